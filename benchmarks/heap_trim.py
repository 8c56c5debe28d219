"""What the heap's trim threshold costs a served JSON request: GCODEFP_HEAP_TRIM_KB values, alternated.

The server fixes glibc's mmap threshold (api/app.py), which also freezes the heap's trim threshold;
at glibc's 128 KB default the memory a request frees goes back to the OS after every request and is
faulted in again by the next. For each round and each --trim-kb value (alternated, so that this VM's
drift hits both alike) it starts `gcodefp serve --workers 1` on the registry, drives open-loop JSON
/predict at each --rates value for --duration seconds and reads, per request, the worker's CPU time
and minor page faults (/proc/PID/stat), p50 / p99 latency and the server's own inference time, and
the worker's RSS at the end.

    .venv/bin/python benchmarks/heap_trim.py --registry artifacts/registry [--trim-kb 128 2048] [--rounds 4]
"""
from __future__ import annotations

import argparse
import json
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

from gcodefp_core import package as pkg  # noqa: E402
from gcodefp_core.fileio import write_json  # noqa: E402


def faults_and_cpu(pid: int) -> tuple[int, float]:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[7]), (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")   # minflt; utime + stime


def one_server(registry: Path, trim_kb: int, rates: list[int], duration: float, work: Path) -> dict:
    os.environ["GCODEFP_HEAP_TRIM_KB"] = str(trim_kb)
    server = serving.Server(registry, 1, work / f"server-{trim_kb}.log")
    req = serving.bodies(pkg.current_package(registry), 8, 4)["json"]
    out = {"trim_kb": trim_kb, "steps": []}
    try:
        pid = server.worker_pids()[0]
        http_load.run(http_load.open_loop(server.port, req, 50, 2))   # warm-up
        for rate in rates:
            f0, c0 = faults_and_cpu(pid)
            s, tally = http_load.run(http_load.open_loop(server.port, req, rate, duration))
            f1, c1 = faults_and_cpu(pid)
            n = max(s["requests"], 1)
            inference = [json.loads(b)["inference_time_ms"] for b in tally.bodies[:500]]
            out["steps"].append({"rate": rate, "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "errors": s["errors"],
                                 "cpu_ms_per_request": round((c1 - c0) * 1000 / n, 3),
                                 "faults_per_request": round((f1 - f0) / n, 1),
                                 "inference_p50_ms": round(float(np.median(inference)), 4) if inference else None})
        out["rss_mb"] = server.rss_mb()[0]
    finally:
        server.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--registry", type=Path, required=True)
    ap.add_argument("--trim-kb", type=int, nargs="+", default=[128, 2048])
    ap.add_argument("--rates", type=int, nargs="+", default=[100, 200, 400])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--output", type=Path, default=Path("results/heap_trim.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gcodefp-trim-"))
    reg = shutil.copytree(args.registry, work / "registry")
    runs = []
    try:
        for r in range(args.rounds):
            for kb in args.trim_kb:
                runs.append(one_server(reg, kb, args.rates, args.duration, work) | {"round": r})
                print(f"round {r} trim {kb:5d} KB: " + "  ".join(
                    f"@{s['rate']} cpu {s['cpu_ms_per_request']} ms, faults {s['faults_per_request']}, "
                    f"p50 {s['p50_ms']}" for s in runs[-1]["steps"]) + f"  rss {runs[-1]['rss_mb']} MB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nmedian over {args.rounds} rounds: CPU ms / minor faults / p50 ms per request")
    print("trim KB  " + "".join(f"{'@' + str(rate):>24s}" for rate in args.rates) + "   RSS MB")
    for kb in args.trim_kb:
        mine = [r for r in runs if r["trim_kb"] == kb]
        cells = []
        for i in range(len(args.rates)):
            m = lambda key: float(np.median([r["steps"][i][key] for r in mine if i < len(r["steps"])]))
            cells.append(f"{m('cpu_ms_per_request'):.2f} / {m('faults_per_request'):5.1f} / {m('p50_ms'):.2f}")
        print(f"{kb:7d}  " + "".join(f"{c:>24s}" for c in cells) + f"   {np.median([r['rss_mb'] for r in mine]):.1f}")
    write_json(args.output, {"rates": args.rates, "runs": runs,
                             "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
