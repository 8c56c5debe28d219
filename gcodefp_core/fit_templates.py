"""Fitting the operation templates (gcodefp_core.runtime.operation_templates) from the training runs.

Per operation, the template is the mean of its training runs' template channels (motor currents and
the boards' RMS channels, as the model sees them: normalised) at each row offset, each run centred
first (its day's level removed). The boards' readings are shifted against the controller's rows by a
constant of several rows that differs from run to run (their interpolation onto the controller's
timestamps), so the runs are registered before they are averaged: each run's lag is the shift that
best matches its vibration (the boards' mean RMS, smoothed) to the operation's mean vibration, found
from the first run and refined three times; every run is then moved by its lag minus the median lag.
"""
from __future__ import annotations

import numpy as np

from .runtime.operation_templates import OperationTemplates

MOTORS = ("spindle", "x_motor", "y_motor", "z_motor")
MAX_LAG = 30      # rows; the lags seen on the real data are 3-13
EDGE = 40         # rows at either end of a run left out of the lag search (spindle start and stop)


def template_columns(features: list[str]) -> list[int]:
    """The motor currents and the boards' RMS channels among the model's continuous features."""
    return [i for i, name in enumerate(features) if name in MOTORS or name.endswith(".RMS")]


def vibration(x: np.ndarray) -> np.ndarray:
    """[rows, channels] -> the mean of the channels that vary (absent boards are flat), smoothed over 5
    rows and standardised."""
    live = x[:, x.std(axis=0) > 0.01]
    s = live.mean(axis=1) if live.shape[1] else np.zeros(len(x))
    s = np.convolve(s, np.ones(5) / 5, "same")
    return (s - s.mean()) / (s.std() + 1e-9)


def best_lag(ref: np.ndarray, s: np.ndarray) -> int:
    """The shift l (|l| <= MAX_LAG) that best correlates ref[t] with s[t + l] away from the ends."""
    lo, hi = EDGE, min(len(ref), len(s)) - EDGE
    best, lag = -2.0, 0
    for shift in range(-MAX_LAG, MAX_LAG + 1):
        if lo + shift < 0 or hi + shift > len(s) or hi - lo < 2 * EDGE:
            continue
        a, b = ref[lo:hi], s[lo + shift:hi + shift]
        c = float(np.dot(a - a.mean(), b - b.mean()) / (a.std() * b.std() * len(a) + 1e-12))
        if c > best:
            best, lag = c, shift
    return lag


def registered_mean(runs: list[np.ndarray], signals: list[np.ndarray], length: int) -> np.ndarray:
    """The mean of runs [rows, channels] over `length` offsets, each run centred and moved by its lag
    (against the mean vibration) minus the median lag."""
    ref = signals[0][:length]
    lags = [0] * len(runs)
    for _ in range(3):
        lags = [best_lag(ref, s) for s in signals]
        med = int(np.median(lags))
        acc, cnt = np.zeros(length), np.zeros(length)
        for s, lag in zip(signals, lags):
            i = np.arange(length) + lag - med
            ok = (i >= 0) & (i < len(s))
            acc[ok] += s[i[ok]]
            cnt[ok] += 1
        ref = acc / np.maximum(cnt, 1)
    med = int(np.median(lags))
    acc, cnt = np.zeros((length, runs[0].shape[1])), np.zeros((length, 1))
    for x, lag in zip(runs, lags):
        x = x - x.mean(axis=0)
        i = np.arange(length) + lag - med
        ok = (i >= 0) & (i < len(x))
        acc[ok] += x[i[ok]]
        cnt[ok] += 1
    return acc / np.maximum(cnt, 1)


def fit_operation_templates(ds, program_of_operation: list[int]) -> OperationTemplates | None:
    """The templates of a dataset's training runs (None when the features hold no template channel).
    A template spans the longest training run of its operation's program."""
    features = ds.continuous_features
    cols = template_columns(features)
    if not cols:
        return None
    rms = [k for k, c in enumerate(cols) if features[c].endswith(".RMS")] or list(range(len(cols)))
    x = ds.arrays["rows_continuous"]
    train = [r for r in ds.manifest["runs"] if r["split"] == "train"]
    templates = []
    for o, op in enumerate(ds.operations):
        length = max(r["rows"] for r in train if program_of_operation[ds.operations.index(r["operation"])]
                     == program_of_operation[o])
        mine = [np.asarray(x[r["first_row"]:r["first_row"] + r["rows"]][:, cols], np.float64)
                for r in train if r["operation"] == op]
        if not mine:
            raise ValueError(f"operation {op!r}: no training run to make a template of")
        templates.append(registered_mean(mine, [vibration(m[:, rms]) for m in mine], length).astype(np.float32))
    return OperationTemplates(cols, templates, ds.window)
