"""Which operation a window's readings look like, from how much they vary: spread evidence (numpy only).

A recording session adds a level to every reading (a board's mounting offset, its calibration), so
a model that reads the levels learns the session as much as the operation, and a run recorded on
another day can be called another operation for its whole length. How much each channel varies
over the last few rows carries no level: it is the cut, the feed and the spindle load. Across held-out
recording sessions, a linear model of each channel's spread over the last 16 rows named the
operation of 85% of streamed rows where one of the readings themselves named 78%
(benchmarks/stream_operation_evidence.py).

`OperationSpread` is that model: a multinomial logistic regression on the standard deviation of
every continuous input (normalised, as the predict graph reads it) over the window's last `rows`
rows, fitted on the training runs (gcodefp_core.fit_spread). Its log-probabilities are operation
evidence for the program tracker, which adds `spread_weight` x them to each operation's states'
log evidence (gcodefp_core.runtime.program_tracker); the weight is chosen on validation streams and
the model ships only where it helps there.

Cost per judged window: the spread of [rows, F] and one [F] x [F, operations] product.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class OperationSpread:
    weights: np.ndarray        # [F, operations]: applies to the raw spreads (standardisation folded in)
    bias: np.ndarray           # [operations]
    rows: int = 16             # the window's last rows whose spread is read

    def __post_init__(self) -> None:
        self.weights = np.ascontiguousarray(self.weights, np.float64)
        self.bias = np.asarray(self.bias, np.float64)
        if self.weights.ndim != 2 or self.bias.shape != (self.weights.shape[1],):
            raise ValueError("operation spread: weights must be [features, operations] and bias [operations]")
        if self.rows < 2:
            raise ValueError("operation spread: rows must be at least 2")

    @staticmethod
    def spread(windows: np.ndarray, rows: int) -> np.ndarray:
        """[B, W, F] -> [B, F]: each channel's standard deviation over the last `rows` rows."""
        return np.asarray(windows, np.float64)[:, -rows:].std(axis=1)

    def scores(self, windows: np.ndarray) -> np.ndarray:
        """[B, W, F] normalised windows -> [B, operations] log p(operation | spread)."""
        x = np.asarray(windows)
        if x.ndim != 3 or x.shape[2] != self.weights.shape[0]:
            raise ValueError(f"operation spread: expected [windows, rows, {self.weights.shape[0]}] inputs, got {x.shape}")
        z = self.spread(x, self.rows) @ self.weights + self.bias
        z -= z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    def to_dict(self) -> dict:
        return {"rows": int(self.rows), "weights": self.weights.tolist(), "bias": self.bias.tolist()}

    @classmethod
    def from_dict(cls, d: dict, n_operations: int | None = None, n_features: int | None = None) -> "OperationSpread":
        for key in ("rows", "weights", "bias"):
            if key not in d:
                raise ValueError(f"operation spread: missing field {key!r}")
        try:
            weights, bias = np.asarray(d["weights"], np.float64), np.asarray(d["bias"], np.float64)
        except (TypeError, ValueError):
            raise ValueError("operation spread: fields 'weights' and 'bias' must be numeric arrays") from None
        if not (np.isfinite(weights).all() and np.isfinite(bias).all()):
            raise ValueError("operation spread: fields 'weights' and 'bias' must be finite")
        spread = cls(weights, bias, int(d["rows"]))
        if n_operations is not None and spread.weights.shape[1] != n_operations:
            raise ValueError(f"operation spread: {spread.weights.shape[1]} operations in 'weights', the tracker has {n_operations}")
        if n_features is not None and spread.weights.shape[0] != n_features:
            raise ValueError(f"operation spread: {spread.weights.shape[0]} features in 'weights', the model reads {n_features}")
        return spread
