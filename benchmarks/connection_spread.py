"""How keep-alive connections opened in a burst spread over `gcodefp serve --workers N`.

A /stream monitor keeps one connection per machine for hours, and after a server restart every
monitor reconnects at once. For each socket mode (a socket per worker, the default; one shared
socket, GCODEFP_SOCKET_PER_WORKER=0) it starts the server, then --trials times opens --connections
connections (64 at a time, each answered a GET /health, all kept open), counts each worker's share
from /proc, and closes them.

    .venv/bin/python benchmarks/connection_spread.py --registry artifacts/registry [--trials 10] [--output results/connection_spread.json]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import http_load  # noqa: E402
import serving  # noqa: E402

from gcodefp_core.fileio import write_json  # noqa: E402


def sockets_held(pid: int) -> int:
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            n += os.readlink(fd).startswith("socket:")
        except OSError:   # closed meanwhile
            pass
    return n


async def burst(port: int, pids: list[int], n: int) -> list[int]:
    """Open n connections (64 at a time), each answered once; -> connections per worker."""
    base = {p: sockets_held(p) for p in pids}
    gate, conns = asyncio.Semaphore(64), []

    async def connect():
        async with gate:
            c = await http_load.Connection.open(port)
            conns.append(c)
            c.writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = await c.reader.readuntil(b"\r\n\r\n")
            length = next(int(h[15:]) for h in head.split(b"\r\n") if h[:15].lower() == b"content-length:")
            await c.reader.readexactly(length)

    await asyncio.gather(*(connect() for _ in range(n)))
    await asyncio.sleep(0.3)
    held = [sockets_held(p) - base[p] for p in pids]
    for c in conns:
        c.close()
    await asyncio.sleep(1.0)   # the workers close their ends before the next burst
    return held


def measure(registry: Path, workers: int, per_worker_socket: bool, trials: int, n: int, work: Path) -> dict:
    os.environ["GCODEFP_SOCKET_PER_WORKER"] = "1" if per_worker_socket else "0"
    server = serving.Server(registry, workers, work / f"server-{int(per_worker_socket)}.log")
    try:
        pids = server.worker_pids()
        held = [http_load.run(burst(server.port, pids, n)) for _ in range(trials)]
    finally:
        server.stop()
    shares = np.array(held) / np.array(held).sum(axis=1, keepdims=True)
    return {"socket_per_worker": per_worker_socket, "connections": n, "held": held,
            "max_share": [round(float(s), 3) for s in shares.max(axis=1)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--registry", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--output", type=Path, default=Path("results/connection_spread.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gcodefp-spread-"))
    reg = work / "registry"
    shutil.copytree(args.registry, reg)
    try:
        modes = [measure(reg, args.workers, m, args.trials, args.connections, work) for m in (True, False)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.connections} connections in bursts, {args.workers} workers, {args.trials} trials")
    print(f"{'sockets':12s} {'max share: median':>18s} {'worst':>6s}  connections per worker")
    for m in modes:
        name = "per worker" if m["socket_per_worker"] else "shared"
        print(f"{name:12s} {np.median(m['max_share']):18.3f} {max(m['max_share']):6.3f}  {m['held']}")
    write_json(args.output, {"workers": args.workers, "trials": args.trials, "modes": modes,
                             "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
