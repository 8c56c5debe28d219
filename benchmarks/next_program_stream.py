"""A monitor that attaches mid-run and keeps following the machine into its next program, never told
that a program started: does the program tracker lock on at the restart, and which window weight
serves those rows best? Offline, on checkpoints with their fitted trackers (a diagnosis).

Per test run A: A's rows from a random point 25-75% in (no start flag), then every row of the next
test run B of the same operation (the run itself when it has none), as one stream judged every 4th
row as /stream does. Scored on B's rows from its row 63 on: exact line with the tracker's attached
window weight (`window_weight`, what such a session uses), its from-the-start weight
(`window_weight_start`) and the filter's line alone (weight 0).

    .venv/bin/python benchmarks/next_program_stream.py --dataset artifacts/pipeline-side/dataset \
        --checkpoints .../seed42/checkpoint_best.pt ... [--output results/next_program_stream.json]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from gcodefp_core import fit_program_tracker as fit
from gcodefp_core import monitor_streams as monitor
from gcodefp_core.checkpoints import load_checkpoint
from gcodefp_core.dataset import load_dataset
from gcodefp_core.fileio import write_json
from gcodefp_core.programs import row_classes
from gcodefp_core.runtime.program_tracker import ProgramTracker

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("op_logits", "line_logits", "weights", "repeated", "line_target", "spread")


def next_program_exact(path: Path, ds, seed: int) -> dict:
    tracker = ProgramTracker.from_dict(torch.load(path, map_location="cpu", weights_only=True)["program_tracker"])
    model, bundle, _ = load_checkpoint(path)
    classes, rng = row_classes(ds, bundle.line_table), np.random.default_rng(seed)
    weights = {"attached weight": tracker.params["window_weight"], "start weight": tracker.params["window_weight_start"],
               "filter alone": 0.0}
    runs = [r for r in ds.manifest["runs"] if r["split"] == "test"]
    exact = {k: [] for k in weights}
    evidence = {"spread": tracker.spread}
    for a in runs:
        b = next((r for r in runs if r["operation"] == a["operation"] and r is not a), a)
        first = monitor.stream_record([model], ds, a, monitor.make_stream(a["rows"], rng, attach=0.25), classes, evidence)
        nxt = monitor.stream_record([model], ds, b, np.arange(b["rows"]), classes, evidence)
        s = {k: np.concatenate([first[k], nxt[k]]) for k in KEYS if k in first}
        s["weights"][len(first["weights"]):] = 1.0    # B's windows follow A's rows: none is padded
        tracker.set_params(window_weight=0.0, window_weight_start=0.0)
        out = fit.run_tracker(tracker, s["op_logits"], s["line_logits"], s["weights"], s["repeated"], False, 4,
                              None, s.get("spread"))
        scored = out["judged"] & (np.arange(len(s["weights"])) >= len(first["weights"]) + ds.window - 1)
        w_line, w_conf = fit.window_lines(tracker, out["operation"], s["line_logits"])
        y = s["line_target"][scored]
        for name, w in weights.items():
            line = np.where(w * w_conf > out["line_confidence"], w_line, out["line"])[scored]
            exact[name].append(float(np.mean((line == y) & (y >= 0))))
    return {"checkpoint": str(path), "weights": weights, "exact": {k: float(np.mean(v)) for k, v in exact.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--checkpoints", type=Path, nargs="+", required=True)
    ap.add_argument("--output", type=Path, default=ROOT / "results" / "next_program_stream.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = load_dataset(args.dataset)
    rows = [next_program_exact(p, ds, seed) for seed, p in enumerate(args.checkpoints)]
    print("| checkpoint | " + " | ".join(f"exact, {k}" for k in rows[0]["exact"]) + " |")
    print("|---|" + "---|" * len(rows[0]["exact"]))
    for r in rows:
        cells = " | ".join(f"{100 * v:.1f} (w {r['weights'][k]:g})" for k, v in r["exact"].items())
        print(f"| {r['checkpoint']} | {cells} |")
    write_json(args.output, {"checkpoints": rows})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
