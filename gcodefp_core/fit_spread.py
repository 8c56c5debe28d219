"""Fitting the operation spread evidence (gcodefp_core.runtime.operation_spread) on the training runs.

Samples are windows' last rows at every `stride`-th row of each training run (the spread of 16 rows
changes slowly: every 4th row loses nothing and fits 4x faster), labelled with the run's operation.
The classifier is a multinomial logistic regression on standardised spreads, full batch with L-BFGS
and a small L2 penalty; the standardisation is folded into the weights so the runtime applies them
to raw spreads.
"""
from __future__ import annotations

import numpy as np

from .runtime.operation_spread import OperationSpread


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, iters: int = 80, l2: float = 1e-3,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression -> (w [F, classes], b [classes]) with logits = x @ w + b on the
    raw features. Deterministic for a seed (the initial weights)."""
    import torch

    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt = torch.as_tensor((x - mu) / sd, dtype=torch.float32)
    yt = torch.as_tensor(np.asarray(y, np.int64))
    generator = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(xt.shape[1], n_classes)
    with torch.no_grad():
        bound = 1 / np.sqrt(xt.shape[1])
        lin.weight.copy_(torch.rand(lin.weight.shape, generator=generator) * 2 * bound - bound)
        lin.bias.zero_()
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xt), yt) + l2 * lin.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    w = lin.weight.detach().numpy().astype(np.float64).T / sd[:, None]
    return w, lin.bias.detach().numpy().astype(np.float64) - mu @ w


def fit_operation_spread(ds, rows: int = 16, stride: int = 4, seed: int = 0) -> OperationSpread:
    """The spread model of a dataset's training runs (their normalised continuous inputs)."""
    x, feats, labels = ds.arrays["rows_continuous"], [], []
    for run in (r for r in ds.manifest["runs"] if r["split"] == "train"):
        ends = run["first_row"] + np.arange(rows - 1, run["rows"], stride)
        if not len(ends):
            continue
        feats.append(OperationSpread.spread(x[ends[:, None] + np.arange(-rows + 1, 1)], rows))
        labels.append(np.full(len(ends), ds.operations.index(run["operation"])))
    if not feats:
        raise ValueError(f"operation spread: no training run has {rows} rows")
    w, b = fit_logistic(np.concatenate(feats), np.concatenate(labels), len(ds.operations), seed=seed)
    return OperationSpread(w, b, rows)
