"""Input drift and prediction monitoring on the hot path (numpy only), exported as Prometheus metrics.

Inputs. Each monitored window is reduced to its per-channel mean, expressed in the package's
training normalisation (z = (mean - train_mean) / train_std). An exponentially weighted mean of
those z per channel (half-life GCODEFP_DRIFT_HALF_LIFE windows, bias-corrected) says where the
recent inputs sit. Scores: mean |rolling z| over a sensor board's channels, and over one channel
kind (Gx, Mz, RMS, current, ...) across boards. Normal traffic wanders around 0 as the program
moves; a recording session with other sensor offsets sits persistently away from it (on real runs
the gyroscope offsets move most: benchmarks/drift.py). Also counted per board: windows without the
board (filled with the training mean), absent readings inside a present board, and readings beyond
the model's clip (|z| > clip: saturated at the model's input).

Predictions: the operation mix, where the line came from (path / model / clock), the operation and
line confidence, and in streams whether the accumulated answer agrees with the window's own.

Cost: a few reductions over the [N, W, F] windows and [F]-vectors per call; the Prometheus gauges and
counters are updated at most once a second and before every scrape (flush_all from GET /metrics).
GCODEFP_MONITOR_EVERY=k looks at one window in k (0: off). benchmarks/monitoring_overhead.py measures it.
A /stream chunk (a few rows) is one short window, and the reductions cost the same for 4 rows as for 64:
short chunks wait in the monitor and are reduced STREAM_CHUNKS at a time (or when the flush is due, and
before every scrape), so a followed machine's chunk costs a list append here.
"""
from __future__ import annotations

import time
from collections import Counter as Tally

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from gcodefp_core import schema

from .settings import SETTINGS

STREAM_CHUNKS = 16   # short stream chunks reduced together (their tallies are exact; the rolling z takes them
                     # as one step, as it does a /batch_predict request's windows)

DRIFT = Gauge("gcodefp_input_drift_score", "Mean |rolling z| of a sensor board's channels against the training "
              "normalisation (0: like training; sustained > 1: drift)", ["board"], multiprocess_mode="livemax")
CHANNEL_DRIFT = Gauge("gcodefp_input_channel_drift_score", "Mean |rolling z| of one channel kind (Gx, Mz, RMS, ...) "
                      "over the boards", ["channel"], multiprocess_mode="livemax")
WINDOWS = Counter("gcodefp_monitored_windows_total", "Windows the input monitor looked at")
BOARD_MISSING = Counter("gcodefp_input_board_missing_total", "Monitored windows without any reading of a board",
                        ["board"])
READINGS_ABSENT = Counter("gcodefp_input_absent_readings_total", "Absent (null) readings inside a present board",
                          ["board"])
OUT_OF_RANGE = Counter("gcodefp_input_out_of_range_total", "Readings beyond the model's clip (|z| > clip)", ["board"])
OPERATIONS = Counter("gcodefp_prediction_operation_total", "Predicted operations", ["endpoint", "operation"])
LINE_SOURCE = Counter("gcodefp_prediction_line_source_total", "Where the predicted line came from",
                      ["endpoint", "source"])
CONFIDENCE = Histogram("gcodefp_prediction_confidence", "Confidence of the predicted operation / line",
                       ["kind"], buckets=(.1, .2, .3, .4, .5, .6, .7, .8, .9, .95, .99, 1.0))
_CONF_OPERATION, _CONF_LINE = CONFIDENCE.labels("operation"), CONFIDENCE.labels("line")
STREAM_AGREEMENT = Counter("gcodefp_stream_window_agreement_total", "Stream answers (clock + accumulated evidence) "
                           "against the window's own answer", ["field", "agrees"])


def channel_of(column: str) -> str:
    """The kind of a continuous input: a board channel (Ax .. RMS), "current" or "controller"."""
    if "." in column:
        return column.split(".", 1)[1]
    return "current" if column in schema.CURRENTS else "controller"


def _one_hot(names: list[str], mask: np.ndarray) -> tuple[list[str], np.ndarray]:
    groups = list(dict.fromkeys(n for n, m in zip(names, mask) if m))
    member = np.zeros((len(names), len(groups)))
    for j, (n, m) in enumerate(zip(names, mask)):
        if m:
            member[j, groups.index(n)] = 1.0
    return groups, member


def board_of(column: str) -> str:
    """The group a continuous input belongs to: its sensor board, the motor currents, or the controller."""
    if "." in column:
        return column.split(".", 1)[0]
    return "currents" if column in schema.CURRENTS else "controller"


class DriftMonitor:
    """The rolling input statistics of one loaded model (its normalisation is the reference)."""

    def __init__(self, spec, half_life: float = 256.0, every: int = 1, flush_seconds: float = 1.0):
        self.mean = np.asarray(spec.mean, dtype=np.float64)
        self.std = np.asarray(spec.std, dtype=np.float64)
        self.clip = float(spec.clip)
        names = [board_of(c) for c in spec.continuous]
        # channel -> board one-hot [F, G] (counters: every input)
        self.boards, self.member = _one_hot(names, np.ones(len(names), bool))
        # A channel that no training run recorded has the pass-through normalisation (0, 1): its z says
        # nothing, so drift scores leave it out (its readings still count as absent / out of range).
        trained = ~((self.mean == 0) & (self.std == 1))
        self.score_boards, self.score_member = _one_hot(names, trained)
        self.kinds, self.kind_member = _one_hot([channel_of(c) for c in spec.continuous], trained)
        self.decay = 0.5 ** (1.0 / half_life)
        self.inv_std, self.limit = 1.0 / self.std, self.clip * self.std
        self.every, self._tick = every, 0
        self.ewma = np.zeros(len(names))       # decayed sum of z (bias-corrected by `weight`)
        self.weight = np.zeros(len(names))     # decayed count of windows that had the channel
        self.windows = 0
        # Per-channel tallies since the last flush to Prometheus (the hot path touches numpy only).
        self._pending = 0
        self._missing = np.zeros(len(self.boards))
        self._absent_readings = np.zeros(len(names))
        self._over = np.zeros(len(names))
        self._next_flush = 0.0
        self.flush_seconds = flush_seconds
        self._chunks: list[np.ndarray] = []   # stream chunks waiting for observe_pending

    def observe(self, cont: np.ndarray) -> None:
        """Raw continuous windows [N, W, F] (NaN = absent) -> updated rolling z and tallies."""
        if self.every > 1:
            first = (-self._tick) % self.every
            self._tick += len(cont)
            cont = cont[first::self.every]
            if not len(cont):
                return
        n, w = cont.shape[:2]
        nan = np.isnan(cont)
        absent = nan.sum(axis=1)                                        # [N, F] absent readings per window
        has = absent < w
        sums = cont.sum(axis=1)                                         # NaN where a reading is absent
        if (absent[has] > 0).any():  # a board present with gaps (rare): the slower NaN-skipping sum
            sums = np.nansum(cont, axis=1)
        z = np.where(has, (sums / np.maximum(w - absent, 1) - self.mean) * self.inv_std, 0.0)  # [N, F] window-mean z
        k = has.sum(axis=0)                                             # windows with each channel
        # n windows as one step: the old state decays by decay**k, the batch mean of z enters with the rest
        # of the weight (exact when the windows are equal, close otherwise); k = 0 leaves a channel as it was.
        keep = self.decay ** k
        self.ewma = keep * self.ewma + (1 - keep) * (z.sum(axis=0) / np.maximum(k, 1))
        self.weight = keep * self.weight + (1 - keep)
        self.windows += n
        self._pending += n
        board_in = (has @ self.member) > 0                              # [N, G] board recorded in the window
        self._missing += n - board_in.sum(axis=0)
        self._absent_readings += (absent * (board_in @ self.member.T)).sum(axis=0)  # inside present boards only
        # Readings beyond the clip are rare: two NaN-skipping reductions find whether there are any at all.
        if ((np.fmax.reduce(cont, axis=1) - self.mean > self.limit) | (self.mean - np.fmin.reduce(cont, axis=1)
                                                                       > self.limit)).any():
            self._over += (np.abs(cont - self.mean) > self.limit).sum(axis=(0, 1))  # NaN compares False
        if time.monotonic() >= self._next_flush:
            self.flush()

    def observe_chunk(self, rows: np.ndarray) -> None:
        """One stream chunk's raw rows [n, F] (n < W): a short window, reduced with the chunks after it."""
        self._chunks.append(rows)
        if len(self._chunks) >= STREAM_CHUNKS or time.monotonic() >= self._next_flush:
            self.observe_pending()

    def observe_pending(self) -> None:
        """Reduce the waiting stream chunks, those of one length as one [k, n, F] block."""
        chunks, self._chunks = self._chunks, []
        for n in sorted({len(c) for c in chunks}):
            self.observe(np.stack([c for c in chunks if len(c) == n]))

    def scores(self, by: str = "board") -> dict[str, float]:
        """Mean |rolling z| over the trained channels seen so far, per board (by="board") or per channel
        kind (by="channel"); groups never seen are left out."""
        groups, member = (self.score_boards, self.score_member) if by == "board" else (self.kinds, self.kind_member)
        seen = self.weight > 0
        rolling = np.abs(np.where(seen, self.ewma / np.where(seen, self.weight, 1.0), 0.0))
        n_seen = seen.astype(np.float64) @ member
        total = rolling @ member
        return {b: float(total[g] / n_seen[g]) for g, b in enumerate(groups) if n_seen[g] > 0}

    def flush(self) -> None:
        """Publish the scores and the tallies (from observe at most every flush_seconds: a scrape sees at
        most that much lag, and the hot path stays numpy only)."""
        self._next_flush = time.monotonic() + self.flush_seconds
        if not self._pending:
            return
        w_missing, inside, over = self._missing, self._absent_readings @ self.member, self._over @ self.member
        WINDOWS.inc(self._pending)
        for board, score in self.scores("board").items():
            DRIFT.labels(board).set(round(score, 4))
        for kind, score in self.scores("channel").items():
            CHANNEL_DRIFT.labels(kind).set(round(score, 4))
        for g, board in enumerate(self.boards):
            if w_missing[g]:
                BOARD_MISSING.labels(board).inc(float(w_missing[g]))
            if inside[g]:
                READINGS_ABSENT.labels(board).inc(float(inside[g]))
            if over[g]:
                OUT_OF_RANGE.labels(board).inc(float(over[g]))
        self._pending = 0
        self._missing[:], self._absent_readings[:], self._over[:] = 0, 0, 0


_MONITORS: dict[tuple[str, str], DriftMonitor] = {}


def monitor_for(model) -> DriftMonitor:
    """The monitor of a loaded model (a new package starts from a clean slate: another reference)."""
    key = (str(model.path), model.version)
    mon = _MONITORS.get(key)
    if mon is None:
        if len(_MONITORS) >= 4:  # current + previous, and a little slack across swaps
            _MONITORS.pop(next(iter(_MONITORS)))
        mon = _MONITORS[key] = DriftMonitor(model.spec, SETTINGS.drift_half_life, SETTINGS.monitor_every)
    return mon


_CHILDREN: dict[tuple, object] = {}


def _child(metric, *labels):
    """metric.labels(*labels), remembered (the label lookup costs more than the increment)."""
    key = (metric._name, *labels)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(*labels)
    return child


def flush_all() -> None:
    """Publish every monitor's pending tallies (before a scrape renders the metrics)."""
    for mon in list(_MONITORS.values()):
        mon.observe_pending()
        mon.flush()


def observe_windows(model, endpoint: str, cont: np.ndarray, rows: list[dict] | None = None) -> None:
    """A request's raw windows [N, W, F] and, if any, its predictions (the predictor's dicts)."""
    if not SETTINGS.monitor_every:
        return
    monitor_for(model).observe(cont)
    if not rows:
        return
    if len(rows) == 1:  # the common case, without the tallies
        _child(OPERATIONS, endpoint, rows[0]["operation"]).inc()
        if "line_source" in rows[0]:
            _child(LINE_SOURCE, endpoint, rows[0]["line_source"]).inc()
    else:
        for op, n in Tally(r["operation"] for r in rows).items():
            _child(OPERATIONS, endpoint, op).inc(n)
        for src, n in Tally(r["line_source"] for r in rows if "line_source" in r).items():
            _child(LINE_SOURCE, endpoint, src).inc(n)
    for r in rows:
        _CONF_OPERATION.observe(r["operation_confidence"])
        if "line_confidence" in r:
            _CONF_LINE.observe(r["line_confidence"])


def observe_stream(model, cont: np.ndarray, result: dict) -> None:
    """A stream chunk's raw rows [n, F] and its answer (api/streams.post_rows)."""
    if not SETTINGS.monitor_every:
        return
    w = model.window
    if len(cont) >= w:  # whole windows of the chunk; a short chunk counts as one (shorter) window
        monitor_for(model).observe(cont[: len(cont) // w * w].reshape(-1, w, cont.shape[1]))
    elif len(cont):
        monitor_for(model).observe_chunk(cont)
    preds = result.get("predictions") or []
    if not preds:
        return
    for op, n in Tally(p["operation"]["name"] for p in preds).items():
        _child(OPERATIONS, "/stream", op).inc(n)
    for src, n in Tally(p["line_source"] for p in preds).items():
        _child(LINE_SOURCE, "/stream", src).inc(n)
    op_agree = sum(p["operation"]["name"] == p["window"]["operation"]["name"] for p in preds)
    line_agree = sum(p["gcode_sequence"] == p["window"]["gcode_sequence"] for p in preds)
    for field, agree in (("operation", op_agree), ("line", line_agree)):
        if agree:
            _child(STREAM_AGREEMENT, field, "true").inc(agree)
        if len(preds) - agree:
            _child(STREAM_AGREEMENT, field, "false").inc(len(preds) - agree)
