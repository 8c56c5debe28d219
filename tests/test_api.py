"""The API against a real uvicorn serving a real tiny package: endpoints, bad input, auth, hot swap, metrics."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from api_fixtures import ADMIN_TOKEN, REPO, Server, free_port, server_env
from gcodefp_core import package as pkg

pytestmark = pytest.mark.slow


def raw_window(package_meta, seed=0):
    """A plausible raw window: training mean + noise, categorical codes the model has seen."""
    f = package_meta["features"]
    rng = np.random.default_rng(seed)
    w = package_meta["window"]
    cont = np.asarray(f["mean"]) + rng.normal(0, 1, (w, len(f["mean"]))) * np.asarray(f["std"])
    cat = [[int(float(sorted(f["categorical_maps"][c], key=f["categorical_maps"][c].get)[0]))
            for c in f["categorical"]] for _ in range(w)]
    return cont.round(4), cat


def expected(predictor, cont, cat, **kw):
    c, k = predictor.features.transform_arrays(np.asarray(cont, dtype=float), np.asarray(cat, dtype=object))
    return predictor.predict(c[None], k[None], **kw)[0]


# ---- read-only endpoints -------------------------------------------------------------------------
def test_welcome_health_ready_info(http, package_meta):
    assert http.get("/").json()["links"]["predict"] == "/predict"
    assert http.get("/health").json() == {"status": "ok"}
    assert "/predict" in http.get("/openapi.json").json()["paths"]
    assert http.get("/ready").json()["ready"] is True
    info = http.get("/info").json()
    assert info["features"]["continuous"] == package_meta["features"]["continuous"]
    assert info["features"]["categorical"] == package_meta["features"]["categorical"]
    assert info["window"] == package_meta["window"] and info["variant"] == "fp32"
    assert info["vocab_size"] == package_meta["tokenizer"]["vocab_size"] and info["embedding_dim"] > 0
    assert info["metrics"] == {"test_line_accuracy": 0.123} or info["version"] != "v1"
    assert info["runtime"]["torch_imported"] is False  # the serving process never imports torch
    assert info["client_tokens"] is False   # no tokens file: the data endpoints are open


def test_app_module_never_imports_torch():
    code = ("import sys, api.app, api.client, gcodefp_core.runtime, gcodefp_core.package; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---- predictions ---------------------------------------------------------------------------------
def test_predict_matches_the_runtime(http, predictor, package_meta):
    cont, cat = raw_window(package_meta, 1)
    r = http.post("/predict", json={"sensor_data": {"continuous": cont.tolist(), "categorical": cat},
                                    "return_fingerprint": True})
    assert r.status_code == 200, r.text
    body, ref = r.json(), expected(predictor, cont, cat)
    assert body["gcode_sequence"] == ref["gcode"] and body["tokens"] == ref["tokens"]
    assert body["operation"]["name"] == ref["operation"]
    assert body["operation"]["confidence"] == pytest.approx(ref["operation_confidence"], abs=1e-5)
    assert body["line_source"] == ref["line_source"] and body["line_source"] in ("path", "model")
    assert (body["line_confidence"] == 1.0) >= (body["line_source"] == "path")   # a snapped line is certain
    assert np.allclose(body["fingerprint"], ref["fingerprint"], atol=1e-5)
    assert body["inference_time_ms"] > 0 and body["model_version"] in ("v1", "v2")
    assert "fingerprint" not in http.post("/predict", json={"sensor_data": {"continuous": cont.tolist(),
                                                                            "categorical": cat}}).json()


@pytest.mark.parametrize("config", [{"method": "beam", "beam_width": 3}, {"method": "sample", "temperature": 0.7,
                                                                           "seed": 3}, {"max_length": 2}])
def test_predict_inference_configs(http, predictor, package_meta, config):
    cont, cat = raw_window(package_meta, 2)
    r = http.post("/predict", json={"sensor_data": {"continuous": cont.tolist(), "categorical": cat},
                                    "inference_config": config})
    assert r.status_code == 200, r.text
    ref = expected(predictor, cont, cat, **config)
    assert r.json()["tokens"] == ref["tokens"]
    if "max_length" in config:
        assert len(r.json()["tokens"]) <= 2


def test_columns_form_equals_matrix_form_and_fills_missing_boards(http, package_meta):
    f = package_meta["features"]
    cont, cat = raw_window(package_meta, 3)
    cols = {name: cont[:, j].tolist() for j, name in enumerate(f["continuous"])}
    cols.update({name: [row[j] for row in cat] for j, name in enumerate(f["categorical"])})
    matrix = http.post("/predict", json={"sensor_data": {"continuous": cont.tolist(), "categorical": cat}}).json()
    by_name = dict(reversed(list(cols.items())))  # any order
    by_name["t_console"] = ["08:00:00.000"] * len(cont)  # a log column that is not an input: ignored
    r = http.post("/predict", json={"sensor_data": {"columns": by_name}})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == matrix["tokens"] and r.json()["operation"] == matrix["operation"]
    # a board the machine lacks: omitted columns == nulls in the matrix == the training fill
    board = [c for c in f["continuous"] if c.startswith("spindle2.")]
    partial = {k: v for k, v in cols.items() if k not in board}
    nulled = cont.astype(object)
    for c in board:
        nulled[:, f["continuous"].index(c)] = None
    a = http.post("/predict", json={"sensor_data": {"columns": partial}, "return_fingerprint": True}).json()
    b = http.post("/predict", json={"sensor_data": {"continuous": nulled.tolist(), "categorical": cat},
                                    "return_fingerprint": True}).json()
    assert a["tokens"] == b["tokens"] and np.allclose(a["fingerprint"], b["fingerprint"], atol=1e-6)


def test_binary_body_equals_json(http, package_meta):
    cont, cat = raw_window(package_meta, 4)
    js = http.post("/predict", json={"sensor_data": {"continuous": cont.tolist(), "categorical": cat},
                                     "return_fingerprint": True}).json()
    body = np.concatenate([cont, np.asarray(cat, float)], axis=1).astype("<f4").tobytes()
    r = http.post("/predict?return_fingerprint=true", content=body,
                  headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == js["tokens"]
    assert np.allclose(r.json()["fingerprint"], js["fingerprint"], atol=1e-4)  # float32 rounding of raw values


def graph_calls(metrics_text: str) -> dict[str, float]:
    """The model time and windows summed over graph calls (each call once), from /metrics."""
    found = dict(re.findall(r"^gcodefp_graph_call_(seconds|windows)_total ([0-9.e+-]+)$", metrics_text, re.M))
    return {k: float(found.get(k, 0.0)) for k in ("seconds", "windows")}


def test_batch_predict_is_one_batch_equal_to_singles(http, package_meta):
    windows = [raw_window(package_meta, s) for s in range(5)]
    singles = [http.post("/predict", json={"sensor_data": {"continuous": c.tolist(), "categorical": k}}).json()
               for c, k in windows]
    calls_before = graph_calls(http.get("/metrics").text)
    r = http.post("/batch_predict", json={"windows": [{"continuous": c.tolist(), "categorical": k} for c, k in windows]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["batch_size"] == 5
    calls_after = graph_calls(http.get("/metrics").text)   # one graph call of 5 windows, its time counted once
    assert calls_after["windows"] - calls_before["windows"] == 5
    assert 0 < calls_after["seconds"] - calls_before["seconds"] <= body["inference_time_ms"] / 1000 + 1e-6
    assert [p["tokens"] for p in body["predictions"]] == [s["tokens"] for s in singles]
    metrics = http.get("/metrics").text
    assert re.search(r'gcodefp_batch_size_bucket\{endpoint="/batch_predict",le="4.0"\} 0.0', metrics)
    assert re.search(r'gcodefp_batch_size_bucket\{endpoint="/batch_predict",le="8.0"\} [1-9]', metrics)


def test_fingerprint_endpoint(http, package_meta):
    cont, cat = raw_window(package_meta, 5)
    r = http.post("/fingerprint", json={"sensor_data": {"continuous": cont.tolist(), "categorical": cat}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["embedding_dim"] == len(body["fingerprint"]) == http.get("/info").json()["embedding_dim"]
    assert body["norm"] == pytest.approx(1.0, abs=1e-3)  # L2-normalised


# ---- bad input: 422/413 naming the field, never a 500 ---------------------------------------------
def bad_cases(package_meta):
    cont, cat = raw_window(package_meta, 6)
    c, k = cont.tolist(), cat
    w, n_f = len(c), len(c[0])

    def sd(**kw):
        return {"sensor_data": {"continuous": c, "categorical": k} | kw}

    ragged = [row[:-1] if i == 3 else row for i, row in enumerate(c)]
    strings = [[str(v) for v in row] for row in c]
    bools = [[True] * n_f for _ in c]
    first = package_meta["features"]["continuous"][0]
    return [
        ("short window", sd(continuous=c[:-1]), 422, "sensor_data.continuous"),
        ("too few features", sd(continuous=[row[:-1] for row in c]), 422, "sensor_data.continuous"),
        ("ragged rows", sd(continuous=ragged), 422, "sensor_data.continuous"),
        ("strings", sd(continuous=strings), 422, "sensor_data.continuous"),
        ("booleans", sd(continuous=bools), 422, "sensor_data.continuous"),
        ("object in a cell", sd(continuous=[[{}] * n_f] + c[1:]), 422, "sensor_data.continuous[0][0]"),
        ("categorical shape", sd(categorical=k[:3]), 422, "sensor_data.categorical"),
        ("missing categorical", {"sensor_data": {"continuous": c}}, 422, "sensor_data.categorical"),
        ("missing sensor_data", {"return_fingerprint": True}, 422, "sensor_data"),
        ("sensor_data not an object", {"sensor_data": [1, 2]}, 422, "sensor_data"),
        ("unknown top-level field", sd() | {"return_fingerprints": True}, 422, "return_fingerprints"),
        ("wrong type return_fingerprint", sd() | {"return_fingerprint": "yes"}, 422, "return_fingerprint"),
        ("bad method", sd() | {"inference_config": {"method": "nucleus"}}, 422, "inference_config.method"),
        ("beam width 0", sd() | {"inference_config": {"beam_width": 0}}, 422, "inference_config.beam_width"),
        ("max_length too big", sd() | {"inference_config": {"max_length": 10_000}}, 422, "inference_config.max_length"),
        ("negative temperature", sd() | {"inference_config": {"temperature": -1}}, 422,
         "inference_config.temperature"),
        ("unknown config", sd() | {"inference_config": {"top_k": 3}}, 422, "inference_config.top_k"),
        ("unknown column", {"sensor_data": {"columns": {"spindel": [0.0] * w}}}, 422, "sensor_data.columns.spindel"),
        ("missing required column", {"sensor_data": {"columns": {"frame_b1.Ax": [0.0] * w}}}, 422,
         "sensor_data.columns."),
        ("column too short", {"sensor_data": {"columns": {first: [0.0] * (w - 1)}}}, 422, "sensor_data.columns."),
        ("columns and matrix", {"sensor_data": {"columns": {first: [0.0] * w}, "continuous": c}}, 422,
         "sensor_data.continuous"),
    ]


def test_bad_json_inputs(http, package_meta):
    for name, doc, status, field in bad_cases(package_meta):
        r = http.post("/predict", json=doc)
        assert r.status_code == status, (name, r.status_code, r.text)
        body = r.json()
        assert body["error"].startswith(field), (name, body)
        assert "Traceback" not in r.text


@pytest.mark.parametrize("raw, field", [
    (b'{"sensor_data": {"continuous": [[NaN]]}}', "body"),         # NaN is not JSON
    (b'{"sensor_data": {"continuous": [[Infinity]]}}', "body"),
    (b'{"sensor_data": {"continuous": [[1e999]]}}', "body"),         # overflows to infinity
    (b'{"sensor_data": ', "body"),
    (b'[1, 2, 3]', "body"),
    (b'', "body"),
])
def test_malformed_json(http, raw, field):
    r = http.post("/predict", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"].startswith(field), r.text


def test_bad_binary_and_limits(http, package_meta):
    cont, cat = raw_window(package_meta, 7)
    win = np.concatenate([cont, np.asarray(cat, float)], axis=1).astype("<f4")
    octet = {"content-type": "application/octet-stream"}
    nan = win.copy()
    nan[2, 5] = np.nan
    r = http.post("/predict", content=nan.tobytes(), headers=octet)
    assert r.status_code == 422 and r.json()["error"].startswith("body[0][2][5]"), r.text
    r = http.post("/predict", content=win.tobytes()[:-4], headers=octet)
    assert r.status_code == 422 and "whole number of windows" in r.json()["error"]
    r = http.post("/predict", content=win.tobytes() * 2, headers=octet)
    assert r.status_code == 422 and "/batch_predict" in r.json()["error"]
    r = http.post("/predict?method=beam&beam_width=x", content=win.tobytes(), headers=octet)
    assert r.status_code == 422 and r.json()["error"].startswith("query.beam_width")
    r = http.post("/batch_predict", content=win.tobytes() * 9, headers=octet)  # GCODEFP_MAX_BATCH=8 here
    assert r.status_code == 413 and r.json()["error"].startswith("body")
    sd = {"continuous": cont.tolist(), "categorical": cat}
    r = http.post("/batch_predict", json={"windows": [sd] * 9})
    assert r.status_code == 413 and r.json()["error"].startswith("windows")
    r = http.post("/batch_predict", json={"windows": [sd, {"continuous": [[1.0]]}]})
    assert r.status_code == 422 and r.json()["error"].startswith("windows[1].continuous")
    r = http.post("/predict", content=b"x" * 1_000_001, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"].startswith("body")  # GCODEFP_MAX_BODY_BYTES=1e6 here


# ---- admin, swap, logs, metrics ---------------------------------------------------------------------
def test_admin_reload_auth_and_refusal(http, api_server, sample_request):
    assert http.post("/admin/reload").status_code == 401
    assert http.post("/admin/reload", headers={"authorization": "Bearer wrong"}).status_code == 403
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    r = http.post("/admin/reload", json={"version": "v2"}, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == "v2" and pkg.current_version(api_server.registry) == "v2"
    assert http.post("/predict", json=sample_request).json()["model_version"] == "v2"
    r = http.post("/admin/reload", json={"version": "broken"}, headers=auth)
    assert r.status_code == 409 and "model.decoder.onnx" in r.json()["error"] and r.json()["serving"] == "v2"
    assert pkg.current_version(api_server.registry) == "v2"  # a refused package is never promoted
    assert http.post("/predict", json=sample_request).status_code == 200
    r = http.post("/admin/reload", json={"version": 5}, headers=auth)
    assert r.status_code == 422 and r.json()["error"].startswith("version")
    r = http.post("/admin/reload", headers=auth)  # the current package again
    assert r.status_code == 200 and r.json()["version"] == "v2"
    failed = [rec for rec in api_server.log_records() if rec.get("event") == "load_failed"]
    assert failed and "model.decoder.onnx" in failed[-1]["error"]
    metrics = http.get("/metrics").text
    assert re.search(r"gcodefp_model_load_failures_total [1-9]", metrics)
    assert 'gcodefp_model_info{variant="fp32",version="v2"} 1.0' in metrics


def test_watcher_follows_promotions(http, api_server, sample_request):
    pkg.promote(api_server.registry, "v1")
    deadline = time.monotonic() + 10
    while http.post("/predict", json=sample_request).json()["model_version"] != "v1":
        assert time.monotonic() < deadline, "server did not follow the promotion"
        time.sleep(0.1)
    assert http.get("/ready").json()["version"] == "v1"


def test_request_ids_and_json_logs(http, api_server, sample_request):
    r = http.post("/predict", json=sample_request, headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(http.get("/info").headers["x-request-id"]) == 32  # generated when absent
    time.sleep(0.2)
    lines = [ln for ln in api_server.log_text().splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines if ln.startswith("{")]
    assert len(records) >= 0.9 * len(lines)  # structured, one object per line
    mine = [rec for rec in records if rec.get("request_id") == "abc-123"]
    assert mine and mine[0]["path"] == "/predict" and mine[0]["status"] == 200 and mine[0]["duration_ms"] > 0


def test_metrics_content(http):
    http.post("/predict", json={"sensor_data": {}})
    text = http.get("/metrics").text
    for pattern in [r'gcodefp_http_requests_total\{endpoint="/predict",method="POST",status="200"\} [1-9]',
                    r'gcodefp_http_requests_total\{endpoint="/predict",method="POST",status="422"\} [1-9]',
                    r'gcodefp_http_request_duration_seconds_bucket\{endpoint="/predict",le="0.01",status="200"\}',
                    r'gcodefp_inference_duration_seconds_count\{endpoint="/predict",variant="fp32"\} [1-9]',
                    r'gcodefp_parse_duration_seconds_count\{format="binary"\} [1-9]',
                    r'gcodefp_http_requests_in_flight 1.0',  # the scrape itself
                    r'gcodefp_model_reloads_total\{result="success",trigger="startup"\} 1.0']:
        assert re.search(pattern, text), pattern
    assert "_created" not in text


# ---- several workers: shared metrics, hot swap under load --------------------------------------------
def test_multiworker_swap_under_load_and_shared_metrics(api_registry, tmp_path, sample_request):
    reg = tmp_path / "registry"
    shutil.copytree(api_registry, reg)
    port = free_port()
    cmd = [sys.executable, "-m", "gcodefp_core.cli", "serve", "--registry", str(reg), "--workers", "2",
           "--port", str(port), "--poll-seconds", "0.2"]
    server = Server(cmd, server_env(), tmp_path / "multi.log", port)  # no admin token: reload is off
    try:
        server.wait_ready()
        assert httpx.post(f"{server.url}/admin/reload").status_code == 404
        outcomes, versions, stop = [], [], threading.Event()  # list.append is atomic across threads
        body = json.dumps(sample_request).encode()

        def hammer():
            with httpx.Client(base_url=server.url, timeout=10) as c:
                while not stop.is_set():
                    try:
                        r = c.post("/predict", content=body, headers={"content-type": "application/json"})
                        outcomes.append(r.status_code)
                        if r.status_code == 200:
                            versions.append(r.json()["model_version"])
                    except httpx.HTTPError as exc:
                        outcomes.append(repr(exc))

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        pkg.promote(reg, "v2")
        time.sleep(2.0)
        (reg / "CURRENT").write_text("broken\n")  # bypassing promote() (which refuses it): workers must too
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join(timeout=20)
        assert [o for o in outcomes if o != 200] == [] and len(outcomes) > 50
        assert "v1" in versions[:50] and set(versions[-30:]) == {"v2"}
        metrics = httpx.get(f"{server.url}/metrics").text
        served = sum(float(v) for v in re.findall(
            r'gcodefp_http_requests_total\{endpoint="/predict",method="POST",status="200"\} (\S+)', metrics))
        assert served == len(outcomes)  # summed over both workers (multiprocess mode)
        infos = re.findall(r'gcodefp_model_info\{pid="(\d+)",variant="fp32",version="v2"\} 1.0', metrics)
        assert len(set(infos)) == 2  # both workers swapped
        failures_metric = float(re.search(r"^gcodefp_model_load_failures_total (\S+)$", metrics, re.M).group(1))
        assert failures_metric == 2  # each worker refused the broken package once, and kept serving v2
    finally:
        server.stop()


def test_the_server_keeps_numpys_blas_to_one_thread():
    """Small matrix products per request: BLAS threads would only spin on cores the workers use."""
    from threadpoolctl import threadpool_info

    import api  # noqa: F401

    blas = [p for p in threadpool_info() if p["user_api"] == "blas"]
    assert blas and all(p["num_threads"] == 1 for p in blas)
