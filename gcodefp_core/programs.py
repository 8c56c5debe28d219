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

    @property
    def n_lines(self) -> int:
        return len(self.lines)

    def to_dict(self) -> dict:
        return {"lines": self.lines, "programs": self.programs,
                "program_lines": [np.flatnonzero(row).tolist() for row in self.mask],
                "operation_program": self.operation_program, "operation_variant": self.operation_variant}

    @classmethod
    def from_dict(cls, d: dict) -> "LineTable":
        for key in ("lines", "programs", "program_lines", "operation_program", "operation_variant"):
            if key not in d:
                raise ValueError(f"line table: missing field {key!r}")
        mask = np.zeros((len(d["programs"]), len(d["lines"])), dtype=bool)
        for p, idx in enumerate(d["program_lines"]):
            mask[p, idx] = True
        return cls(list(d["lines"]), list(d["programs"]), mask, list(d["operation_program"]),
                   list(d["operation_variant"]))


def operation_factors(operations: list[str]) -> tuple[list[str], list[int], list[int]]:
    """-> (programs, program index per operation, variant per operation). An operation the schema
    does not know is its own program."""
    program_names = [PROGRAM_OF.get(op, op) for op in operations]
    programs = list(dict.fromkeys(program_names))
    variants = [int(op.startswith("damage") and op in PROGRAM_OF) for op in operations]
    return programs, [programs.index(p) for p in program_names], variants


def build_line_table(ds) -> LineTable:
    """The line classes of a dataset: distinct target lines of its training windows, in the order of
    the dataset's line table, with the programs each occurs in."""
    train = ds.split_windows("train")
    line_of = ds.arrays["row_line"][train]
    ops = ds.operation_labels(train)
    programs, op_program, op_variant = operation_factors(list(ds.operations))
    classes = np.unique(line_of)
    mask = np.zeros((len(programs), len(classes)), dtype=bool)
    col = np.searchsorted(classes, line_of)
    mask[np.asarray(op_program)[ops], col] = True
    lines = [ds.manifest["lines"][i] for i in classes]
    return LineTable(lines, programs, mask, op_program, op_variant)


def class_of_dataset_line(ds, table: LineTable) -> np.ndarray:
    """For each line of the dataset's line table, its class in `table`; -1 where the table lacks it
    (a line no training run executes). Index it with ds.arrays["row_line"][window_ids]."""
    index = {line: i for i, line in enumerate(table.lines)}
    return np.array([index.get(line, -1) for line in ds.manifest["lines"]], dtype=np.int64)
