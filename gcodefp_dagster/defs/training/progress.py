"""Training progress for the run's log (one line per epoch, while it trains) and the learning
curve for the checkpoint's metadata (a table and a text plot)."""
from __future__ import annotations

import time

SPARK = "▁▂▃▄▅▆▇█"
CURVE_COLUMNS = ("train_loss", "val_loss", "val_op_acc", "val_exact_match", "val_score", "lr", "seconds")


class EpochReporter:
    """The `on_epoch` callback of gcodefp_core.train.train_model: logs loss, validation metrics,
    epoch time and the ETA (remaining epochs at the mean epoch time, capped by max_minutes)."""

    def __init__(self, log, seed: str, max_minutes: float | None = None):
        self.log, self.seed, self.max_minutes = log, seed, max_minutes
        self.started = time.monotonic()

    def eta_seconds(self, row: dict) -> float:
        done, planned, elapsed = row["epoch"], row["epochs"], row["elapsed"]
        eta = (planned - done) * elapsed / max(done, 1)
        if self.max_minutes is not None:
            eta = min(eta, max(0.0, 60 * self.max_minutes - elapsed))
        return eta

    def __call__(self, row: dict) -> None:
        self.log.info(
            f"seed {self.seed} epoch {row['epoch']}/{row['epochs']}: loss {row['train_loss']:.4f} | "
            f"val loss {row['val_loss']:.4f} op {row['val_op_acc']:.4f} exact {row['val_exact_match']:.4f} "
            f"score {row['val_score']:.4f}{' (best so far)' if row['improved'] else ''} | "
            f"{row['seconds']:.1f}s, ETA {self.eta_seconds(row):.0f}s")


def sparkline(values: list[float]) -> str:
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * len(SPARK)))] for v in values)


def learning_curve(history: list[dict]) -> str:
    """Markdown: a text plot of the validation score and the training loss, then one row per epoch."""
    cols = [c for c in CURVE_COLUMNS if history and c in history[0]]
    out = [f"val_score  `{sparkline([h['val_score'] for h in history if 'val_score' in h])}`  ",
           f"train_loss `{sparkline([h['train_loss'] for h in history if 'train_loss' in h])}`", "",
           "| epoch | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
    for h in history:
        out.append(f"| {h['epoch']} | " + " | ".join(f"{h[c]:.4g}" for c in cols) + " |")
    return "\n".join(out)
