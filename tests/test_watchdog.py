"""api/watchdog.py: a worker whose event loop is stuck ends itself and a fresh worker takes over."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time

import httpx
import pytest
from api_fixtures import Server, free_port, server_env

from api.watchdog import LoopWatchdog


def stuck_in_a_blocking_call(seconds: float) -> None:
    time.sleep(seconds)


def test_a_stuck_loop_is_reported_with_its_stack_and_a_turning_one_is_not():
    stalls = []

    async def scenario():
        dog = LoopWatchdog(0.4, on_stall=lambda stuck, stack: stalls.append((stuck, stack)), beat=0.05)
        dog.start()
        for _ in range(12):           # 1.2 s of a loop that keeps turning: no report
            await asyncio.sleep(0.1)
        assert stalls == []
        stuck_in_a_blocking_call(1.0)  # the loop stops turning
        await asyncio.sleep(0.1)
        dog.stop()

    asyncio.run(scenario())
    assert len(stalls) == 1
    stuck, stack = stalls[0]
    assert stuck > 0.4 and "stuck_in_a_blocking_call" in stack


def test_a_stopped_watchdog_never_reports():
    stalls = []

    async def scenario():
        dog = LoopWatchdog(0.2, on_stall=lambda *a: stalls.append(a), beat=0.05)
        dog.start()
        await asyncio.sleep(0.1)
        dog.stop()
        stuck_in_a_blocking_call(0.5)

    asyncio.run(scenario())
    assert stalls == []


def test_the_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout"):
        LoopWatchdog(0)


# Loaded by every worker (PYTHONPATH): SIGUSR1 deadlocks the worker's event loop (the handler runs on
# the main thread, which runs the loop), as a lock taken twice on the loop would.
DEADLOCK_ON_SIGNAL = """
import signal, threading
_lock = threading.Lock()

def _deadlock_the_loop(signum, frame):
    _lock.acquire()
    _lock.acquire()

signal.signal(signal.SIGUSR1, _deadlock_the_loop)
"""


def serving_workers(server: Server, done, timeout: float = 60.0) -> set[int]:
    """The pids with a model loaded (gcodefp_model_info), polled until done(pids) or the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        pids = {int(p) for p in re.findall(r'gcodefp_model_info\{pid="(\d+)"', text)}
        if done(pids) or time.monotonic() > deadline:
            return pids
        time.sleep(0.3)


def test_a_deadlocked_worker_is_replaced_and_the_server_keeps_answering(api_registry, tmp_path, sample_request):
    (tmp_path / "sitecustomize.py").write_text(DEADLOCK_ON_SIGNAL)
    env = server_env(GCODEFP_LOOP_TIMEOUT_S=2)
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"
    port = free_port()
    cmd = [sys.executable, "-m", "gcodefp_core.cli", "serve", "--registry", str(api_registry), "--workers", "2",
           "--port", str(port)]
    server = Server(cmd, env, tmp_path / "server.log", port)
    try:
        server.wait_ready()
        before = serving_workers(server, lambda pids: len(pids) == 2)   # both started: their watchdogs run
        assert len(before) == 2 and before == server.worker_pids()
        stuck = min(before)
        os.kill(stuck, signal.SIGUSR1)
        deadline = time.monotonic() + 60   # 2 s to notice, then uvicorn's check (every 0.5 s) and a fresh start
        while time.monotonic() < deadline:
            now = server.worker_pids()
            if stuck not in now and len(now) == 2:
                break
            time.sleep(0.2)
        assert stuck not in now and len(now) == 2, f"workers {now}, the stuck one was {stuck}"
        # a uvicorn worker accepts connections once its startup (the model load) is done
        with httpx.Client(base_url=server.url, timeout=10) as c:   # fresh connections reach either worker
            codes = [c.post("/predict", json=sample_request, headers={"connection": "close"}).status_code
                     for _ in range(20)]
        assert codes == [200] * 20
        record = next(r for r in server.log_records() if r.get("event") == "loop_stuck")
        assert record["pid"] == stuck and record["level"] == "CRITICAL" and "_deadlock_the_loop" in record["stack"]
        # the lost worker is counted once and no longer counted among the live ones (the new worker's
        # series appears once it has loaded its model)
        assert serving_workers(server, lambda pids: pids == now) == now
        text = httpx.get(f"{server.url}/metrics").text
        assert re.search(r"^gcodefp_workers_lost_total 1\.0$", text, re.M)
    finally:
        server.stop()


def test_a_lost_worker_is_counted_once_when_two_processes_clean_up_its_two_files(tmp_path, monkeypatch):
    """A worker leaves two live-gauge files; a scrape and a starting worker may each remove one."""
    import dataclasses
    import subprocess

    from api import metrics

    monkeypatch.setattr(metrics, "MULTIPROCESS", True)
    monkeypatch.setattr(metrics, "SETTINGS", dataclasses.replace(metrics.SETTINGS, metrics_dir=str(tmp_path)))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    before = metrics.WORKERS_LOST._value.get()
    (tmp_path / f"gauge_livesum_{gone.pid}.db").write_bytes(b"")
    assert metrics.forget_dead_workers() == [gone.pid]
    (tmp_path / f"gauge_liveall_{gone.pid}.db").write_bytes(b"")   # the file the other process had not reached
    assert metrics.forget_dead_workers() == [gone.pid]
    assert metrics.WORKERS_LOST._value.get() - before == 1
    assert not list(tmp_path.glob("gauge_*.db"))
