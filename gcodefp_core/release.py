"""Release policy: which ensemble member ships, whether a variant keeps the served answer, which
variant ships, and which package may replace the one being served.

Used by the Dagster assets and by the CLI, so both decide the same way. Numpy and the standard
library only, plus the serving runtime for `served_correctness` (imported there, not here).

The accuracy gate judges the answer the server gives (the exact G-code line and the operation of
each test window), paired window by window against fp32 on the same windows. Only the windows
where the two disagree carry information (McNemar): b = fp32 right and the variant wrong,
c = the reverse. Conditional on m = b + c, b ~ Binomial(m, pi) and the accuracy drop is
d = (b - c) / n = (m / n)(2 pi - 1), so an exact (Clopper-Pearson) bound on pi is an exact bound on
d. A variant is blocked only when the lower bound of its drop exceeds the bar, i.e. when the
windows show, at the stated confidence, that it loses more than the bar allows. A handful of
flipped windows cannot do that: on 2,000 windows 6 one-way flips (0.3 points) give a lower bound
below zero, while a real 2-point drop (40 net flips) gives about 1.5 points.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .variants import REFERENCE, VARIANTS

CONFIDENCE = 0.99          # one-sided, for each bound
SERVED_METRICS = ("exact_line", "operation")


# ---- ensemble member -------------------------------------------------------------------------
def selection_metric(monitor: str) -> str:
    """The validation metric a TrainConfig.monitor names ("loss" is minimised, the rest maximised)."""
    return "val_loss" if monitor == "loss" else f"val_{monitor}"


def select_member(members: list[dict], monitor: str) -> dict:
    """The member to ship: the best on the monitored validation metric (members carry "val_metrics");
    ties go to the first listed (the lowest seed when listed in seed order)."""
    if not members:
        raise ValueError("no ensemble members to choose from")
    metric = selection_metric(monitor)
    missing = [m.get("name", "?") for m in members if metric not in m["val_metrics"]]
    if missing:
        raise ValueError(f"members {missing} have no {metric} in their validation metrics")
    pick = min if monitor == "loss" else max
    return pick(members, key=lambda m: m["val_metrics"][metric])


# ---- the served answer, window by window -----------------------------------------------------
def evaluation_windows(dataset, split: str = "test", max_windows: int | None = None) -> np.ndarray:
    """Evenly spaced windows of a split (the same ids for every variant, so results pair up)."""
    ids = dataset.split_windows(split)
    if max_windows and len(ids) > max_windows:
        ids = ids[np.linspace(0, len(ids) - 1, max_windows).astype(np.int64)]
    if len(ids) == 0:
        raise ValueError(f"dataset {dataset.path}: split {split!r} has no windows")
    return ids


def served_correctness(predictor, dataset, ids: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per window: is the served G-code line exactly the target line, is the operation right.
    `predictor` is a runtime OnnxPredictor answering with its default method, as the server does."""
    lines = dataset.target_lines(ids)
    line_ok, op_ok = [], []
    for s in range(0, len(ids), batch_size):
        b = dataset.batch(ids[s:s + batch_size])
        for p, target, op in zip(predictor.predict(b["continuous"], b["categorical"]), lines[s:s + batch_size],
                                 b["operation"]):
            line_ok.append(p["gcode"] == target)
            op_ok.append(p["operation"] == dataset.operations[int(op)])
    return {"exact_line": np.asarray(line_ok, bool), "operation": np.asarray(op_ok, bool)}


def save_correctness(path: Path, ids: np.ndarray, correct: dict[str, np.ndarray]) -> None:
    """Per-window results as JSON ("1"/"0" strings: compact, diffable), written atomically."""
    from .fileio import write_json

    write_json(path, {"windows": [int(i) for i in ids],
                      **{k: "".join("1" if x else "0" for x in v) for k, v in correct.items()}})


def load_correctness(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    doc = json.loads(Path(path).read_text())
    return (np.asarray(doc["windows"], np.int64),
            {k: np.frombuffer(doc[k].encode(), np.uint8) == ord("1") for k in SERVED_METRICS})


# ---- the paired gate --------------------------------------------------------------------------
def _log_binom_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p))


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return min(1.0, sum(math.exp(_log_binom_pmf(j, n, p)) for j in range(k, n + 1)))


def _bisect(f, lo: float = 0.0, hi: float = 1.0, iterations: int = 60) -> float:
    """The root of an increasing f on [lo, hi]."""
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def proportion_bounds(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """One-sided Clopper-Pearson bounds (each at `confidence`) of a binomial proportion."""
    alpha = 1.0 - confidence
    low = 0.0 if successes == 0 else _bisect(lambda p: binom_sf(successes, trials, p) - alpha)
    high = 1.0 if successes == trials else _bisect(lambda p: alpha - (1.0 - binom_sf(successes + 1, trials, p)))
    return low, high


@dataclass(frozen=True)
class PairedDrop:
    """The accuracy drop (points) of a variant against the reference on the same windows."""
    windows: int
    reference_accuracy: float          # points
    variant_accuracy: float            # points
    reference_only: int                # b: windows the reference gets right and the variant wrong
    variant_only: int                  # c: the reverse
    drop_points: float                 # (b - c) / n * 100
    drop_low_points: float             # lower bound at CONFIDENCE
    drop_high_points: float            # upper bound at CONFIDENCE
    confidence: float


def paired_drop(reference: np.ndarray, variant: np.ndarray, confidence: float = CONFIDENCE) -> PairedDrop:
    reference, variant = np.asarray(reference, bool), np.asarray(variant, bool)
    if reference.shape != variant.shape or reference.ndim != 1 or len(reference) == 0:
        raise ValueError(f"paired results must be two equal, non-empty vectors (got {reference.shape}, {variant.shape})")
    n = len(reference)
    b, c = int((reference & ~variant).sum()), int((~reference & variant).sum())
    m = b + c
    low_p, high_p = proportion_bounds(b, m, confidence) if m else (0.5, 0.5)
    scale = 100.0 * m / n
    return PairedDrop(windows=n, reference_accuracy=100.0 * reference.mean(), variant_accuracy=100.0 * variant.mean(),
                      reference_only=b, variant_only=c, drop_points=100.0 * (b - c) / n,
                      drop_low_points=scale * (2 * low_p - 1), drop_high_points=scale * (2 * high_p - 1),
                      confidence=confidence)


@dataclass(frozen=True)
class GateVerdict:
    variant: str
    bar_points: float
    passed: bool
    metrics: dict[str, PairedDrop]     # by SERVED_METRICS name

    def figures(self) -> dict:
        """Flat numbers for metadata and reports."""
        out = {"variant": self.variant, "bar_points": self.bar_points, "passed": self.passed}
        for name, d in self.metrics.items():
            out.update({f"{name}_{k}": v for k, v in asdict(d).items() if k != "confidence"})
            out["confidence"] = d.confidence
        return out


def max_drop_points(variant: str, overrides: dict[str, float] | None = None) -> float:
    """The variant's bar: the registry's, unless overridden (a forced pass or fail)."""
    if overrides and variant in overrides:
        return float(overrides[variant])
    bar = VARIANTS[variant].max_drop_points
    return 0.0 if bar is None else float(bar)


def judge_variant(variant: str, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                  bar_points: float | None = None, confidence: float = CONFIDENCE) -> GateVerdict:
    """Blocked when, for the exact line or the operation, the lower confidence bound of the paired
    drop exceeds the bar; passed otherwise."""
    bar = max_drop_points(variant) if bar_points is None else float(bar_points)
    metrics = {k: paired_drop(reference[k], candidate[k], confidence) for k in SERVED_METRICS}
    return GateVerdict(variant, bar, all(d.drop_low_points <= bar for d in metrics.values()), metrics)


# ---- which variant ships ----------------------------------------------------------------------
def choose_variant(rows: dict[str, dict], requested: str = "auto", tolerance: float = 0.10) -> tuple[str, str]:
    """-> (variant, why). rows: variant -> {"p95_ms", "within_accuracy_bar", "size_mb" (optional)}.
    auto: among variants that kept the served answer (the reference always qualifies), those whose batch-1
    p95 is within `tolerance` of the lowest, and of them the smallest. A p95 of about a millisecond moves
    by 5-10% between two benchmarks on a shared machine: without the tolerance the shipped variant
    flipped between fp32 and int8_static from one pipeline run to the next on the same checkpoints."""
    if requested != "auto":
        if requested not in rows:
            raise ValueError(f"ship_variant: {requested!r} is not one of {sorted(rows)} (or 'auto')")
        return requested, "requested in config"
    ok = {v: r for v, r in rows.items() if v == REFERENCE or r["within_accuracy_bar"]}
    fastest = min(r["p95_ms"] for r in ok.values())
    near = {v: r for v, r in ok.items() if r["p95_ms"] <= fastest * (1 + tolerance)}
    best = min(near, key=lambda v: (near[v].get("size_mb", 0.0), near[v]["p95_ms"]))
    return best, (f"the smallest of the variants within {tolerance:.0%} of the lowest batch-1 p95 ({', '.join(sorted(near))}) "
                  f"among those that kept the served answer ({', '.join(sorted(ok))})")


# ---- which package may be served ----------------------------------------------------------------
def package_age_key(registry: Path, version: str) -> tuple[str, str]:
    """Sort key of a package: its manifest's created_at, then its name (newest sorts last)."""
    manifest = Path(registry) / "packages" / version / "manifest.json"
    try:
        created = json.loads(manifest.read_text()).get("created_at", "")
    except (FileNotFoundError, json.JSONDecodeError):
        created = ""
    return created, version


def newest(registry: Path, versions: list[str]) -> tuple[str, list[str]]:
    """-> (the newest version, the others it supersedes, oldest first)."""
    ordered = sorted(versions, key=lambda v: package_age_key(registry, v))
    return ordered[-1], ordered[:-1]


def check_forward(registry: Path, current: str | None, target: str, rollback: bool = False) -> None:
    """Refuse to replace CURRENT with an older package unless this is an explicit rollback."""
    if current is None or current == target or rollback:
        return
    if package_age_key(registry, target) < package_age_key(registry, current):
        raise ValueError(f"package {target} is older than the served {current}; "
                         "redeploy it only as an explicit rollback (rollback: true)")
