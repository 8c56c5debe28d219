"""The training transform (FeatureSpec.transform_arrays) for request bodies, vectorised.

FeatureSpec.transform_arrays turns every categorical code into its canonical string key in Python
(64 rows x C codes per window) and looks each up in a dict: under load that was a fifth of the
server's time. Request bodies almost always carry numeric codes (JSON numbers or binary float32),
so the lookup tables are turned into sorted float keys once per model, and a whole block of codes
is mapped with one searchsorted per column. The result is identical to transform_arrays: a float
value matches a key exactly when the key is that value's canonical string (features.category_key),
which is how the tables are built. Codes given as strings (or mixed) take the original path.
"""
from __future__ import annotations

import numpy as np

from gcodefp_core import schema
from gcodefp_core.features import category_key

SMALL_TABLE = 16   # codes per column up to which all columns are matched in one broadcast comparison


def _numeric_key(key: str) -> float | None:
    """The float whose canonical key is `key`, or None (a key no number maps to, e.g. "G21" or "")."""
    try:
        value = float(key)
    except ValueError:
        return None
    return value if category_key(value) == key else None


class InputTransform:
    """Raw [N, W, F] / [N, W, C] windows -> normalised float32 / int64 model inputs for one FeatureSpec."""

    def __init__(self, spec):
        self.spec = spec
        self.mean = np.asarray(spec.mean, np.float64)
        self.std = np.asarray(spec.std, np.float64)
        self.clip = float(spec.clip)
        self.pos_idx = np.array([j for j, c in enumerate(spec.continuous) if c in schema.POSITIONS], np.intp)
        self.unit_col = spec.categorical.index(schema.UNIT_COLUMN) if schema.UNIT_COLUMN in spec.categorical else None
        self.tables = []  # per categorical column: (sorted float keys, their indices, the index of an absent code)
        for name in spec.categorical:
            mapping = spec.categorical_maps.get(name, {})
            pairs = sorted((v, i) for k, i in mapping.items() if (v := _numeric_key(k)) is not None)
            self.tables.append((np.array([p[0] for p in pairs], np.float64), np.array([p[1] for p in pairs], np.int64),
                                int(mapping.get("", 0))))
        # Small tables (the usual: a handful of codes per column) are matched all columns at once: one
        # broadcast comparison instead of a searchsorted per column (a 4-row stream chunk paid ~5 us a column).
        widest = max((len(keys) for keys, _, _ in self.tables), default=0)
        self.small = widest <= SMALL_TABLE
        if self.small:
            n = len(self.tables)
            self.keys = np.full((n, max(widest, 1)), np.nan)  # NaN pads: equal to nothing
            self.index = np.zeros((n, max(widest, 1)), np.int64)
            for j, (keys, index, _) in enumerate(self.tables):
                self.keys[j, :len(keys)], self.index[j, :len(keys)] = keys, index
            self.absent = np.array([absent for _, _, absent in self.tables], np.int64)
            self.columns = np.arange(n)

    def __call__(self, cont: np.ndarray, cat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, w = cont.shape[:2]
        flat_c, flat_k = cont.reshape(n * w, -1), cat.reshape(n * w, -1)
        if flat_k.shape[1] and flat_k.dtype.kind != "f":  # strings or nulls among the codes: the reference path
            c, k = self.spec.transform_arrays(flat_c, flat_k)
            return c.reshape(n, w, -1), k.reshape(n, w, -1)
        # One float64 temporary, transformed in place (fresh temporaries per step cost more than the
        # arithmetic on a batch of windows); the same operations as FeatureSpec.normalise, in its order.
        z = np.subtract(flat_c, self.mean, dtype=np.float64)
        if len(self.pos_idx) and self.unit_col is not None:
            inches = flat_k[:, self.unit_col] == schema.INCHES
            if inches.any():  # positions in inches -> mm before centring, as FeatureSpec._to_mm does
                rows = np.ix_(inches, self.pos_idx)
                z[rows] = flat_c[rows] * schema.MM_PER_INCH - self.mean[self.pos_idx]
        np.divide(z, self.std, out=z)
        np.copyto(z, 0.0, where=np.isnan(z))  # an absent reading -> the mean (nan_to_num: 5x slower per window;
        # it also maps infinities to the float range, which the clip below does here)
        np.clip(z, -self.clip, self.clip, out=z)
        z = z.astype(np.float32)
        if self.small:
            return z.reshape(n, w, -1), self._codes_small(flat_k).reshape(n, w, -1)
        codes = np.zeros(flat_k.shape, np.int64)
        for j, (keys, index, absent) in enumerate(self.tables):
            col = flat_k[:, j]
            if len(keys):
                pos = np.minimum(np.searchsorted(keys, col), len(keys) - 1)
                codes[:, j] = np.where(keys[pos] == col, index[pos], 0)
            if absent:
                codes[np.isnan(col), j] = absent
        return z.reshape(n, w, -1), codes.reshape(n, w, -1)

    def _codes_small(self, flat_k: np.ndarray) -> np.ndarray:
        """[R, C] float codes -> [R, C] indices: a code matching no key is 0, an absent one (NaN) the
        column's index of "" (the same as the per-column searchsorted path)."""
        match = flat_k[:, :, None] == self.keys           # [R, C, K]
        codes = np.where(match.any(axis=2), self.index[self.columns, match.argmax(axis=2)], 0)
        if self.absent.any():
            codes = np.where(np.isnan(flat_k) & (self.absent > 0), self.absent, codes)
        return codes
