"""Release policy (gcodefp_core.release): the paired gate on the served answer, member selection,
the shipped variant and forward-only promotion. Deterministic: constructed per-window results on
the pipeline's own sample size (ExportConfig/QuantizeConfig eval_windows)."""
from __future__ import annotations

import numpy as np
import pytest

from gcodefp_core import release
from gcodefp_core.variants import QUANTIZED, VARIANTS

WINDOWS = 2000          # the pipeline's eval_windows (gcodefp_dagster/defs/onnx/assets.py)


def served(accuracy: float = 0.8, n: int = WINDOWS) -> np.ndarray:
    right = np.zeros(n, bool)
    right[np.random.default_rng(0).permutation(n)[:int(accuracy * n)]] = True
    return right


def flip(reference: np.ndarray, lost: int, gained: int) -> np.ndarray:
    """The reference's results with `lost` right windows made wrong and `gained` wrong ones made right."""
    out = reference.copy()
    out[np.flatnonzero(reference)[:lost]] = False
    out[np.flatnonzero(~reference)[:gained]] = True
    return out


def results(line: np.ndarray, op: np.ndarray) -> dict:
    return {"exact_line": line, "operation": op}


def test_the_pipeline_scores_the_windows_this_test_uses():
    from gcodefp_dagster.defs.onnx.assets import ExportConfig, QuantizeConfig

    assert ExportConfig().eval_windows == QuantizeConfig().eval_windows == WINDOWS


@pytest.mark.parametrize("variant", QUANTIZED)
def test_a_real_two_point_drop_is_blocked_and_no_drop_passes(variant):
    ref = results(served(0.8), served(0.9))
    two_points = int(0.02 * WINDOWS)
    dropped = release.judge_variant(variant, ref, results(flip(ref["exact_line"], two_points + 5, 5),
                                                                 ref["operation"]))
    assert not dropped.passed
    line = dropped.metrics["exact_line"]
    assert line.drop_points == pytest.approx(2.0) and line.drop_low_points > VARIANTS[variant].max_drop_points
    assert line.drop_low_points <= line.drop_points <= line.drop_high_points
    same = release.judge_variant(variant, ref, results(flip(ref["exact_line"], 7, 7), flip(ref["operation"], 3, 3)))
    assert same.passed and same.metrics["exact_line"].drop_points == 0.0
    identical = release.judge_variant(variant, ref, ref)
    assert identical.passed and identical.figures()["exact_line_drop_high_points"] == 0.0


def test_a_handful_of_flipped_windows_cannot_trip_the_gate():
    ref = results(served(0.8), served(0.9))
    for variant in QUANTIZED:  # 4 windows lost, none gained: 0.2 points, on every bar including fp16's 0.1
        verdict = release.judge_variant(variant, ref, results(flip(ref["exact_line"], 4, 0), flip(ref["operation"], 4, 0)))
        assert verdict.passed, verdict.figures()


def test_an_operation_drop_blocks_alone():
    ref = results(served(0.8), served(0.9))
    verdict = release.judge_variant("int8_static", ref, results(ref["exact_line"], flip(ref["operation"], 60, 0)))
    assert not verdict.passed and verdict.metrics["exact_line"].drop_points == 0.0


def test_proportion_bounds_are_clopper_pearson():
    low, high = release.proportion_bounds(5, 10, 0.99)
    assert low == pytest.approx(0.1504, abs=1e-3) and high == pytest.approx(0.8496, abs=1e-3)
    assert release.proportion_bounds(0, 10)[0] == 0.0 and release.proportion_bounds(10, 10)[1] == 1.0


def test_paired_results_must_pair():
    with pytest.raises(ValueError, match="equal, non-empty"):
        release.paired_drop(np.ones(3, bool), np.ones(4, bool))


def test_select_member_by_the_monitored_metric():
    members = [{"name": "a", "val_metrics": {"val_score": 0.5, "val_loss": 1.0}},
               {"name": "b", "val_metrics": {"val_score": 0.7, "val_loss": 2.0}}]
    assert release.select_member(members, "score")["name"] == "b"
    assert release.select_member(members, "loss")["name"] == "a"
    with pytest.raises(ValueError, match="val_op_acc"):
        release.select_member(members, "op_acc")


def test_choose_variant_ships_the_fastest_that_kept_the_answer():
    rows = {"fp32": {"p95_ms": 3.0, "within_accuracy_bar": True},
            "int8_dynamic": {"p95_ms": 1.0, "within_accuracy_bar": False},
            "int8_static": {"p95_ms": 2.0, "within_accuracy_bar": True}}
    assert release.choose_variant(rows)[0] == "int8_static"
    # Within the benchmark's noise (10%) of the fastest, the smallest ships; beyond it, the fastest.
    sized = {"fp32": {"p95_ms": 1.39, "size_mb": 22.2, "within_accuracy_bar": True},
             "int8_static": {"p95_ms": 1.49, "size_mb": 5.9, "within_accuracy_bar": True},
             "int8_dynamic": {"p95_ms": 1.40, "size_mb": 5.8, "within_accuracy_bar": False}}
    assert release.choose_variant(sized)[0] == "int8_static"
    sized["int8_static"]["p95_ms"] = 1.60
    assert release.choose_variant(sized)[0] == "fp32"
    assert release.choose_variant(rows, "int8_dynamic") == ("int8_dynamic", "requested in config")
    with pytest.raises(ValueError, match="ship_variant"):
        release.choose_variant(rows, "fp64")


def test_check_forward_refuses_an_older_package(tmp_path):
    import json

    for version, created in (("old", "2026-11-01T00:00:00+00:00"), ("new", "2026-11-02T00:00:00+00:00")):
        (tmp_path / "packages" / version).mkdir(parents=True)
        (tmp_path / "packages" / version / "manifest.json").write_text(json.dumps({"created_at": created}))
    release.check_forward(tmp_path, "old", "new")
    release.check_forward(tmp_path, "new", "old", rollback=True)
    with pytest.raises(ValueError, match="older than the served new"):
        release.check_forward(tmp_path, "new", "old")
    assert release.newest(tmp_path, ["new", "old"]) == ("new", ["old"])
