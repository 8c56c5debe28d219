"""Operation spread evidence (gcodefp_core.runtime.operation_spread, gcodefp_core.fit_spread): which
operation a window's readings look like from how much each channel varies over its last rows, blind
to the recording day's levels; its trip through model.json; the evidence the program tracker adds."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gcodefp_core.runtime.operation_spread import OperationSpread
from gcodefp_core.runtime.program_tracker import PARAMS, ProgramTracker

W, F = 32, 3


def noisy_windows(rng, n: int, scales) -> np.ndarray:
    """[n, W, F] windows whose channels vary by the given scales around a random level each."""
    level = rng.normal(scale=5.0, size=(n, 1, F))
    return level + rng.normal(size=(n, W, F)) * np.asarray(scales)[None, None, :]


def test_scores_are_log_probabilities_that_ignore_the_level_of_each_channel():
    rng = np.random.default_rng(0)
    spread = OperationSpread(rng.normal(size=(F, 4)), rng.normal(size=4), rows=16)
    windows = noisy_windows(rng, 6, [1.0, 0.5, 2.0])
    scores = spread.scores(windows)
    assert scores.shape == (6, 4)
    np.testing.assert_allclose(np.exp(scores).sum(1), 1.0, rtol=1e-9)
    # A day's offset on every reading, or rows before the last 16, change nothing.
    shifted = windows + np.array([3.0, -7.0, 100.0])
    shifted[:, :-16] = 0.0
    np.testing.assert_allclose(spread.scores(shifted), scores, atol=1e-9)
    with pytest.raises(ValueError, match=r"expected \[windows, rows, 3\]"):
        spread.scores(windows[..., :2])


def test_spread_round_trips_through_json_and_bad_dicts_name_the_field():
    rng = np.random.default_rng(1)
    spread = OperationSpread(rng.normal(size=(F, 2)), rng.normal(size=2), rows=8)
    again = OperationSpread.from_dict(json.loads(json.dumps(spread.to_dict())), n_operations=2, n_features=F)
    windows = noisy_windows(rng, 5, [1.0, 1.0, 1.0])
    np.testing.assert_allclose(again.scores(windows), spread.scores(windows))
    d = spread.to_dict()
    for bad, message in [({"rows": 8, "weights": d["weights"]}, "missing field 'bias'"),
                         (d | {"bias": [0.0]}, r"weights must be \[features, operations\]"),
                         (d | {"weights": [[1.0, "x"]] * F}, "'weights' and 'bias' must be numeric"),
                         (d | {"bias": [0.0, float("nan")]}, "must be finite"),
                         (d | {"rows": 1}, "rows must be at least 2")]:
        with pytest.raises(ValueError, match=message):
            OperationSpread.from_dict(bad)
    with pytest.raises(ValueError, match="2 operations in 'weights', the tracker has 3"):
        OperationSpread.from_dict(d, n_operations=3)
    with pytest.raises(ValueError, match="3 features in 'weights', the model reads 4"):
        OperationSpread.from_dict(d, n_features=4)


def tracker_with(spread: OperationSpread | None) -> ProgramTracker:
    """Three operations over two programs of 12 offsets; op2 is op1's damaged twin (same program)."""
    lines = [np.repeat(np.arange(0, 3), 4)[:, None], np.repeat(np.arange(3, 6), 4)[:, None]]
    return ProgramTracker(["op0", "op1", "op2"], ["p0", "p1"], [0, 1, 1], lines,
                          [np.ones_like(a, dtype=np.float64) for a in lines], [np.array([0.01, 0.98, 0.01])] * 2,
                          np.full(6, -np.log(6)), PARAMS | {"op_weight": 0.3}, spread=spread)


def test_the_tracker_adds_spread_evidence_only_when_weighted_and_carries_it_through_json():
    rng = np.random.default_rng(2)
    tracker = tracker_with(OperationSpread(rng.normal(size=(F, 3)), np.zeros(3), rows=16))
    op, line, evidence = np.zeros(3), np.zeros(6), np.log([0.1, 0.2, 0.7])
    assert tracker.operation_evidence(noisy_windows(rng, 2, [1, 1, 1])) == {}   # weight 0: not even computed
    np.testing.assert_allclose(tracker.emission(op, line, spread=evidence), tracker.emission(op, line))
    tracker.set_params(spread_weight=2.0)
    diff = tracker.emission(op, line, spread=evidence) - tracker.emission(op, line)
    np.testing.assert_allclose(diff, np.repeat(2.0 * evidence, 12), rtol=1e-6)
    # The window model cannot tell op1 from its damaged twin op2; the readings' spread can.
    session = tracker.start(at_program_start=True)
    for _ in range(8):
        step = session.update(np.array([0.0, 1.0, 1.0]), line, spread=evidence)
    assert tracker.operations[step.operation] == "op2" and step.operation_confidence > 0.9
    again = ProgramTracker.from_dict(json.loads(json.dumps(tracker.to_dict())))
    assert again.uses_spread and not again.uses_templates and again.spread.rows == 16
    windows = noisy_windows(rng, 3, [1, 1, 1])
    np.testing.assert_allclose(again.operation_evidence(windows)["spread"], tracker.spread.scores(windows))


def test_a_bundle_whose_spread_reads_other_features_than_the_model_is_refused(tiny_export):
    from gcodefp_core.runtime.bundle import ModelBundle

    meta = json.loads((tiny_export / "model.json").read_text())
    n = len(meta["features"]["continuous"])
    meta["program_tracker"]["spread"] = OperationSpread(np.zeros((n + 1, len(meta["operations"]))),
                                                        np.zeros(len(meta["operations"]))).to_dict()
    with pytest.raises(ValueError, match=f"program_tracker.spread reads {n + 1} features, the model {n} continuous"):
        ModelBundle.from_dict(meta)


def test_the_spread_model_is_fitted_from_the_training_runs_of_a_dataset(synthetic_dataset):
    """The synthetic operations cut at their own feeds and loads: on windows of training runs, the
    fitted model names the run's operation for most of them, and the fit is deterministic."""
    from gcodefp_core.dataset import load_dataset
    from gcodefp_core.monitor_streams import evidence_scores
    from gcodefp_core.fit_spread import fit_operation_spread

    ds = load_dataset(synthetic_dataset)
    spread = fit_operation_spread(ds)
    assert spread.weights.shape == (len(ds.continuous_features), len(ds.operations)) and spread.rows == 16
    np.testing.assert_array_equal(fit_operation_spread(ds).weights, spread.weights)
    right = []
    for run in (r for r in ds.manifest["runs"] if r["split"] == "train"):
        ends = run["first_row"] + np.arange(ds.window - 1, run["rows"], 5)
        scores = evidence_scores(spread, ds, ends[:, None] + np.arange(-ds.window + 1, 1))
        right.append(scores.argmax(1) == ds.operations.index(run["operation"]))
    assert np.concatenate(right).mean() > 0.5
