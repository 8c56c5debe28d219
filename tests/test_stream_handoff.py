"""api/stream_handoff.py: with several workers, a followed machine whose monitor reconnects to another
worker is handed over with its state, not started again, and no worker keeps a stale copy."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from api_fixtures import Server, free_port, server_env
from test_stream_tracker import body, copy_export, matches, tracked_reference

from api import stream_handoff, streams
from gcodefp_core import package as pkg
from gcodefp_core.runtime import OnnxPredictor
from gcodefp_core.synthetic import generate_run

CHUNK = 4


@pytest.fixture(scope="module")
def served(tiny_export, tmp_path_factory):
    """`gcodefp serve --workers 2` on the tiny model with its tracker (the window's own line never
    preferred, so every answer is the tracker's and carries its whole state)."""
    tmp = tmp_path_factory.mktemp("handoff")

    def tracker_only(meta):
        meta["program_tracker"]["params"] |= {"window_weight": 0.0, "window_weight_start": 0.0}

    pkg.build_package(copy_export(tiny_export, tmp / "tracked", tracker_only), tmp / "reg", version="tracked")
    pkg.promote(tmp / "reg", "tracked")
    port = free_port()
    cmd = [sys.executable, "-m", "gcodefp_core.cli", "serve", "--registry", str(tmp / "reg"), "--workers", "2",
           "--port", str(port)]
    server = Server(cmd, server_env(), tmp / "server.log", port)
    server.wait_ready()
    deadline = time.monotonic() + 60
    while len(server.worker_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)   # the second worker's model warm-up
    server.predictor = OnnxPredictor.load(tmp / "reg" / "packages" / "tracked")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rows(tiny_export):
    f = json.loads((tiny_export / "model.json").read_text())["features"]
    frame = generate_run("adaptive", run_index=5, seed=13, machine_id=2).iloc[:240]
    cont = np.stack([frame[c].to_numpy(float) if c in frame else np.full(len(frame), np.nan)
                     for c in f["continuous"]], axis=1)
    return cont, np.stack([frame[c].to_numpy() for c in f["categorical"]], axis=1).astype(float)


def on_new_connection(server, method: str, path: str, rid: str, doc: dict | None = None) -> tuple[dict, int]:
    """One request on a connection of its own (as a monitor that reconnects) -> (answer, the worker's pid)."""
    r, pid = sent_on_new_connection(server, method, path, rid, doc)
    return r.json(), pid


def sent_on_new_connection(server, method: str, path: str, rid: str, doc: dict | None = None,
                           headers: dict | None = None) -> tuple[httpx.Response, int]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.request(method, path, json=doc, headers={"x-request-id": rid, **(headers or {})})
    assert r.status_code == 200, r.text
    for _ in range(100):   # the worker's request log line names its pid
        pid = next((rec["pid"] for rec in server.log_records()
                    if rec.get("request_id") == rid and rec.get("event") == "request"), None)
        if pid is not None:
            return r, pid
        time.sleep(0.05)
    raise AssertionError(f"no log line for request {rid}")


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_a_monitor_that_reconnects_to_another_worker_keeps_its_place(served, rows):
    """Every chunk on a new connection: the machine's answers are those of one uninterrupted session
    (posterior, buffered rows and row count carried), whichever worker each chunk reached."""
    cont, cat = rows
    answers, pids = [], []
    for k in range(len(cont) // CHUNK):
        lo = k * CHUNK
        doc = body(cont[lo:lo + CHUNK], cat[lo:lo + CHUNK])
        answer, pid = on_new_connection(served, "POST", "/stream/roaming-mill", f"roam-{k}", doc)
        answers.append(answer)
        pids.append(pid)
        if sum(a != b for a, b in zip(pids, pids[1:])) >= 3 and k >= 10:
            break
    hops = sum(a != b for a, b in zip(pids, pids[1:]))
    assert hops >= 3, f"{len(pids)} connections, {hops} changes of worker: {pids}"
    assert answers[0]["started"] is True and not any(a["started"] for a in answers[1:])
    assert [a["rows_since_start"] for a in answers] == [CHUNK * (k + 1) for k in range(len(answers))]
    n = CHUNK * len(answers)
    steps, _ = tracked_reference(served.predictor, cont[:n], cat[:n])
    matches(served.predictor, [p for a in answers for p in a["predictions"]], steps)
    assert metric(served, "gcodefp_stream_sessions") == 1   # no stale copy left behind
    assert metric(served, 'gcodefp_stream_handoffs_total{result="received"}') == hops

    # GET reaches the machine from either worker, taking it over where needed
    seen = set()
    for k in range(40):
        state, pid = on_new_connection(served, "GET", "/stream/roaming-mill", f"roam-get-{k}")
        assert state["rows_since_start"] == n
        seen.add(pid)
        if len(seen) == 2:
            break
    assert len(seen) == 2 and metric(served, "gcodefp_stream_sessions") == 1


def test_a_new_program_on_another_worker_drops_the_old_copy(served, rows):
    cont, cat = rows
    first, owner = on_new_connection(served, "POST", "/stream/restarted-mill", "restart-0",
                                     body(cont[:CHUNK], cat[:CHUNK], start=True))
    sessions = metric(served, "gcodefp_stream_sessions")
    for k in range(1, 40):
        again, pid = on_new_connection(served, "POST", "/stream/restarted-mill", f"restart-{k}",
                                       body(cont[:CHUNK], cat[:CHUNK], start=True))
        assert again["started"] is True and again["rows_since_start"] == CHUNK
        if pid != owner:
            break
    assert pid != owner, "40 connections all reached the same worker"
    deadline = time.monotonic() + 5   # the old worker drops its copy within its next look at the asks
    while metric(served, "gcodefp_stream_sessions") != sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(served, "gcodefp_stream_sessions") == sessions


def test_a_retried_chunk_that_reaches_the_other_worker_is_answered_not_applied_again(served, rows):
    """A monitor's connection drops after its chunk was applied; it reconnects, reaches the other worker
    and sends the chunk again with its Idempotency-Key: the answer comes with the machine's state."""
    cont, cat = rows
    on_new_connection(served, "POST", "/stream/retrying-mill", "retry-0", body(cont[:CHUNK], cat[:CHUNK], start=True))
    for k in range(1, 40):
        lo, key = k * CHUNK, {"idempotency-key": f"chunk-{k}"}
        doc = body(cont[lo:lo + CHUNK], cat[lo:lo + CHUNK])
        first, owner = sent_on_new_connection(served, "POST", "/stream/retrying-mill", f"retry-{k}", doc, key)
        again, pid = sent_on_new_connection(served, "POST", "/stream/retrying-mill", f"retry-{k}-again", doc, key)
        assert again.content == first.content and again.headers["idempotent-replayed"] == "true"
        if pid != owner:
            break
    assert pid != owner, "40 retries all reached the worker that applied the chunk"
    # the worker that answered the retry holds the machine now: a GET on either worker finds it there
    seen = set()
    for j in range(40):
        state, at = on_new_connection(served, "GET", "/stream/retrying-mill", f"retry-state-{j}")
        assert state["rows_since_start"] == (k + 1) * CHUNK
        seen.add(at)
        if len(seen) == 2:
            break
    assert len(seen) == 2


def test_a_rolling_restart_keeps_every_followed_machine(served, rows):
    """SIGHUP (uvicorn's rolling restart: every worker replaced in turn): a worker that stops leaves its
    machines' state in the folder `gcodefp serve` gives its workers, and the new workers take it over."""
    import os
    import signal

    cont, cat = rows
    machines = [f"restarting-mill-{i}" for i in range(6)]   # spread over both workers
    answers = {m: [] for m in machines}
    for k in range(8):
        for j, m in enumerate(machines):
            lo = k * CHUNK
            answers[m].append(on_new_connection(served, "POST", f"/stream/{m}", f"rr-{k}-{j}",
                                                body(cont[lo:lo + CHUNK], cat[lo:lo + CHUNK]))[0])
    # the first machine's last chunk before the restart carries a key: its answer is lost, say
    last = body(cont[8 * CHUNK:9 * CHUNK], cat[8 * CHUNK:9 * CHUNK])
    applied, _ = sent_on_new_connection(served, "POST", f"/stream/{machines[0]}", "rr-keyed", last,
                                        {"idempotency-key": "before-restart"})
    before = served.worker_pids()
    os.kill(served.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and (served.worker_pids() & before or len(served.worker_pids()) != 2):
        time.sleep(0.2)
    assert not served.worker_pids() & before and len(served.worker_pids()) == 2
    time.sleep(1.0)   # the second new worker's warm-up
    # sent again after the restart, with its key: the new worker restored the machine and answers it again
    again, _ = sent_on_new_connection(served, "POST", f"/stream/{machines[0]}", "rr-keyed-again", last,
                                      {"idempotency-key": "before-restart"})
    assert again.content == applied.content and again.headers["idempotent-replayed"] == "true"
    answers[machines[0]].append(applied.json())
    for k in range(8, 16):
        for j, m in enumerate(machines):
            if j == 0 and k == 8:
                continue   # its chunk 8 is the keyed one above
            lo = k * CHUNK
            answers[m].append(on_new_connection(served, "POST", f"/stream/{m}", f"rr-{k}-{j}",
                                                body(cont[lo:lo + CHUNK], cat[lo:lo + CHUNK]))[0])
    steps, _ = tracked_reference(served.predictor, cont[:16 * CHUNK], cat[:16 * CHUNK])
    for m in machines:
        assert not any(a["started"] for a in answers[m][1:]), m
        assert answers[m][-1]["rows_since_start"] == 16 * CHUNK
        matches(served.predictor, [p for a in answers[m] for p in a["predictions"]], steps)
    # one copy each; the earlier tests' machines wait in the folder until they post again
    assert metric(served, "gcodefp_stream_sessions") == len(machines)


def test_an_owner_that_does_not_answer_costs_the_timeout_then_the_machine_starts_afresh(tmp_path):
    registry = streams.StreamRegistry()
    handoff = stream_handoff.Handoff(tmp_path, registry, timeout_s=0.2, max_age_s=600)
    silent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])   # alive, never answers
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        (tmp_path / "owners" / "silent-mill.pid").write_text(str(silent.pid))
        (tmp_path / "owners" / "gone-mill.pid").write_text(str(gone.pid))
        t0 = time.monotonic()
        assert asyncio.run(handoff.take(streams.Session("silent-mill"), None, start=False)) is False
        assert time.monotonic() - t0 >= 0.2
        t0 = time.monotonic()
        assert asyncio.run(handoff.take(streams.Session("gone-mill"), None, start=False)) is False
        assert time.monotonic() - t0 < 0.1   # a dead owner is not waited for
        asks = [p.name for p in (tmp_path / "asks").iterdir()]   # the silent owner was asked, the gone one not
        assert len(asks) == 1 and asks[0].startswith(f"silent-mill.{silent.pid}.") and asks[0].endswith(".ask")
    finally:
        silent.kill()


def test_a_state_that_cannot_be_written_still_ends_the_ask_and_the_old_copy(tmp_path, monkeypatch):
    """A full tmpfs (say): the asker must stop waiting at once and the machine must not stay twice."""
    from api import stream_state

    registry = streams.StreamRegistry()
    handoff = stream_handoff.Handoff(tmp_path, registry, timeout_s=0.2, max_age_s=600)
    session = registry.acquire("full-mill")
    session.version = "v1"   # started
    registry.release(session)

    def no_space(path, s):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stream_state, "write", no_space)
    name = f"full-mill.{handoff.pid}.0123456789ab.ask"
    (tmp_path / "asks" / name).write_text("send")
    asyncio.run(handoff._give(name, "full-mill", session))
    assert registry.get("full-mill") is None
    assert not list((tmp_path / "asks").iterdir()) and not list((tmp_path / "states").iterdir())


def test_a_handoff_folder_that_is_gone_costs_the_handoff_not_the_request(tmp_path):
    import shutil

    registry = streams.StreamRegistry()
    handoff = stream_handoff.Handoff(tmp_path / "h", registry, timeout_s=0.2, max_age_s=600)
    elsewhere = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "h" / "owners" / "lost-mill.pid").write_text(str(elsewhere.pid))
        shutil.rmtree(tmp_path / "h" / "asks")
        assert asyncio.run(handoff.take(streams.Session("lost-mill"), None, start=False)) is False
        shutil.rmtree(tmp_path / "h")
        handoff.claim("lost-mill")   # logged, not raised
    finally:
        elsewhere.kill()
