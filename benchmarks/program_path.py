"""The program path (gcodefp_core.runtime.program_path) on the test runs: exact-line match and G-code word
accuracy of the line head alone against the line head snapped onto the program's tool path, per
operation, mean [min-max] over seeds, plus the ensemble; and what snapping costs per window.

A checkpoint trained before the program path existed gets its path built and its tolerance chosen
on the validation split here, the way `gcodefp train` does it (nothing is written back).

    .venv/bin/python benchmarks/program_path.py --dataset DIR --checkpoints A.pt B.pt C.pt
        [--output results/program_path.json]

DIR is the built `full` dataset the checkpoints were trained on (`gcodefp build-dataset --config
configs/production.json -o DIR`), rebuilt by this version so it has the line numbers.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from gcodefp_core.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]
MODES = ("line_head", "snapped")
METRICS = ("exact_match", "word_acc")


def ensure_path(loaded, ds):
    """-> (the bundle with a fitted program path, whether it was fitted here: its checkpoint had none)."""
    from gcodefp_core.path_fitting import path_for_model

    if loaded.bundle.program_path is not None:
        return loaded.bundle, False
    path, _ = path_for_model(loaded.model, loaded.bundle, ds, ds.split_windows("val"))
    if path is None:
        raise SystemExit(f"{ds.path}: no program path (a side_channel dataset, or built before line numbers were kept)")
    return loaded.bundle.replace(program_path=path), True


def score(models: list, bundle, ds) -> dict:
    """Line head alone vs snapped, overall and per operation, on the test split."""
    from gcodefp_core import evaluate

    ids = ds.split_windows("test")
    pred = evaluate.predict(models, bundle, ds, ids, greedy=False)
    out = {}
    for mode, key in (("line_head", "line_model"), ("snapped", "line_pred")):
        scores = evaluate.line_scores(dict(pred, line_pred=pred[key]), ds, ids, bundle.line_table.lines)
        out[mode] = {"overall": evaluate.summarise(scores), "per_operation": {}}
        for i, op in enumerate(ds.operations):
            idx = np.flatnonzero(pred["operation"] == i)
            if len(idx):
                out[mode]["per_operation"][op] = evaluate.summarise(scores, idx)
    out["changed_share"] = float((pred["line_pred"] != pred["line_model"]).mean())
    out["tolerance_mm"] = bundle.program_path.tolerance_mm
    return out


def snap_cost_us(bundle, ds, n: int = 2000) -> float:
    """Median microseconds to snap one window (batch 1), as the server does after the predict graph."""
    ids = ds.split_windows("test")[:n]
    rows = ds.arrays["rows_continuous"][ids]
    program = np.zeros(1, np.int64)
    times = []
    for i in range(len(ids)):
        program[0] = bundle.line_table.operation_program[ds.operation_labels(ids[i:i + 1])[0]]
        t = time.perf_counter()
        bundle.program_path.snap(program, rows[i:i + 1], np.zeros(1, np.int64), np.zeros(1))
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def table(singles: dict, ensemble: dict) -> str:
    head = f"{'operation':<16}" + "".join(f"{mode + ' ' + m:>26}" for mode in MODES for m in METRICS) + \
        f"{'ensemble snapped exact':>26}"
    lines = [head]
    for row in singles["line_head"]:
        cells = [singles[mode][row][m] for mode in MODES for m in METRICS]
        ens = ensemble["snapped"]["overall" if row == "overall" else "per_operation"]
        ens = ens if row == "overall" else ens[row]
        lines.append(f"{row:<16}" + "".join(f"{100 * v[0]:>13.1f} [{100 * v[1]:4.1f}-{100 * v[2]:5.1f}]" for v in cells)
                     + f"{100 * ens['exact_match']:>26.1f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--checkpoints", type=Path, nargs="+", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", type=Path, default=ROOT / "results/program_path.json")
    args = ap.parse_args()

    import torch

    from gcodefp_core.checkpoints import load_checkpoint
    from gcodefp_core.dataset import load_dataset
    from gcodefp_core.evaluate import seed_spread

    torch.set_num_threads(args.threads)
    ds = load_dataset(args.dataset)
    loaded = [load_checkpoint(c) for c in args.checkpoints]
    models = [c.model for c in loaded]
    bundles, fitted = zip(*(ensure_path(c, ds) for c in loaded))
    reports = [score([c.model], b, ds) for c, b in zip(loaded, bundles)]
    ensemble = score(models, bundles[0], ds)
    singles = {mode: seed_spread([r[mode] for r in reports], METRICS) for mode in MODES}
    result = {
        "dataset": str(args.dataset), "checkpoints": [str(c) for c in args.checkpoints],
        "windows": int(len(ds.split_windows("test"))), "singles": reports, "fitted_here": fitted,
        "mean_min_max": singles, "ensemble": ensemble,
        "segments": bundles[0].program_path.n_segments, "snap_us_per_window": snap_cost_us(bundles[0], ds),
    }
    write_json(args.output, result)
    print(f"test split, {result['windows']} windows, mean [min-max] over {len(models)} seeds, %")
    print(table(singles, ensemble))
    print(f"tolerance (chosen on validation): {[r['tolerance_mm'] for r in reports]} mm; snapping changed "
          f"{100 * statistics.mean(r['changed_share'] for r in reports):.1f}% of the answers; "
          f"{result['segments']} segments; {result['snap_us_per_window']:.1f} us per window at batch 1")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
