"""Streaming endpoints (/stream/{machine_id}) against the real uvicorn server serving the tiny package,
the client's stream methods, and the session registry (eviction, bad first requests, 409) directly."""
from __future__ import annotations

import asyncio
import copy
import re
import threading
import time

import numpy as np
import pytest

from api import streams
from api.client import APINotFoundError, APIValidationError, GCodeAPIClient
from api.inputs import InputError
from api.model_store import LoadedModel
from api_fixtures import ADMIN_TOKEN, tracked_windows
from gcodefp_core.synthetic import generate_run

pytestmark = pytest.mark.slow
N_ROWS = 130  # rows of the synthetic run used: about 4 windows of 32 rows


@pytest.fixture(scope="module")
def run_rows(package_meta):
    """The first N_ROWS raw rows of a synthetic run the model never saw (another run index, seed and
    machine), in feature order: continuous [n, F] (NaN: a board this run lacks), categorical [n, C]."""
    f = package_meta["features"]
    frame = generate_run("pocket", run_index=7, seed=11, machine_id=3).iloc[:N_ROWS]
    cont = np.stack([frame[c].to_numpy(float) if c in frame else np.full(len(frame), np.nan)
                     for c in f["continuous"]], axis=1)
    cat = np.stack([frame[c].to_numpy() for c in f["categorical"]], axis=1).astype(float)
    assert np.isnan(cont).any() and not np.isnan(cont).all(axis=0).all()  # some boards absent, others present
    return cont, cat


def matrix(cont, cat, lo=0, hi=None) -> dict:
    """sensor_data in the matrix form (NaN -> null)."""
    c = cont[lo:hi].astype(object)
    c[np.isnan(cont[lo:hi])] = None
    return {"continuous": c.tolist(), "categorical": cat[lo:hi].tolist()}


def columns(package_meta, cont, cat, lo=0, hi=None) -> dict:
    """sensor_data in the columns form; the boards the run lacks are left out."""
    f = package_meta["features"]
    cols = {n: cont[lo:hi, j].tolist() for j, n in enumerate(f["continuous"]) if not np.isnan(cont[:, j]).all()}
    cols |= {n: cat[lo:hi, j].tolist() for j, n in enumerate(f["categorical"])}
    return {"columns": cols}


def post(http, machine_id, sensor_data, start=False, status=200) -> dict:
    r = http.post(f"/stream/{machine_id}", json={"sensor_data": sensor_data, "start": start, "every": 1})
    assert r.status_code == status, r.text
    return r.json()


def reference(predictor, cont, cat):
    """What streaming must give for rows posted from a program's start (start=true)."""
    out, steps, _ = tracked_windows(predictor, cont, cat, at_program_start=True)
    return out, steps


def same_prediction(a: dict, b: dict) -> None:
    assert a["row"] == b["row"] and a["gcode_sequence"] == b["gcode_sequence"]
    assert a["line_source"] == b["line_source"] and a["operation"]["name"] == b["operation"]["name"]
    assert a["operation"]["confidence"] == pytest.approx(b["operation"]["confidence"], abs=1e-5)
    assert a["line_confidence"] == pytest.approx(b["line_confidence"], abs=1e-5)
    assert a["window"]["operation"]["name"] == b["window"]["operation"]["name"]
    assert a["window"]["gcode_sequence"] == b["window"]["gcode_sequence"]


# ---- streaming ------------------------------------------------------------------------------------------
def test_chunked_stream_equals_one_post_and_the_runtime(http, predictor, package_meta, run_rows):
    cont, cat = run_rows
    w = package_meta["window"]
    sizes = [5, w, 17, 1, 2 * w + 3]
    sizes.append(N_ROWS - sum(sizes))
    assert sizes[-1] > 0
    chunked, lo = [], 0
    for i, n in enumerate(sizes):
        # one chunk in the columns form: the two forms may be mixed within a stream
        sd = columns(package_meta, cont, cat, lo, lo + n) if i == 2 else matrix(cont, cat, lo, lo + n)
        body = post(http, "mill-chunks", sd, start=i == 0)
        lo += n
        assert body["machine_id"] == "mill-chunks" and body["rows_since_start"] == lo
        assert body["windows"] == lo and body["started"] is (i == 0) and body["model_changed"] is False
        assert body["mode"] == "tracker" and [p["row"] for p in body["predictions"]] == list(range(lo - n, lo))
        assert body["model_version"] in ("v1", "v2") and body["inference_time_ms"] >= 0
        chunked += body["predictions"]
    assert [p["row"] for p in chunked] == list(range(N_ROWS))  # one per row from the first on

    whole = post(http, "mill-whole", matrix(cont, cat), start=True)
    assert whole["windows"] == N_ROWS and len(whole["predictions"]) == len(chunked)
    for a, b in zip(chunked, whole["predictions"]):  # streaming does not depend on chunking
        same_prediction(a, b)

    out, steps = reference(predictor, cont, cat)
    z = np.exp(out["op_logits"] - out["op_logits"].max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    for j, p in enumerate(chunked):
        # the per-window part is the window model's own answer on the same normalised window
        assert p["window"]["gcode_sequence"] == predictor.lines[int(out["line"][j])]
        assert p["window"]["operation"]["name"] == predictor.operations[int(probs[j].argmax())]
        assert p["window"]["operation"]["confidence"] == pytest.approx(float(probs[j].max()), abs=1e-5)
        # the streamed part is the program tracker's answer after this row
        s = steps[j]
        assert p["gcode_sequence"] == predictor.lines[s.line] and p["line_source"] == s.line_source
        assert p["program_offset"] == s.offset and p["paused"] == pytest.approx(s.paused, abs=1e-5)
        assert p["evidence_weight"] == pytest.approx(min(j + 1, w) / w, abs=1e-4)
        assert p["operation"]["name"] == predictor.operations[s.operation]
        assert p["operation"]["confidence"] == pytest.approx(s.operation_confidence, abs=1e-5)
        assert p["line_confidence"] == pytest.approx(s.line_confidence, abs=1e-5)


def test_start_resets_and_state_get_delete(http, package_meta, run_rows):
    cont, cat = run_rows
    w = package_meta["window"]
    assert http.get("/stream/mill-never").status_code == 404
    t0 = time.time()
    first = post(http, "mill-state", matrix(cont, cat, 0, 40), start=True)
    state = http.get("/stream/mill-state").json()
    assert state["machine_id"] == "mill-state" and state["rows_since_start"] == 40 and state["windows"] == 40
    assert state["operation"] == first["predictions"][-1]["operation"]
    assert state["model_version"] == first["model_version"]
    assert state["clock"] is bool(package_meta.get("program_clock")) and t0 - 1 <= state["started_at"] <= time.time()
    again = post(http, "mill-state", matrix(cont, cat, 0, 10), start=True)  # a new program run
    assert again["rows_since_start"] == 10 and again["windows"] == 10 and len(again["predictions"]) == 10
    assert again["started"] is True
    more = post(http, "mill-state", matrix(cont, cat, 10, 40))
    assert more["rows_since_start"] == 40 and [p["row"] for p in more["predictions"]] == list(range(10, 40))
    restarted = http.get("/stream/mill-state").json()
    assert restarted["started_at"] >= state["started_at"] and restarted["windows"] == 40
    r = http.delete("/stream/mill-state")
    assert r.status_code == 200 and r.json() == {"machine_id": "mill-state", "ended": True, "rows_since_start": 40,
                                                 "windows": 40}
    for r in (http.get("/stream/mill-state"), http.delete("/stream/mill-state")):
        assert r.status_code == 404 and r.json()["error"].startswith("machine_id")
        assert r.json()["detail"][0]["loc"] == ["path", "machine_id"]
    # an unknown machine without start: a new run begins all the same
    body = post(http, "mill-state", matrix(cont, cat, 0, 3))
    assert body["started"] is True and body["rows_since_start"] == 3
    http.delete("/stream/mill-state")


def test_concurrent_chunks_of_one_machine_apply_one_at_a_time(http, package_meta, run_rows):
    cont, cat = run_rows
    w = package_meta["window"]
    post(http, "mill-busy", matrix(cont, cat, 0, 10), start=True)
    results, errors = [], []

    def send(lo):  # 20 rows each: above the inline limit, so inference runs in a thread (awaited under the lock)
        try:
            results.append(post(http, "mill-busy", matrix(cont, cat, lo, lo + 20)))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(lo,)) for lo in range(10, 130, 20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 6
    assert sorted(r["rows_since_start"] for r in results) == list(range(30, 131, 20))  # each saw the one before
    rows = sorted(p["row"] for r in results for p in r["predictions"])
    assert rows == list(range(10, N_ROWS))  # no window twice, none lost


def test_a_model_swap_keeps_the_row_count_and_restarts_the_evidence(http, package_meta, run_rows):
    cont, cat = run_rows
    w = package_meta["window"]
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    serving = http.get("/ready").json()["version"]
    other = "v2" if serving == "v1" else "v1"
    post(http, "mill-swap", matrix(cont, cat, 0, 40), start=True)
    try:
        assert http.post("/admin/reload", json={"version": other}, headers=auth).status_code == 200
        body = post(http, "mill-swap", matrix(cont, cat, 40, 60))
        assert body["model_changed"] is True and body["model_version"] == other and body["started"] is False
        # the evidence starts over: the tracker from anywhere, on windows padded until W new rows arrive
        assert body["rows_since_start"] == 60 and body["windows"] == 20 and len(body["predictions"]) == 20
        assert body["predictions"][0]["evidence_weight"] == pytest.approx(1 / w, abs=1e-4)
        body = post(http, "mill-swap", matrix(cont, cat, 60, 80))
        assert body["model_changed"] is False and body["rows_since_start"] == 80
        # the rows still count from the session's start
        assert [p["row"] for p in body["predictions"]] == list(range(60, 80))
        assert http.get("/stream/mill-swap").json()["model_version"] == other
    finally:
        assert http.post("/admin/reload", json={"version": serving}, headers=auth).status_code == 200


def test_bad_stream_input_names_the_field(http, package_meta, run_rows):
    cont, cat = run_rows
    sd = matrix(cont, cat, 0, 6)
    first = package_meta["features"]["continuous"][0]
    ragged = [row if i != 2 else row[:-1] for i, row in enumerate(sd["continuous"])]
    cases = [
        ("bad id", "bad id!", {"sensor_data": sd}, 422, "machine_id"),
        ("id too long", "m" * 65, {"sensor_data": sd}, 422, "machine_id"),
        ("id with a slash", "a/b", {"sensor_data": sd}, 422, "machine_id"),
        ("ragged rows", "mill-bad", {"sensor_data": sd | {"continuous": ragged}}, 422, "sensor_data.continuous"),
        ("zero rows", "mill-bad", {"sensor_data": {"continuous": [], "categorical": []}}, 422,
         "sensor_data.continuous"),
        ("zero rows, columns", "mill-bad", {"sensor_data": {"columns": {first: []}}}, 422, "sensor_data.columns"),
        ("unknown column", "mill-bad", {"sensor_data": {"columns": {"spindel": [0.0] * 6}}}, 422,
         "sensor_data.columns.spindel"),
        ("categorical rows", "mill-bad", {"sensor_data": sd | {"categorical": sd["categorical"][:5]}}, 422,
         "sensor_data.categorical"),
        ("too many rows", "mill-bad", {"sensor_data": {"columns": {first: [0.0] * 4097}}}, 413,
         "sensor_data.columns"),
        ("start not a bool", "mill-bad", {"sensor_data": sd, "start": "yes"}, 422, "start"),
        ("missing sensor_data", "mill-bad", {"start": True}, 422, "sensor_data"),
        ("unknown field", "mill-bad", {"sensor_data": sd, "method": "beam"}, 422, "method"),
    ]
    for name, mid, doc, status, field in cases:
        r = http.post(f"/stream/{mid}", json=doc)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.json()["error"].startswith(field), (name, r.json())
    r = http.post("/stream/bad id!", json={"sensor_data": sd})
    assert r.json()["detail"][0]["loc"] == ["path", "machine_id"]
    assert http.get("/stream/mill-bad").status_code == 404  # bad first requests hold no session


def test_stream_links_and_metrics(http, package_meta, run_rows):
    cont, cat = run_rows
    post(http, "mill-metrics", matrix(cont, cat, 0, package_meta["window"]), start=True)
    assert http.get("/").json()["links"]["stream"] == "/stream/MACHINE_ID"
    assert "/stream/{machine_id}" in http.get("/openapi.json").json()["paths"]
    limits = http.get("/info").json()["limits"]
    assert limits["max_stream_rows"] == 4096 and limits["max_streams"] == 1000
    text = http.get("/metrics").text
    requests = r'gcodefp_http_requests_total\{endpoint="/stream/\{machine_id\}",method="POST",'
    for pattern in [r"^gcodefp_stream_sessions [1-9]",
                    r'gcodefp_inference_duration_seconds_count\{endpoint="/stream",variant="fp32"\} [1-9]',
                    requests + r'status="200"\} [1-9]', requests + r'status="422"\} [1-9]']:
        assert re.search(pattern, text, re.M), pattern
    assert "mill-metrics" not in text  # machine ids never become label values


def test_client_stream_methods(api_server, package_meta, run_rows):
    cont, cat = run_rows
    w = package_meta["window"]
    with GCodeAPIClient(api_server.url, timeout=60) as api:
        r = api.stream("mill-client", cont[:w], cat[:w], start=True)  # numpy, NaN for absent boards
        # the server's default: the chunk's last row and every 4th before it
        assert r["rows_since_start"] == w and [p["row"] for p in r["predictions"]] == list(range(3, w, 4))
        r = api.stream("mill-client", columns=columns(package_meta, cont, cat, w, w + 3)["columns"], every=1)
        assert r["rows_since_start"] == w + 3 and [p["row"] for p in r["predictions"]] == [w, w + 1, w + 2]
        state = api.stream_state("mill-client")
        assert state["windows"] == w // 4 + 3 and state["operation"] == r["predictions"][-1]["operation"]
        assert api.end_stream("mill-client")["ended"] is True
        with pytest.raises(APINotFoundError) as err:
            api.stream_state("mill-client")
        assert err.value.status == 404
        with pytest.raises(APIValidationError, match="machine_id"):
            api.stream("a/b", cont[:2], cat[:2])
        with pytest.raises(APIValidationError, match="sensor_data.continuous"):
            api.stream("mill-client", cont[:0], cat[:0])


# ---- the registry itself (no server) ------------------------------------------------------------------
def feed(registry, model, machine_id, cont, cat, start=False) -> dict:
    """What POST /stream/{machine_id} does with parsed rows."""
    async def run(wc, wk):
        return streams.predict(model, wc, wk), 0.0

    async def go():
        session = registry.acquire(machine_id)
        try:
            async with session.lock:
                return await streams.post_rows(session, model, cont, cat, start, run)
        finally:
            registry.release(session)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def loaded(predictor, api_registry):
    return LoadedModel(predictor, "v1", predictor.variant, api_registry / "packages" / "v1", {}, 0.0)


def test_registry_evicts_the_least_recently_used_idle_session(loaded, run_rows):
    cont, cat = run_rows
    reg = streams.StreamRegistry(max_streams=2)
    feed(reg, loaded, "a", cont[:5], cat[:5], start=True)
    feed(reg, loaded, "b", cont[:5], cat[:5], start=True)
    feed(reg, loaded, "a", cont[5:7], cat[5:7])  # a is now the most recently used
    feed(reg, loaded, "c", cont[:5], cat[:5], start=True)
    assert len(reg) == 2 and reg.get("b") is None and reg.get("a").rows_since_start == 7 and reg.get("c")
    busy = reg.acquire("c")  # a request holds c: never evicted, even as the least recently used
    feed(reg, loaded, "a", cont[7:8], cat[7:8])
    feed(reg, loaded, "d", cont[:5], cat[:5], start=True)
    assert reg.get("a") is None and reg.get("c") is busy and reg.get("d")
    reg.release(busy)
    assert feed(reg, loaded, "b", cont[:1], cat[:1])["started"] is True  # an evicted machine starts over


def test_a_failed_first_request_holds_no_session_but_a_started_one_stays(loaded, run_rows):
    cont, cat = run_rows
    reg = streams.StreamRegistry(max_streams=4)
    s = reg.acquire("new")
    reg.release(s)  # its request failed before any row was applied
    assert len(reg) == 0 and reg.get("new") is None
    feed(reg, loaded, "kept", cont[:3], cat[:3], start=True)
    reg.release(reg.acquire("kept"))
    kept = reg.get("kept")
    assert kept.rows_since_start == 3
    reg.end(kept)
    assert len(reg) == 0 and reg.get("kept") is None


def test_a_model_without_a_line_head_is_refused_with_409(loaded):
    p = copy.copy(loaded.predictor)
    p.sessions = {k: v for k, v in p.sessions.items() if k != "predict"}
    with pytest.raises(InputError) as err:
        streams.require_line_head(LoadedModel(p, "old", "fp32", loaded.path, {}, 0.0))
    assert err.value.status == 409 and err.value.field == "model" and "line head" in err.value.message
    with pytest.raises(InputError, match="machine_id"):
        streams.check_machine_id("")


def test_a_machine_idle_past_the_limit_is_forgotten_and_starts_afresh(loaded, run_rows, monkeypatch):
    cont, cat = run_rows
    clock = [1000.0]
    monkeypatch.setattr(streams.time, "time", lambda: clock[0])
    reg = streams.StreamRegistry(max_streams=10, idle_s=600)
    feed(reg, loaded, "quiet", cont[:5], cat[:5], start=True)
    clock[0] += 300
    feed(reg, loaded, "busy", cont[:5], cat[:5], start=True)
    clock[0] += 301   # quiet: 601 s without a chunk; busy: 301
    held = reg.acquire("busy")
    assert reg.get("quiet") is None and reg.get("busy") is held and len(reg) == 1
    reg.release(held)
    assert feed(reg, loaded, "quiet", cont[5:8], cat[5:8])["started"] is True
    never = streams.StreamRegistry(max_streams=10, idle_s=0)
    feed(never, loaded, "kept", cont[:5], cat[:5], start=True)
    clock[0] += 10 ** 6
    never.release(never.acquire("other"))
    assert never.get("kept") is not None
