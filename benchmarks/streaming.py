"""Streaming mode against window mode on the test runs: the same checkpoints, every window, per
operation, mean [min-max] over seeds, plus the ensemble of them.

Window mode judges each 64-row window alone (what /predict answers). Streaming mode
(gcodefp_core.runtime.clock, POST /stream/{machine}) follows each test run from its first row: the
operation evidence of all windows so far adds up, and the row offset since the program started is
looked up in the training runs (the program clock). The clock's weight is chosen on the validation
split; a checkpoint trained before streaming mode existed gets its clock fitted here the same way
`gcodefp train` does it (nothing is written back).

    .venv/bin/python benchmarks/streaming.py --dataset DIR --checkpoints A.pt B.pt C.pt [--name side_channel]
        [--dataset DIR2 --checkpoints ... --name production] [--output results/streaming.json]

Each --dataset is the built dataset its checkpoints were trained on (`gcodefp build-dataset
--config configs/<name>.json`).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from gcodefp_core.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("op_acc", "exact_match", "word_acc")


def score(models: list, bundle, ds) -> dict:
    """Window and streaming reports for one model (or an ensemble) on the test split."""
    from gcodefp_core import evaluate
    from gcodefp_core.clock_fitting import fit_program_clock
    from gcodefp_core.path_fitting import path_for_model

    table = bundle.line_table
    if bundle.program_path is None:  # as `gcodefp train` does: the path first, so the clock is fitted on snapped lines
        bundle = bundle.replace(program_path=path_for_model(models[0], bundle, ds, ds.split_windows("val"))[0])
    clock = bundle.program_clock if len(models) == 1 else None
    val_ids, test_ids = ds.split_windows("val"), ds.split_windows("test")
    fitted = clock is None
    if fitted:
        val = evaluate.predict(models, bundle, ds, val_ids, greedy=False)
        clock, _ = fit_program_clock(ds, table, val, val_ids)
    pred = evaluate.predict(models, bundle, ds, test_ids, greedy=False)
    scores = evaluate.line_scores(pred, ds, test_ids, table.lines)
    window = {"overall": evaluate.summarise(scores), "per_operation": {}}
    for i, op in enumerate(ds.operations):
        idx = np.flatnonzero(pred["operation"] == i)
        if len(idx):
            window["per_operation"][op] = evaluate.summarise(scores, idx)
    streamed = evaluate.stream_report(clock, table, ds, test_ids, pred)
    return {"window": window, "stream": streamed, "clock_weight": clock.weight, "clock_fitted_here": fitted,
            "program_path_tolerance_mm": bundle.program_path.tolerance_mm if bundle.program_path else None}


def table(title: str, window: dict, stream_: dict) -> str:
    head = f"{'operation':<16}" + "".join(f"{'window ' + m:>22}" for m in METRICS) + \
        "".join(f"{'stream ' + m:>22}" for m in METRICS)
    lines = [title, head]
    for row in window:
        cells = [window[row][m] for m in METRICS] + [stream_[row][m] for m in METRICS]
        lines.append(f"{row:<16}" + "".join(f"{100 * v[0]:>9.1f} [{100 * v[1]:4.1f}-{100 * v[2]:5.1f}]" for v in cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, action="append", required=True)
    ap.add_argument("--checkpoints", type=Path, nargs="+", action="append", required=True)
    ap.add_argument("--name", action="append", default=None, help="a label per --dataset (default: its folder name)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", type=Path, default=ROOT / "results/streaming.json")
    args = ap.parse_args()
    if len(args.dataset) != len(args.checkpoints):
        ap.error("give one --checkpoints list per --dataset")
    names = args.name or [d.name for d in args.dataset]

    import torch

    from gcodefp_core.checkpoints import load_checkpoint
    from gcodefp_core.dataset import load_dataset
    from gcodefp_core.evaluate import seed_spread

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = {}
    for name, dataset, ckpts in zip(names, args.dataset, args.checkpoints):
        ds = load_dataset(dataset)
        loaded = [load_checkpoint(c) for c in ckpts]
        models = [c.model for c in loaded]
        singles = [score([c.model], c.bundle, ds) for c in loaded]
        entry = {"dataset": str(dataset), "checkpoints": [str(c) for c in ckpts], "singles": singles,
                 "window": seed_spread([r["window"] for r in singles], METRICS),
                 "stream": seed_spread([r["stream"] for r in singles], METRICS)}
        print(table(f"\n== {name}: test split, mean [min-max] over {len(models)} checkpoints (%)",
                    entry["window"], entry["stream"]))
        if len(models) > 1:
            entry["ensemble"] = score(models, loaded[0].bundle, ds)
            ens = entry["ensemble"]
            print(f"ensemble of {len(models)}: " + "  ".join(
                f"{mode} {m} {100 * ens[mode]['overall'][m]:.1f}" for mode in ("window", "stream") for m in METRICS))
        print("clock weight chosen on validation: " + ", ".join(f"{s['clock_weight']:g}" for s in singles))
        results[name] = entry
    write_json(args.output, results)
    print(f"\nwrote {args.output} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
