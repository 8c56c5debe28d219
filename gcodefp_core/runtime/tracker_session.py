"""One followed machine's forward filter over a ProgramTracker's states (numpy only).

`ProgramTracker` (gcodefp_core.runtime.program_tracker) is the model, shared by every machine: the
states (operation, row offset since the program started; moving and paused), the transition and
the emission. `TrackerSession` is one machine's posterior over those states: `update` moves it over
the streamed rows since the previous judged window and weighs that window's evidence; `answer`
reads the operation, the line, the offset, the pause probability and the entropy off it. A session
is plain arrays (to_dict / from_dict, or the server's saved state files) and can outlive a worker.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STATE = np.float32   # the posterior and the transition: half the memory of float64 per followed machine and
                     # faster array arithmetic; a posterior floored at 1e-30 needs no more range or precision


@dataclass
class TrackStep:
    operation: int
    operation_confidence: float           # posterior probability of the operation
    line: int                             # a class of the line table (-1: no known line)
    line_confidence: float                # posterior probability of that line
    line_source: str                      # "tracker", or "window" when the window's own line is surer
    offset: int                           # most probable row offset since the program started
    paused: float                         # posterior probability that the machine stands still
    entropy: float                        # of the posterior over states, in nats (0 = certain)


@dataclass
class TrackerSession:
    """One machine's filter: the posterior over (operation, row offset), moving and paused."""
    model: object            # its ProgramTracker (not imported here: the tracker module imports this one)
    moving: np.ndarray
    paused: np.ndarray
    rows: int = 0
    from_start: bool = False  # started at a program start (the client said so): its own window weight

    def update(self, op_logits, line_logits, weight: float = 1.0, repeated: int = 0, rows: int = 1,
               template=None, spread=None) -> TrackStep:
        """The window model's op_logits [ops] and line_logits [n_lines] for the window ending at the
        newest streamed row. weight in [0, 1] scales the window's evidence (a padded window is weaker).
        rows: streamed rows since the previous update (1: every row is judged). A server that judges
        only every k-th row passes k: the filter moves k rows and the window's evidence counts k
        times, as the k skipped windows, which overlap it in all but k of 64 rows, would have.
        repeated: how many of those rows equal the row before them (stale readings: pause evidence).
        template, spread: the window's operation evidence (ProgramTracker.operation_evidence), used when
        the tracker has that kind."""
        m, prm = self.model, self.model.params
        moving, paused = self.moving, self.paused
        for i in range(rows):
            # The first row of a session is where the start distribution is; later rows move on.
            moving, paused = self._move(moving, paused, advance=bool(self.rows or i))
        e = m.emission(op_logits, line_logits, template, spread)
        e -= e.max()
        e *= weight * rows
        e = np.exp(np.maximum(e, -60.0, out=e), out=e)
        r = int(repeated)
        rep = (prm["repeat_moving"] ** r * (1 - prm["repeat_moving"]) ** (rows - r),
               prm["repeat_paused"] ** r * (1 - prm["repeat_paused"]) ** (rows - r))
        moving *= e
        paused *= e
        total = rep[0] * moving.sum() + rep[1] * paused.sum()
        if not np.isfinite(total) or total <= 0:   # evidence contradicts everything: start over
            fresh = m.start()
            moving, paused, rep, total = fresh.moving, fresh.paused, (1.0, 1.0), 1.0
        # A floor keeps every state reachable and the arithmetic off subnormal floats.
        moving *= rep[0] / total
        paused *= rep[1] / total
        self.moving = np.maximum(moving, 1e-30, out=moving)
        self.paused = np.maximum(paused, 1e-30, out=paused)
        self.rows += rows
        step = self.answer()
        # The window's own line (among the lines of the tracker's operation), calibrated: while
        # the filter has not locked on, a window that is sure of its line answers instead. A session
        # that saw its program start knows where the machine is and a monitor attached mid-run does
        # not, so each kind has its own weight (on the real side-channel validation streams: 0-0.5
        # from the start, 1 to "always" attached).
        window_weight = prm["window_weight_start"] if self.from_start else prm["window_weight"]
        if window_weight > 0 and m._op_lines[step.operation].any():
            z = np.where(m._op_lines[step.operation], np.asarray(line_logits, np.float64) / prm["line_temperature"], -np.inf)
            p = np.exp(z - z.max())
            line = int(p.argmax())
            confidence = float(p[line] / p.sum())
            if window_weight * confidence > step.line_confidence:
                step.line, step.line_confidence, step.line_source = line, confidence, "window"
        return step

    def _move(self, a: np.ndarray, b: np.ndarray, advance: bool) -> tuple[np.ndarray, np.ndarray]:
        """One row of time on the (moving, paused) posterior, before that row's evidence. Every mass
        that stays (no pause entered, no jump taken) is scaled by keep = 1 - teleport - switch; the
        moving mass also by 1 - pause_in (both folded into the transition: m._moving_keep). The
        factors are float32 constants of the model (ProgramTracker._move_factors): a row costs a few
        passes over the states, and a followed machine moves 4 rows per judged window."""
        m = self.model
        f = m._move_factors
        moving = m.advance(a) if advance else a * f["moving_keep"]
        # Past a program's last offset: the next run may start (any program, offset 0).
        ended = a[m._last] * f["restart"]
        moving[m._last] -= ended
        moving[m.block_start] += ended.sum() * f["new_run"]  # a new run's mass does not pause-in
        moving += f["pause_out"] * b
        paused = f["pause_in"] * a
        paused += f["pause_stay"] * b
        # Jumps anywhere: within the operation (recovery after a gap) or to any operation.
        per_op = np.add.reduceat(moving, m.block_start)
        per_op += np.add.reduceat(paused, m.block_start)
        moving += np.repeat(per_op * f["teleport_per_state"] + f["switch_per_state"], m._sizes)
        return moving, paused

    def answer(self) -> TrackStep:
        m = self.model
        post = self.moving + self.paused
        ops = np.add.reduceat(post, m.block_start)
        op = int(ops.argmax())
        lo, hi = m.block_start[op], m.block_end[op]
        mass = (post[lo:hi, None] * m._share[lo:hi]).ravel()
        lines = np.bincount(m._idx[lo:hi].ravel(), mass, minlength=m.n_lines + 1)[:m.n_lines]
        line = int(lines.argmax()) if lines.any() else -1
        nz = post[post > 1e-12]
        return TrackStep(op, float(ops[op]), line, float(lines[line] / ops[op]) if line >= 0 else 0.0, "tracker",
                         int(post[lo:hi].argmax()), float(self.paused.sum()), float(-(nz * np.log(nz)).sum()))

    def to_dict(self) -> dict:
        """The filter state (sparse: states above 1e-9), to keep a session across restarts."""
        keep = np.flatnonzero((self.moving > 1e-9) | (self.paused > 1e-9))
        return {"rows": self.rows, "states": keep.tolist(), "moving": self.moving[keep].tolist(),
                "paused": self.paused[keep].tolist(), "from_start": self.from_start}

    @classmethod
    def from_dict(cls, model: ProgramTracker, d: dict) -> "TrackerSession":
        for key in ("rows", "states", "moving", "paused"):
            if key not in d:
                raise ValueError(f"tracker session: missing field {key!r}")
        idx = np.asarray(d["states"], np.int64)
        if len(idx) != len(d["moving"]) or len(idx) != len(d["paused"]) or (len(idx) and not 0 <= idx.min() <= idx.max() < model.n_states):
            raise ValueError(f"tracker session: states must be {len(idx)} indices below {model.n_states} with a value each")
        moving, paused = np.zeros(model.n_states, STATE), np.zeros(model.n_states, STATE)
        moving[idx], paused[idx] = d["moving"], d["paused"]
        total = moving.sum() + paused.sum()
        if total <= 0:
            return model.start()
        return cls(model, moving / total, paused / total, int(d["rows"]), bool(d.get("from_start", False)))
