"""Fitting streaming mode's program clock on the training runs and choosing its weight on validation.

The clock and the per-machine tracker are serving code: gcodefp_core.runtime.clock.
"""
from __future__ import annotations

import numpy as np

from .programs import LineTable, row_classes
from .runtime.clock import ProgramClock, StreamTracker

WEIGHT_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 1e6)


def build_program_clock(ds, table: LineTable, weight: float = 1.0) -> ProgramClock:
    """The clock of a dataset's training runs, over the line classes of `table`."""
    classes = row_classes(ds, table)
    runs = [r for r in ds.manifest["runs"] if r["split"] == "train"]
    lines, shares = [], []
    for p in range(len(table.programs)):
        mine = [r for r in runs if table.operation_program[ds.operations.index(r["operation"])] == p]
        length = max((r["rows"] for r in mine), default=0)
        counts = np.zeros((length, table.n_lines + 1), np.int64)   # last column: a line the table lacks
        for r in mine:
            c = classes[r["first_row"]:r["first_row"] + r["rows"]]
            counts[np.arange(len(c)), np.where(c >= 0, c, table.n_lines)] += 1
        best = counts[:, :-1].argmax(axis=1) if length else np.zeros(0, np.int64)
        top = counts[np.arange(length), best]
        shares.append(top / np.maximum(counts.sum(axis=1), 1))
        lines.append(np.where(top > 0, best, -1).astype(np.int64))
    return ProgramClock(list(table.programs), lines, shares, weight)


def replay(clock: ProgramClock, operation_program, ds, window_ids: np.ndarray, op_logits: np.ndarray,
           line: np.ndarray, line_confidence: np.ndarray) -> dict[str, np.ndarray]:
    """Stream every run's windows (in row order) through a fresh tracker -> per window (in the
    order of window_ids): operation, line, clock (bool: the clock answered)."""
    window_ids = np.asarray(window_ids, np.int64)
    runs = ds.manifest["runs"]
    run_of = ds.arrays["row_run"][window_ids]
    out = {"operation": np.zeros(len(window_ids), np.int64), "line": np.zeros(len(window_ids), np.int64),
           "clock": np.zeros(len(window_ids), bool)}
    for run in np.unique(run_of):
        idx = np.flatnonzero(run_of == run)
        idx = idx[np.argsort(window_ids[idx])]
        tracker = StreamTracker(clock, np.asarray(operation_program))
        for i in idx:
            step = tracker.update(int(window_ids[i]) - runs[run]["first_row"], op_logits[i], int(line[i]),
                                  float(line_confidence[i]))
            out["operation"][i], out["line"][i], out["clock"][i] = step.operation, step.line, step.line_source == "clock"
    return out


def fit_program_clock(ds, table: LineTable, val_pred: dict, val_ids: np.ndarray,
                      grid: tuple[float, ...] = WEIGHT_GRID) -> tuple[ProgramClock, dict]:
    """Build the clock and choose its weight by streamed exact-line match on the validation split.
    val_pred: evaluate.predict's op_prob, line_pred, line_confidence for the windows val_ids.
    -> (clock, {weight: validation exact match})."""
    clock = build_program_clock(ds, table)
    targets = ds.target_lines(val_ids)
    op = np.log(np.clip(val_pred["op_prob"], 1e-12, None))
    scores = {}
    for w in grid:
        clock.weight = w
        streamed = replay(clock, table.operation_program, ds, val_ids, op, val_pred["line_pred"],
                          val_pred["line_confidence"])
        scores[w] = float(np.mean([table.lines[i] == t for i, t in zip(streamed["line"], targets)]))
    clock.weight = max(grid, key=lambda w: (scores[w], -w))  # ties: trust the model more
    return clock, scores
