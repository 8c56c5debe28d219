"""Why is a whole unseen run called another operation? Operation accuracy of a simple per-row
classifier (multinomial logistic regression on the side-channel features, torch, full batch) under
the project's split by run and under leave-sessions-out, for several feature variants.

The logs carry no date (the controller's `mark` field is not a timestamp), so a *session* here is
the set of sensor boards a run recorded: boards are mounted and removed between recording sessions,
and runs with the same set were recorded under the same setup. Leave-sessions-out: the sessions are
split into 5 folds; each fold's runs are predicted by a classifier trained on the other folds'.
Variants:
- all:        every side-channel feature, a missing board filled with the training mean (as the model);
- presence:   only which boards the run recorded (16 indicators): how much the board set alone says;
- common:     the motor currents and the boards every run recorded (no presence pattern to read);
- centred:    all, minus each run's own mean per channel (a running mean online): no per-run offsets;
- centred_common: both;
- centred_plus_spread: centred, plus each channel's spread over the last 16 rows (level-free).
With --checkpoints, the window model itself (test split): per test run, its operation accuracy, and
the same with every board outside the common set blanked (filled as if absent), which removes the
board-presence pattern and the boards' levels at once.
Scores are row accuracy, and "runs right" = share of runs whose majority vote is their operation.

    .venv/bin/python benchmarks/operation_across_sessions.py --dataset data/side [--output results/operation_across_sessions.json]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from gcodefp_core.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]


def run_features(ds, stride: int) -> dict:
    """Per row (every `stride`-th): features of each variant, operation, run index, session id."""
    from gcodefp_core.schema import NODES

    x, runs = ds.arrays["rows_continuous"].astype(np.float64), ds.manifest["runs"]
    names = ds.continuous_features
    board_of = np.array([n.split(".")[0] if "." in n else "" for n in names])
    every = set.intersection(*(set(r["boards_present"]) for r in runs))
    common = np.array([b == "" or b in every for b in board_of])
    sessions = {s: i for i, s in enumerate(sorted({tuple(r["boards_present"]) for r in runs}))}
    rows, centred, dynamics, presence, op, run_id, session = [], [], [], [], [], [], []
    for i, r in enumerate(runs):
        block = x[r["first_row"]:r["first_row"] + r["rows"]]
        pick = np.arange(0, r["rows"], stride)
        rows.append(block[pick])
        centred.append(block[pick] - block.mean(0))
        # Spread over the last 16 rows: what moves, not the level a board was mounted at.
        c = np.cumsum(np.pad(block, ((16, 0), (0, 0)), mode="edge"), 0)
        c2 = np.cumsum(np.pad(block ** 2, ((16, 0), (0, 0)), mode="edge"), 0)
        m, m2 = (c[16:] - c[:-16]) / 16, (c2[16:] - c2[:-16]) / 16
        dynamics.append(np.sqrt(np.clip(m2 - m ** 2, 0, None))[pick])
        presence.append(np.tile([float(n in r["boards_present"]) for n in NODES], (len(pick), 1)))
        op += [ds.operations.index(r["operation"])] * len(pick)
        run_id += [i] * len(pick)
        session += [sessions[tuple(r["boards_present"])]] * len(pick)
    a, c = np.concatenate(rows), np.concatenate(centred)
    variants = {"all": a, "presence": np.concatenate(presence), "common": a[:, common], "centred": c,
                "centred_common": c[:, common], "centred_plus_spread": np.concatenate([c, np.concatenate(dynamics)], 1)}
    return {"variants": variants, "op": np.array(op), "run": np.array(run_id), "session": np.array(session),
            "n_sessions": len(sessions), "common_boards": sorted(every)}


def fit_linear(x_train, y_train, n_classes: int, iters: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression on standardised features (L-BFGS, full batch, small L2)
    -> (w [F, classes], b [classes]) that apply to the raw features: logits = x @ w + b. The core's
    fitter, which the served spread evidence uses (gcodefp_core.fit_spread)."""
    from gcodefp_core.fit_spread import fit_logistic

    return fit_logistic(x_train, y_train, n_classes, iters=iters)


def fit_predict(x_train, y_train, x_test, n_classes: int, iters: int = 60) -> np.ndarray:
    w, b = fit_linear(x_train, y_train, n_classes, iters)
    return (x_test @ w + b).argmax(1)


def scores(pred, data, mask) -> dict:
    run_right = [np.bincount(pred[mask & (data["run"] == r)]).argmax() == data["op"][data["run"] == r][0]
                 for r in np.unique(data["run"][mask])]
    return {"row_acc": float((pred[mask] == data["op"][mask]).mean()), "runs_right": float(np.mean(run_right)),
            "runs": len(run_right)}


def window_model_runs(ds, checkpoints: list[Path], common_boards: list[str]) -> dict:
    """Per checkpoint and test run: window op accuracy, as is and with non-common boards blanked."""
    import torch

    from gcodefp_core.checkpoints import load_checkpoint

    names = ds.continuous_features
    blank = np.array(["." in n and n.split(".")[0] not in common_boards for n in names])
    ids = ds.split_windows("test")
    runs = ds.arrays["row_run"][ids]
    out = {}
    for path in checkpoints:
        model = load_checkpoint(path).model
        preds = {"as_is": [], "blanked": []}
        with torch.no_grad():
            for s in range(0, len(ids), 512):
                b = ds.batch(ids[s:s + 512])
                for key in preds:
                    x = b["continuous"].copy()
                    if key == "blanked":
                        x[:, :, blank] = 0.0     # the training mean: how an absent board is filled
                    op, _ = model.heads(model.summarise(torch.as_tensor(x), torch.as_tensor(b["categorical"])))
                    preds[key].append(op.argmax(1).numpy())
        preds = {k: np.concatenate(v) for k, v in preds.items()}
        truth = ds.operation_labels(ids)
        per_run = {}
        for r in np.unique(runs):
            sel = runs == r
            meta = ds.manifest["runs"][r]
            wrong = np.bincount(preds["as_is"][sel], minlength=len(ds.operations))
            wrong[truth[sel][0]] = -1
            same_op_sets = {tuple(x["boards_present"]) for x in ds.manifest["runs"]
                            if x["split"] == "train" and x["operation"] == meta["operation"]}
            per_run[meta["name"]] = {"as_is": float((preds["as_is"][sel] == truth[sel]).mean()),
                                     "blanked": float((preds["blanked"][sel] == truth[sel]).mean()),
                                     "most_common_wrong": ds.operations[int(wrong.argmax())],
                                     "board_set_seen_in_training_of_its_operation": tuple(meta["boards_present"]) in same_op_sets}
        out[str(path)] = per_run
        bad = {k: v for k, v in per_run.items() if v["as_is"] < 0.9}
        print(f"{path}: overall as is {np.mean(preds['as_is'] == truth):.3f}, blanked {np.mean(preds['blanked'] == truth):.3f}; "
              f"runs below 90%: " + "; ".join(f"{k} {v['as_is']:.2f} -> {v['blanked']:.2f} (calls it {v['most_common_wrong']}, "
                                               f"board set seen: {v['board_set_seen_in_training_of_its_operation']})" for k, v in bad.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--checkpoints", type=Path, nargs="*", default=[])
    ap.add_argument("--output", type=Path, default=ROOT / "results/operation_across_sessions.json")
    args = ap.parse_args()
    import torch

    from gcodefp_core.dataset import load_dataset

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ds = load_dataset(args.dataset)
    data = run_features(ds, args.stride)
    split = np.array([r["split"] for r in ds.manifest["runs"]])[data["run"]]
    fold_of_session = np.random.default_rng(0).permutation(data["n_sessions"]) % args.folds
    fold = fold_of_session[data["session"]]
    n = len(ds.operations)
    report = {"common_boards": data["common_boards"], "sessions": data["n_sessions"], "variants": {}}
    print(f"{data['n_sessions']} sessions (board sets); boards every run has: {data['common_boards']}")
    print(f"{'variant':<16}{'split by run: rows':>20}{'runs right':>12}{'sessions out: rows':>20}{'runs right':>12}")
    for name, x in data["variants"].items():
        train = split == "train"
        by_run = scores(fit_predict(x[train], data["op"][train], x, n), data, split == "test")
        pred = np.zeros(len(x), np.int64)
        for f in range(args.folds):
            out = fold == f
            pred[out] = fit_predict(x[~out], data["op"][~out], x[out], n)
        by_session = scores(pred, data, np.ones(len(x), bool))
        report["variants"][name] = {"split_by_run": by_run, "sessions_out": by_session}
        print(f"{name:<16}{100 * by_run['row_acc']:>20.1f}{100 * by_run['runs_right']:>12.1f}"
              f"{100 * by_session['row_acc']:>20.1f}{100 * by_session['runs_right']:>12.1f}", flush=True)
    if args.checkpoints:
        report["window_model_runs"] = window_model_runs(ds, args.checkpoints, data["common_boards"])
    write_json(args.output, report)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
