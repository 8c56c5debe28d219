"""gcodefp_core.runtime.program_tracker: the online forward filter over (operation, row offset in the
program), on tiny hand-made programs whose window evidence is clear, and its fitting from a dataset."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gcodefp_core.runtime.program_tracker import PARAMS, ProgramTracker

N_LINES = 12


def tiny_tracker(**params) -> ProgramTracker:
    """Two programs over 12 line classes, each line held for 4 rows: program 0 runs lines 0..5,
    program 1 runs lines 6..11. Operations: op0 -> program 0, op1 -> program 1, op2 -> program 1
    (a damaged variant)."""
    lines = [np.repeat(np.arange(0, 6), 4)[:, None], np.repeat(np.arange(6, 12), 4)[:, None]]
    shares = [np.ones_like(a, dtype=np.float64) for a in lines]
    tempo = [np.array([0.01, 0.98, 0.01])] * 2
    return ProgramTracker(["op0", "op1", "op2"], ["p0", "p1"], [0, 1, 1], lines, shares, tempo,
                          np.full(N_LINES, -np.log(N_LINES)), PARAMS | {"line_weight": 1.0, "op_weight": 0.3} | params)


def evidence(line: int, op: int, strength: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    op_logits, line_logits = np.zeros(3), np.zeros(N_LINES)
    op_logits[op] += 1.0
    line_logits[line] += strength
    return op_logits, line_logits


def feed(session, offsets, program: int = 1, op: int = 1):
    """Stream the rows at these offsets of a program (the line at offset t is 6*program + t // 4)."""
    step = None
    for t in offsets:
        step = session.update(*evidence(6 * program + t // 4, op))
    return step


def test_attached_mid_run_it_starts_anywhere_then_locks_on():
    tracker = tiny_tracker()
    session = tracker.start()
    first = session.answer()
    assert first.operation_confidence < 0.5 and first.entropy > 3.0   # anywhere in any program
    step = feed(session, range(9, 17))
    assert (step.operation, step.line) == (1, 6 + 16 // 4)
    assert step.line_confidence > 0.8 and abs(step.offset - 16) <= 1
    assert step.entropy < first.entropy


def test_from_the_program_start_it_follows_the_clock_without_evidence():
    tracker = tiny_tracker(line_weight=0.0, op_weight=0.0)
    session = tracker.start(at_program_start=True)
    zero_op, zero_line = np.zeros(3), np.zeros(N_LINES)
    for _ in range(10):
        step = session.update(zero_op, zero_line)
    assert step.offset == 9 and step.line in (2, 8)   # offset 9 holds line 2 (p0) or 8 (p1)


def test_recovers_after_a_gap_of_lost_rows():
    session = tiny_tracker().start()
    feed(session, range(0, 6))
    step = feed(session, range(14, 22))          # rows 6..13 never arrived
    assert (step.operation, step.line) == (1, 6 + 21 // 4)


def test_pause_state_holds_the_line_and_resumes():
    session = tiny_tracker().start()
    feed(session, range(0, 10))
    before = session.answer()
    for _ in range(30):                          # the machine stands still: the same readings repeat
        step = session.update(*evidence(6 + 9 // 4, 1), repeated=True)
    assert step.paused > 0.5 and step.line == before.line
    step = feed(session, range(10, 14))
    assert step.paused < 0.5 and step.line == 6 + 13 // 4


def test_damaged_variant_evidence_adds_up_over_the_run():
    session = tiny_tracker().start()
    steps = [session.update(*evidence(6 + t // 4, 2)) for t in range(12)]
    assert steps[-1].operation == 2 and steps[-1].operation_confidence > steps[0].operation_confidence


def test_padded_window_evidence_counts_less():
    strong, weak = tiny_tracker().start(), tiny_tracker().start()
    a = strong.update(*evidence(8, 1))
    b = weak.update(*evidence(8, 1), weight=0.1)
    assert a.line == b.line == 8 and a.line_confidence > b.line_confidence


def test_a_sure_window_answers_until_the_filter_locks_on():
    from gcodefp_core.fit_program_tracker import window_lines

    # line_weight 0.3: one window moves the filter's line far less than the window's own softmax
    session = tiny_tracker(window_weight=1.0, line_weight=0.3).start()
    first = session.update(*evidence(9, 1, strength=8.0))
    assert (first.line, first.line_source) == (9, "window")      # one window: the filter is unsure
    step = feed(session, range(13, 24))
    assert step.line_source == "tracker" and step.line == 6 + 23 // 4
    # The tuning replays the same rule offline.
    line, conf = window_lines(session.model, np.array([1]), evidence(9, 1, strength=8.0)[1][None, :])
    assert line[0] == 9 and conf[0] == pytest.approx(first.line_confidence)


def test_a_session_from_the_program_start_has_its_own_window_weight_and_keeps_it():
    tracker = tiny_tracker(window_weight=1e6, window_weight_start=0.0, line_weight=0.0)
    sure_window = evidence(9, 1, strength=8.0)
    attached, started = tracker.start(), tracker.start(at_program_start=True)
    assert attached.update(*sure_window).line_source == "window"     # attached: the window answers
    assert started.update(*sure_window).line_source == "tracker"     # from the start: the filter does
    # The kind travels with the session: saved state, and a swap to a tracker of the same programs.
    for again in (type(started).from_dict(tracker, json.loads(json.dumps(started.to_dict()))),
                  tiny_tracker(window_weight=1e6).resume(started)):
        assert again.from_start and again.update(*sure_window).line_source == "tracker"
    assert not type(attached).from_dict(tracker, attached.to_dict()).from_start
    # A package from before the split had one weight for every session: it keeps answering so.
    old = tiny_tracker(window_weight=1e6).to_dict()
    del old["params"]["window_weight_start"]
    assert ProgramTracker.from_dict(old).params["window_weight_start"] == 1e6


def test_the_banded_transition_and_the_shared_row_emission_equal_their_dense_definitions():
    """advance() (shifted multiply-adds) and emission() (per distinct (lines, shares) row) against the
    plain definitions: a dense transition matrix and sum_k share_k * ratio[line_k] per state."""
    rng = np.random.default_rng(1)
    lines = [rng.integers(0, N_LINES + 1, (n, 4)) for n in (9, 14)]
    shares = [rng.dirichlet(np.full(4, 0.4), len(a)) * (rng.random((len(a), 4)) > 0.3) + 1e-9 * (np.arange(4) == 0)
              for a in lines]
    lines[1][::3] = lines[1][0]          # repeated rows, as when the training runs agree for a while
    shares[1][::3] = shares[1][0]
    tempo = [np.array([0.1, 0.8, 0.1]), np.array([0.05, 0.9, 0.04, 0.01])]
    tracker = ProgramTracker(["a", "b", "c"], ["p0", "p1"], [0, 1, 1], lines, shares, tempo,
                             np.log(rng.dirichlet(np.ones(N_LINES))), PARAMS | {"skip": 0.1, "line_weight": 0.7})
    dense = np.zeros((tracker.n_states, tracker.n_states))
    for o, p in enumerate([0, 1, 1]):
        t, size, first = tempo[p], len(lines[p]), tracker.block_start[o]
        step = 0.9 * np.pad(t, (0, len(t) - 1)) + 0.1 * np.convolve(t, t)
        for i in range(size):
            for d, prob in enumerate(step):
                dense[first + i, first + min(i + d, size - 1)] += prob
    a = rng.dirichlet(np.ones(tracker.n_states))
    # the filter runs in float32 (runtime.program_tracker.STATE): equal to its precision; advance() also
    # applies the share of moving mass that neither pauses nor jumps
    keep = (1 - PARAMS["pause_in"]) * (1 - PARAMS["teleport"] - PARAMS["switch"])
    assert tracker._moving_keep == pytest.approx(keep)
    np.testing.assert_allclose(tracker.advance(a.astype(np.float32)), keep * (a @ dense), rtol=2e-6, atol=1e-9)
    op_logits, line_logits = rng.normal(size=3), rng.normal(size=N_LINES) * 3
    idx, share = np.concatenate([lines[p] for p in (0, 1, 1)]), np.concatenate([shares[p] for p in (0, 1, 1)])
    expected = (0.3 * np.log(np.exp(op_logits) / np.exp(op_logits).sum())[tracker.state_op]
                + np.log((tracker.line_ratios(line_logits)[idx] * share).sum(axis=1) + 1e-300))
    np.testing.assert_allclose(tracker.emission(op_logits, line_logits), expected, rtol=1e-6, atol=1e-6)


def test_a_row_of_time_follows_the_transition_as_documented():
    """_move against the module's definition, written out in float64: advance (tempo), leave a
    program's last offset for any program's start (restart), enter / stay in / leave the paused twin,
    then jump anywhere within the operation (teleport) or to any operation (switch)."""
    tracker = tiny_tracker(restart=0.2, pause_in=0.05, pause_stay=0.8, teleport=0.01, switch=0.001)
    prm, n_ops, n = tracker.params, 3, tracker.n_states
    rng = np.random.default_rng(2)
    a, b = rng.dirichlet(np.ones(n)) * 0.9, rng.dirichlet(np.ones(n)) * 0.1
    dense = np.zeros((n, n))
    for o, p in enumerate([0, 1, 1]):
        size, first = len(tracker.timeline_line[p]), tracker.block_start[o]
        t = tracker.tempo[p]   # a lost row (skip) looks like two rows of progress at once
        step = (1 - prm["skip"]) * np.pad(t, (0, len(t) - 1)) + prm["skip"] * np.convolve(t, t)
        for i in range(size):
            for d, prob in enumerate(step):
                dense[first + i, first + min(i + d, size - 1)] += prob
    for advance in (True, False):
        moving = a @ dense if advance else a.copy()
        ended = a[tracker._last] * prm["restart"]
        moving[tracker._last] -= ended
        moving = moving * (1 - prm["pause_in"]) + (1 - prm["pause_stay"]) * b
        moving[tracker.block_start] += ended.sum() / n_ops
        paused = prm["pause_in"] * a + prm["pause_stay"] * b
        per_op = np.add.reduceat(moving + paused, tracker.block_start)
        keep = 1 - prm["teleport"] - prm["switch"]
        moving = keep * moving + np.repeat((prm["teleport"] * per_op + prm["switch"] / n_ops) / tracker._sizes,
                                           tracker._sizes)
        got = tracker.start()._move(a.astype(np.float32), b.astype(np.float32), advance)
        np.testing.assert_allclose(got[0], moving, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(got[1], keep * paused, rtol=1e-5, atol=1e-9)


def test_serialisation_round_trip_gives_the_same_answers():
    tracker = tiny_tracker()
    again = ProgramTracker.from_dict(json.loads(json.dumps(tracker.to_dict())))
    s1, s2 = tracker.start(), again.start()
    for t in range(12):
        a, b = s1.update(*evidence(t // 4, 0)), s2.update(*evidence(t // 4, 0))
        assert (a.operation, a.line, a.offset) == (b.operation, b.line, b.offset)
        assert a.line_confidence == pytest.approx(b.line_confidence, rel=1e-6)
    # A session survives a restart through its JSON state.
    resumed = type(s1).from_dict(tracker, json.loads(json.dumps(s1.to_dict())))
    x, y = s1.update(*evidence(3, 0)), resumed.update(*evidence(3, 0))
    assert (x.line, x.offset) == (y.line, y.offset)


@pytest.mark.parametrize("field, change, message", [
    ("timeline_line", None, "missing field 'timeline_line'"),
    ("operation_program", [0, 5, 1], "operation_program"),
    ("tempo", [[0.5, 0.1], [0.2, 0.8]], "tempo must be probabilities"),
    ("timeline_line", [[[0]], [[99]]], "not in 0..12"),
    ("params", {"no_such": 1}, "unknown params"),
])
def test_bad_tracker_dicts_name_the_field(field, change, message):
    d = tiny_tracker().to_dict()
    if change is None:
        del d[field]
    else:
        d[field] = change
        if field == "timeline_line":
            d["timeline_share"] = [[[1.0]], [[1.0]]]
    with pytest.raises(ValueError, match=message):
        ProgramTracker.from_dict(d)


def test_fitted_from_a_dataset_and_tuned_on_its_streams(synthetic_dataset):
    from gcodefp_core import fit_program_tracker as fit
    from gcodefp_core import monitor_streams as monitor
    from gcodefp_core.dataset import load_dataset
    from gcodefp_core.programs import build_line_table, row_classes

    ds = load_dataset(synthetic_dataset)
    table = build_line_table(ds)
    tracker = fit.build_program_tracker(ds, table, top_k=3)
    train = [r for r in ds.manifest["runs"] if r["split"] == "train"]
    classes = row_classes(ds, table)
    # One timeline per operation, from its own training runs: a damaged variant keeps its own pace.
    assert tracker.programs == list(ds.operations) and tracker.operation_program == list(range(len(ds.operations)))
    single = 0
    for o, op in enumerate(ds.operations):
        runs = [r for r in train if r["operation"] == op]
        assert tracker.timeline_line[o].shape == (max(r["rows"] for r in runs), 3)
        assert np.allclose(tracker.timeline_share[o].sum(1), 1.0)
        if len(runs) == 1:   # its one run's line at every offset, with share 1
            c = classes[runs[0]["first_row"]:runs[0]["first_row"] + runs[0]["rows"]]
            np.testing.assert_array_equal(tracker.timeline_line[o][:, 0], np.where(c >= 0, c, table.n_lines))
            assert (tracker.timeline_share[o][:, 0] == 1.0).all()
            single += 1
    assert single and any(op.startswith("damage") for op in ds.operations)
    shared = fit.build_program_tracker(ds, table, top_k=3, per_operation=False)   # the older packages' layout
    assert shared.programs == list(table.programs) and shared.operation_program == list(table.operation_program)
    # Oracle evidence (one-hot on the true line) streamed from a late attachment with lost rows.
    run = next(r for r in ds.manifest["runs"] if r["split"] == "test")
    offsets = monitor.make_stream(run["rows"], np.random.default_rng(0), attach=0.25, loss=0.05)
    y = classes[run["first_row"] + offsets]
    line_logits = np.where(np.arange(table.n_lines)[None, :] == y[:, None], 5.0, 0.0)
    op_logits = np.zeros((len(y), len(ds.operations)))
    op_logits[:, ds.operations.index(run["operation"])] = 1.0
    stream = {"op_logits": op_logits, "line_logits": line_logits, "weights": None, "repeated": None,
              "line_target": y, "op_target": ds.operations.index(run["operation"]),
              "scored": np.arange(len(y)) >= 10}
    params, grid = fit.tune_tracker(tracker, [stream], {"line_weight": [0.0, 1.0]}, window_weights=(0.0,))
    assert params["line_weight"] == 1.0 and len(grid) == 2
    assert grid[1][1] > grid[0][1]               # evidence beats none when attached mid-run
    # Each kind of session gets the window weight that does best on its own streams: attached, the
    # (here perfect) window; from the start, the clock the filter keeps, over a window that is wrong.
    y0 = classes[run["first_row"]:run["first_row"] + run["rows"]]
    wrong = np.where(np.arange(table.n_lines)[None, :] == (y0[:, None] + 1) % table.n_lines, 5.0, 0.0)
    start = stream | {"op_logits": np.repeat(op_logits[:1], len(y0), 0), "line_logits": wrong, "line_target": y0,
                      "scored": np.arange(len(y0)) >= 10, "from_start": True}
    params, grid = fit.tune_tracker(tracker, [stream, start], {"line_weight": [0.0]}, window_weights=(0.0, 1e6))
    assert (params["window_weight"], params["window_weight_start"]) == (1e6, 0.0) and len(grid) == 4
    # Tuned as served (every 4th row judged): scored on the rows the server answers, not every row.
    _, served = fit.tune_tracker(tracker, [stream], {"line_weight": [1.0]}, window_weights=(0.0,), every=4)
    out = fit.run_tracker(tracker, op_logits, line_logits, every=4)
    sel = stream["scored"] & out["judged"]
    assert 0 < sel.sum() <= stream["scored"].sum() / 4 + 1
    assert served[0][1] == pytest.approx(np.mean(out["line"][sel] == y[sel])) and served[0][1] > 0.5


def test_temperature_and_reliability():
    from gcodefp_core.fit_program_tracker import fit_temperature, reliability

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 2000)
    logits = rng.normal(0, 1, (2000, 4))
    logits[np.arange(2000), labels] += 1.0
    assert fit_temperature(logits * 5, labels) > fit_temperature(logits, labels)   # overconfident -> T > 1
    rel = reliability(np.array([0.9, 0.9, 0.1, 0.1]), np.array([1, 1, 0, 0]))
    assert rel["ece"] == pytest.approx(0.1) and [b["n"] for b in rel["bins"]] == [2, 2]


def test_fit_program_tracker_end_to_end_with_a_window_model(synthetic_dataset):
    """The one call training makes: temperatures on validation windows, weights on validation
    streams, and a tracker that survives model.json (an untrained tiny model: plumbing, not accuracy)."""
    import torch

    from gcodefp_core import fit_program_tracker as fit
    from gcodefp_core.dataset import load_dataset
    from gcodefp_core.model import build_model
    from gcodefp_core.programs import build_line_table
    from gcodefp_core.train import model_config_for

    torch.manual_seed(0)
    ds = load_dataset(synthetic_dataset)
    table = build_line_table(ds)
    model = build_model(model_config_for(ds, {"d_model": 16, "line_hidden": 16, "token_dim": 8,
                                              "fingerprint_dim": 8}, table))
    model.set_line_mask(table.mask)
    tracker, report = fit.fit_program_tracker([model], ds, table, max_streams=2,
                                              grid={"line_weight": [0.0, 0.1], "op_weight": [0.05]})
    assert report["streams"] == 2 and len(report["tuning"]) == 2 * 5 * 5 and report["every"] == fit.SERVED_EVERY
    assert set(report["conditions"]) == {"start", "attached"} and report["exact_match"] == max(r[1] for r in report["tuning"])
    assert tracker.params["line_weight"] in (0.0, 0.1) and tracker.params["op_temperature"] > 0
    # The operation evidence's weights are chosen last (templates, then spread); without a gain on
    # validation, a kind does not ship.
    assert [r[0] for r in report["templates_tuning"]] == list(fit.TEMPLATE_WEIGHTS)
    assert [r[0] for r in report["spread_tuning"]] == list(fit.SPREAD_WEIGHTS)
    assert (tracker.templates is not None) == (tracker.params["template_weight"] > 0)
    assert (tracker.spread is not None) == (tracker.params["spread_weight"] > 0)
    again = ProgramTracker.from_dict(json.loads(json.dumps(tracker.to_dict())))
    assert again.params == tracker.params and again.n_states == tracker.n_states


def test_tuning_takes_the_least_weights_among_near_ties():
    """Grid points within half a point of the best exact line (and of their best operation) tie; the
    least weights win, in the grid's order. A real gain still wins."""
    from gcodefp_core.fit_program_tracker import pick_tracker_params

    def point(line_weight, window_weight, exact, op):
        return ({"line_weight": line_weight, "op_weight": 0.05, "window_weight": window_weight}, exact, op, {})

    tie = [point(0.0, 0.0, 0.4130, 0.898), point(0.0, 1.0, 0.4404, 0.898), point(0.03, 0.5, 0.4407, 0.9026),
           point(0.1, 0.0, 0.4015, 0.9021)]
    assert pick_tracker_params(tie)[0] == {"line_weight": 0.0, "op_weight": 0.05, "window_weight": 1.0}
    gain = tie[:2] + [point(0.03, 0.5, 0.4600, 0.9026)]
    assert pick_tracker_params(gain)[0]["line_weight"] == 0.03
    worse_op = [point(0.0, 1.0, 0.4404, 0.880), point(0.03, 0.5, 0.4407, 0.9026)]
    assert pick_tracker_params(worse_op)[0]["line_weight"] == 0.03
