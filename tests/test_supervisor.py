"""api/supervisor.py: `gcodefp serve --workers N` gives each worker its own listening socket, so the
long-lived connections of /stream monitors spread evenly over the workers."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from api_fixtures import Server, free_port, server_env

from api import supervisor

pytestmark = pytest.mark.skipif(not supervisor.supported(), reason="no SO_REUSEPORT on this platform")


def tcp_sockets(port: int) -> dict[int, str]:
    """inode -> state ('0A' listening, '01' established) of the IPv4 TCP sockets on local `port`."""
    out = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == port:
            out[int(f[9])] = f[3]
    return out


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:   # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def serve(registry: Path, tmp: Path, **env) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "gcodefp_core.cli", "serve", "--registry", str(registry), "--workers", "2",
           "--port", str(port)]
    server = Server(cmd, server_env(**env), tmp / f"server-{port}.log", port)
    server.wait_ready()
    return server


def wait_for_workers(server: Server, n: int) -> list[int]:
    """Worker pids once n of them listen (a uvicorn worker listens once its model is loaded)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = sorted(server.worker_pids())
        listening = {i for i, state in tcp_sockets(server.port).items() if state == "0A"}
        if len(pids) == n and all(socket_inodes(p) & listening for p in pids):
            return pids
        time.sleep(0.2)
    raise AssertionError(f"{n} listening workers expected, got {server.worker_pids()}")


def test_each_worker_listens_on_its_own_socket_and_connections_spread_over_them(api_registry, tmp_path):
    server = serve(api_registry, tmp_path)
    try:
        pids = wait_for_workers(server, 2)
        listening = {i for i, state in tcp_sockets(server.port).items() if state == "0A"}
        own = [socket_inodes(p) & listening for p in pids]
        assert all(len(s) == 1 for s in own) and own[0] != own[1], f"listening sockets per worker: {own}"
        # 200 keep-alive connections opened at once, as monitors reconnecting after a restart do:
        # a worker's share is binomial around 100 (sd 7), so 50 is far out; a shared socket has
        # handed one idle worker two thirds of such a burst
        conns = []
        try:
            for _ in range(200):
                c = socket.create_connection(("127.0.0.1", server.port))
                c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                conns.append(c)
            for c in conns:
                assert c.recv(65536).startswith(b"HTTP/1.1 200")
            established = {i for i, state in tcp_sockets(server.port).items() if state == "01"}
            held = [len(socket_inodes(p) & established) for p in pids]
        finally:
            for c in conns:
                c.close()
        assert sum(held) == 200 and min(held) >= 50, f"connections per worker: {held}"
    finally:
        server.stop()
    assert "a socket each" in server.log_text()


def test_one_shared_socket_when_turned_off(api_registry, tmp_path):
    server = serve(api_registry, tmp_path, GCODEFP_SOCKET_PER_WORKER=0)
    try:
        pids = wait_for_workers(server, 2)
        listening = {i for i, state in tcp_sockets(server.port).items() if state == "0A"}
        own = [socket_inodes(p) & listening for p in pids]
        assert own[0] == own[1] and len(own[0]) == 1, f"listening sockets per worker: {own}"
    finally:
        server.stop()


def test_a_port_in_use_is_a_clear_error(api_registry, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "gcodefp_core.cli", "serve", "--registry", str(api_registry),
                               "--workers", "2", "--port", str(port)], env=server_env(), capture_output=True,
                              text=True, timeout=60)
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_rolling_restart_replaces_every_worker_and_loses_no_connection(api_registry, tmp_path, sample_request):
    """SIGHUP to `gcodefp serve` (uvicorn's rolling restart) while clients keep connecting: each worker is
    replaced in turn, the new one on its slot's socket, and no connection is refused or reset (a socket
    that closed with its worker reset the connections queued on it). A worker that is shutting down
    closes the connections it has accepted but not yet read a request from, as uvicorn does with a
    single socket too (the HTTP/1.1 race of a server closing an idle connection); a client retries
    those, and they are counted apart."""
    import signal
    import threading

    import httpx

    server = serve(api_registry, tmp_path)
    codes, errors, retried, stop = [], [], [], threading.Event()

    def client():
        with httpx.Client(base_url=server.url, timeout=30, headers={"connection": "close"}) as c:
            while not stop.is_set():
                for attempt in range(3):
                    try:
                        codes.append(c.post("/predict", json=sample_request).status_code)
                        break
                    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:   # closed before it answered
                        retried.append(repr(exc))
                    except httpx.TransportError as exc:   # refused or reset while connecting: lost
                        errors.append(repr(exc))
                        break

    try:
        before = set(wait_for_workers(server, 2))
        slots = {i for i, state in tcp_sockets(server.port).items() if state == "0A"}
        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(1)
        os.kill(server.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (server.worker_pids() & before or len(server.worker_pids()) != 2):
            time.sleep(0.2)
        after = set(wait_for_workers(server, 2))
        time.sleep(1)   # the new workers answer too
        stop.set()
        for t in threads:
            t.join()
        assert not after & before, f"workers before {before}, after {after}"
        assert errors == [] and set(codes) == {200} and len(codes) > 20, (errors[:3], sorted(set(codes)), len(codes))
        assert len(retried) < 10, retried[:3]
        listening = {i for i, state in tcp_sockets(server.port).items() if state == "0A"}
        own = [socket_inodes(p) & listening for p in after]
        assert all(len(s) == 1 for s in own) and own[0] != own[1], f"listening sockets per worker: {own}"
        assert own[0] | own[1] == slots, "the new workers listen on the slots' sockets, which never closed"
    finally:
        stop.set()
        server.stop()
