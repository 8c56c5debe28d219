"""Time the real dataset build (bar: under 60 s for 126 runs) and the synthetic generator's speed.

    .venv/bin/python benchmarks/build_dataset.py [--output results/bench_build_dataset.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from gcodefp_core.dataset import DatasetConfig, build_dataset
from gcodefp_core.paths import has_real_data, real_data_dir
from gcodefp_core.synthetic import OPERATIONS, generate_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, default=Path("results/bench_build_dataset.json"))
    args = ap.parse_args()
    results: dict = {}

    t0, rows = time.perf_counter(), 0
    for i, op in enumerate(OPERATIONS):
        rows += len(generate_run(op, run_index=i, seed=0))
    dt = time.perf_counter() - t0
    results["synthetic"] = {"rows": rows, "seconds": round(dt, 3), "rows_per_second": round(rows / dt)}

    if has_real_data():
        for fs in ("full", "side_channel"):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                out = build_dataset(DatasetConfig(source=str(real_data_dir()), feature_set=fs), Path(tmp) / "ds")
                dt = time.perf_counter() - t0
                m = json.loads((out / "manifest.json").read_text())
                results[f"real_{fs}"] = {"seconds": round(dt, 2), "runs": m["counts"]["runs"], "rows": m["counts"]["rows"],
                                         "windows": m["counts"]["windows"], "features": len(m["features"]["continuous"]),
                                         "vocab_size": m["tokenizer"]["vocab_size"], "max_tokens": m["max_tokens"]}

    print(f"{'what':<20} {'seconds':>8}  details")
    for k, v in results.items():
        print(f"{k:<20} {v['seconds']:>8}  " + ", ".join(f"{a}={b}" for a, b in v.items() if a != "seconds"))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
