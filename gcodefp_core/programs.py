"""What the programs look like: the table of G-code lines the line head classifies over.

Every operation runs one fixed program (damage* reuse the *150025 ones), so predicting the line is
predicting a position in a known program. The line head scores the distinct lines of the *training*
runs (never the test runs': a line only a test run executes is simply missed), and at prediction
time only the lines of the predicted operation's program compete. The operation itself is
factorised the same way: program (6 classes) x variant (normal / damaged), so the program comes
from everything the model sees and the damaged-or-not decision is one question shared by all
programs (each damage* class alone has only 2 training runs).

A LineTable is plain data (lists and numpy arrays): it travels in checkpoints and in model.json.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .schema import PROGRAM_OF


@dataclass
class LineTable:
    lines: list[str]                  # class i -> G-code text
    programs: list[str]               # program names, in the order of `mask`'s rows
    mask: np.ndarray                  # [programs, lines] bool: line i occurs in program p (training runs)
    operation_program: list[int]      # per operation: its program's index
    operation_variant: list[int]      # per operation: 1 = a damaged run of its program, else 0
    per_program: bool = False         # classes are (program, line) pairs: each column of mask has one 1

    @property
    def n_lines(self) -> int:
        return len(self.lines)

    def to_dict(self) -> dict:
        return {"lines": self.lines, "programs": self.programs,
                "program_lines": [np.flatnonzero(row).tolist() for row in self.mask],
                "operation_program": self.operation_program, "operation_variant": self.operation_variant,
                "per_program": self.per_program}

    @classmethod
    def from_dict(cls, d: dict) -> "LineTable":
        for key in ("lines", "programs", "program_lines", "operation_program", "operation_variant"):
            if key not in d:
                raise ValueError(f"line table: missing field {key!r}")
        mask = np.zeros((len(d["programs"]), len(d["lines"])), dtype=bool)
        for p, idx in enumerate(d["program_lines"]):
            mask[p, idx] = True
        return cls(list(d["lines"]), list(d["programs"]), mask, list(d["operation_program"]),
                   list(d["operation_variant"]), bool(d.get("per_program", False)))


def operation_factors(operations: list[str]) -> tuple[list[str], list[int], list[int]]:
    """-> (programs, program index per operation, variant per operation). An operation the schema
    does not know is its own program."""
    program_names = [PROGRAM_OF.get(op, op) for op in operations]
    programs = list(dict.fromkeys(program_names))
    variants = [int(op.startswith("damage") and op in PROGRAM_OF) for op in operations]
    return programs, [programs.index(p) for p in program_names], variants


def build_line_table(ds, per_program: bool = False) -> LineTable:
    """The line classes of a dataset: the distinct target lines of its training windows, with the
    programs each occurs in. per_program: one class per (program, line) pair instead, so a line
    that ends every program (M30, a retract) is still told apart by where the tool stands, and the
    line head alone decides the program."""
    train = ds.split_windows("train")
    line_of = ds.arrays["row_line"][train]
    programs, op_program, op_variant = operation_factors(list(ds.operations))
    prog_of = np.asarray(op_program)[ds.operation_labels(train)]
    keys = np.unique(np.stack([prog_of if per_program else np.zeros_like(prog_of), line_of], 1), axis=0)
    mask = np.zeros((len(programs), len(keys)), dtype=bool)
    if per_program:
        mask[keys[:, 0], np.arange(len(keys))] = True
    else:
        mask[prog_of, np.searchsorted(keys[:, 1], line_of)] = True
    lines = [ds.manifest["lines"][i] for i in keys[:, 1]]
    return LineTable(lines, programs, mask, op_program, op_variant, per_program)


def row_classes(ds, table: LineTable) -> np.ndarray:
    """The line class of every row's target (index it with window ids); -1 where the table lacks it
    (a line no training run executes, or, per program, not in that program's training runs)."""
    rows = len(ds.arrays["row_run"])
    if table.per_program:
        program_of_run = np.asarray(table.operation_program)[
            [ds.operations.index(r["operation"]) for r in ds.manifest["runs"]]]
        prog = program_of_run[ds.arrays["row_run"]]
        index = {(int(table.mask[:, i].argmax()), line): i for i, line in enumerate(table.lines)}
    else:
        prog = np.zeros(rows, np.int64)
        index = {(0, line): i for i, line in enumerate(table.lines)}
    # Look up each distinct (program, dataset line) pair once, then spread to the rows.
    pairs, inverse = np.unique(np.stack([prog, ds.arrays["row_line"]], 1), axis=0, return_inverse=True)
    texts = ds.manifest["lines"]
    cls = np.array([index.get((int(p), texts[int(l)]), -1) for p, l in pairs], dtype=np.int64)
    return cls[inverse.reshape(-1)]
