"""The program path: the tool path of each program, built from the training runs
(gcodefp_core.path_fitting), and snapping a window's last position onto it (gcodefp_core.runtime.program_path)."""
from __future__ import annotations

import numpy as np
import pytest

from gcodefp_core.dataset import load_dataset
from gcodefp_core.path_fitting import build_program_path, fit_program_path
from gcodefp_core.programs import build_line_table
from gcodefp_core.runtime.program_path import ProgramPath, arc_points, axis_words


@pytest.fixture(scope="module")
def built(synthetic_dataset):
    ds = load_dataset(synthetic_dataset)
    table = build_line_table(ds)
    return ds, table, build_program_path(ds, table)


def split_inputs(ds, table, split):
    ids = ds.split_windows(split)
    program = np.asarray(table.operation_program)[ds.operation_labels(ids)]
    truth = np.asarray(ds.target_lines(ids), dtype=object)
    return ids, program, ds.arrays["rows_continuous"][ids], truth


def test_axis_words_reads_targets_and_radius_but_not_machine_coordinates():
    assert axis_words("G2 X1.5 Y-0.25 R.1") == {"X": 1.5, "Y": -0.25, "R": 0.1}
    assert axis_words("X1.41 Y1.58") == {"X": 1.41, "Y": 1.58}
    assert axis_words("G53 G0 Z0.") == {}          # machine coordinates: not a point of the work path
    assert axis_words("M3 S12000") == {}


@pytest.mark.parametrize("clockwise, radius, centre", [(False, 1.0, (0, 0)), (True, 1.0, (1, 1)), (False, -1.0, (1, 1))])
def test_arc_points_lie_on_the_circle_and_end_at_the_target(clockwise, radius, centre):
    start, end = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, -1.0])
    pts = arc_points(start, end, radius, clockwise, n=8)
    assert pts.shape == (8, 3) and np.allclose(pts[-1], end)
    assert np.allclose(np.hypot(pts[:, 0] - centre[0], pts[:, 1] - centre[1]), 1.0)
    assert np.all(np.diff(pts[:, 2]) < 0)              # Z descends linearly: a helix
    # A radius shorter than half the chord cannot be an arc: the chord's end point only.
    assert np.allclose(arc_points(start, end, 0.1, clockwise), end[None])


def test_snapping_finds_the_line_from_the_position_alone(built):
    ds, table, path = built
    assert path is not None and path.n_segments > 100
    ids, program, last, truth = split_inputs(ds, table, "val")
    lines = np.asarray(table.lines, dtype=object)
    blank, zero = np.zeros(len(ids), np.int64), np.zeros(len(ids))   # a line head that knows nothing
    line, conf, snapped = path.snap(program, last, blank, zero, tolerance_mm=0.01)
    assert np.all(conf[snapped] == 1.0) and np.all(conf[~snapped] == 0.0)
    assert snapped.mean() > 0.6
    assert (lines[line[snapped]] == truth[snapped]).mean() > 0.95
    assert np.array_equal(line[~snapped], blank[~snapped])          # elsewhere the model's answer stands
    # Off: nothing changes. Far from the path (100 mm away): nothing is snapped.
    assert np.array_equal(path.snap(program, last, blank, zero, tolerance_mm=0.0)[0], blank)
    moved = last.copy()
    moved[:, path.position_index[2]] += 100.0 / path.std[2]
    assert not path.snap(program, moved, blank, zero, tolerance_mm=0.01)[2].any()


def test_round_trip_and_bad_input(built):
    ds, table, path = built
    ids, program, last, _ = split_inputs(ds, table, "test")
    again = ProgramPath.from_dict(path.to_dict())
    blank, zero = np.zeros(len(ids), np.int64), np.zeros(len(ids))
    assert np.array_equal(again.snap(program, last, blank, zero, 0.01)[0], path.snap(program, last, blank, zero, 0.01)[0])
    broken = path.to_dict()
    del broken["ends"]
    with pytest.raises(ValueError, match="ends"):
        ProgramPath.from_dict(broken)
    broken = path.to_dict()
    broken["classes"] = broken["classes"][:-1]
    with pytest.raises(ValueError, match="one list per program"):
        ProgramPath.from_dict(broken)


def test_tolerance_is_chosen_on_validation(built):
    ds, table, path = built
    ids, program, last, truth = split_inputs(ds, table, "val")
    ops = ds.operation_labels(ids)
    op_prob = np.eye(len(ds.operations))[ops]
    # A line head that knows nothing: snapping helps, so the fit switches it on.
    poor = {"op_prob": op_prob, "line_pred": np.zeros(len(ids), np.int64), "line_confidence": np.zeros(len(ids))}
    fitted, scores = fit_program_path(path, table, poor, list(truth), last)
    assert fitted.tolerance_mm > 0 and scores[fitted.tolerance_mm] > scores[0.0] + 0.3
    # A line head that is always right: snapping cannot help, so the fit leaves it off.
    index = {line: i for i, line in enumerate(table.lines)}
    known = np.array([t in index for t in truth])        # windows whose line a training run executed
    perfect = {"op_prob": op_prob[known], "line_pred": np.array([index[t] for t in truth[known]]),
               "line_confidence": np.ones(known.sum())}
    fitted, scores = fit_program_path(path, table, perfect, list(truth[known]), last[known])
    assert fitted.tolerance_mm == 0.0 and scores[0.0] == 1.0


def test_no_path_without_positions(synthetic_dataset, tmp_path):
    from gcodefp_core.dataset import DatasetConfig, build_dataset

    cfg = DatasetConfig(source="synthetic", feature_set="side_channel", window=32, synthetic_runs_per_operation=2)
    ds = load_dataset(build_dataset(cfg, tmp_path / "side"))
    assert build_program_path(ds, build_line_table(ds)) is None


def test_the_onnx_runtime_snaps_what_it_serves(tiny_export, synthetic_dataset):
    """A package trained by `gcodefp train` carries its path in model.json, and predict_lines applies it."""
    from gcodefp_core.runtime import OnnxPredictor

    pred = OnnxPredictor.load(tiny_export)
    assert pred.program_path is not None and pred.program_path.tolerance_mm > 0
    ds = load_dataset(synthetic_dataset)
    ids = ds.split_windows("val")[::7][:256]
    b = ds.batch(ids)
    snapped = pred.predict_lines(b["continuous"], b["categorical"])
    own = pred.predict_lines(b["continuous"], b["categorical"], snap=False)
    on = snapped["on_path"]
    assert on.mean() > 0.1 and not own["on_path"].any()   # (a wrongly predicted program has no path here)
    truth = np.asarray(ds.target_lines(ids), dtype=object)
    lines = np.asarray(pred.lines, dtype=object)
    # The tiny model trained for one short epoch barely knows the lines; on the path, geometry does.
    assert (lines[snapped["line"][on]] == truth[on]).mean() > 0.9
    assert (lines[snapped["line"][on]] == truth[on]).mean() > (lines[own["line"][on]] == truth[on]).mean()
    assert np.array_equal(snapped["line"][~on], own["line"][~on])
    items = pred.predict(b["continuous"][:8], b["categorical"][:8])
    assert [r["line_source"] for r in items] == ["path" if o else "model" for o in on[:8]]


def brute_force(path, program, positions, prefer):
    """locate() without the grid: every segment of the program, the same tie rule."""
    from gcodefp_core.runtime.program_path import MARGIN_MM, TIE_MM

    line, dist = np.full(len(program), -1), np.full(len(program), np.inf)
    for i, (p, pos) in enumerate(zip(program, positions)):
        end = path.ends[p]
        start = np.concatenate([end[:1], end[:-1]])
        seg = end - start
        length2 = (seg * seg).sum(1)
        moving = length2 > 0
        t = np.clip(((pos - start) * seg).sum(1) / np.where(moving, length2, 1.0), 0, 1)
        d = np.where(moving, np.sqrt(((pos - start - t[:, None] * seg) ** 2).sum(1)), np.inf)
        if d.min() <= MARGIN_MM:
            tied = path.classes[p][d <= d.min() + TIE_MM]
            line[i] = prefer[i] if prefer[i] in tied else tied[0]
            dist[i] = d.min()
    return line, dist


def test_the_lookup_grid_answers_like_brute_force(built):
    ds, table, path = built
    ids, program, last, _ = split_inputs(ds, table, "test")
    rng = np.random.default_rng(0)
    positions = path.positions_mm(last)
    # Also points just off the path (within and beyond the grid's reach) and far away.
    positions = np.concatenate([positions, positions + rng.normal(0, 0.2, positions.shape),
                                positions + rng.normal(0, 20, positions.shape)])
    program = np.tile(program, 3)
    prefer = rng.integers(0, table.n_lines, len(program))
    line, dist = path.locate(program, positions, prefer)
    ref_line, ref_dist = brute_force(path, program, positions, prefer)
    assert np.array_equal(line, ref_line)
    assert np.array_equal(np.isinf(dist), np.isinf(ref_dist)) and np.allclose(dist[np.isfinite(dist)], ref_dist[np.isfinite(ref_dist)])
    assert 0.3 < np.isfinite(dist).mean() < 0.9       # the test covers both found and not found
