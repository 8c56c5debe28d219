"""What input + prediction monitoring (api/monitoring.py) costs on the hot path.

1. In process: observe_windows() on a served package's real feature spec, for 1 and 64 windows
   (median of many calls), next to the package's own model call on the same windows.
2. Served: /predict latency (sequential requests from one client, loopback) of a uvicorn worker with
   monitoring on (GCODEFP_MONITOR_EVERY=1) and off (0), alternating rounds to spread the noise.
Prints a table and writes results/monitoring_overhead.json.

    python benchmarks/monitoring_overhead.py --package PATH [--requests 400]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def per_call_us(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def in_process(package: Path) -> dict:
    from api import inputs, monitoring
    from api.model_store import LoadedModel
    from gcodefp_core.runtime import OnnxPredictor

    p = OnnxPredictor.load(package)
    model = LoadedModel(p, "bench", p.variant, package, {}, 0.0)
    spec, w = p.features, p.window
    rng = np.random.default_rng(0)
    out = {}
    for n in (1, 64):
        cont = np.asarray(spec.mean) + rng.normal(0, 1, (n, w, len(spec.continuous))) * np.asarray(spec.std)
        cat = np.ones((n, w, len(spec.categorical)))
        c, k = inputs.model_inputs(spec, cont, cat)
        rows = p.predict(c, k)
        model_us = per_call_us(lambda: p.predict(*inputs.model_inputs(spec, cont, cat)), 50 if n == 1 else 10)
        mon_us = per_call_us(lambda: monitoring.observe_windows(model, "/bench", cont, rows), 500)
        out[n] = {"windows": n, "monitor_us": round(mon_us, 1), "model_us": round(model_us, 1),
                  "share_of_model": round(mon_us / model_us, 4)}
    return out


def served(package: Path, requests: int, rounds: int = 4) -> dict:
    import httpx
    from api_fixtures import start_uvicorn

    doc = json.loads((package / "sample_request.json").read_text())
    lat: dict[str, list[float]] = {"on": [], "off": []}
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "gcodefp-monitoring-bench"
    tmp.mkdir(parents=True, exist_ok=True)
    servers = {k: start_uvicorn(tmp, GCODEFP_PACKAGE=package, GCODEFP_MONITOR_EVERY=v) for k, v in (("on", 1), ("off", 0))}
    try:
        for _ in range(rounds):
            for key, server in servers.items():
                with httpx.Client(base_url=server.url, timeout=30) as http:
                    for _ in range(20):
                        http.post("/predict", json=doc)
                    for _ in range(requests // rounds):
                        t0 = time.perf_counter()
                        r = http.post("/predict", json=doc)
                        lat[key].append(time.perf_counter() - t0)
                        assert r.status_code == 200, r.text
    finally:
        for s in servers.values():
            s.stop()
    res = {k: {"p50_ms": round(float(np.median(v)) * 1e3, 3), "p95_ms": round(float(np.quantile(v, .95)) * 1e3, 3)}
           for k, v in lat.items()}
    res["p50_overhead"] = round(res["on"]["p50_ms"] / res["off"]["p50_ms"] - 1, 4)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", required=True, type=Path)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--out", default=str(REPO / "results" / "monitoring_overhead.json"))
    args = ap.parse_args(argv)
    res = {"in_process": in_process(args.package), "served_predict": served(args.package, args.requests)}
    print(f"{'windows':>8}{'monitor us':>12}{'model us':>10}{'share':>8}")
    for r in res["in_process"].values():
        print(f"{r['windows']:>8}{r['monitor_us']:>12.1f}{r['model_us']:>10.1f}{r['share_of_model']:>8.1%}")
    s = res["served_predict"]
    print(f"/predict p50 / p95 ms: monitoring on {s['on']['p50_ms']} / {s['on']['p95_ms']}, "
          f"off {s['off']['p50_ms']} / {s['off']['p95_ms']} (p50 overhead {s['p50_overhead']:+.1%})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, out)
    return res


if __name__ == "__main__":
    main()
