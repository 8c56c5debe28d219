"""The benchmark harness: every field of the JSON, speedups against PyTorch from the same run, the
table, the CLI, and clear errors."""
from __future__ import annotations

import json

import pytest

from gcodefp_core.benchmark import FORMATS, STAT_FIELDS, format_table, run_benchmark
from gcodefp_core.cli import main


@pytest.fixture(scope="module")
def result(exported):
    # The checkpoint recorded in model.json becomes the PyTorch baseline on its own.
    return run_benchmark(onnx=exported["model_json"], batch_sizes=(1, 3), warmup=2, iterations=5,
                         dataset=exported["dataset"], modes=("full", "encoder", "decoder"))


def test_json_has_every_field(result):
    assert list(result["formats"]) == ["pytorch", "onnx_fp32"]
    assert result["batch_sizes"] == [1, 3] and result["threads"] == 1 and result["device"] == "cpu"
    assert {"cpu_count", "onnxruntime", "torch", "loadavg_start", "loadavg_end"} <= set(result["environment"])
    for fmt, entry in result["formats"].items():
        modes = ("full", "encoder", "decoder")
        assert set(entry) == set(modes) | {"source", "memory"}
        assert entry["memory"]["peak_rss_mb"] > 0 and entry["memory"]["peak_delta_mb"] >= 0
        for mode in modes:
            for b in ("1", "3"):
                stats = entry[mode][b]
                assert set(STAT_FIELDS) | {"iterations", "speedup_vs_pytorch"} == set(stats)
                assert stats["iterations"] == 5
                assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p95_ms"] <= stats["p99_ms"] <= stats["max_ms"]
                assert stats["throughput_wps"] > 0 and stats["speedup_vs_pytorch"] > 0
    base = result["formats"]["pytorch"]["full"]["1"]
    assert base["speedup_vs_pytorch"] == 1.0
    onnx = result["formats"]["onnx_fp32"]["full"]["1"]
    assert onnx["speedup_vs_pytorch"] == pytest.approx(base["median_ms"] / onnx["median_ms"])
    s = result["summary"]
    assert s["best_format"] in result["formats"] and set(s["bars"]) == {"full_batch1_median_ms<=2", "speedup>=4",
                                                                   "throughput>=2000"}
    json.dumps(result)


def test_table_lists_every_format_and_batch(result):
    table = format_table(result)
    assert table.count("\npytorch") == 2 and table.count("\nonnx_fp32") == 2
    assert "decod ms" in table and f"best: {result['summary']['best_format']}" in table


def test_cli_writes_the_json(exported, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["benchmark", "--checkpoint", str(exported["checkpoint"]), "--batch-sizes", "2", "--iterations", "3",
               "--warmup", "1", "--output", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert list(doc["formats"]) == ["pytorch"] and doc["summary"] == {"best_format": None}
    assert "pytorch" in capsys.readouterr().out


def test_bad_requests_fail_clearly(exported):
    with pytest.raises(ValueError, match="nothing to benchmark"):
        run_benchmark()
    with pytest.raises(ValueError, match="batch-sizes"):
        run_benchmark(onnx=exported["model_json"], batch_sizes=(0,))
    with pytest.raises(ValueError, match="variants"):
        run_benchmark(variants={"int4": exported["model_json"]})
    assert "onnx_fp32" in FORMATS
