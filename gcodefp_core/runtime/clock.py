"""Streaming mode: follow one machine's program from its start instead of judging each window alone.

A window model sees 64 rows. That is enough to tell which program runs, but not where in the
program the machine is: the adaptive and pocket programs execute hundreds of short lines, about
one new line per status report, and from side channels alone a window says "somewhere in a
roughing pass". A monitor that watches a machine from the moment its program starts knows two
things a window does not:

- **how many rows since the program started.** Each operation runs one fixed program, and runs of
  one program take almost the same number of rows (adaptive: 345-346; pocket: 296-301), so the row
  offset, looked up in the training runs of that program (`ProgramClock`), names the line;
- **every window seen so far.** The operation does not change during a program, so the per-window
  operation log-probabilities add up (`StreamTracker`): one run of ambiguous windows no longer
  flips the answer.

Which line wins, the clock's or the window model's, is decided per window: the clock's when
`weight * (share of training runs on that line at this offset) >= the window's line confidence`.
`weight` is chosen on the validation split when the clock is built (`fit_program_clock`): near 0
for a model that reads controller state (its own line is better), large for a side-channel model.
Past the end of the longest training run of the program (a paused or hand-jogged machine) the
clock has nothing to say and the window model answers alone.

What the client must supply: the rows in order, from the start of the program (a new session per
program run). The clock is wrong if rows are dropped or the session starts mid-program. That is why
/stream serves the program tracker (runtime/program_tracker.py) instead wherever a package has one;
the clock remains for packages exported before it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ProgramClock:
    """Per program (LineTable.programs order) and row offset since its start: the most common line
    class among the training runs (-1: none) and the share of runs on it."""
    programs: list[str]
    line: list[np.ndarray]            # per program: [length] int64
    share: list[np.ndarray]           # per program: [length] float
    weight: float = 1.0

    @classmethod
    def empty(cls) -> "ProgramClock":
        """No clock (a model exported before streaming mode existed): the window model answers every line."""
        return cls([], [], [], 0.0)

    def lookup(self, program: int, offset: int) -> tuple[int, float] | None:
        """-> (line class, share) or None when the clock does not cover this offset."""
        if not 0 <= program < len(self.line) or not 0 <= offset < len(self.line[program]):
            return None
        line = int(self.line[program][offset])
        return (line, float(self.share[program][offset])) if line >= 0 else None

    def to_dict(self) -> dict:
        return {"programs": self.programs, "weight": self.weight,
                "line": [a.tolist() for a in self.line], "share": [np.round(a, 4).tolist() for a in self.share]}

    @classmethod
    def from_dict(cls, d: dict) -> "ProgramClock":
        for key in ("programs", "line", "share", "weight"):
            if key not in d:
                raise ValueError(f"program clock: missing field {key!r}")
        if not len(d["programs"]) == len(d["line"]) == len(d["share"]):
            raise ValueError("program clock: fields 'programs', 'line' and 'share' differ in length")
        line = [np.asarray(a, np.int64) for a in d["line"]]
        share = [np.asarray(a, np.float64) for a in d["share"]]
        for p, (a, b) in enumerate(zip(line, share)):
            if a.shape != b.shape:
                raise ValueError(f"program clock: program {d['programs'][p]!r} has {len(a)} lines but {len(b)} shares")
        return cls(list(d["programs"]), line, share, float(d["weight"]))


@dataclass
class StreamStep:
    operation: int
    operation_confidence: float       # the geometric mean of the windows' probabilities, renormalised
    line: int                         # a class of the line table
    line_confidence: float
    line_source: str                  # "clock" or "window"
    windows: int                      # windows seen since the program started


@dataclass
class StreamTracker:
    """One machine from the start of its program. Feed it every window in row order."""
    clock: ProgramClock
    operation_program: np.ndarray     # per operation: index into clock.programs
    evidence: np.ndarray | None = None
    windows: int = 0

    def reset(self) -> None:
        self.evidence, self.windows = None, 0

    def update(self, offset: int, op_logits: np.ndarray, line: int, line_confidence: float) -> StreamStep:
        """offset: row offset of the window's newest row since the program started (0 = first row).
        op_logits, line, line_confidence: the window model's answer (line among the lines of its
        own predicted operation's program)."""
        z = np.asarray(op_logits, np.float64)
        logp = z - z.max() - np.log(np.exp(z - z.max()).sum())
        self.evidence = logp if self.evidence is None else self.evidence + logp
        self.windows += 1
        mean = self.evidence / self.windows
        probs = np.exp(mean - mean.max())
        op = int(probs.argmax())
        program = int(self.operation_program[op])
        # The window's line belongs to the program of the window's own operation; if that is not
        # the stream's program, it cannot be the answer unless nothing else is.
        own = int(self.operation_program[int(z.argmax())]) == program
        confidence = float(line_confidence) if own else 0.0
        hit = self.clock.lookup(program, offset)
        if hit is not None and self.clock.weight * hit[1] >= confidence:
            line, confidence, source = hit[0], hit[1], "clock"
        else:
            source = "window"
        return StreamStep(op, float(probs[op] / probs.sum()), int(line), confidence, source, self.windows)
