"""Operation templates (gcodefp_core.runtime.operation_templates, gcodefp_core.fit_templates): which
program a window's readings look like, the runs registered before they are averaged, the evidence
the program tracker adds, and the templates fitted with the tracker from a dataset."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gcodefp_core.fit_templates import fit_operation_templates, registered_mean, template_columns, vibration
from gcodefp_core.runtime.operation_templates import OFFSET_STEP, OperationTemplates
from gcodefp_core.runtime.program_tracker import PARAMS, ProgramTracker

W = 32


def smooth_walks(n_ops: int, length: int, channels: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    kernel = np.ones(9) / 9
    return [np.stack([np.convolve(np.cumsum(rng.normal(size=length)), kernel, "same") for _ in range(channels)], 1)
            for _ in range(n_ops)]


def test_a_window_of_an_operations_readings_matches_its_own_template_best():
    walks = smooth_walks(3, 200, 4)
    tpl = OperationTemplates([1, 3, 4, 6], walks, W)
    x = np.zeros((len(walks), 200, 8))
    for o, walk in enumerate(walks):
        x[o][:, [1, 3, 4, 6]] = 3.0 * walk + 7.0      # another day's gain and level
        x[o][:, 0] = 99.0                              # a channel the templates do not read
    ends = np.arange(W, 200, OFFSET_STEP)   # windows ending where a segment ends
    for o in range(len(walks)):
        windows = np.stack([x[o][e - W + 1:e + 1] for e in ends])
        scores = tpl.scores(windows)
        assert scores.shape == (len(ends), 3) and (scores.argmax(1) == o).all()
        np.testing.assert_allclose(scores[:, o], 1.0, atol=1e-4)
        absent = windows.copy()
        absent[:, :, 6] = 0.0                          # a board that is not there is flat: no evidence
        assert (tpl.scores(absent).argmax(1) == o).mean() > 0.9


def test_templates_round_trip_through_json_and_bad_dicts_name_the_field():
    tpl = OperationTemplates([0, 2], smooth_walks(2, 60, 2), W)
    again = OperationTemplates.from_dict(json.loads(json.dumps(tpl.to_dict())), n_operations=2)
    windows = np.random.default_rng(1).normal(size=(5, W, 3))
    np.testing.assert_allclose(again.scores(windows), tpl.scores(windows), atol=2e-3)   # 3 decimals kept
    for d, message in [({"columns": [0], "window": W}, "missing field 'templates'"),
                       (tpl.to_dict() | {"templates": tpl.to_dict()["templates"][:1]}, "1 templates for 2 operations"),
                       (tpl.to_dict() | {"columns": [0]}, r"expected \[offsets, 1\]"),
                       (tpl.to_dict() | {"columns": []}, "columns must be")]:
        with pytest.raises(ValueError, match=message):
            OperationTemplates.from_dict(d, n_operations=2)


def test_runs_are_registered_by_their_vibration_before_they_are_averaged():
    """The boards lag the controller's rows by a constant per run: averaged as they come, runs shifted
    by -6..+8 rows blur the template; registered, the mean is the common shape again."""
    rng = np.random.default_rng(2)
    base = np.stack([np.convolve(rng.normal(size=400), np.ones(5) / 5, "same") for _ in range(3)], 1)
    lags = [0, 8, -6, 3]
    runs = [np.roll(base, lag, axis=0) + 0.01 * k for k, lag in enumerate(lags)]   # each run at its own level
    signals = [vibration(r) for r in runs]
    median = int(np.median(lags))
    truth = np.roll(base, median, axis=0) - base.mean(0)
    inner = slice(60, 340)
    registered = registered_mean(runs, signals, 400)
    blurred = np.mean([r - r.mean(0) for r in runs], axis=0)
    corr = lambda a: np.mean([np.corrcoef(a[inner, c], truth[inner, c])[0, 1] for c in range(3)])
    assert corr(registered) > 0.999 and corr(blurred) < 0.8


def test_the_tracker_adds_template_evidence_to_each_operations_states_only_when_weighted():
    lines = [np.repeat(np.arange(0, 3), 4)[:, None], np.repeat(np.arange(3, 6), 4)[:, None]]
    tracker = ProgramTracker(["op0", "op1", "op2"], ["p0", "p1"], [0, 1, 1], lines,
                             [np.ones_like(a, dtype=np.float64) for a in lines], [np.array([0.01, 0.98, 0.01])] * 2,
                             np.full(6, -np.log(6)), PARAMS | {"op_weight": 0.3},
                             OperationTemplates([0], smooth_walks(3, 12, 1), 8))
    op, line, template = np.zeros(3), np.zeros(6), np.array([0.1, 0.2, 0.9])
    np.testing.assert_allclose(tracker.emission(op, line, template), tracker.emission(op, line))   # weight 0: off
    tracker.set_params(template_weight=2.0)
    diff = tracker.emission(op, line, template) - tracker.emission(op, line)
    np.testing.assert_allclose(diff, np.repeat(2.0 * template, 12), rtol=1e-6)
    # The window model cannot tell op1 from its damaged variant op2; the readings' shape can.
    session = tracker.start(at_program_start=True)
    for _ in range(8):
        step = session.update(op, line, template=template)
    assert tracker.operations[step.operation] == "op2" and step.operation_confidence > 0.9
    again = ProgramTracker.from_dict(json.loads(json.dumps(tracker.to_dict())))
    assert again.uses_templates and again.templates.columns == [0]


def test_templates_are_fitted_from_the_training_runs_of_a_dataset(synthetic_dataset):
    from gcodefp_core.dataset import load_dataset
    from gcodefp_core.monitor_streams import evidence_scores
    from gcodefp_core.programs import build_line_table

    ds = load_dataset(synthetic_dataset)
    table = build_line_table(ds)
    tpl = fit_operation_templates(ds, list(table.operation_program))
    names = ds.continuous_features
    assert tpl.columns == template_columns(names) and {names[c] for c in tpl.columns} >= {"spindle", "x_motor"}
    assert all(names[c] in ("spindle", "x_motor", "y_motor", "z_motor") or names[c].endswith(".RMS") for c in tpl.columns)
    train = [r for r in ds.manifest["runs"] if r["split"] == "train"]
    for o, op in enumerate(ds.operations):
        program = table.operation_program[o]
        longest = max(r["rows"] for r in train if table.operation_program[ds.operations.index(r["operation"])] == program)
        assert tpl.templates[o].shape == (longest, len(tpl.columns))
    # A training run's own windows: the templates were made from them, so its operation wins most of them.
    run = next(r for r in train if r["operation"] == "face")
    ends = run["first_row"] + np.arange(ds.window - 1, run["rows"], 7)
    scores = evidence_scores(tpl, ds, ends[:, None] + np.arange(-ds.window + 1, 1))
    assert (scores.argmax(1) == ds.operations.index("face")).mean() > 0.5


def test_the_template_weight_is_kept_only_where_it_gains_on_validation():
    """Streams of the damaged variant op2, which the window model cannot tell from op1: templates that
    point to op2 earn a weight; templates that say nothing (the same score for every operation) do
    not ship, whatever weight would tie."""
    from gcodefp_core.fit_program_tracker import choose_evidence_weight

    lines = [np.repeat(np.arange(0, 3), 4)[:, None], np.repeat(np.arange(3, 6), 4)[:, None]]
    tracker = ProgramTracker(["op0", "op1", "op2"], ["p0", "p1"], [0, 1, 1], lines,
                             [np.ones_like(a, dtype=np.float64) for a in lines], [np.array([0.01, 0.98, 0.01])] * 2,
                             np.full(6, -np.log(6)), PARAMS | {"op_weight": 0.3},
                             OperationTemplates([0], smooth_walks(3, 12, 1), 8))
    n = 12
    op_logits = np.tile([0.0, 1.0, 1.0], (n, 1))
    line_logits = np.where(np.arange(6)[None, :] == (3 + np.arange(n) // 4)[:, None], 4.0, 0.0)

    def streams(template):
        return [{"op_logits": op_logits, "line_logits": line_logits, "weights": None, "repeated": None,
                 "line_target": 3 + np.arange(n) // 4, "op_target": 2, "scored": np.arange(n) >= 2,
                 "from_start": True, "template": np.tile(template, (n, 1))}]

    weight, scored = choose_evidence_weight(tracker, streams([0.1, 0.2, 0.9]))
    assert weight > 0 and max(r[2] for r in scored) > scored[0][2]
    weight, _ = choose_evidence_weight(tracker, streams([0.5, 0.5, 0.5]))
    assert weight == 0.0 and tracker.params["template_weight"] == 0.0


def test_the_least_evidence_weight_that_does_as_well_ships():
    """A larger weight that beats a smaller one by a hair on validation is noise: the least weight within
    0.5 points of the best exact line and operation ships; nothing ships without a 0.5-point gain."""
    from gcodefp_core.fit_program_tracker import pick_evidence_weight

    scored = [(0.0, 0.890, 0.940), (0.01, 0.890, 0.969), (0.03, 0.890, 0.968), (0.1, 0.889, 0.970)]
    assert pick_evidence_weight(scored) == 0.01
    scored[3] = (0.1, 0.889, 0.990)                       # a real gain in operation: the larger weight
    assert pick_evidence_weight(scored) == 0.1
    scored[3] = (0.1, 0.870, 0.990)                       # ... unless it moves the line
    assert pick_evidence_weight(scored) == 0.01
    assert pick_evidence_weight([(0.0, 0.89, 0.97), (0.01, 0.89, 0.973)]) == 0.0
