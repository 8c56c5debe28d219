"""A run as a monitor receives it, and what the models say over it: the streams the program tracker is
tuned on (gcodefp_core.fit_program_tracker) and evaluated under (gcodefp_core.evaluate, benchmarks/).
Training-side code: torch is allowed here.

- `make_stream`: the row offsets received: attached late, rows lost, a pause;
- `stream_windows` / `stream_outputs`: the window ending at each received row (a window with fewer
  than 64 received rows is padded with its first row, and its evidence weight is the share of real
  rows) and the window model's logits over them;
- `evidence_scores` / `stream_record`: the operation evidence from the readings (templates, spread)
  of each window, and everything a replay needs in one record.
"""
from __future__ import annotations

import numpy as np


def make_stream(n_rows: int, rng: np.random.Generator, attach: float | None = None, loss: float = 0.0,
                pause_rows: int = 0) -> np.ndarray:
    """The row offsets (within the run) a monitor receives, in order.
    attach: attach at a uniformly random fraction in [attach, 0.75] of the run (None: from row 0);
    loss: each row after attachment is lost with this probability; pause_rows: at a random row in
    the middle third, that row's readings repeat this many extra times (the machine stands still)."""
    first = int(rng.uniform(attach, max(attach, 0.75)) * n_rows) if attach is not None else 0
    rows = np.arange(first, n_rows)
    if loss:
        keep = rng.random(len(rows)) >= loss
        keep[0] = True
        rows = rows[keep]
    if pause_rows:
        at = int(rng.integers(len(rows) // 3, 2 * len(rows) // 3))
        rows = np.concatenate([rows[:at + 1], np.full(pause_rows, rows[at]), rows[at + 1:]])
    return rows


def stream_windows(ds, run: dict, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dataset row indices of the window ending at each received row [len, W] (padded with the
    first received row) and each window's share of real rows."""
    w = ds.window
    got = run["first_row"] + np.asarray(offsets, np.int64)
    j = np.arange(len(got))[:, None] + np.arange(-w + 1, 1)[None, :]
    return got[np.clip(j, 0, None)], np.minimum(np.arange(len(got)) + 1, w) / w


def stream_outputs(models: list, ds, rows: np.ndarray, batch_size: int = 512) -> dict[str, np.ndarray]:
    """Mean (over ensemble members) op and line logits of windows given as dataset row indices."""
    import torch

    cont = ds.arrays["rows_continuous"]
    cat = ds.arrays["rows_categorical"]
    op, line = [], []
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            r = rows[s:s + batch_size]
            c, k = torch.as_tensor(cont[r]), torch.as_tensor(cat[r].astype(np.int64))
            o, li = 0.0, 0.0
            for m in models:
                m.eval()
                oo, ll = m.heads(m.summarise(c, k))
                o, li = o + oo.double() / len(models), li + ll.double() / len(models)
            op.append(o.numpy())
            line.append(li.numpy())
    return {"op_logits": np.concatenate(op), "line_logits": np.concatenate(line)}


def evidence_scores(evidence, ds, rows: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Operation evidence (OperationTemplates or OperationSpread: .scores) per operation of windows
    given as dataset row indices [n, W]."""
    cont = ds.arrays["rows_continuous"]
    return np.concatenate([evidence.scores(cont[rows[s:s + batch_size]]) for s in range(0, len(rows), batch_size)])


def stream_record(models: list, ds, run: dict, offsets: np.ndarray, classes: np.ndarray,
                  evidence: dict | None = None) -> dict:
    """One received stream of a run: the window model's logits, evidence weights (share of real rows),
    repeated-row flags (the row's features equal the previous row's), targets, and per kind of
    operation evidence given ({"template": OperationTemplates, "spread": OperationSpread}, None
    values skipped) each window's scores under that key."""
    rows, weights = stream_windows(ds, run, offsets)
    got = run["first_row"] + np.asarray(offsets, np.int64)
    cont = ds.arrays["rows_continuous"][got]
    repeated = np.concatenate([[False], (cont[1:] == cont[:-1]).all(axis=1)])
    extra = {k: evidence_scores(e, ds, rows) for k, e in (evidence or {}).items() if e is not None}
    return stream_outputs(models, ds, rows) | extra | {"weights": weights, "repeated": repeated, "line_target": classes[got],
                                               "op_target": ds.operations.index(run["operation"]), "offsets": offsets}
