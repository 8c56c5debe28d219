"""The direct path of the hot endpoints (api/direct_routes.py) answers exactly as the framework's routing.

Two real uvicorn servers on one registry: the default (direct) and GCODEFP_DIRECT_ROUTES=0 (every
request routed by FastAPI). The same requests, good and bad, go to both; status, content type and
body must be equal (the model's timing aside), and both count and log the request the same way.
"""
from __future__ import annotations

import re

import httpx
import numpy as np
import pytest

from api_fixtures import start_uvicorn
from test_api import bad_cases, raw_window
from test_stream_api import matrix, run_rows  # noqa: F401  (run_rows: a fixture)

LIMITS = {"GCODEFP_MAX_BATCH": 8, "GCODEFP_MAX_BODY_BYTES": 1_000_000}


@pytest.fixture(scope="module")
def servers(api_registry, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("direct_routes")
    started = []
    try:
        for direct in (1, 0):
            started.append(start_uvicorn(tmp, GCODEFP_REGISTRY=api_registry, GCODEFP_DIRECT_ROUTES=direct, **LIMITS))
        clients = [httpx.Client(base_url=s.url, timeout=60) for s in started]
        yield started, clients
        for c in clients:
            c.close()
    finally:
        for s in started:
            s.stop()


def comparable(r: httpx.Response):
    """What must be equal between the two paths: timings, clocks and the request id differ by nature."""
    try:
        body = r.json()
    except ValueError:
        body = r.text
    if isinstance(body, dict):
        for key in ("inference_time_ms", "started_at", "last_used"):
            body.pop(key, None)
    return r.status_code, r.headers.get("content-type"), r.headers.get("allow"), body


def requests(package_meta, cont, cat):
    """(method, path, keyword arguments of httpx) of every case compared."""
    c, k = raw_window(package_meta, 3)
    sd = {"continuous": c.tolist(), "categorical": k}
    octet = {"content-type": "application/octet-stream"}
    binary = np.concatenate([c, np.asarray(k, float)], axis=1).astype("<f4").tobytes()
    yield "POST", "/predict", {"json": {"sensor_data": sd, "return_fingerprint": True}}
    yield "POST", "/predict", {"json": {"sensor_data": sd, "inference_config": {"method": "beam", "beam_width": 2}}}
    yield "POST", "/predict?return_fingerprint=true", {"content": binary, "headers": octet}
    yield "POST", "/predict?beam_width=x", {"content": binary, "headers": octet}
    yield "POST", "/predict", {"content": binary[:-4], "headers": octet}
    yield "POST", "/batch_predict", {"json": {"windows": [sd, sd]}}
    yield "POST", "/batch_predict", {"json": {"windows": [sd] * 9}}
    yield "POST", "/fingerprint", {"json": {"sensor_data": sd}}
    yield "POST", "/fingerprint", {"json": {"sensor_data": sd, "return_fingerprint": True}}
    for _, doc, _, _ in bad_cases(package_meta):
        yield "POST", "/predict", {"json": doc}
    for raw in (b"", b"[1]", b'{"sensor_data": ', b'{"sensor_data": {"continuous": [[NaN]]}}'):
        yield "POST", "/predict", {"content": raw, "headers": {"content-type": "application/json"}}
    yield "POST", "/predict", {"content": b"x" * 1_000_001, "headers": {"content-type": "application/json"}}
    # a machine followed over three chunks, then bad chunks, odd machine ids, and the routes around them
    yield "POST", "/stream/mill-7", {"json": {"sensor_data": matrix(cont, cat, 0, 40), "start": True, "every": 1}}
    yield "POST", "/stream/mill-7", {"json": {"sensor_data": matrix(cont, cat, 40, 44)}}
    yield "POST", "/stream/mill-7", {"json": {"sensor_data": matrix(cont, cat, 44, 90), "every": 8}}
    yield "POST", "/stream/mill-7", {"json": {"sensor_data": matrix(cont, cat, 90, 94), "every": 0}}
    yield "POST", "/stream/mill-7", {"json": {"sensor_data": matrix(cont, cat, 90, 94), "start": "yes"}}
    yield "POST", "/stream/mill-7", {"json": {"rows": []}}
    yield "POST", "/stream/mill-7", {"content": b"{", "headers": {"content-type": "application/json"}}
    yield "GET", "/stream/mill-7", {}
    yield "POST", "/stream/bad id!", {"json": {"sensor_data": matrix(cont, cat, 0, 4)}}
    yield "POST", "/stream/" + "m" * 300, {"json": {"sensor_data": matrix(cont, cat, 0, 4)}}
    yield "POST", "/stream/", {"json": {"sensor_data": matrix(cont, cat, 0, 4)}}
    yield "DELETE", "/stream/mill-7", {}
    yield "GET", "/stream/mill-7", {}
    yield "GET", "/predict", {}
    yield "POST", "/predict/", {"json": {"sensor_data": sd}}
    yield "POST", "/nowhere", {"json": {}}


@pytest.mark.slow
def test_direct_and_routed_answers_are_equal(servers, package_meta, run_rows):  # noqa: F811
    (direct, routed), (a, b) = servers
    cont, cat = run_rows
    statuses = []
    for method, path, kw in requests(package_meta, cont, cat):
        ra, rb = a.request(method, path, follow_redirects=False, **kw), b.request(method, path, follow_redirects=False,
                                                                                     **kw)
        assert comparable(ra) == comparable(rb), (method, path, ra.text[:300], rb.text[:300])
        assert ra.status_code < 500 and "Traceback" not in ra.text, (method, path, ra.text[:300])
        assert ra.headers.get("x-request-id") and rb.headers.get("x-request-id")
        statuses.append(ra.status_code)
    assert {200, 404, 405, 413, 422} <= set(statuses) and len(statuses) > 40  # the cases reach every kind of answer
    # both paths count the requests under the same bounded labels, the stream under one label for all machines
    for client in (a, b):
        text = client.get("/metrics").text
        assert re.search(r'gcodefp_http_requests_total\{endpoint="/stream/\{machine_id\}",method="POST",status="200"\} '
                         r'[1-9]', text)
        assert re.search(r'gcodefp_http_requests_total\{endpoint="/predict",method="POST",status="422"\} [1-9]', text)
        assert not re.search(r'endpoint="/stream/mill-7"', text)


@pytest.mark.parametrize("method,path,root_path,direct", [
    ("POST", "/predict", "", True), ("POST", "/batch_predict", "", True), ("POST", "/fingerprint", "", True),
    ("POST", "/stream/mill-7", "", True), ("POST", "/stream/hall/a/mill 7", "", True),
    ("POST", "/stream/", "", False), ("GET", "/stream/mill-7", "", False), ("GET", "/predict", "", False),
    ("POST", "/predict/", "", False), ("POST", "/v2/models/gcodefp/infer", "", False), ("POST", "/predict", "/api", False),
])
def test_only_the_hot_posts_take_the_direct_path(method, path, root_path, direct):
    from api import direct_routes

    handler = direct_routes.route({"type": "http", "method": method, "path": path, "root_path": root_path})
    assert (handler is not None) == direct
