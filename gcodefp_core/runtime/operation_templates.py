"""Which operation's program a window of sensor readings looks like: template evidence (numpy only).

Every operation runs one fixed program, so its runs pass through the same sequence of loads and
vibrations. Per operation, the mean of its training runs' motor currents and the boards' RMS
channels at each row offset is a *template*. A received window (the model's normalised inputs, the
same window the predict graph reads) is compared with the template's segments by cosine similarity
after centring and scaling each channel within the window (what is left is the shape over time, not
a day's level or a board's gain; an absent board is flat and adds nothing). The evidence for an
operation is its best match over the segments of its program: which program, not where in it.

Why not where: the boards' readings are interpolated onto the controller's rows with a per-run shift
of several rows, so the match is too loose to name a line; it is sharp enough to tell the programs
apart, and a damaged variant has its own template. The program tracker adds `template_weight` x this
score to the log evidence of each operation's states (gcodefp_core.runtime.program_tracker).

Cost per judged window: one [windows, D] x [D, segments] product, with D = (W / STEP) x channels and
a segment at every OFFSET_STEP-th offset (offsets 4 apart overlap in 60 of 64 rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STEP = 2          # every 2nd row of the window: the channels are smooth at that scale; half the work
OFFSET_STEP = 4   # a segment every 4th program offset


def centred(x: np.ndarray, axis: int) -> np.ndarray:
    """Each channel centred and scaled along `axis`; a flat channel (an absent board) stays ~0."""
    x = x - x.mean(axis, keepdims=True)
    return x / np.sqrt(x.var(axis, keepdims=True) + 0.05 ** 2)


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-9)


@dataclass
class OperationTemplates:
    columns: list[int]              # the template channels: indices into the model's continuous features
    templates: list[np.ndarray]     # per operation [offsets, channels]: mean normalised readings
    window: int                     # rows per window (the model's)

    def __post_init__(self) -> None:
        if len(self.columns) == 0 or min(self.columns) < 0:
            raise ValueError("operation templates: columns must be one or more feature indices")
        picks = np.arange(self.window - 1, -1, -STEP)[::-1]      # the window's rows used, ending at its last
        segments, owner = [], []
        for o, t in enumerate(self.templates):
            t = np.asarray(t, np.float32)
            if t.ndim != 2 or t.shape[1] != len(self.columns) or not len(t):
                raise ValueError(f"operation templates: operation {o}: expected [offsets, {len(self.columns)}] readings")
            padded = np.concatenate([np.repeat(t[:1], self.window - 1, axis=0), t])   # as a stream's first windows are
            ends = np.arange(0, len(t), OFFSET_STEP)
            seg = centred(padded[ends[:, None] + picks[None, :]], axis=1).reshape(len(ends), -1)
            segments.append(unit_rows(seg))
            owner.append(np.full(len(ends), o))
        self._picks = picks
        self._segments = np.ascontiguousarray(np.concatenate(segments).T, np.float32)   # [D, segments]
        owner = np.concatenate(owner)
        self._first = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])             # each operation's first segment
        self._cols = np.asarray(self.columns, np.int64)

    def scores(self, windows: np.ndarray) -> np.ndarray:
        """[B, W, F] normalised windows -> [B, operations]: each operation's best cosine in [-1, 1]."""
        x = np.asarray(windows, np.float32)[:, self._picks][:, :, self._cols]
        x = unit_rows(centred(x, axis=1).reshape(len(x), -1))
        return np.maximum.reduceat(x @ self._segments, self._first, axis=1)

    def to_dict(self) -> dict:
        return {"columns": [int(c) for c in self.columns], "window": int(self.window),
                "templates": [np.round(np.asarray(t, np.float64), 3).tolist() for t in self.templates]}

    @classmethod
    def from_dict(cls, d: dict, n_operations: int | None = None) -> "OperationTemplates":
        for key in ("columns", "window", "templates"):
            if key not in d:
                raise ValueError(f"operation templates: missing field {key!r}")
        if n_operations is not None and len(d["templates"]) != n_operations:
            raise ValueError(f"operation templates: {len(d['templates'])} templates for {n_operations} operations")
        return cls([int(c) for c in d["columns"]], [np.asarray(t, np.float32) for t in d["templates"]], int(d["window"]))
