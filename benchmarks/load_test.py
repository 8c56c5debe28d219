"""Load test of the API on loopback: open-loop single-window /predict at a fixed rate, a hot swap in
the middle, then (optionally) a search for the highest rate that still meets the latency bars.

    python benchmarks/load_test.py --registry REG [--rate 200 --duration 60 --workers 1 --find-max]
    python benchmarks/load_test.py --build-tiny          # trains + exports + int8-quantizes a tiny model first

Requests are scheduled at fixed times (rate R: one every 1/R s) and latency is measured from the
scheduled time, so a slow server cannot hide its queueing (no coordinated omission). The client is a
minimal HTTP/1.1 keep-alive client on asyncio streams, because an httpx client costs more CPU per
request than the server, and the two share this machine's cores. Bars (issue 6): 200 req/s for 60 s
with p95 <= 10 ms, p99 <= 20 ms, zero errors, <= 300 MB resident per worker, zero errors during the swap.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BARS = {"p95_ms": 10.0, "p99_ms": 20.0, "rss_mb_per_worker": 300.0}


class Connection:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    async def post(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)


async def run_phase(port: int, body: bytes, rate: float, duration: float, conns: int = 64, on_time=None) -> dict:
    """Fire POST /predict at `rate` for `duration` s; returns latencies (ms), errors, achieved rate."""
    request = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(conns):
        pool.put_nowait(Connection(*await asyncio.open_connection("127.0.0.1", port)))
    latencies, errors, versions = [], [], {}
    loop = asyncio.get_running_loop()

    async def one(scheduled: float):
        conn = await pool.get()
        try:
            status, payload = await conn.post(request)
            latencies.append((loop.time() - scheduled) * 1000)
            if status != 200:
                errors.append(f"HTTP {status}: {payload[:200]!r}")
            else:
                v = json.loads(payload)["model_version"]
                versions[v] = versions.get(v, 0) + 1
            pool.put_nowait(conn)
        except Exception as exc:  # connection broken: count it, open a fresh one
            errors.append(repr(exc))
            pool.put_nowait(Connection(*await asyncio.open_connection("127.0.0.1", port)))

    n = int(rate * duration)
    start = loop.time() + 0.05
    tasks, fired_swap = [], False
    for i in range(n):
        t = start + i / rate
        delay = t - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if on_time and not fired_swap and i >= n // 2:
            fired_swap = True
            on_time()
        tasks.append(asyncio.create_task(one(t)))
    await asyncio.gather(*tasks)
    elapsed = loop.time() - start
    while not pool.empty():
        pool.get_nowait().writer.close()
    lat = np.asarray(latencies)
    return {"target_rate": rate, "requests": n, "achieved_rate": round(len(lat) / elapsed, 1),
            "errors": len(errors), "error_samples": errors[:5], "versions": versions,
            "p50_ms": round(float(np.percentile(lat, 50)), 3), "p95_ms": round(float(np.percentile(lat, 95)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3), "max_ms": round(float(lat.max()), 3)}


def meets_bars(r: dict) -> bool:
    return (r["errors"] == 0 and r["p95_ms"] <= BARS["p95_ms"] and r["p99_ms"] <= BARS["p99_ms"]
            and r["achieved_rate"] >= 0.97 * r["target_rate"])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker_pids(master: int, workers: int) -> list[int]:
    if workers == 1:
        return [master]  # uvicorn serves in the main process
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True).stdout
    kids = [int(p) for p in out.split()]
    # the multiprocessing resource tracker is a child too: workers are the ones that import onnxruntime
    return [p for p in kids if "onnxruntime" in Path(f"/proc/{p}/maps").read_text(errors="ignore")]


def build_tiny_registry(work: Path) -> Path:
    """A registry holding an int8 package of a tiny model trained on synthetic data (~1 min)."""
    import torch

    from gcodefp_core.export import export_checkpoint
    from gcodefp_core.package import build_package, promote
    from gcodefp_core.quantize import quantize_model
    from gcodefp_core.train import train

    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_MODE", "disabled")
    cfg = json.loads((REPO / "configs" / "tiny.json").read_text())
    cfg["data"]["window"] = 64  # the production window length
    cfg["train"].update(epochs=1, samples_per_epoch=512)
    train(cfg, work / "train", seed=0)
    export_checkpoint(work / "train" / "model_seed0" / "checkpoint_best.pt", work / "export" / "model.onnx")
    quantize_model(work / "export" / "model.json", work / "export" / "model_int8_dynamic.onnx", "int8")
    reg = work / "registry"
    pkg = build_package(work / "export" / "model_int8_dynamic.json", reg, version="tiny-int8")
    promote(reg, pkg.name)
    return reg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--registry", type=Path, help="registry whose CURRENT package is served (not modified: copied)")
    src.add_argument("--build-tiny", action="store_true", help="build a tiny int8 package first")
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--find-max", action="store_true", help="then step the rate up (10 s each) until a bar fails")
    ap.add_argument("--max-rate", type=float, default=2000.0)
    ap.add_argument("--output", type=Path, help="write the results as JSON")
    args = ap.parse_args()
    if args.duration > 600 or args.rate > args.max_rate:
        ap.error("bounded run: --duration <= 600 s and --rate <= --max-rate")

    from gcodefp_core import package as pkg

    work = Path(tempfile.mkdtemp(prefix="gcodefp-load-"))
    reg = build_tiny_registry(work) if args.build_tiny else shutil.copytree(args.registry, work / "registry")
    current = pkg.current_version(reg)
    swap_version = f"{current}-swap"  # the same graphs under a new version: a real reload, checksums and all
    pkg.build_package(reg / "packages" / current / "model.json", reg, version=swap_version)
    body = (reg / "packages" / current / "sample_request.json").read_bytes()
    body = json.dumps({"sensor_data": json.loads(body)["sensor_data"]}).encode()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(work / "server.log", "wb")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    server = subprocess.Popen([sys.executable, "-m", "gcodefp_core.cli", "serve", "--registry", str(reg),
                               "--workers", str(args.workers), "--port", str(port), "--poll-seconds", "0.5"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    results: dict = {"registry": str(args.registry or reg), "package": current, "workers": args.workers}
    try:
        import httpx

        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        results["variant"] = httpx.get(f"http://127.0.0.1:{port}/info").json()["variant"]
        asyncio.run(run_phase(port, body, 100, 3))  # warm-up
        swap_at = {}

        def swap():
            swap_at["t"] = time.time()
            pkg.promote(reg, swap_version)

        main_run = asyncio.run(run_phase(port, body, args.rate, args.duration, on_time=swap))
        main_run["swap"] = {"to": swap_version, "served_by_new": main_run["versions"].get(swap_version, 0)}
        main_run["meets_bars"] = meets_bars(main_run)
        results["main"] = main_run
        pids = worker_pids(server.pid, args.workers)
        results["rss_mb_per_worker"] = [round(rss_mb(p), 1) for p in pids]
        print(json.dumps(main_run, indent=1), flush=True)
        if args.find_max:
            steps, rate = [], args.rate
            while rate <= args.max_rate:
                r = asyncio.run(run_phase(port, body, rate, 10.0))
                r["meets_bars"] = meets_bars(r)
                steps.append(r)
                print(f"rate {rate:.0f}: p50 {r['p50_ms']} p95 {r['p95_ms']} p99 {r['p99_ms']} ms, "
                      f"errors {r['errors']}, achieved {r['achieved_rate']}", flush=True)
                if not r["meets_bars"]:
                    break
                rate *= 1.25
            ok = [s["target_rate"] for s in steps if s["meets_bars"]]
            results["steps"], results["max_sustainable_rate"] = steps, max(ok) if ok else None
            results["rss_mb_per_worker"] = [round(rss_mb(p), 1) for p in pids]
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()
    results["rss_bar_met"] = all(v <= BARS["rss_mb_per_worker"] for v in results.get("rss_mb_per_worker", [1e9]))
    print(json.dumps({k: v for k, v in results.items() if k not in ("main", "steps")}, indent=1))
    if args.output:
        args.output.write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if results["main"]["meets_bars"] and results["rss_bar_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
