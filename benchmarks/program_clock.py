"""How far a program clock alone goes: no sensors, no model, only "how many rows since the program
started" and the training runs' timing.

Each operation runs one fixed program, and runs of one program take almost the same number of rows
(adaptive: 345-346 of 346; pocket: 296-301). So the row offset since the program started, looked up
in the training runs of the same program (the most common line at that offset), predicts the line.
This is not something a window model can use: a 64-row window does not say where the program
started. It measures what a streaming monitor would gain by keeping that one number per machine,
and it is the reference for the side-channel exact-line bar.

    .venv/bin/python benchmarks/program_clock.py --dataset DIR [--output results/program_clock.json]

DIR is a built dataset (`gcodefp build-dataset`); the feature set does not matter. The operation
is taken as known (the program clock needs it); test split, every window, per operation.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from gcodefp_core.dataset import load_dataset
from gcodefp_core.fileio import write_json
from gcodefp_core.schema import PROGRAM_OF


def clock_table(ds) -> dict[tuple[str, int], str]:
    """(program, row offset) -> most common target line among the training runs."""
    line_of = ds.arrays["row_line"]
    counts: dict[tuple[str, int], Counter] = defaultdict(Counter)
    for run in ds.manifest["runs"]:
        if run["split"] != "train":
            continue
        rows = np.arange(run["first_row"], run["first_row"] + run["rows"])
        program = PROGRAM_OF.get(run["operation"], run["operation"])
        for offset, line in enumerate(line_of[rows]):
            counts[(program, offset)][int(line)] += 1
    lines = ds.manifest["lines"]
    return {key: lines[c.most_common(1)[0][0]] for key, c in counts.items()}


def evaluate(ds, split: str = "test") -> dict:
    table = clock_table(ds)
    run_of, runs = ds.arrays["row_run"], ds.manifest["runs"]
    ids = ds.split_windows(split)
    targets = ds.target_lines(ids)
    hits: dict[str, list[bool]] = defaultdict(list)
    for w, target in zip(ids, targets):
        run = int(run_of[w])
        program = PROGRAM_OF.get(runs[run]["operation"], runs[run]["operation"])
        hits[runs[run]["operation"]].append(table.get((program, int(w) - runs[run]["first_row"])) == target)
    out = {"overall": float(np.mean([h for v in hits.values() for h in v])), "windows": len(ids)}
    out["per_operation"] = {op: {"exact_match": float(np.mean(v)), "windows": len(v)} for op, v in sorted(hits.items())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True, help="a built dataset folder")
    ap.add_argument("--split", default="test")
    ap.add_argument("--output", type=Path, default=Path("results/program_clock.json"))
    args = ap.parse_args()
    result = evaluate(load_dataset(args.dataset), args.split)
    print(f"program clock (row offset since the program started + known operation), {args.split} split:")
    print(f"{'operation':<16}{'windows':>9}{'exact line':>12}")
    for op, m in result["per_operation"].items():
        print(f"{op:<16}{m['windows']:>9}{100 * m['exact_match']:>11.1f}%")
    print(f"{'OVERALL':<16}{result['windows']:>9}{100 * result['overall']:>11.1f}%")
    write_json(args.output, result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
