"""Turn raw log rows into model inputs, identically at training and at serving time.

`FeatureSpec` is fitted on the training split only and stored in the dataset manifest (and later in
every deployment package), so the server normalises a posted window exactly as training did.

Documented fills (never silent):
- a sensor board that a run did not record is filled with the training mean of each of its
  channels, i.e. 0 after normalisation; the manifest lists the boards each run recorded;
- work positions (pos*) are converted to millimetres where `unit` says inches, because the
  controller switches units inside a run (machine positions mpo* are always millimetres);
- categorical codes map to 1..K in sorted order of the training values; 0 is "unknown" (unseen,
  empty or NaN); a NaN is never cast to int;
- normalised values are clipped to +-`clip` standard deviations so one sensor glitch cannot
  dominate a window.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .schema import INCHES, MM_PER_INCH, POSITIONS, UNIT_COLUMN, FeatureColumns


def category_key(value) -> str:
    """Canonical string for a categorical code: 5, 5.0, "5" and " 5 " are all "5"; NaN/empty -> ""."""
    if value is None:
        return ""
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    text = str(value).strip()
    try:
        return category_key(float(text)) if text else ""
    except ValueError:
        return text


@dataclass
class FeatureSpec:
    feature_set: str
    continuous: list[str]
    categorical: list[str]
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    categorical_maps: dict[str, dict[str, int]] = field(default_factory=dict)
    clip: float = 8.0

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def for_columns(cls, feature_set: str, columns: FeatureColumns, clip: float = 8.0) -> "FeatureSpec":
        return cls(feature_set, list(columns.continuous), list(columns.categorical), clip=clip)

    def fit(self, frames) -> "FeatureSpec":
        """Fit normalisation and categorical maps on the training runs' frames."""
        raws = [self.raw_matrix(f) for f in frames]
        cont = np.concatenate([r[0] for r in raws])
        with np.errstate(invalid="ignore"):
            counts = np.sum(~np.isnan(cont), axis=0)
            mean = np.where(counts > 0, np.nansum(cont, axis=0) / np.maximum(counts, 1), 0.0)
            var = np.where(counts > 1, np.nansum((cont - mean) ** 2, axis=0) / np.maximum(counts - 1, 1), 1.0)
        std = np.sqrt(var)
        std[~np.isfinite(std) | (std < 1e-6)] = 1.0  # constant channels pass through centred
        self.mean, self.std = mean.astype(float).tolist(), std.astype(float).tolist()
        cats = np.concatenate([r[1] for r in raws]) if self.categorical else np.empty((0, 0), object)
        self.categorical_maps = {}
        for j, name in enumerate(self.categorical):
            seen = sorted({k for k in cats[:, j] if k != ""}, key=lambda s: (len(s), s))
            self.categorical_maps[name] = {k: i + 1 for i, k in enumerate(seen)}
        return self

    # ---- raw values ---------------------------------------------------------------------
    def raw_matrix(self, frame) -> tuple[np.ndarray, np.ndarray]:
        """Raw continuous values [n, F] (NaN where a column is absent) and categorical keys [n, C]."""
        n = len(frame)
        cont = np.full((n, len(self.continuous)), np.nan, dtype=np.float64)
        for j, name in enumerate(self.continuous):
            if name in frame:
                cont[:, j] = np.asarray(frame[name], dtype=np.float64)
        cats = np.empty((n, len(self.categorical)), dtype=object)
        for j, name in enumerate(self.categorical):
            cats[:, j] = [category_key(v) for v in frame[name]] if name in frame else ""
        units = np.asarray([category_key(v) for v in frame[UNIT_COLUMN]]) if UNIT_COLUMN in frame else None
        return self._to_mm(cont, units), cats

    def _to_mm(self, cont: np.ndarray, units: np.ndarray | None) -> np.ndarray:
        pos_idx = [j for j, c in enumerate(self.continuous) if c in POSITIONS]
        if pos_idx and units is not None:
            inches = units == str(INCHES)
            cont[np.ix_(inches, pos_idx)] *= MM_PER_INCH
        return cont

    # ---- model inputs -------------------------------------------------------------------
    def transform(self, frame) -> tuple[np.ndarray, np.ndarray]:
        """Rows of a log frame -> (float32 [n, F] normalised, int64 [n, C] category indices)."""
        cont, cats = self.raw_matrix(frame)
        return self.normalise(cont), self.encode_categories(cats)

    def transform_arrays(self, continuous: np.ndarray, categorical: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """A window posted in feature order (raw readings; NaN = board absent) -> model inputs."""
        cats = np.empty((continuous.shape[0], len(self.categorical)), dtype=object)
        if self.categorical:
            cats[:] = [[category_key(v) for v in row] for row in categorical]
        units = cats[:, self.categorical.index(UNIT_COLUMN)] if UNIT_COLUMN in self.categorical else None
        cont = self._to_mm(np.array(continuous, dtype=np.float64), units)
        return self.normalise(cont), self.encode_categories(cats)

    def normalise(self, cont: np.ndarray) -> np.ndarray:
        z = (cont - np.asarray(self.mean)) / np.asarray(self.std)
        z = np.nan_to_num(z, nan=0.0)  # an absent board sits at the training mean
        return np.clip(z, -self.clip, self.clip).astype(np.float32)

    def encode_categories(self, cats: np.ndarray) -> np.ndarray:
        out = np.zeros(cats.shape, dtype=np.int64)
        for j, name in enumerate(self.categorical):
            mapping = self.categorical_maps.get(name, {})
            out[:, j] = [mapping.get(k, 0) for k in cats[:, j]]
        return out

    @property
    def cardinalities(self) -> list[int]:
        """Embedding table sizes, the unknown index 0 included."""
        return [len(self.categorical_maps.get(c, {})) + 1 for c in self.categorical]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        return cls(**d)
