"""Streaming mode over HTTP (POST/GET/DELETE /stream/{machine_id}): one session per machine.

A window model judges 64 rows alone; a stream session follows one machine, which needs state
between requests, so a session lives in one worker's memory; a machine whose monitor reconnects to
another worker is handed over to it (api/stream_handoff.py). The client posts the machine's rows in order, in
chunks of any size; windows may span chunks, so a session keeps the last W-1 rows, already
normalised (gcodefp_core.runtime.windows cuts and batches them). Two ways to follow a machine:

- **tracker** (models whose package has a program tracker and whose predict graph gives
  line_logits): gcodefp_core.runtime.program_tracker infers where in which program the machine is
  from the windows themselves, so no row counter is needed: a monitor may attach mid-run, lose rows
  or see a paused machine. Answers start with the first row: until W rows have arrived, the window
  is padded with the first row and its evidence weighs the share of real rows; a row equal to the
  previous one is evidence of a pause. Only each chunk's last row and every `every`-th row before
  it are judged (gcodefp_core.runtime.tracked_stream, shared with `gcodefp track`;
  GCODEFP_STREAM_EVERY): consecutive windows share all but a few rows, so judging every row costs a
  window and a filter update per row for almost no information.
  `start` is optional information: true says a program starts with these rows (the filter starts
  at offset 0 of any program), otherwise it starts from "anywhere in any program".
- **clock** (older packages): gcodefp_core.runtime.clock counts rows from the program's start, so the
  client must post every row from the start (start=true); answers begin at row W-1.

Bounded: at most GCODEFP_MAX_STREAMS sessions; a new machine evicts the least recently used one. A
machine that posted nothing for GCODEFP_STREAM_IDLE_S is forgotten (its monitor is gone, or the machine
was off: where it was is no longer where it is), so memory follows the machines actually followed.
With GCODEFP_STREAM_STATE_DIR, tracker sessions outlive a restart of the worker (api/stream_state.py).
A hot swap (the session's model version is not the served one) keeps rows_since_start (a property
of the machine, not of the model) but drops the buffered rows: the new model may read other
features or normalise them differently. Its predictions resume once W new rows have arrived
(clock), or at once from padded windows (tracker). A tracker keeps its posterior over "which
program, which row offset" (also a property of the machine) when the new package's tracker has the
same states (a retrained model of the same programs: the scheduled retraining); otherwise it starts
from "anywhere".
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from gcodefp_core.runtime import tracked_stream, windows

from . import inputs, metrics
from .settings import SETTINGS

log = logging.getLogger("api.streams")
MAX_STREAMS = SETTINGS.max_streams
MACHINE_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
INLINE_ROWS = 256      # a chunk this small is normalised on the event loop (~0.5 ms at most): cheaper than a
                       # thread hop, and worker threads each grow their own malloc arena (RSS)
INLINE_TRACKED = 8     # judged rows a tracker session follows before giving the event loop a turn (~0.2-0.5 ms each).
                       # Not a thread: the filter is numpy on small arrays and holds the GIL, so a thread buys
                       # no parallelism, and each thread grew its own malloc arena (measured: +2 MB RSS a machine)


def check_machine_id(machine_id: str) -> str:
    if not MACHINE_ID_RE.match(machine_id):
        raise inputs.InputError("machine_id", f"must be 1-64 characters of A-Z a-z 0-9 . _ : -, got {machine_id!r}",
                                location="path")
    return machine_id


def require_line_head(model) -> None:
    if "predict" not in model.predictor.sessions:
        raise inputs.InputError("model", f"model {model.version} has no line head (predict graph); streaming needs "
                                         "one (use /predict, or serve a model trained with the line head)", 409)


@dataclass(eq=False)
class Session:
    machine_id: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one request of this machine at a time, FIFO
    version: str | None = None    # the model version it follows; None: not started yet (first request running)
    mode: str = "clock"           # "tracker" (ProgramTracker) or "clock" (row-count clock), set per model
    tracker: object = None        # runtime.program_tracker.TrackerSession or runtime.clock.StreamTracker
    clock: bool = False           # whether that model has a program clock
    rows_since_start: int = 0
    windows: int = 0              # windows answered since the (re)start
    real_rows: int = 0            # rows since the (re)start, up to W: a padded window's share of real rows
    cont: np.ndarray | None = None  # the last <= W-1 rows, normalised: float32 [n, F]
    cat: np.ndarray | None = None   # int64 [n, C]
    started_at: float = 0.0
    last_used: float = field(default_factory=time.time)
    operation: dict | None = None   # the latest streamed operation {"name", "confidence"}
    users: int = 0                  # requests holding or awaiting it (acquire .. release)
    replay_key: str | None = None   # the Idempotency-Key of the last chunk applied with one,
    replay_digest: bytes = b""      # a digest of that chunk's body,
    replay_answer: bytes = b""      # and the answer it got (api/stream_replay.py)


class StreamRegistry:
    """Sessions by machine id, least recently used first (an OrderedDict kept in use order)."""

    def __init__(self, max_streams: int = MAX_STREAMS, idle_s: float = SETTINGS.stream_idle_s):
        if max_streams < 1:
            raise ValueError(f"GCODEFP_MAX_STREAMS must be >= 1, got {max_streams}")
        self.max_streams, self.idle_s = max_streams, idle_s
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self.on_forget = None   # machine_id -> None, called when a started session is ended or evicted

    def __len__(self) -> int:
        return len(self._sessions)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def get(self, machine_id: str) -> Session | None:
        """A started session (reading its state does not count as use)."""
        s = self._sessions.get(machine_id)
        return s if s is not None and s.version is not None else None

    def acquire(self, machine_id: str) -> Session:
        """The machine's session (a new, unstarted one if unknown), marked most recently used.
        Every acquire must be paired with release()."""
        now = time.time()
        self._expire(now)
        s = self._sessions.get(machine_id)
        if s is None:
            s = self._sessions[machine_id] = Session(machine_id)
            self._evict(keep=s)
        self._sessions.move_to_end(machine_id)
        s.last_used, s.users = now, s.users + 1
        metrics.STREAM_SESSIONS.set(len(self._sessions))
        return s

    def release(self, s: Session) -> None:
        """A request is done with the session; one whose first request failed (bad input) and that no
        other request awaits is forgotten, so that bad input holds no slot."""
        s.users -= 1
        if s.version is None and s.users == 0 and self._sessions.get(s.machine_id) is s:
            del self._sessions[s.machine_id]
            metrics.STREAM_SESSIONS.set(len(self._sessions))

    def _expire(self, now: float) -> None:
        """Forget the sessions idle past idle_s (0: never); the least recently used come first, so this
        looks at one session per call unless some are due."""
        while self.idle_s and self._sessions:
            old = next(iter(self._sessions.values()))
            if now - old.last_used <= self.idle_s or old.users:
                return
            del self._sessions[old.machine_id]
            self._forget(old)
            metrics.STREAM_EXPIRED.inc()
            log.info("stream session of %s forgotten after %.0f s without a chunk", old.machine_id,
                     now - old.last_used, extra={"event": "stream_expired", "machine_id": old.machine_id,
                                                 "rows_since_start": old.rows_since_start})

    def _evict(self, keep: Session) -> None:
        """Least recently used first, never one a request is using (the limit may be passed meanwhile)."""
        idle = (s for s in list(self._sessions.values()) if s.users == 0 and s is not keep)
        while len(self._sessions) > self.max_streams:
            old = next(idle, None)
            if old is None:
                return
            del self._sessions[old.machine_id]
            self._forget(old)
            metrics.STREAM_EVICTIONS.inc()
            log.warning("stream session of %s evicted (GCODEFP_MAX_STREAMS=%d)", old.machine_id, self.max_streams,
                        extra={"event": "stream_evicted", "machine_id": old.machine_id,
                               "rows_since_start": old.rows_since_start,
                               "idle_seconds": round(time.time() - old.last_used, 3)})

    def end(self, s: Session, handed_over: bool = False) -> None:
        """Forget a session: the client ended it, or (handed_over) another worker took the machine over."""
        if self._sessions.get(s.machine_id) is s:
            del self._sessions[s.machine_id]
            metrics.STREAM_SESSIONS.set(len(self._sessions))
            if not handed_over:
                self._forget(s)

    def _forget(self, s: Session) -> None:
        if self.on_forget is not None and s.version is not None:
            self.on_forget(s.machine_id)


# ---- one chunk --------------------------------------------------------------------------------------
def cut(model, buf_cont, buf_cat, raw_cont: np.ndarray, raw_cat: np.ndarray, pad: bool = False, every: int = 1):
    """Normalise the chunk and cut the windows that end in it: every `every`-th one counted back from the
    chunk's last row (windows.slide). pad (a tracker session's first chunk): the buffer is the first row
    W-1 times, so every row ends a window.
    -> (windows cont [k, W, F] or None, windows cat, new buffer cont, new buffer cat, m: how many windows end
    in the chunk, repeated [n] bool: a row's readings equal the previous row's)."""
    c, k = inputs.model_inputs(model.spec, raw_cont[None], raw_cat[None])
    c, k = c[0], k[0]
    repeated = np.zeros(len(c), bool)
    repeated[1:] = (c[1:] == c[:-1]).all(axis=1)
    if buf_cont is not None and len(buf_cont):
        repeated[0] = bool((c[0] == buf_cont[-1]).all())
    elif pad:
        buf_cont, buf_cat = np.repeat(c[:1], model.window - 1, axis=0), np.repeat(k[:1], model.window - 1, axis=0)
    return (*windows.slide(buf_cont, buf_cat, c, k, model.window, every), repeated)


def predict(model, wc: np.ndarray, wk: np.ndarray) -> dict[str, np.ndarray]:
    """The windows' line-head answers (also on concatenated windows of several machines: micro-batching)."""
    return windows.predict_windows(model.predictor, wc, wk)


def _restart(session: Session, model, start: bool, swapped: bool = False) -> None:
    """Fresh evidence: a new run, or (swapped) the same run under another model. A tracker's posterior
    (where in which program the machine is) survives a swap to a tracker with the same states."""
    p = model.predictor
    resumed = None
    if swapped and session.mode == "tracker" and p.program_tracker is not None:
        resumed = p.program_tracker.resume(session.tracker)
    if p.program_tracker is not None:
        session.mode, session.tracker = "tracker", resumed or p.program_tracker.start(at_program_start=start)
    else:
        session.mode, session.tracker = "clock", p.stream_tracker()
    session.version, session.clock, session.operation = model.version, p.program_clock is not None, None
    session.windows = session.real_rows = 0


def _tracked(session: Session, model, out: dict, first: int, judged, gaps, repeats, lo: int, hi: int) -> list[dict]:
    """The tracker's answers at judged rows lo..hi-1 (gcodefp_core.runtime.tracked_stream)."""
    predictions = tracked_stream.tracked_answers(model.predictor, session.tracker, out, first, judged, gaps, repeats,
                                                 session.real_rows, lo, hi)
    if predictions:
        session.operation = predictions[-1]["operation"]
    return predictions


def _clocked(session: Session, model, out: dict, first: int) -> list[dict]:
    """The clock's answer after each window (window j's newest row is `first + j` rows after the start)."""
    p = model.predictor
    predictions = []
    for j in range(len(out["line"])):
        logits, line, conf = out["op_logits"][j], int(out["line"][j]), float(out["line_confidence"][j])
        step = session.tracker.update(first + j, logits, line, conf)
        session.operation = {"name": p.operations[step.operation], "confidence": round(step.operation_confidence, 6)}
        predictions.append({"row": first + j, "gcode_sequence": p.lines[step.line], "operation": session.operation,
                            "line_confidence": round(step.line_confidence, 6), "line_source": step.line_source,
                            "window": {"operation": tracked_stream.operation_answer(p.operations, logits),
                                       "gcode_sequence": p.lines[line]}})
    return predictions


async def post_rows(session: Session, model, raw_cont, raw_cat, start: bool, run, every: int = 1) -> dict:
    """Apply one chunk to a session (hold session.lock). run(windows cont, windows cat) runs the model
    (predict) and records metrics -> (result, ms). every: a tracker session judges every `every`-th row
    (tracked_stream.judged_rows); a clock session judges every row. The session changes only after the
    model has answered."""
    fresh = session.version is None or start
    changed = not fresh and session.version != model.version
    rows_before = 0 if fresh else session.rows_since_start
    tracking = model.predictor.program_tracker is not None
    buf = (None, None) if fresh or changed else (session.cont, session.cat)
    n = len(raw_cont)
    pad = tracking and buf[0] is None
    step = every if tracking else 1  # a tracker judges every `every`-th row; the clock every row
    if n <= INLINE_ROWS:
        wc, wk, cont, cat, n_windows, repeated = cut(model, *buf, raw_cont, raw_cat, pad, step)
    else:
        wc, wk, cont, cat, n_windows, repeated = await asyncio.to_thread(cut, model, *buf, raw_cont, raw_cat, pad, step)
    if tracking and n_windows:  # padded: window j ends at the chunk's row j, and the judged rows' windows were cut
        judged, gaps, repeats = tracked_stream.judged_rows(n, every, repeated)
    out, ms = await run(wc, wk) if n_windows else (None, 0.0)

    if fresh or changed:
        _restart(session, model, bool(start), swapped=changed)
        if fresh:
            session.started_at = time.time()
    first = rows_before + n - n_windows  # the row (since the start) that the first window ends at
    if not n_windows:
        predictions = []
    elif session.mode == "tracker":  # ~0.25 ms a row: a long chunk lets other requests in between slices
        predictions = []
        for lo in range(0, len(judged), INLINE_TRACKED):
            if lo:
                await asyncio.sleep(0)
            predictions += _tracked(session, model, out, first, judged, gaps, repeats, lo,
                                    min(lo + INLINE_TRACKED, len(judged)))
    else:
        predictions = _clocked(session, model, out, first)
    session.windows += len(predictions)
    session.real_rows = min(session.real_rows + n, model.window)
    session.rows_since_start, session.cont, session.cat = rows_before + n, cont, cat
    return {"machine_id": session.machine_id, "rows_since_start": session.rows_since_start, "mode": session.mode,
            "windows": session.windows, "model_version": model.version, "started": fresh,
            "model_changed": changed, "predictions": predictions, "inference_time_ms": ms}


def state(session: Session) -> dict:
    return {"machine_id": session.machine_id, "rows_since_start": session.rows_since_start,
            "windows": session.windows, "operation": session.operation, "model_version": session.version,
            "started_at": session.started_at, "last_used": session.last_used, "clock": session.clock,
            "mode": session.mode}
