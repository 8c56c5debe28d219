"""Quantized variants: each method gives a loadable model that stays close to fp32; --compare writes
every variant and quantization_results.json."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gcodefp_core.benchmark import FORMATS
from gcodefp_core.cli import main
from gcodefp_core.export import sample_windows
from gcodefp_core.quantize import compare_variants, quantize_model
from gcodefp_core.runtime import OnnxPredictor


@pytest.mark.parametrize("method,variant", [("fp16", "fp16"), ("int8", "int8_dynamic"), ("int8-static", "int8_static")])
def test_each_method_gives_a_loadable_model_close_to_fp32(exported, tmp_path, method, variant):
    meta = quantize_model(exported["model_json"], tmp_path / "q" / "model.onnx", method, exported["dataset"])
    assert meta["variant"] == variant
    assert json.loads((tmp_path / "q" / "model.json").read_text())["variant"] == variant
    assert set(meta["files"]) == set(exported["meta"]["files"])
    fp32_size = exported["meta"]["total_size_bytes"]
    # Tiny model: graph structure (QDQ nodes, names) weighs more than on the real one (28% there).
    assert meta["total_size_bytes"] < (0.75 if method == "fp16" else 0.45) * fp32_size
    pred, ref = OnnxPredictor.load(tmp_path / "q"), OnnxPredictor.load(exported["model_json"])
    assert pred.variant == variant
    cont, cat, _ = sample_windows(exported["meta"], exported["dataset"], n=200)
    a, b = ref.encode(cont, cat), pred.encode(cont, cat)
    assert b["op_logits"].dtype == np.float32  # float inputs/outputs stay float32, fp16 included
    assert (a["op_logits"].argmax(1) == b["op_logits"].argmax(1)).mean() >= 0.9
    cosine = (a["fingerprint"] * b["fingerprint"]).sum(1)
    assert cosine.mean() >= 0.98 and cosine.min() >= 0.9
    same = (ref.predict_arrays(cont, cat)[0] == pred.predict_arrays(cont, cat)[0]).all(1).mean()
    assert same >= (0.97 if method == "fp16" else 0.8)
    # The program tracker's evidence survives quantization: float32 line_logits of every line class.
    logits = pred.predict_lines(cont, cat)["line_logits"]
    assert pred.program_tracker is not None and logits.dtype == np.float32
    assert logits.shape == (len(cont), len(pred.lines)) and np.isfinite(logits).all()
    par = meta["parity"]
    assert par["reference"] == "fp32 ONNX" and par["op_agreement"] >= 0.9
    if variant == "int8_static":
        assert meta["quantization"]["calibration"]["windows"] >= 100
        assert "dataset" in meta["quantization"]["calibration"]["data"]


def float_copies_of_int8_weights(path) -> list[str]:
    """Float weight initializers (2-D+, >= 256 values) with an int8 twin of the same shape up to
    transposition (1-D ones would match per-channel zero points)."""
    import onnx
    from onnx import numpy_helper

    inits = [(i.name, numpy_helper.to_array(i)) for i in onnx.load(str(path)).graph.initializer]
    int8 = {tuple(sorted(a.shape)) for _, a in inits if a.dtype in (np.int8, np.uint8)}
    return [name for name, a in inits if a.dtype.kind == "f" and a.ndim >= 2 and a.size >= 256
            and tuple(sorted(a.shape)) in int8]


def test_int8_static_stores_each_weight_once(exported, tmp_path):
    """Regression: the tied token embedding's Gather kept a float table beside the output projection's
    int8 one (61% of fp32 on the real model, 53% on this one)."""
    meta = quantize_model(exported["model_json"], tmp_path / "model.onnx", "int8-static", exported["dataset"])
    for file in meta["files"].values():
        assert float_copies_of_int8_weights(tmp_path / file) == [], file
    assert meta["quantization"]["size_ratio_vs_fp32"] < 0.45


def test_bad_quantization_requests_fail_clearly(exported, tmp_path):
    with pytest.raises(ValueError, match="method"):
        quantize_model(exported["model_json"], tmp_path / "m.onnx", "int4")
    with pytest.raises(ValueError, match=">= 100 windows"):
        quantize_model(exported["model_json"], tmp_path / "m.onnx", "int8-static", calibration_windows=50)
    fp16 = quantize_model(exported["model_json"], tmp_path / "h" / "model.onnx", "fp16")
    assert fp16["variant"] == "fp16"
    with pytest.raises(ValueError, match="fp32 export"):
        quantize_model(tmp_path / "h", tmp_path / "m.onnx", "int8")


def test_compare_writes_every_variant_and_the_results(exported, tmp_path):
    res = compare_variants(exported["model_json"], tmp_path / "variants", exported["dataset"], max_windows=300,
                           latency_iterations=20)
    doc = json.loads((tmp_path / "variants" / "quantization_results.json").read_text())
    assert doc == json.loads(json.dumps(res))
    assert set(doc["variants"]) == {"fp32", "fp16", "int8_dynamic", "int8_static"}
    for variant, r in doc["variants"].items():
        assert OnnxPredictor.load(tmp_path / "variants" / variant).variant == variant
        assert r["size_bytes"] > 0 and r["latency_batch1_ms"]["median"] > 0
        assert set(r["accuracy"]) == {"windows", "op_acc", "token_acc_greedy", "token_acc_tf", "exact_match"}
        assert r["accuracy"]["windows"] == 300
        assert set(r["drop_points_vs_fp32"]) == {"op_acc", "token_acc_greedy", "token_acc_tf", "exact_match"}
        if variant != "fp32":
            assert set(r["bars"]["checks"]) >= {"op_acc", "token_acc"}
            assert ("size" in r["bars"]["checks"]) == variant.startswith("int8")
    fp32 = doc["variants"]["fp32"]
    assert fp32["size_ratio_vs_fp32"] == 1.0 and fp32["drop_points_vs_fp32"]["op_acc"] == 0.0
    assert doc["variants"]["fp16"]["size_ratio_vs_fp32"] < 0.75
    # The variants folder feeds the benchmark's --compare-all: all five formats in one run.
    out = tmp_path / "bench.json"
    rc = main(["benchmark", "--compare-all", "--variants-dir", str(tmp_path / "variants"), "--batch-sizes", "1", "4",
               "--iterations", "3", "--warmup", "1", "--output", str(out)])
    assert rc == 0
    assert list(json.loads(out.read_text())["formats"]) == list(FORMATS)


def test_quantize_cli(exported, tmp_path, capsys):
    assert main(["quantize", "--model", str(exported["model_json"]), "--output", str(tmp_path / "q" / "model.onnx"),
                 "--method", "int8"]) == 0
    assert "int8_dynamic" in capsys.readouterr().out
    assert OnnxPredictor.load(tmp_path / "q").variant == "int8_dynamic"
    assert main(["quantize", "--model", str(exported["model_json"]), "--output", str(tmp_path / "x")]) == 2
    assert "--method is required" in capsys.readouterr().err
