"""Can a stream name its operation from level-free sensor evidence? An offline study for the tracker.

A per-row multinomial logistic regression reads each received row of a stream *relative to the
stream's own running mean* (what a monitor can compute online: the mean of the rows it has
received so far, from wherever it attached), plus each channel's spread over the last 16 received
rows. Its per-row log-probabilities are summed over the stream (an operation does not change
inside a run), and the stream's operation is their argmax. The running mean removes what a
recording session adds to every reading (a board's mounting offset, its calibration), which the
per-row study (`operation_across_sessions.py`) found to be what fails to transfer across sessions.

Conditions, as in `stream_conditions.py`: from the program start (scored from row 63) and attached
at a random row 25-75% into the run with 5% of rows lost (scored from 30 received rows after
attachment). Evaluated on the dataset's test split (trained on its train runs) and with whole
sessions (board sets) held out in 5 folds. Training rows are featurised the same online way, from
the run start and from a random attachment point per run.

    .venv/bin/python benchmarks/stream_operation_evidence.py --dataset data/side [--output results/stream_operation_evidence.json]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from gcodefp_core.fileio import write_json
from operation_across_sessions import fit_linear   # this folder: the same classifier as the per-row study

ROOT = Path(__file__).resolve().parents[1]
SPREAD_ROWS = 16


def online_features(block: np.ndarray, variant: str) -> np.ndarray:
    """Rows as a monitor receives them, in order -> per-row features computed only from the past."""
    n = len(block)
    running_mean = np.cumsum(block, 0) / np.arange(1, n + 1)[:, None]
    padded = np.concatenate([np.repeat(block[:1], SPREAD_ROWS - 1, 0), block])
    c, c2 = np.cumsum(np.pad(padded, ((1, 0), (0, 0))), 0), np.cumsum(np.pad(padded ** 2, ((1, 0), (0, 0))), 0)
    m = (c[SPREAD_ROWS:] - c[:-SPREAD_ROWS]) / SPREAD_ROWS
    m2 = (c2[SPREAD_ROWS:] - c2[:-SPREAD_ROWS]) / SPREAD_ROWS
    spread = np.sqrt(np.clip(m2 - m ** 2, 0, None))
    centred = block - running_mean
    smooth_centred = m - running_mean  # the last 16 rows' mean against the stream's: slow, level-free
    if variant == "raw":
        return block
    if variant == "centred":
        return centred
    if variant == "centred_spread":
        return np.concatenate([centred, spread], 1)
    if variant == "centred_spread_smooth":
        return np.concatenate([centred, spread, smooth_centred], 1)
    if variant == "raw_spread":
        return np.concatenate([block, spread], 1)
    if variant == "spread":
        return spread
    if variant == "centred_logspread":
        return np.concatenate([centred, np.log(spread + 0.01)], 1)
    raise ValueError(variant)


def stream_views(block: np.ndarray, rng, condition: str) -> tuple[np.ndarray, int]:
    """-> indices of the rows a monitor receives, and how many received rows precede the scored ones."""
    n = len(block)
    if condition == "start":
        return np.arange(n), 63
    start = int(rng.integers(int(0.25 * n), int(0.75 * n)))
    idx = np.arange(start, n)
    if condition == "attached_lost5":
        idx = idx[rng.random(len(idx)) >= 0.05]
    return idx, 30


def log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def training_rows(blocks, ops, variant, rng, stride: int):
    xs, ys = [], []
    for block, op in zip(blocks, ops):
        for condition in ("start", "attached"):
            idx, _ = stream_views(block, rng, condition)
            f = online_features(block[idx], variant)[8::stride]   # skip the first rows: no mean yet
            xs.append(f)
            ys.append(np.full(len(f), op))
    return np.concatenate(xs), np.concatenate(ys)


def evaluate(blocks, ops, model, variant, condition, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    w, b = model
    row_right, runs_right, per_op = [], [], {}
    for block, op in zip(blocks, ops):
        idx, skip = stream_views(block, rng, condition)
        logp = log_softmax(online_features(block[idx], variant) @ w + b)
        streamed = np.cumsum(logp, 0).argmax(1)[skip:]
        window = logp.argmax(1)[skip:]
        row_right.append(streamed == op)
        runs_right.append(np.mean(streamed == op))
        per_op.setdefault(int(op), []).append((float(np.mean(streamed == op)), float(np.mean(window == op))))
    rows = np.concatenate(row_right)
    return {"streamed_row_acc": float(rows.mean()), "runs_fully_right": float(np.mean([r == 1.0 for r in runs_right])),
            "per_operation": per_op}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--variants", nargs="+", default=["raw", "centred", "centred_spread", "centred_spread_smooth"])
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--output", type=Path, default=ROOT / "results/stream_operation_evidence.json")
    args = ap.parse_args()
    import torch

    from gcodefp_core.dataset import load_dataset

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ds = load_dataset(args.dataset)
    x = ds.arrays["rows_continuous"].astype(np.float64)
    runs = ds.manifest["runs"]
    blocks = [x[r["first_row"]:r["first_row"] + r["rows"]] for r in runs]
    ops = np.array([ds.operations.index(r["operation"]) for r in runs])
    split = np.array([r["split"] for r in runs])
    sessions = {s: i for i, s in enumerate(sorted({tuple(r["boards_present"]) for r in runs}))}
    session = np.array([sessions[tuple(r["boards_present"])] for r in runs])
    fold = (np.random.default_rng(0).permutation(len(sessions)) % args.folds)[session]
    n = len(ds.operations)
    report = {"operations": list(ds.operations), "variants": {}}
    print(f"{'variant':<24}{'condition':<16}{'test: rows':>12}{'runs all right':>16}{'sessions out: rows':>20}{'runs':>8}")
    for variant in args.variants:
        rng = np.random.default_rng(1)
        torch.manual_seed(0)   # each variant's figures independent of which ran before it
        train = [i for i in range(len(runs)) if split[i] != "test"]
        model = fit_linear(*training_rows([blocks[i] for i in train], ops[train], variant, rng, args.stride), n, iters=80)
        folds = []
        for f in range(args.folds):
            tr = [i for i in range(len(runs)) if fold[i] != f]
            folds.append(fit_linear(*training_rows([blocks[i] for i in tr], ops[tr], variant, rng, args.stride), n, iters=80))
        report["variants"][variant] = {}
        for condition in ("start", "attached_lost5"):
            test = [i for i in range(len(runs)) if split[i] == "test"]
            by_run = evaluate([blocks[i] for i in test], ops[test], model, variant, condition, seed=7)
            rows, runs_all = [], []
            for f in range(args.folds):
                out = [i for i in range(len(runs)) if fold[i] == f]
                r = evaluate([blocks[i] for i in out], ops[out], folds[f], variant, condition, seed=7)
                rows.append((r["streamed_row_acc"], len(out)))
                runs_all.append((r["runs_fully_right"], len(out)))
            by_session = {"streamed_row_acc": sum(a * k for a, k in rows) / sum(k for _, k in rows),
                          "runs_fully_right": sum(a * k for a, k in runs_all) / sum(k for _, k in runs_all)}
            report["variants"][variant][condition] = {"test_split": by_run, "sessions_out": by_session}
            print(f"{variant:<24}{condition:<16}{100 * by_run['streamed_row_acc']:>12.1f}{100 * by_run['runs_fully_right']:>16.1f}"
                  f"{100 * by_session['streamed_row_acc']:>20.1f}{100 * by_session['runs_fully_right']:>8.1f}", flush=True)
    write_json(args.output, report)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
