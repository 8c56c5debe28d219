"""Input drift and prediction monitoring: the rolling scores on synthetic shifts, the served metrics,
the alert rules (promtool) and, on real runs, a shifted recording session against a normal one."""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from api.monitoring import DriftMonitor
from api_fixtures import REPO
from gcodefp_core.features import FeatureSpec

COLUMNS = ["spindle", "x_motor", "frame_r2.Ax", "frame_r2.Gx", "frame_r2.Mz", "y_bed__3.Ax", "y_bed__3.Gy",
           "untrained.Ax"]


def spec() -> FeatureSpec:
    # "untrained.Ax": no training run had it, so it has the pass-through normalisation (0, 1)
    return FeatureSpec("side_channel", COLUMNS, [], mean=[1.0, 2.0, 0.0, 5.0, -3.0, 0.5, 0.0, 0.0],
                       std=[0.5, 1.0, 2.0, 1.0, 4.0, 1.0, 3.0, 1.0])


def windows(n: int, rng, shift: dict[str, float] | None = None, w: int = 16) -> np.ndarray:
    s = spec()
    x = np.asarray(s.mean) + rng.normal(0, 1, (n, w, len(COLUMNS))) * np.asarray(s.std)
    x[..., COLUMNS.index("untrained.Ax")] = 1000.0  # meaningless scale: must not move any score
    for col, sd in (shift or {}).items():
        x[..., COLUMNS.index(col)] += sd * s.std[COLUMNS.index(col)]
    return x


def test_drift_stays_flat_on_training_like_inputs_and_rises_on_an_offset():
    rng = np.random.default_rng(0)
    normal, shifted = DriftMonitor(spec(), half_life=64), DriftMonitor(spec(), half_life=64)
    for _ in range(200):
        normal.observe(windows(1, rng))
        shifted.observe(windows(1, rng, shift={"frame_r2.Gx": 3.0}))
    flat, risen = normal.scores("board"), shifted.scores("board")
    assert set(flat) == {"currents", "frame_r2", "y_bed__3"}  # the untrained board is left out
    assert max(flat.values()) < 0.2
    assert risen["frame_r2"] > 0.8 and risen["y_bed__3"] < 0.2 and risen["currents"] < 0.2
    assert shifted.scores("channel")["Gx"] > 2.5 and shifted.scores("channel")["Ax"] < 0.2


def test_drift_follows_a_shift_that_starts_later_and_batches_count_as_their_windows():
    rng = np.random.default_rng(1)
    mon = DriftMonitor(spec(), half_life=32)
    for _ in range(100):
        mon.observe(windows(1, rng))
    before = mon.scores("channel")["current"]
    mon.observe(windows(64, rng, shift={"spindle": 4.0, "x_motor": 4.0}))  # one batch of 64 windows
    after = mon.scores("channel")["current"]
    assert before < 0.3 and after > 2.5 and mon.windows == 164


def test_absent_boards_absent_readings_and_out_of_range_are_counted():
    from prometheus_client import REGISTRY

    def value(name, board):
        return REGISTRY.get_sample_value(name, {"board": board}) or 0.0

    before = [value("gcodefp_input_board_missing_total", "y_bed__3"),
              value("gcodefp_input_absent_readings_total", "frame_r2"),
              value("gcodefp_input_out_of_range_total", "currents")]
    x = windows(2, np.random.default_rng(2))
    x[:, :, [COLUMNS.index("y_bed__3.Ax"), COLUMNS.index("y_bed__3.Gy")]] = np.nan  # board absent
    x[0, :3, COLUMNS.index("frame_r2.Ax")] = np.nan                                  # 3 readings absent
    x[1, 0, COLUMNS.index("spindle")] = 1.0 + 50 * 0.5                               # 50 sd: beyond the clip
    DriftMonitor(spec()).observe(x)
    after = [value("gcodefp_input_board_missing_total", "y_bed__3"),
             value("gcodefp_input_absent_readings_total", "frame_r2"),
             value("gcodefp_input_out_of_range_total", "currents")]
    assert [a - b for a, b in zip(after, before)] == [2.0, 3.0, 1.0]


def test_sampling_looks_at_one_window_in_k():
    mon = DriftMonitor(spec(), every=4)
    rng = np.random.default_rng(3)
    for _ in range(10):
        mon.observe(windows(3, rng))
    assert mon.windows == 8  # windows 0, 4, ..., 28 of 30


def test_short_stream_chunks_wait_and_are_reduced_together_with_the_same_tallies():
    from api import monitoring
    from prometheus_client import REGISTRY

    rng = np.random.default_rng(4)
    chunks = [windows(1, rng, w=4)[0] for _ in range(monitoring.STREAM_CHUNKS + 3)] + [windows(1, rng, w=3)[0]]
    for c in chunks[::5]:
        c[:, COLUMNS.index("frame_r2.Ax")] = np.nan          # a board reading absent in some chunks
    one_by_one, batched = DriftMonitor(spec(), flush_seconds=3600), DriftMonitor(spec(), flush_seconds=3600)
    batched._next_flush = one_by_one._next_flush = float("inf")
    for c in chunks:
        one_by_one.observe(c[None])
        batched.observe_chunk(c)
    # the first STREAM_CHUNKS were reduced as one block; the rest wait for the next block or a scrape
    assert batched.windows == monitoring.STREAM_CHUNKS and len(batched._chunks) == len(chunks) - monitoring.STREAM_CHUNKS
    batched.observe_pending()
    assert batched.windows == one_by_one.windows == len(chunks) and not batched._chunks
    assert np.array_equal(batched._absent_readings, one_by_one._absent_readings)
    assert np.array_equal(batched._missing, one_by_one._missing)
    got, want = batched.scores("board"), one_by_one.scores("board")
    assert set(got) == set(want) and all(abs(got[b] - want[b]) < 0.1 for b in want)  # one step per block: close

    # a scrape publishes what is waiting (flush_all)
    mon = DriftMonitor(spec())
    mon._next_flush = float("inf")
    monitoring._MONITORS[("test", "chunks")] = mon
    try:
        monitoring.flush_all()  # what other monitors of this process hold is published first
        before = REGISTRY.get_sample_value("gcodefp_monitored_windows_total") or 0.0
        mon.observe_chunk(chunks[0])
        assert mon.windows == 0
        monitoring.flush_all()
        assert mon.windows == 1 and REGISTRY.get_sample_value("gcodefp_monitored_windows_total") == before + 1
    finally:
        monitoring._MONITORS.pop(("test", "chunks"), None)


@pytest.mark.slow
def test_served_metrics_carry_drift_and_prediction_mix(http, sample_request):
    assert http.post("/predict", json=sample_request).status_code == 200
    text = http.get("/metrics").text
    for name in ("gcodefp_input_drift_score", "gcodefp_input_channel_drift_score", "gcodefp_monitored_windows_total",
                 "gcodefp_prediction_operation_total", "gcodefp_prediction_confidence_bucket"):
        assert re.search(rf"^{name}[{{ ]", text, re.M), name
    windows_seen = float(re.search(r"^gcodefp_monitored_windows_total (\S+)", text, re.M).group(1))
    assert windows_seen >= 1


def test_alert_rules_pass_their_promtool_unit_tests():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is absent (Debian package `prometheus`)")
    out = subprocess.run([promtool, "test", "rules", str(REPO / "deploy/prometheus/alerts.test.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


@pytest.mark.real_data
def test_drift_rises_on_another_session_and_stays_low_on_a_held_out_run(real_data_dir, tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import drift

    runs = drift.main(["--data", str(real_data_dir), "--out", str(tmp_path / "drift.json")])
    normal = runs["pocket150025_013"]["max_channel"][1]
    shifted = [runs[r]["max_channel"][1] for r in ("pocket150025_002", "pocket150025_004")]
    assert normal < 1.25 < min(shifted), (normal, shifted)
