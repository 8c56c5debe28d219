"""What a followed machine costs in memory: one worker's resident memory as it follows more machines.

`gcodefp serve --workers 1` on the registry's current package; machines are added in steps, each
posting a start chunk and then 16 rows in 4-row chunks (the rows of the package's sample request),
a few at a time so that the worker is never overloaded: what stays is the sessions (each keeps its
tracker's posterior and its last W-1 rows), not a backlog. RSS is read from /proc after each step.

    .venv/bin/python benchmarks/stream_memory.py --registry artifacts/registry [--machines 100 250 500 1000]
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import http_load  # noqa: E402
import serving  # noqa: E402


async def follow(port: int, req: dict, lo: int, hi: int, chunks: int = 4, at_once: int = 8) -> None:
    gate = asyncio.Semaphore(at_once)

    async def machine(i: int) -> None:
        async with gate:
            conn = await http_load.Connection.open(port)
            try:
                for body in [req["stream_first"](i)] + [req["stream_chunk"](i, k) for k in range(chunks)]:
                    status, payload = await conn.send(body)
                    if status != 200:
                        raise RuntimeError(f"machine {i}: HTTP {status} {payload[:200]!r}")
            finally:
                conn.close()

    await asyncio.gather(*(machine(i) for i in range(lo, hi)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", type=Path, required=True, help="the pipeline's registry (copied, not modified)")
    ap.add_argument("--machines", type=int, nargs="+", default=[100, 250, 500, 1000])
    ap.add_argument("--output", type=Path, default=REPO / "results" / "stream_memory.json")
    args = ap.parse_args()
    from gcodefp_core import package as pkg
    from gcodefp_core.fileio import write_json

    work = Path(tempfile.mkdtemp(prefix="gcodefp-stream-memory-"))
    try:
        reg = shutil.copytree(args.registry, work / "registry")
        package = pkg.current_package(reg)
        req = serving.bodies(package, 8, 4)
        server = serving.Server(reg, 1, work / "server.log")
        try:
            steps = [{"machines": 0, "rss_mb": server.rss_mb()[0]}]
            for n in sorted(args.machines):
                http_load.run(follow(server.port, req, steps[-1]["machines"], n))
                time.sleep(1.0)
                steps.append({"machines": n, "rss_mb": server.rss_mb()[0]})
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"package {package.name}: one worker's RSS as it follows more machines")
    print(f"{'machines':>9} {'RSS MB':>8} {'KB per added machine':>22}")
    for prev, step in zip([None] + steps, steps):
        per = "" if prev is None else f"{1024 * (step['rss_mb'] - prev['rss_mb']) / (step['machines'] - prev['machines']):.0f}"
        print(f"{step['machines']:>9} {step['rss_mb']:>8.1f} {per:>22}")
    last = steps[-1]
    result = {"package": package.name, "date": time.strftime("%Y-%m-%d %H:%M"), "steps": steps,
              "kb_per_machine": round(1024 * (last["rss_mb"] - steps[0]["rss_mb"]) / max(last["machines"], 1), 1)}
    write_json(args.output, result)
    print(f"~{result['kb_per_machine']} KB per followed machine; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
