"""Where in which program a machine is, inferred online from the window model's answers (numpy only).

Every operation runs one fixed program, so a monitor's question "what is the machine executing?"
is "which program, and where in it?". `ProgramTracker` answers it with a forward filter (an HMM)
instead of counting rows, so it needs no row counter from the client, survives a monitor attached
mid-run, lost rows and pauses, and says how sure it is.

Hidden state, one per (operation, row offset since the program started), plus a paused twin:
- runs of one operation take almost the same number of rows (adaptive 345-346, pocket 296-301), so
  the row offset says where in the program the machine is: at each offset the training runs give
  the lines executed there and their shares (`timeline_*`, the K most common). How long each line
  dwells is in that table: a line held for 5 rows spans 5 offsets. A damaged variant runs its
  program at its own pace and has its own timeline (`programs` names the timelines; packages before
  this shared one per program); its states are separate, so the damaged-or-not evidence adds up;
- the *paused* twin of a state holds the same line while the machine stands still.
Transitions per streamed row:
- `tempo` (per program, from the spread of the training runs' lengths): the offset advances by 1,
  or by 0 / 2 when this run is a little slower / faster than the training runs;
- `skip`: a lost row looks like two rows of progress at once (the tempo applied twice);
- `pause_in` / `pause_stay`: enter the paused twin, stay there, come back to the same offset;
- `restart`: from a program's last offset to the start of any program (the next run);
- `teleport` (same operation) and `switch` (any operation): a small jump to anywhere. This is what
  recovers after a long gap or a wrong lock, and keeps every operation's mass above underflow.
Emissions (from the window ending at a judged row): the window model's probabilities as tempered
likelihoods, `op_weight * log p(op) + log sum_k share_k * (p(line_k) / prior(line_k)) ** line_weight`
over the lines of the offset; consecutive windows overlap in 63 of 64 rows, so the weights (< 1)
are chosen on validation streams. A padded window (< 64 rows arrived) weighs less; a row identical
to the previous one (stale readings) is evidence for pausing. With operation templates (kept when
they help on validation), `template_weight` x each operation's best template match of the window's
readings (gcodefp_core.runtime.operation_templates) is added to its states' log evidence; with
operation spread evidence (kept likewise), `spread_weight` x the log-probability a linear model of
the channels' spread over the window's last rows gives each operation
(gcodefp_core.runtime.operation_spread): evidence without the recording day's levels. The
answer is the line with the most posterior mass, with that mass as its confidence, unless
`window_weight` x the window's own line confidence is higher (the filter has not locked on yet, or
the timeline lacks the line; `window_weight_start` instead for a session started at a program
start, which knows where the machine is); also the operation's posterior, the pause probability,
the most probable row offset and the entropy.

`ProgramTracker` is plain data (to_dict / from_dict, stored in model.json) shared by all
machines; `TrackerSession` (gcodefp_core.runtime.tracker_session) is one machine's filter state (also
serialisable).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .operation_spread import OperationSpread
from .operation_templates import OperationTemplates
from .tracker_session import STATE, TrackerSession, TrackStep  # noqa: F401  (TrackStep: re-exported)

PARAMS = {"line_weight": 0.3, "op_weight": 0.3, "line_temperature": 1.0, "op_temperature": 1.0,
          "skip": 0.05, "pause_in": 1e-3, "pause_stay": 0.97, "restart": 0.05, "teleport": 1e-4,
          "switch": 1e-6, "repeat_moving": 0.02, "repeat_paused": 0.9, "window_weight": 0.0,
          "window_weight_start": 0.0, "template_weight": 0.0, "spread_weight": 0.0}


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


@dataclass
class ProgramTracker:
    operations: list[str]
    programs: list[str]                   # the timelines' names (one per operation; older packages: per program)
    operation_program: list[int]          # per operation: index into programs (its timeline)
    timeline_line: list[np.ndarray]       # per program [T, K]: the K most common line classes at row offset t
    timeline_share: list[np.ndarray]      # per program [T, K]: the share of training runs on each (index n_lines: a line the table lacks)
    tempo: list[np.ndarray]               # per program: P(the offset advances by 0, 1, 2, .. per row)
    line_log_prior: np.ndarray            # [n_lines] log frequency of each line class in training windows
    params: dict = field(default_factory=lambda: dict(PARAMS))
    templates: OperationTemplates | None = None   # operation evidence from the readings' shape (optional)
    spread: OperationSpread | None = None         # operation evidence from the readings' spread (optional)

    def __post_init__(self) -> None:
        self._build()

    # ---- the flattened state space (operation-major, a program's offsets contiguous) ----
    def _build(self) -> None:
        blocks = [self.operation_program[o] for o in range(len(self.operations))]
        sizes = [len(self.timeline_line[p]) for p in blocks]
        self.n_states = int(sum(sizes))
        self.n_lines = len(self.line_log_prior)
        self.state_op = np.repeat(np.arange(len(blocks)), sizes)
        self.state_offset = np.concatenate([np.arange(n) for n in sizes])
        self._idx = np.concatenate([self.timeline_line[p] for p in blocks]).astype(np.int64)
        self._share = np.concatenate([self.timeline_share[p] for p in blocks])
        # The line evidence depends on a state's (lines, shares) row only, and few rows differ (the real
        # tables: 1,311 distinct of 5,337; a damaged variant repeats its program's): the emission is
        # computed per distinct row, over the columns holding a share anywhere, then spread to the states.
        k = self._idx.shape[1]
        rows, self._row_of_state = np.unique(np.concatenate([self._idx, self._share], axis=1), axis=0,
                                             return_inverse=True)
        held = (rows[:, k:] > 0).any(axis=0) | (np.arange(k) == 0)
        self._row_idx, self._row_share = rows[:, :k][:, held].astype(np.int64), np.ascontiguousarray(rows[:, k:][:, held])
        self._row_of_state = self._row_of_state.ravel()
        self._sizes = np.asarray(sizes, np.int64)
        starts = np.cumsum([0] + sizes)
        self.block_start, self.block_end = starts[:-1], starts[1:]
        self._last = self.block_end - 1
        self._start = np.zeros(self.n_states, STATE)
        self._start[self.block_start] = 1.0 / len(blocks)
        self._uniform_in_op = (1.0 / np.asarray(sizes, np.float64)[self.state_op]).astype(STATE)
        # Per operation: the line classes its program's timeline holds (the window's own answer
        # competes only among them).
        self._op_lines = np.zeros((len(blocks), self.n_lines), bool)
        for o, p in enumerate(blocks):
            held = self.timeline_line[p][self.timeline_share[p] > 0]
            self._op_lines[o, held[held < self.n_lines]] = True
        # A lost row looks like two rows of progress at once.
        skip = self.params["skip"]
        steps = []
        for p in blocks:
            t = np.asarray(self.tempo[p], np.float64)
            steps.append((1 - skip) * np.pad(t, (0, len(t) - 1)) + skip * np.convolve(t, t))
        self._width = max(len(x) for x in steps)
        # Incoming form of the banded transition: column j holds P(arrive at s from s - (width-1-j));
        # mass that would run past a program's last offset stays there.
        into = np.zeros((self.n_states, self._width))
        for o, st in enumerate(steps):
            i = np.arange(sizes[o])
            for d, prob in enumerate(st):
                j = np.minimum(i + d, sizes[o] - 1)
                np.add.at(into, (self.block_start[o] + j, self._width - 1 - (j - i)), prob)
        # Per shift that any state can take (tempo 0/1/2 rows without skips: 3 of 5), contiguous, with
        # the per-row factors that scale all moving mass folded in (no pause entered, no jump taken):
        # fewer passes over the states per row.
        self._moving_keep = (1 - self.params["pause_in"]) * (1 - self.params["teleport"] - self.params["switch"])
        self._into = [(self._width - 1 - j, np.ascontiguousarray(into[:, j] * self._moving_keep, STATE))
                      for j in range(self._width) if into[:, j].any()]
        prm, keep, n_ops = self.params, 1 - self.params["teleport"] - self.params["switch"], len(blocks)
        sizes32 = np.asarray(sizes, STATE)
        self._move_factors = {
            "moving_keep": STATE(self._moving_keep), "restart": STATE(prm["restart"] * self._moving_keep),
            "new_run": STATE(1 / (n_ops * (1 - prm["pause_in"]))), "pause_out": STATE((1 - prm["pause_stay"]) * keep),
            "pause_in": STATE(prm["pause_in"] * keep), "pause_stay": STATE(prm["pause_stay"] * keep),
            # per operation: teleport x (its mass before the jumps = its mass now / keep) spread over its states
            "teleport_per_state": (prm["teleport"] / keep / sizes32).astype(STATE),
            "switch_per_state": (prm["switch"] / n_ops / sizes32).astype(STATE)}

    def set_params(self, **params) -> None:
        """Change params (e.g. tuned emission weights); the transition is rebuilt."""
        unknown = set(params) - set(PARAMS)
        if unknown:
            raise ValueError(f"program tracker: unknown params {sorted(unknown)}")
        self.params = self.params | params
        self._build()

    def start(self, at_program_start: bool = False) -> "TrackerSession":
        """A new machine. Attached at an unknown point (default): any row offset of any operation.
        at_program_start: the client knows a program is starting (any program, offset 0)."""
        moving = self._start.copy() if at_program_start else self._uniform_in_op / len(self.operations)
        return TrackerSession(self, moving, np.zeros(self.n_states, STATE), from_start=at_program_start)

    def resume(self, session: "TrackerSession") -> "TrackerSession | None":
        """Another tracker's session carried over to this one (a model swap): where the machine is in
        which program is a property of the machine, so the posterior carries over when both trackers
        have the same states (operations, their programs and the programs' lengths); else None."""
        old = session.model
        if (old.operations, old.operation_program, list(old._sizes)) != (self.operations, self.operation_program,
                                                                          list(self._sizes)):
            return None
        return TrackerSession(self, session.moving.copy(), session.paused.copy(), session.rows, session.from_start)

    def advance(self, a: np.ndarray) -> np.ndarray:
        """One row of program progress applied to a distribution over states, times `_moving_keep`: the
        banded transition as one multiply-add per shift into a fresh array (a private buffer: one model
        serves concurrent sessions). A strided einsum over the band cost twice as much."""
        n = self.n_states
        out = None
        for shift, into in self._into:
            if out is None:
                out = into * a if shift == 0 else np.zeros(n, STATE)
                if shift:
                    np.multiply(into[shift:], a[:n - shift], out=out[shift:])
            elif shift == 0:
                out += into * a
            else:
                out[shift:] += into[shift:] * a[:n - shift]
        return out

    def line_ratios(self, line_logits: np.ndarray) -> np.ndarray:
        """exp(line_weight * (log p(line) - log prior(line))) per line class, and 1 for a line the
        table lacks (index n_lines: no evidence either way); scaled so the largest is 1. In place on
        one float64 buffer: ~2,000 line classes, and this runs once per judged window."""
        prm = self.params
        ratio = np.empty(self.n_lines + 1)
        z = np.multiply(line_logits, 1.0 / prm["line_temperature"], out=ratio[:-1], dtype=np.float64)
        top = z.max()
        log_norm = top + np.log(np.exp(z - top).sum())   # log p(line) = z - log_norm
        z -= self.line_log_prior
        z -= log_norm
        z *= prm["line_weight"]
        ratio[-1] = 0.0
        ratio -= ratio.max()
        np.maximum(ratio, -60.0, out=ratio)   # no subnormal floats: they cost 100x per op
        return np.exp(ratio, out=ratio)

    @property
    def uses_templates(self) -> bool:
        return self.templates is not None and self.params["template_weight"] > 0

    @property
    def uses_spread(self) -> bool:
        return self.spread is not None and self.params["spread_weight"] > 0

    def operation_evidence(self, windows: np.ndarray) -> dict[str, np.ndarray]:
        """What a judged window's readings add beyond the window model's answer, per kind the tracker
        uses: [B, W, F] normalised windows -> {"template": [B, ops], "spread": [B, ops]} (either absent)."""
        out = {}
        if self.uses_templates:
            out["template"] = self.templates.scores(windows)
        if self.uses_spread:
            out["spread"] = self.spread.scores(windows)
        return out

    def emission(self, op_logits: np.ndarray, line_logits: np.ndarray, template: np.ndarray | None = None,
                 spread: np.ndarray | None = None) -> np.ndarray:
        """Log scaled likelihood of one window's answer under every state (up to a constant).
        template: the window's best template match per operation (OperationTemplates.scores);
        spread: its spread model's log-probability per operation (OperationSpread.scores)."""
        prm = self.params
        op = prm["op_weight"] * log_softmax(np.asarray(op_logits, np.float64) / prm["op_temperature"])
        if template is not None and self.uses_templates:
            op = op + prm["template_weight"] * np.asarray(template, np.float64)
        if spread is not None and self.uses_spread:
            op = op + prm["spread_weight"] * np.asarray(spread, np.float64)
        ratio = self.line_ratios(line_logits)
        line = np.einsum("ij,ij->i", ratio[self._row_idx], self._row_share)
        # per distinct row, then spread to the states in float32 (the state arrays' type: half the bytes)
        e = np.log(line + 1e-300).astype(STATE)[self._row_of_state]
        e += np.repeat(op.astype(STATE), self._sizes)
        return e

    # ---- serialisation (model.json) ----
    def to_dict(self) -> dict:
        return {"operations": self.operations, "programs": self.programs, "operation_program": self.operation_program,
                "timeline_line": [a.tolist() for a in self.timeline_line],
                "timeline_share": [np.round(a, 4).tolist() for a in self.timeline_share],
                "tempo": [np.round(a, 5).tolist() for a in self.tempo],
                "line_log_prior": np.round(self.line_log_prior, 4).tolist(), "params": dict(self.params),
                "templates": self.templates.to_dict() if self.templates is not None else None,
                "spread": self.spread.to_dict() if self.spread is not None else None}

    @classmethod
    def from_dict(cls, d: dict) -> "ProgramTracker":
        for key in ("operations", "programs", "operation_program", "timeline_line", "timeline_share", "tempo",
                    "line_log_prior", "params"):
            if key not in d:
                raise ValueError(f"program tracker: missing field {key!r}")
        n = len(d["programs"])
        for key in ("timeline_line", "timeline_share", "tempo"):
            if len(d[key]) != n:
                raise ValueError(f"program tracker: field {key!r} has {len(d[key])} entries for {n} programs")
        if len(d["operation_program"]) != len(d["operations"]) or not all(0 <= p < n for p in d["operation_program"]):
            raise ValueError("program tracker: field 'operation_program' must give a program index per operation")
        n_lines = len(d["line_log_prior"])
        lines = [np.asarray(a, np.int64) for a in d["timeline_line"]]
        shares = [np.asarray(a, np.float64) for a in d["timeline_share"]]
        tempo = [np.asarray(a, np.float64) for a in d["tempo"]]
        for p, name in enumerate(d["programs"]):
            if lines[p].ndim != 2 or not len(lines[p]) or lines[p].shape != shares[p].shape:
                raise ValueError(f"program tracker: program {name!r}: timeline_line and timeline_share must be "
                                 "equal-shaped [offsets, K] tables with at least one offset")
            if lines[p].min() < 0 or lines[p].max() > n_lines:
                raise ValueError(f"program tracker: program {name!r}: a timeline line is not in 0..{n_lines}")
            if tempo[p].ndim != 1 or not len(tempo[p]) or tempo[p].min() < 0 or abs(tempo[p].sum() - 1) > 1e-3:
                raise ValueError(f"program tracker: program {name!r}: tempo must be probabilities summing to 1")
        unknown = set(d["params"]) - set(PARAMS)
        if unknown:
            raise ValueError(f"program tracker: unknown params {sorted(unknown)}")
        params = dict(d["params"])
        # Packages before window_weight_start had one window weight for every session.
        params.setdefault("window_weight_start", params.get("window_weight", PARAMS["window_weight"]))
        templates = OperationTemplates.from_dict(d["templates"], len(d["operations"])) if d.get("templates") else None
        spread = OperationSpread.from_dict(d["spread"], len(d["operations"])) if d.get("spread") else None
        return cls(list(d["operations"]), list(d["programs"]), list(d["operation_program"]), lines, shares, tempo,
                   np.asarray(d["line_log_prior"], np.float64), PARAMS | params, templates, spread)
