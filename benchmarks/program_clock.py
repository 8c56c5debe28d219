"""How far a program clock alone goes: no sensors, no model, only "how many rows since the program
started" and the training runs' timing.

Each operation runs one fixed program, and runs of one program take almost the same number of rows
(adaptive: 345-346 of 346; pocket: 296-301). So the row offset since the program started, looked up
in the training runs of the same program (the most common line at that offset), predicts the line.
This is not something a window model can use: a 64-row window does not say where the program
started. It measures what a streaming monitor would gain by keeping that one number per machine,
and it is the reference for the side-channel exact-line bar: the ceiling of a tracker that names
the line from the offset. Two lookups: timelines per program (the row clock; streaming mode of older
packages, gcodefp_core.runtime.clock, uses it with the operation inferred from the sensors) and per
operation (the program tracker's).

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
from gcodefp_core.fit_program_tracker import build_program_tracker
from gcodefp_core.programs import build_line_table


def evaluate(ds, split: str = "test") -> dict:
    """The clock alone, the operation known: per window, is the most common training line at its row
    offset the target line? Two lookups: `per_program` (gcodefp_core.runtime.clock.ProgramClock: one
    timeline per program, damaged variants mixed with the normal runs) and `per_operation` (the
    program tracker's timelines since ba282ab: each operation's own runs, so a damaged variant keeps
    its own pace)."""
    table = build_line_table(ds)
    clock = build_program_clock(ds, table)
    tracker = build_program_tracker(ds, table, top_k=1)
    run_of, runs = ds.arrays["row_run"], ds.manifest["runs"]
    ids = ds.split_windows(split)
    hits = {"per_program": defaultdict(list), "per_operation": defaultdict(list)}
    for w, op, target in zip(ids, ds.operation_labels(ids), ds.target_lines(ids)):
        run = runs[int(run_of[w])]
        offset = int(w) - run["first_row"]
        hit = clock.lookup(table.operation_program[op], offset)
        hits["per_program"][run["operation"]].append(hit is not None and table.lines[hit[0]] == target)
        timeline = tracker.timeline_line[tracker.operation_program[op]][:, 0]
        line = int(timeline[min(offset, len(timeline) - 1)])
        hits["per_operation"][run["operation"]].append(line < table.n_lines and table.lines[line] == target)
    out = {"windows": len(ids)}
    for kind, per in hits.items():
        out[kind] = {"overall": float(np.mean([h for v in per.values() for h in v])),
                     "per_operation": {op: {"exact_match": float(np.mean(v)), "windows": len(v)}
                                       for op, v in sorted(per.items())}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True, help="a built dataset folder")
    ap.add_argument("--split", default="test")
    ap.add_argument("--output", type=Path, default=Path("results/program_clock.json"))
    args = ap.parse_args()
    result = evaluate(load_dataset(args.dataset), args.split)
    print(f"program clock (row offset since the program started + known operation), {args.split} split, exact line:")
    print(f"{'operation':<16}{'windows':>9}{'per program':>13}{'per operation':>15}")
    per_program, per_operation = result["per_program"], result["per_operation"]
    for op, m in per_program["per_operation"].items():
        print(f"{op:<16}{m['windows']:>9}{100 * m['exact_match']:>12.1f}%"
              f"{100 * per_operation['per_operation'][op]['exact_match']:>14.1f}%")
    print(f"{'OVERALL':<16}{result['windows']:>9}{100 * per_program['overall']:>12.1f}%{100 * per_operation['overall']:>14.1f}%")
    write_json(args.output, result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
