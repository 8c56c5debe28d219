"""Streaming mode (gcodefp_core.runtime.clock, fitted by gcodefp_core.clock_fitting): the program clock, the per-machine tracker, replaying runs,
choosing the clock's weight on validation, and that training, evaluation, export and the runtime
carry the clock through."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gcodefp_core import evaluate
from gcodefp_core.checkpoints import load_checkpoint
from gcodefp_core.clock_fitting import build_program_clock, fit_program_clock, replay
from gcodefp_core.dataset import load_dataset
from gcodefp_core.programs import build_line_table, row_classes
from gcodefp_core.runtime import OnnxPredictor
from gcodefp_core.runtime.clock import ProgramClock, StreamTracker


def hand_clock(weight: float = 1.0) -> ProgramClock:
    """Two programs; program 0 covers offsets 0-3, program 1 offsets 0-1 (offset 1: no known line)."""
    return ProgramClock(["p0", "p1"], [np.array([5, 5, 6, 7]), np.array([8, -1])],
                        [np.array([1.0, 0.9, 0.6, 0.5]), np.array([1.0, 0.0])], weight)


def logits(*p: float) -> np.ndarray:
    return np.log(np.asarray(p))


# ---- the clock -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ds(synthetic_dataset):
    return load_dataset(synthetic_dataset)


def test_clock_holds_the_training_runs_lines_at_each_offset(ds):
    table = build_line_table(ds)
    clock = build_program_clock(ds, table)
    classes = row_classes(ds, table)
    runs = [r for r in ds.manifest["runs"] if r["split"] == "train"]
    assert clock.programs == table.programs
    for p in range(len(table.programs)):
        mine = [r for r in runs if table.operation_program[ds.operations.index(r["operation"])] == p]
        assert len(clock.line[p]) == max(r["rows"] for r in mine)
        # from the first full window on (earlier rows' lines need not be line classes)
        for offset in (ds.manifest["window"] - 1, len(clock.line[p]) // 2, len(clock.line[p]) - 1):
            seen = [classes[r["first_row"] + offset] for r in mine if offset < r["rows"]]
            line, share = clock.lookup(p, offset)
            # the most common line among the runs that reach this offset, and its share of them
            assert line >= 0 and seen.count(line) == max(seen.count(c) for c in seen if c >= 0)
            assert share == pytest.approx(seen.count(line) / len(seen))
    assert clock.lookup(0, len(clock.line[0])) is None and clock.lookup(len(table.programs), 0) is None


def test_clock_round_trips_through_json_and_rejects_broken_fields():
    clock = hand_clock(2.0)
    back = ProgramClock.from_dict(json.loads(json.dumps(clock.to_dict())))
    assert back.weight == 2.0 and back.programs == clock.programs
    assert all(np.array_equal(a, b) for a, b in zip(back.line, clock.line))
    assert back.lookup(0, 2) == (6, 0.6) and back.lookup(1, 1) is None
    broken = clock.to_dict()
    del broken["weight"]
    with pytest.raises(ValueError, match="weight"):
        ProgramClock.from_dict(broken)
    broken = clock.to_dict() | {"share": [[1.0], [1.0, 0.0]]}
    with pytest.raises(ValueError, match="'p0'"):
        ProgramClock.from_dict(broken)


# ---- the tracker -------------------------------------------------------------------------------------
def test_operation_evidence_adds_up_over_the_windows_of_a_run():
    # operations 0, 1 run program 0; operation 2 runs program 1
    tracker = StreamTracker(ProgramClock.empty(), np.array([0, 0, 1]))
    first = tracker.update(10, logits(0.9, 0.05, 0.05), 3, 0.8)
    assert first.operation == 0 and first.windows == 1
    # one window that alone says "operation 2" does not flip a run that said "operation 0" strongly
    step = tracker.update(11, logits(0.3, 0.1, 0.6), 4, 0.7)
    assert step.operation == 0 and step.windows == 2
    # the confidence is the renormalised geometric mean of the windows' probabilities
    mean = (logits(0.9, 0.05, 0.05) + logits(0.3, 0.1, 0.6)) / 2
    assert step.operation_confidence == pytest.approx(np.exp(mean[0]) / np.exp(mean).sum())
    # ... but a steady run of them does
    for offset in range(12, 20):
        step = tracker.update(offset, logits(0.3, 0.1, 0.6), 4, 0.7)
    assert step.operation == 2
    tracker.reset()
    assert tracker.update(0, logits(0.2, 0.7, 0.1), 1, 0.5).operation == 1


def test_the_clock_answers_when_it_is_surer_than_the_window():
    tracker = StreamTracker(hand_clock(weight=1.0), np.array([0, 1]))
    ops = logits(0.9, 0.1)                                   # program 0
    assert tracker.update(0, ops, 3, 0.5).line_source == "clock"          # 1.0 * 1.0 >= 0.5
    step = tracker.update(0, ops, 3, 0.5)
    assert (step.line, step.line_confidence) == (5, 1.0)
    step = tracker.update(3, ops, 3, 0.7)                                 # share 0.5 < 0.7
    assert (step.line, step.line_source, step.line_confidence) == (3, "window", 0.7)
    assert tracker.update(4, ops, 3, 0.1).line_source == "window"         # past the program's end
    strong = StreamTracker(hand_clock(weight=2.0), np.array([0, 1]))
    assert strong.update(3, ops, 3, 0.7).line_source == "clock"           # 2 * 0.5 >= 0.7
    never = StreamTracker(hand_clock(weight=0.0), np.array([0, 1]))
    assert never.update(0, ops, 3, 0.01).line_source == "window"


def test_a_window_line_from_another_program_never_beats_the_clock():
    tracker = StreamTracker(hand_clock(weight=0.0), np.array([0, 1]))
    for offset in range(3):
        tracker.update(offset, logits(0.95, 0.05), 3, 0.9)              # the run is program 0
    # this window alone says program 1: its line (from program 1) cannot be the answer
    step = tracker.update(3, logits(0.4, 0.6), 9, 0.99)
    assert step.operation == 0 and (step.line, step.line_source) == (7, "clock")


# ---- replay, weight choice and the pipeline ----------------------------------------------------------
@pytest.fixture(scope="module")
def model_and_pred(exported, ds):
    model, bundle, ckpt = load_checkpoint(exported["checkpoint"])
    ids = ds.split_windows("test")
    return model, bundle, ckpt, ids, evaluate.predict([model], bundle, ds, ids, greedy=False)


def test_replay_follows_each_run_in_row_order_whatever_the_window_order(model_and_pred, ds):
    model, bundle, _, ids, pred = model_and_pred
    op = np.log(pred["op_prob"])
    clock, table = bundle.program_clock, bundle.line_table
    out = replay(clock, table.operation_program, ds, ids, op, pred["line_pred"], pred["line_confidence"])
    order = np.random.default_rng(0).permutation(len(ids))
    shuffled = replay(clock, table.operation_program, ds, ids[order], op[order], pred["line_pred"][order],
                      pred["line_confidence"][order])
    for key in out:
        assert np.array_equal(shuffled[key], out[key][order])
    # one run by hand
    run = ds.arrays["row_run"][ids[0]]
    first = ds.manifest["runs"][run]["first_row"]
    tracker = StreamTracker(clock, np.asarray(table.operation_program))
    for i in np.flatnonzero(ds.arrays["row_run"][ids] == run):
        step = tracker.update(int(ids[i]) - first, op[i], int(pred["line_pred"][i]), float(pred["line_confidence"][i]))
        assert (step.operation, step.line) == (out["operation"][i], out["line"][i])


def test_the_weight_is_the_best_on_validation(model_and_pred, ds):
    model, bundle, ckpt = model_and_pred[:3]
    val_ids = ds.split_windows("val")
    limit = ckpt["config"]["train"]["val_max_windows"]  # training validates on an even subsample
    if len(val_ids) > limit:
        val_ids = val_ids[np.linspace(0, len(val_ids) - 1, limit).astype(np.int64)]
    pred = evaluate.predict([model], bundle, ds, val_ids, greedy=False)
    clock, scores = fit_program_clock(ds, bundle.line_table, pred, val_ids)
    assert scores[clock.weight] == max(scores.values()) and len(scores) > 3
    # what training stored is what this choice gives
    assert bundle.program_clock.weight == clock.weight


def test_training_evaluation_export_and_runtime_carry_the_clock(model_and_pred, exported, ds):
    model, bundle, ckpt, ids, _ = model_and_pred
    assert {"val_clock_op_acc", "val_clock_exact_match", "val_clock_weight"} <= set(ckpt["metrics"])
    # A model without a program tracker (older checkpoints) is reported through its clock.
    report = evaluate.evaluate_models([model], bundle.replace(program_tracker=None), ds, "test", max_reference=500)
    stream = report["stream"]
    assert stream["clock_weight"] == bundle.program_clock.weight
    assert stream["overall"]["windows"] == len(ids) == sum(m["windows"] for m in stream["per_operation"].values())
    assert 0 <= stream["overall"]["exact_match"] <= 1 and 0 <= stream["overall"]["clock_answers"] <= 1
    assert "clock weight" in evaluate.format_table(report)
    # With its tracker, the report is what /stream serves: judged rows of each test run, from the start
    # and attached late.
    report = evaluate.evaluate_models([model], bundle, ds, "test", max_reference=500)
    stream = report["stream"]
    assert stream["mode"] == "tracker" and set(stream["conditions"]) == {"start", "attached_loss5"}
    runs = [r for r in ds.manifest["runs"] if r["split"] == "test"]
    start = stream["conditions"]["start"]
    # from the start: judged rows from the first full window on, every 4th counted back from each run's last row
    assert start["overall"]["windows"] == sum(len(range(r["rows"] - 1, ds.window - 2, -4)) for r in runs)
    assert set(start["per_operation"]) == {r["operation"] for r in runs}
    assert stream["overall"] == start["overall"]
    assert 0 <= stream["conditions"]["attached_loss5"]["overall"]["exact_match"] <= 1
    assert "the program tracker, as /stream serves it" in evaluate.format_table(report)
    # The same report says what the program path did (this model reads positions: it has one).
    path = report["program_path"]
    assert path["tolerance_mm"] == bundle.program_path.tolerance_mm and 0 <= path["changed"] <= 1
    assert report["overall"]["exact_match"] >= path["exact_match_line_head_only"] - 0.05
    assert "program path: tolerance" in evaluate.format_table(report)
    meta = exported["meta"]
    assert meta["program_path"] == ckpt["program_path"]
    assert meta["program_clock"] == ckpt["program_clock"]
    predictor = OnnxPredictor.load(exported["model_json"])
    assert predictor.program_clock.weight == bundle.program_clock.weight
    assert isinstance(predictor.stream_tracker(), StreamTracker)


def test_a_model_without_a_predict_graph_cannot_stream(exported, tmp_path):
    meta = json.loads(exported["model_json"].read_text())
    meta["files"] = {k: v for k, v in meta["files"].items() if k != "predict"}
    folder = exported["model_json"].parent
    for f in meta["files"].values():
        (tmp_path / f).symlink_to(folder / f)
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="line head"):
        OnnxPredictor.load(tmp_path).stream_tracker()
