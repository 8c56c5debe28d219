"""Building the program path from the training runs and choosing its snapping tolerance.

The path itself, and snapping a window onto it, is serving code: gcodefp_core.runtime.program_path.
"""
from __future__ import annotations

import numpy as np

from .features import category_key
from .programs import row_classes
from .runtime.program_path import (
    MOTION_COLUMN,
    TOLERANCES_MM,
    ProgramPath,
    arc_points,
    axis_words,
)
from .schema import INCHES, MM_PER_INCH, POSITIONS, UNIT_COLUMN


def build_program_path(ds, table) -> ProgramPath | None:
    """The path of every program from the dataset's training runs; None when the dataset has no
    positions (side_channel) or no line numbers (built before they were kept)."""
    names = ds.continuous_features
    if "row_line_number" not in ds.arrays or not all(p in names for p in POSITIONS):
        return None
    index = [names.index(p) for p in POSITIONS]
    mean = np.asarray(ds.features.mean, np.float64)[index]
    std = np.asarray(ds.features.std, np.float64)[index]
    inches = _inch_rows(ds)
    motion = _motion_modes(ds)
    cls = row_classes(ds, table)
    runs = ds.manifest["runs"]
    run_program = np.asarray(table.operation_program)[[ds.operations.index(r["operation"]) for r in runs]]
    train_runs = np.flatnonzero([r["split"] == "train" for r in runs])
    row_run, number = ds.arrays["row_run"], ds.arrays["row_line_number"]
    ends, classes = [], []
    for p in range(len(table.programs)):
        rows = np.flatnonzero(np.isin(row_run, train_runs[run_program[train_runs] == p]) & (number >= 0) & (cls >= 0))
        seen = ds.arrays["rows_continuous"][rows][:, index].astype(np.float64) * std + mean
        order = np.argsort(number[rows], kind="stable")
        rows, seen = rows[order], seen[order]
        numbers, first = np.unique(number[rows], return_index=True)
        bounds = np.append(first, len(rows))
        prog_ends, prog_classes = [], []
        for k in range(len(numbers)):
            sl = slice(bounds[k], bounds[k + 1])
            line_class = int(np.bincount(cls[rows[sl]]).argmax())
            end = np.median(seen[sl], axis=0)     # where the tool sat on the axes the line does not move
            scale = MM_PER_INCH if inches is not None and inches[rows[sl]].mean() > 0.5 else 1.0
            words = axis_words(table.lines[line_class])
            for axis, value in words.items():
                if axis in "XYZ":
                    end["XYZ".index(axis)] = value * scale
            modes = motion[rows[sl]] if motion is not None else np.empty(0, np.int64)
            modes = modes[modes >= 0]
            mode = int(np.bincount(modes).argmax()) if len(modes) else -1
            if prog_ends and mode in (2, 3) and "R" in words:   # G2 / G3: follow the arc, not its chord
                points = arc_points(prog_ends[-1], end, words["R"] * scale, clockwise=mode == 2)
            else:
                points = end[None]
            prog_ends.extend(points)
            prog_classes.extend([line_class] * len(points))
        # Rounded to 1 nm here, not only when saved, so the path evaluated is exactly the path shipped.
        # Not coarser: G-code words (4 decimals of an inch) and reported positions (5) are exact at
        # 1 nm in mm, and a position sitting exactly on a line's end point is the strongest evidence.
        ends.append(np.round(np.asarray(prog_ends, np.float64).reshape(-1, 3), 6))
        classes.append(np.asarray(prog_classes, np.int64))
    return ProgramPath(list(table.programs), ends, classes, index, mean, std)


def _inch_rows(ds) -> np.ndarray | None:
    """Bool per row: the controller reported inches (so a line's X/Y/Z words are inches)."""
    if UNIT_COLUMN not in ds.categorical_features:
        return None
    code = ds.features.categorical_maps.get(UNIT_COLUMN, {}).get(category_key(INCHES))
    if code is None:
        return np.zeros(len(ds.arrays["row_run"]), bool)
    return ds.arrays["rows_categorical"][:, ds.categorical_features.index(UNIT_COLUMN)] == code


def _motion_modes(ds) -> np.ndarray | None:
    """The controller's motion mode per row as its raw number (2 = G2, 3 = G3; -1 unknown), or None."""
    if MOTION_COLUMN not in ds.categorical_features:
        return None
    raw_of = np.full(max(ds.features.categorical_maps.get(MOTION_COLUMN, {}).values(), default=0) + 1, -1, np.int64)
    for key, code in ds.features.categorical_maps.get(MOTION_COLUMN, {}).items():
        raw_of[code] = int(key) if key.isdigit() else -1
    codes = ds.arrays["rows_categorical"][:, ds.categorical_features.index(MOTION_COLUMN)]
    return np.where(codes < len(raw_of), raw_of[np.minimum(codes, len(raw_of) - 1)], -1)


def fit_program_path(path: ProgramPath, table, pred: dict, targets: list[str], window_last_rows: np.ndarray,
                     tolerances=TOLERANCES_MM) -> tuple[ProgramPath, dict[float, float]]:
    """Choose the tolerance with the best validation exact-line match (ties: the smaller one).
    pred: evaluate.predict's output for the validation windows (op_prob, line_pred, line_confidence);
    window_last_rows: their last normalised rows [B, F]."""
    program = np.asarray(table.operation_program)[pred["op_prob"].argmax(1)]
    lines = np.asarray(table.lines, dtype=object)
    truth = np.asarray(targets, dtype=object)
    scores = {}
    for tol in tolerances:
        line, _, _ = path.snap(program, window_last_rows, pred["line_pred"], pred["line_confidence"], tol)
        scores[float(tol)] = float((lines[line] == truth).mean()) if len(truth) else 0.0
    best = max(scores, key=lambda t: (scores[t], -t))
    path.tolerance_mm = best
    return path, scores


def path_for_model(model, bundle, ds, val_ids: np.ndarray) -> tuple[ProgramPath | None, dict[float, float]]:
    """Build the program path for a trained model and choose its tolerance on `val_ids` (the line
    head's own answers, unsnapped) -> (path, validation exact match per tolerance); (None, {}) for a
    feature set without positions."""
    from . import evaluate

    path = build_program_path(ds, bundle.line_table)
    if path is None:
        return None, {}
    pred = evaluate.predict([model], bundle.replace(program_path=None), ds, val_ids, greedy=False)
    return fit_program_path(path, bundle.line_table, pred, ds.target_lines(val_ids), ds.arrays["rows_continuous"][val_ids])
