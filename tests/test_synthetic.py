"""The synthetic log generator: schema, determinism, file round trip and physical sanity."""
from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from gcodefp_core.schema import CHANNELS, CURRENTS, NODES, REQUIRED_COLUMNS
from gcodefp_core.synthetic import OPERATIONS, generate_run, program_for, write_synthetic_logs
from gcodefp_core.synthetic_programs import plan_motion

CONTROLLER = ["t_console", "stat", "line", "posx", "posy", "posz", "mpox", "mpoy", "mpoz", "vel", "feed",
              "unit", "dist", "plane", "coor", "momo", "raw_json"]
KNOWN_COLUMNS = set(CONTROLLER) | set(CURRENTS) | {f"{c}_A" for c in CURRENTS} | {
    f"{n}.{c}" for n in NODES for c in CHANNELS} | {"gcode_line", "gcode_string"}
REAL_CHARS = set(" -.0123456789FGMRSTXYZ")


@pytest.fixture(scope="module")
def face_run():
    return generate_run("face", 0, seed=3)


def test_operations_and_programs_look_like_the_real_ones():
    assert OPERATIONS == ("adaptive", "adaptive150025", "face", "face150025", "pocket", "pocket150025",
                          "damageadaptive", "damageface", "damagepocket")
    for op in OPERATIONS:
        lines = program_for(op)
        assert 30 <= len(lines) <= 200, op
        assert all(set(line) <= REAL_CHARS and len(line) <= 28 and len(line.split()) <= 5 for line in lines), op
        assert lines[-1] == "M30" and "G20" in lines and "T1 M6" in lines
    assert any(line.startswith(("G2 ", "G3 ")) for line in program_for("adaptive"))
    assert len(set(map(tuple, (program_for(op) for op in OPERATIONS[:6])))) == 6


def test_schema_matches_real_logs(face_run):
    cols = list(face_run.columns)
    assert set(cols) <= KNOWN_COLUMNS
    assert set(REQUIRED_COLUMNS) | set(CONTROLLER) <= set(cols)
    assert cols[:17] == CONTROLLER and cols[-2:] == ["gcode_line", "gcode_string"]
    nodes = {c.split(".")[0] for c in cols if "." in c}
    assert 6 <= len(nodes) <= 12 and all(f"{n}.{ch}" in cols for n in nodes for ch in CHANNELS)
    assert (face_run["line"] == face_run["gcode_line"]).all()
    prog = program_for("face")
    assert (face_run["gcode_string"] == [prog[i - 1] for i in face_run["line"]]).all()
    assert face_run["t_console"].str.fullmatch(r"\d\d:\d\d:\d\d\.\d\d\d").all()
    assert face_run["vel"].isna().all() and face_run["plane"].isna().all()
    running = face_run["stat"] == 5
    assert running.iloc[0] and set(face_run.loc[~running, "stat"]) <= {3, 4} and (~running).sum() >= 5
    assert (face_run.loc[~running, "gcode_string"] == "M30").all()
    assert 300 <= len(face_run) <= 1500


def test_report_cadence_and_raw_json(face_run):
    import json

    t = pd.to_timedelta(face_run["t_console"]).dt.total_seconds().diff().dropna()
    assert 0.24 < t.median() < 0.27 and t.std() > 0.001
    report = json.loads(face_run["raw_json"].iloc[100])["sr"]
    row = face_run.iloc[100]
    assert report["line"] == row["line"] and report["momo"] == row["momo"] and report["posx"] == row["posx"]


def test_deterministic_per_seed():
    a, b, c = (generate_run("pocket", 1, seed=s) for s in (7, 7, 8))
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_written_files_read_back_and_are_byte_identical(tmp_path):
    paths = write_synthetic_logs(tmp_path / "a", runs_per_operation=2, seed=5, operations=("face", "damageface"))
    again = write_synthetic_logs(tmp_path / "b", runs_per_operation=2, seed=5, operations=("face", "damageface"))
    assert [p.name for p in paths] == ["face_001_aligned.csv.gz", "face_002_aligned.csv.gz",
                                       "damageface_001_aligned.csv.gz", "damageface_002_aligned.csv.gz"]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(paths, again))
    assert not list((tmp_path / "a").glob(".*"))                      # no temp files left behind
    back = pd.read_csv(paths[1])
    pd.testing.assert_frame_equal(back, generate_run("face", 1, seed=5), check_exact=False, rtol=1e-12)
    with gzip.open(paths[0], "rt") as f:
        assert f.readline().startswith("t_console,stat,line,")
    plain = write_synthetic_logs(tmp_path / "c", runs_per_operation=1, operations="face", compress=False)
    assert plain[0].name == "face_001_aligned.csv" and len(pd.read_csv(plain[0])) > 100


def test_positions_follow_the_program(face_run):
    running = face_run[face_run["stat"] == 5]
    offset = (running[["mpox", "mpoy", "mpoz"]].to_numpy() / 25.4 - running[["posx", "posy", "posz"]].to_numpy())
    assert np.ptp(offset, axis=0).max() < 1e-3                         # one work offset for the whole run
    # Rows that report a line near its end sit on the program's endpoints: x spans the face passes.
    g1 = running[running["gcode_string"].str.fullmatch(r"G1 X[-.\d]+( F[.\d]+)?")]
    assert g1["posx"].min() == pytest.approx(-0.1254, abs=0.05) and g1["posx"].max() == pytest.approx(3.2, abs=0.05)
    after_approach = running[running["line"] > 7]
    assert after_approach["posy"].min() > -0.01 and after_approach["posy"].max() < 3.1
    cutting = running[running["momo"].isin([1, 2, 3]) & (running["line"] > 12)]
    assert (cutting["posz"].abs() < 1e-3).mean() > 0.95                 # facing runs at Z0.
    plan = plan_motion(program_for("face"), np.array([45.0, 17.0, -30.0]), np.array([120.0, 5.0, 0.0]))
    arcs = ~np.isnan(plan.center[:, 0])
    radii = np.hypot(plan.start[arcs, 0] - plan.center[arcs, 0], plan.start[arcs, 1] - plan.center[arcs, 1])
    ends = np.hypot(plan.end[arcs, 0] - plan.center[arcs, 0], plan.end[arcs, 1] - plan.center[arcs, 1])
    np.testing.assert_allclose(radii, 0.083, atol=1e-3)
    np.testing.assert_allclose(ends, 0.083, atol=1e-3)


def test_x_motor_current_follows_x_motion(face_run):
    run = face_run[face_run["stat"] == 5]
    vx = run["posx"].diff().abs() / 0.256
    moving, idle = run.loc[vx > 0.2, "x_motor"], run.loc[run["posx"].diff().abs() < 1e-6, "x_motor"]
    assert len(moving) > 50 and len(idle) > 10
    assert moving.mean() - idle.mean() > 3 * idle.std() / np.sqrt(len(idle)) + 0.005


def test_damage_runs_share_the_program_but_not_the_behaviour():
    assert program_for("damagepocket") == program_for("pocket150025")
    healthy = pd.concat([generate_run("pocket150025", i, seed=1) for i in range(2)])
    damaged = pd.concat([generate_run("damagepocket", i, seed=1) for i in range(2)])
    assert set(damaged["gcode_string"]) <= set(program_for("pocket150025"))
    cut = lambda d: d[(d["momo"] == 1) & (d["posz"] < -0.01) & (d["stat"] == 5)]  # noqa: E731
    assert cut(damaged)["spindle"].mean() > cut(healthy)["spindle"].mean() + 0.1
    rms = lambda d: np.nanmean(d[[c for c in d.columns if c.endswith(".RMS")]].to_numpy())  # noqa: E731
    assert rms(cut(damaged)) > 1.1 * rms(cut(healthy))


def test_machines_have_different_signatures():
    a = generate_run("face", 0, seed=2, machine_id=0)
    b = generate_run("face", 0, seed=2, machine_id=1)
    shared = [c for c in a.columns if c in b.columns and c.endswith((".Ax", ".Mx", ".Gz", ".RMS"))]
    assert shared
    diff = np.abs(a[shared].mean() - b[shared].mean()) / (a[shared].std() + b[shared].std() + 1e-9)
    assert diff.max() > 1.0
    assert abs(a["spindle"].median() - b["spindle"].median()) > 0.01


def test_unknown_operation_is_named():
    with pytest.raises(ValueError, match="drilling"):
        generate_run("drilling", 0)
    with pytest.raises(ValueError, match="drilling"):
        program_for("drilling")
    with pytest.raises(ValueError, match="drilling"):
        write_synthetic_logs("/nonexistent-never-written", operations=("face", "drilling"))
