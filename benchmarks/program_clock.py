"""How far a program clock alone goes: no sensors, no model, only "how many rows since the program
started" and the training runs' timing.

Each operation runs one fixed program, and runs of one program take almost the same number of rows
(adaptive: 345-346 of 346; pocket: 296-301). So the row offset since the program started, looked up
in the training runs of the same program (the most common line at that offset), predicts the line.
This is not something a window model can use: a 64-row window does not say where the program
started. It measures what a streaming monitor would gain by keeping that one number per machine,
and it is the reference for the side-channel exact-line bar. Streaming mode (gcodefp_core.runtime.clock)
uses the same clock with the operation inferred from the sensors.

    .venv/bin/python benchmarks/program_clock.py --dataset DIR [--output results/program_clock.json]

DIR is a built dataset (`gcodefp build-dataset`); the feature set does not matter. The operation
is taken as known (the program clock needs it); test split, every window, per operation.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from gcodefp_core.clock_fitting import build_program_clock
from gcodefp_core.dataset import load_dataset
from gcodefp_core.fileio import write_json
from gcodefp_core.programs import build_line_table


def evaluate(ds, split: str = "test") -> dict:
    """The clock alone (gcodefp_core.runtime.clock.ProgramClock, the operation known): per window, is the
    most common training line at its row offset the target line?"""
    table = build_line_table(ds)
    clock = build_program_clock(ds, table)
    run_of, runs = ds.arrays["row_run"], ds.manifest["runs"]
    ids = ds.split_windows(split)
    hits: dict[str, list[bool]] = defaultdict(list)
    for w, op, target in zip(ids, ds.operation_labels(ids), ds.target_lines(ids)):
        run = runs[int(run_of[w])]
        hit = clock.lookup(table.operation_program[op], int(w) - run["first_row"])
        hits[run["operation"]].append(hit is not None and table.lines[hit[0]] == target)
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
