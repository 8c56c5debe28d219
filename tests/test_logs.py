"""Reading and validating logs: malformed files give errors that name the file, line and column."""
from __future__ import annotations

import gzip

import pandas as pd
import pytest

from gcodefp_core.logs import LogFormatError, list_log_files, read_log
from gcodefp_core.schema import feature_columns

FULL = feature_columns("full")
SIDE = feature_columns("side_channel")


def write_log(path, rows: int = 5, drop: tuple[str, ...] = (), **overrides) -> None:
    data = {
        "t_console": [f"10:00:{i:02d}.000" for i in range(rows)], "stat": [5] * rows, "line": list(range(rows)),
        "posx": [0.1 * i for i in range(rows)], "posy": [0.0] * rows, "posz": [0.0] * rows,
        "mpox": [1.0] * rows, "mpoy": [2.0] * rows, "mpoz": [3.0] * rows, "vel": [None] * rows,
        "feed": [1016] * rows, "unit": [0] * rows, "dist": [0] * rows, "plane": [None] * rows, "coor": [2] * rows,
        "momo": [1] * rows, "raw_json": ['{"sr":{"a":1,"b":2}}'] * rows, "spindle": [5.0] * rows,
        "x_motor": [0.2] * rows, "y_motor": [0.2] * rows, "z_motor": [0.2] * rows,
        "spindle2.Ax": [-1.0] * rows, "spindle2.RMS": [300.0] * rows, "spindle2.Temperature": [26.0] * rows,
        "gcode_line": list(range(rows)), "gcode_string": [f"G1 X{i}." for i in range(rows)],
    }
    data.update(overrides)
    frame = pd.DataFrame({k: v for k, v in data.items() if k not in drop})
    frame.to_csv(path, index=False)


def test_reads_valid_log_and_boards(tmp_path):
    p = tmp_path / "face_001_aligned.csv"
    write_log(p)
    run = read_log(p, FULL)
    assert run.name == "face_001_aligned" and run.operation == "face" and len(run) == 5
    assert run.boards_present == ["spindle2"]
    assert "raw_json" not in run.frame.columns and "line" not in run.frame.columns


def test_reads_gzip(tmp_path):
    p = tmp_path / "pocket_002_aligned.csv"
    write_log(p)
    gz = tmp_path / "pocket_002_aligned.csv.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    p.unlink()
    assert len(read_log(gz, SIDE)) == 5
    assert [f.name for f in list_log_files(tmp_path)] == ["pocket_002_aligned.csv.gz"]


def test_drops_rows_without_gcode_and_counts_them(tmp_path):
    p = tmp_path / "face_001_aligned.csv"
    write_log(p, gcode_string=["G1 X1.", "", "G1 X2.", None, "  "])
    run = read_log(p, FULL)
    assert len(run) == 2 and run.dropped_rows == 3
    assert list(run.frame["gcode_string"]) == ["G1 X1.", "G1 X2."]


def test_missing_required_column_names_it(tmp_path):
    p = tmp_path / "face_001_aligned.csv"
    write_log(p, drop=("x_motor",))
    with pytest.raises(LogFormatError, match=r"face_001_aligned.csv, line 1, column 'x_motor'.*missing required"):
        read_log(p, SIDE)


def test_positions_required_only_for_full(tmp_path):
    p = tmp_path / "face_001_aligned.csv"
    write_log(p, drop=("posx",))
    assert len(read_log(p, SIDE)) == 5
    with pytest.raises(LogFormatError, match="posx"):
        read_log(p, FULL)


def test_non_numeric_cell_names_file_line_and_column(tmp_path):
    p = tmp_path / "adaptive_003_aligned.csv"
    write_log(p, y_motor=[0.1, 0.2, "oops", 0.3, 0.4])
    with pytest.raises(LogFormatError) as err:
        read_log(p, SIDE)
    assert err.value.line == 4 and err.value.column == "y_motor"  # header is line 1; third data row is line 4
    assert "adaptive_003_aligned.csv, line 4, column 'y_motor'" in str(err.value) and "oops" in str(err.value)


def test_empty_file_and_header_only(tmp_path):
    empty = tmp_path / "face_001_aligned.csv"
    empty.write_text("")
    with pytest.raises(LogFormatError, match="empty file"):
        read_log(empty, FULL)
    header = tmp_path / "face_002_aligned.csv"
    write_log(header)
    header.write_text(header.read_text().splitlines()[0] + "\n")
    with pytest.raises(LogFormatError, match="no data rows"):
        read_log(header, FULL)


def test_ragged_row_is_reported(tmp_path):
    p = tmp_path / "face_001_aligned.csv"
    write_log(p)
    lines = p.read_text().splitlines()
    lines[3] += ",1,2,3"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(LogFormatError, match=r"face_001_aligned.csv: malformed CSV.*line 4"):
        read_log(p, FULL)


def test_unknown_operation_prefix(tmp_path):
    p = tmp_path / "drilling_001_aligned.csv"
    write_log(p)
    with pytest.raises(LogFormatError, match="unknown operation 'drilling'"):
        read_log(p, FULL)


def test_gap_in_channel_is_filled_forward_and_counted(tmp_path):
    p = tmp_path / "face_001_aligned.csv"
    write_log(p, spindle=[5.0, None, 7.0, 8.0, None])
    run = read_log(p, SIDE)
    assert run.filled_cells == 2
    assert list(run.frame["spindle"]) == [5.0, 5.0, 7.0, 8.0, 8.0]


def test_every_real_log_reads(real_data_dir):
    files = list_log_files(real_data_dir)
    assert len(files) == 126
    face = read_log(real_data_dir / "face150025_001_aligned.csv.gz", FULL)
    assert face.dropped_rows == 2773
    for f in files[:10]:
        run = read_log(f, SIDE)
        assert 6 <= len(run.boards_present) <= 16
