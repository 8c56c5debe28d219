"""What the program tracker costs per streamed row: TrackerSession.update (the forward filter step and
its answer) on the tables a dataset's training runs give, fed random window logits.

    .venv/bin/python benchmarks/program_tracker_cost.py --dataset DIR [--rows 3000] [--repeats 3]
        [--every 1 4] [--output results/program_tracker_cost.json]

DIR is a built dataset (`gcodefp build-dataset`; the real one has 9 operations over 6 programs,
5,337 states); the cost depends on the tables' size, not on the model, so no model is needed. Each
repeat times `rows` streamed rows of one session (attached anywhere, every 50th row repeated) in
process CPU time, so that other processes on a shared machine count less; the median repeat is the
figure. --every N: one update per N rows (rows=N), as /stream judges by default (N = 4).
With operation evidence from the readings, fitted from the same training runs (the templates,
gcodefp_core.fit_templates; the spread model, gcodefp_core.fit_spread), each update also scores one
window of random readings, as /stream does per judged window (ProgramTracker.operation_evidence);
timed without, with each kind, and with both. The window model's own call (the predict graph) is not included:
/stream pays it with or without the tracker.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # as the server runs (api/__init__.py); before numpy
import numpy as np  # noqa: E402

from gcodefp_core.dataset import load_dataset  # noqa: E402
from gcodefp_core.fileio import write_json
from gcodefp_core.fit_program_tracker import build_program_tracker
from gcodefp_core.fit_spread import fit_operation_spread
from gcodefp_core.fit_templates import fit_operation_templates
from gcodefp_core.programs import build_line_table

# Weights of the order tuning picks on side-channel models (the cost does not depend on them).
PARAMS = {"line_weight": 0.1, "op_weight": 0.05, "window_weight": 1.0}


def measure(tracker, rows: int, repeats: int, every: int = 1, seed: int = 0, window: int = 64, features: int = 0,
            evidence: str = "none") -> dict:
    """With operation evidence in the tracker, each update scores a window of random readings [window, features]."""
    rng = np.random.default_rng(seed)
    ops = rng.normal(size=(rows, len(tracker.operations)))
    lines = rng.normal(size=(rows, tracker.n_lines)) * 3
    windows = rng.normal(size=(8, window, features)).astype(np.float32)
    per_row = []
    for _ in range(repeats):
        session = tracker.start()
        t0 = time.process_time()
        for i in range(every - 1, rows, every):
            scores = {k: v[0] for k, v in tracker.operation_evidence(windows[i % 8][None]).items()}
            session.update(ops[i], lines[i], min(i + 1, 64) / 64, int(i // 50 != (i - every) // 50), rows=every,
                           **scores)
        per_row.append((time.process_time() - t0) / rows * 1e6)
    return {"every": every, "evidence": evidence, "us_per_row_median": float(np.median(per_row)),
            "us_per_update_median": float(np.median(per_row)) * every, "us_per_row": [round(x, 1) for x in per_row]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True, help="a built dataset folder")
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--every", type=int, nargs="+", default=[1, 4], help="rows per update (one window judged per N rows)")
    ap.add_argument("--output", type=Path, default=Path("results/program_tracker_cost.json"))
    args = ap.parse_args()
    ds = load_dataset(args.dataset)
    table = build_line_table(ds)
    tracker = build_program_tracker(ds, table, params=PARAMS)
    templates = fit_operation_templates(ds, list(table.operation_program))
    spread = fit_operation_spread(ds)
    kinds = {"none": {}, "spread": {"spread_weight": 0.03}}
    if templates is not None:
        kinds |= {"templates": {"template_weight": 1.0}, "templates+spread": {"template_weight": 1.0, "spread_weight": 0.03}}
    runs = []
    for kind, weights in kinds.items():
        tracker.templates, tracker.spread = templates, spread
        tracker.set_params(**({"template_weight": 0.0, "spread_weight": 0.0} | weights))
        runs += [measure(tracker, args.rows, args.repeats, every, window=ds.window, features=len(ds.continuous_features),
                         evidence=kind) for every in args.every]
    result = {"dataset": str(args.dataset), "states": tracker.n_states, "operations": len(tracker.operations),
              "programs": len(tracker.programs), "line_classes": tracker.n_lines,
              "distinct_timeline_rows": int(len(tracker._row_idx)), "rows": args.rows,
              "template_channels": len(templates.columns) if templates else 0,
              "spread_channels": int(spread.weights.shape[0]), "runs": runs}
    print(f"program tracker: {result['states']} states ({result['operations']} operations over {result['programs']} "
          f"programs), {result['line_classes']} line classes, {result['distinct_timeline_rows']} distinct timeline rows")
    print(f"{'every':<7}{'evidence':<18}{'us per streamed row (repeats)':<34}{'median':>8}{'us per update':>15}")
    for r in result["runs"]:
        print(f"{r['every']:<7}{r['evidence']:<18}{', '.join(f'{x:.1f}' for x in r['us_per_row']):<34}"
              f"{r['us_per_row_median']:>8.1f}"
              f"{r['us_per_update_median']:>15.1f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, result)


if __name__ == "__main__":
    main()
