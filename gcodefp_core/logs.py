"""Read and validate aligned sensor logs (`<operation>_<NNN>_aligned.csv[.gz]`).

A log is trusted only after validation: a malformed file raises `LogFormatError` naming the file,
the CSV line and the column, so that a user can open the file at that spot. Rows without G-code
(e.g. the 2,773-row empty tail of face150025_001) carry no label and are dropped and counted.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .schema import LINE_NUMBER_COLUMN, NODES, OPERATIONS, TARGET_COLUMN, FeatureColumns, operation_of

log = logging.getLogger(__name__)
LOG_PATTERNS = ("*.csv", "*.csv.gz")


class LogFormatError(ValueError):
    """A log that cannot be used; the message names the file, line and column."""

    def __init__(self, path: Path | str, message: str, line: int | None = None, column: str | None = None):
        self.path, self.line, self.column = Path(path), line, column
        where = str(self.path) + (f", line {line}" if line is not None else "") + (f", column {column!r}" if column else "")
        super().__init__(f"{where}: {message}")


@dataclass
class RunLog:
    """One validated run: the columns a feature set needs, rows with G-code only."""

    name: str                      # file name without the .csv[.gz] suffix
    operation: str
    path: Path
    frame: pd.DataFrame            # needed columns present in the file + gcode_string
    boards_present: list[str]      # sensor nodes that this run recorded
    dropped_rows: int = 0          # rows without G-code
    filled_cells: int = 0          # empty numeric cells filled from the previous row
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.frame)


def list_log_files(folder: Path | str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"log folder not found: {folder}")
    files = sorted({p for pat in LOG_PATTERNS for p in folder.glob(pat)}, key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(f"no *.csv or *.csv.gz logs in {folder}")
    return files


def run_name(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".csv"):
        name = name.removesuffix(suffix)
    return name


def read_log(path: Path | str, columns: FeatureColumns) -> RunLog:
    """Read one log, keeping the columns of `columns` (missing sensor boards are allowed)."""
    path = Path(path)
    name = run_name(path)
    operation = operation_of(name)
    if operation not in OPERATIONS:
        raise LogFormatError(path, f"unknown operation {operation!r} in the file name; expected one of {', '.join(OPERATIONS)}")
    # The line number travels with the label (it orders the program path); it is never a feature.
    wanted = set(columns.continuous) | set(columns.categorical) | set(columns.required) | {LINE_NUMBER_COLUMN}
    try:
        # Read every column (not usecols): with usecols pandas silently accepts rows with extra fields.
        frame = pd.read_csv(path, low_memory=False, dtype={c: str for c in (*columns.categorical, TARGET_COLUMN)})
    except pd.errors.EmptyDataError:
        raise LogFormatError(path, "empty file (no header)", line=1) from None
    except pd.errors.ParserError as exc:  # ragged rows: pandas names the line
        raise LogFormatError(path, f"malformed CSV: {exc}") from None
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise LogFormatError(path, f"cannot read: {exc}") from None

    frame = frame[[c for c in frame.columns if c in wanted]]
    missing = [c for c in columns.required if c not in frame.columns]
    if missing:
        raise LogFormatError(path, f"missing required column(s) {missing}", line=1, column=missing[0])
    if frame.empty:
        raise LogFormatError(path, "no data rows after the header", line=2)

    target = frame[TARGET_COLUMN].fillna("").str.strip()
    has_gcode = target != ""
    dropped = int((~has_gcode).sum())
    frame = frame.loc[has_gcode].copy()
    frame[TARGET_COLUMN] = target[has_gcode]
    if frame.empty:
        raise LogFormatError(path, f"no row has a G-code line ({TARGET_COLUMN} is empty everywhere)")

    filled = 0
    numeric = [c for c in columns.continuous if c in frame.columns]
    for col in numeric:
        values = frame[col]
        if values.dtype == object:  # pandas found a cell that is not a number
            as_num = pd.to_numeric(values, errors="coerce")
            bad = as_num.isna() & values.notna()
            pos = int(np.argmax(bad.to_numpy()))
            line = int(frame.index[pos]) + 2  # +1 for the header, +1 for 1-based lines
            raise LogFormatError(path, f"non-numeric value {values.iloc[pos]!r}", line=line, column=col)
        if values.isna().any():  # a gap inside a recorded channel: carry the last reading forward
            filled += int(values.isna().sum())
            frame[col] = values.ffill().bfill().fillna(0.0)
    boards = [n for n in NODES if any(c.startswith(n + ".") for c in frame.columns)]
    if dropped:
        log.info("%s: dropped %d rows without G-code", name, dropped)
    return RunLog(name, operation, path, frame.reset_index(drop=True), boards, dropped, filled)
