"""The Dagster asset graph, in process, on tiny synthetic data: the whole graph end to end, each
check ran and recorded its figures, forced failures of each check, and a broken export stopping
the package. A 1-epoch model's gates are not required to pass: only to have judged."""
from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from dagster_fixtures import (EXPORT_ONWARDS, PACKAGE, REPO, RUN_CONFIG, VARIANT_ASSETS, check_results,  # noqa: F401
                              make_defs, materialized, packages, run)
from gcodefp_core.variants import QUANTIZED
from gcodefp_dagster.definitions import build_definitions
from gcodefp_dagster.defs.release import package as package_defs
from gcodefp_dagster.resources import ArtifactStore, PipelineConfig, QualityGates


@pytest.fixture
def pipeline(dagster_pipeline):
    return dagster_pipeline


def test_whole_graph_materializes_and_every_check_records_its_figures(pipeline):
    root, instance, defs, result = pipeline
    assert result.success
    assert materialized(result) == {"sensor_logs", "training_dataset", "checkpoint", "ensemble_config", "onnx_model",
                                    "encoder_onnx", *VARIANT_ASSETS, "benchmark_report", "deployment_package"}
    evals = check_results(result)
    assert set(evals) == {"onnx_parity", "latency_sla", "package_integrity", "model_size_budget",
                          *(f"{a}:served_answer_vs_fp32" for a in VARIANT_ASSETS)}
    # Each gate judged and recorded what it judged; whether a 1-epoch model passes is not the point.
    assert evals["onnx_parity"].metadata["max_abs_diff_op_logits"].value >= 0
    assert {"p95_ms", "p99_ms", "bar_p95_ms", "bar_p99_ms", "variant"} <= set(evals["latency_sla"].metadata)
    for a in VARIANT_ASSETS:
        m = evals[f"{a}:served_answer_vs_fp32"].metadata
        for metric in ("exact_line", "operation"):
            assert m[f"{metric}_windows"].value == 64
            low, est, high = (m[f"{metric}_drop_{k}points"].value for k in ("low_", "", "high_"))
            assert low <= est <= high
        assert m["bar_points"].value > 0 and m["confidence"].value == 0.99
    assert evals["package_integrity"].passed  # the package itself must load and answer

    ds = instance.get_latest_materialization_event(dg.AssetKey("training_dataset")).asset_materialization
    assert ds.metadata["runs"].value == 27 and ds.metadata["windows_val"].value > 0
    assert ds.metadata["vocab_size"].value > 10 and ds.metadata["features_continuous"].value == 171
    ck = instance.get_latest_materialization_event(dg.AssetKey("checkpoint")).asset_materialization
    assert ck.partition == "42" and ck.metadata["epochs"].value == 1 and "val_op_acc" in ck.metadata
    assert Path(ck.metadata["path"].value).is_file()
    assert "| epoch |" in ck.metadata["learning_curve"].value
    bench = instance.get_latest_materialization_event(dg.AssetKey("benchmark_report")).asset_materialization
    assert "| variant |" in bench.metadata["table"].value and Path(bench.metadata["path"].value).is_file()

    pkg_meta = instance.get_latest_materialization_event(PACKAGE).asset_materialization.metadata
    path = Path(pkg_meta["path"].value)
    assert path.parent == root / "registry" / "packages" and path.name == pkg_meta["version"].value
    names = {p.name for p in path.iterdir()}
    assert {"model.json", "model_card.md", "benchmark.json", "sample_request.json", "manifest.json",
            "model.encoder_only.onnx", "model.encoder.onnx", "model.decoder.onnx"} <= names
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert not (root / "registry" / "CURRENT").exists()  # promotion is the redeploy job's business
    assert not list((root / "store").rglob(".staging-*"))  # every stage published its folder whole


def test_each_epoch_reaches_the_run_log_while_training(pipeline):
    _, instance, _, result = pipeline
    lines = [e.user_message for e in instance.all_logs(result.run_id)
             if e.dagster_event is None and "epoch 1/1" in e.user_message]
    assert lines and "val loss" in lines[0] and "ETA" in lines[0] and lines[0].startswith("seed 42")


def test_broken_export_fails_onnx_parity_and_blocks_the_package(pipeline, monkeypatch):
    """Perturb the exported encoder's weights after export: parity against PyTorch must fail, and
    nothing downstream of the blocking check (variants, benchmark, package) may materialize."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    import gcodefp_core.export as export_mod

    root, instance, defs, _ = pipeline
    real_export = export_mod.export_checkpoint

    def broken_export(checkpoint, output, **kw):
        meta = real_export(checkpoint, output, **kw)
        for graph in ("encoder",):
            path = Path(output).parent / meta["files"][graph]
            model = onnx.load(str(path))
            for init in model.graph.initializer:
                w = numpy_helper.to_array(init)
                if w.dtype == np.float32 and w.size > 100:
                    init.CopyFrom(numpy_helper.from_array(w + 0.5, init.name))
            onnx.save(model, str(path))
        return meta

    monkeypatch.setattr(export_mod, "export_checkpoint", broken_export)
    before = packages(root / "registry")
    result = run(defs, instance, selection=EXPORT_ONWARDS)
    assert not result.success
    parity = check_results(result)["onnx_parity"]
    assert not parity.passed and parity.metadata["max_abs_diff_op_logits"].value > 1e-3
    assert materialized(result) == {"onnx_model"}
    assert packages(root / "registry") == before


def test_latency_sla_failure_blocks_the_package(pipeline, tmp_path):
    root, instance, _, _ = pipeline
    defs = make_defs(root, QualityGates(parity_windows=32, latency_p95_ms=1e-6))
    before = packages(root / "registry")
    result = run(defs, instance, selection=[dg.AssetKey("benchmark_report"), PACKAGE])
    sla = check_results(result)["latency_sla"]
    assert not result.success and not sla.passed
    assert sla.metadata["p95_ms"].value > sla.metadata["bar_p95_ms"].value == 1e-6
    assert packages(root / "registry") == before


def test_non_blocking_failures_leave_the_run_green_and_still_package(pipeline):
    """Accuracy bars below any possible drop and a size budget of ~0 fail their checks; they do not block."""
    root, instance, _, _ = pipeline
    gates = QualityGates(parity_windows=32, max_drop_points={v: -101.0 for v in QUANTIZED}, max_package_mb=1e-6)
    before = packages(root / "registry")
    result = run(make_defs(root, gates), instance,
                 selection=[dg.AssetKey(k) for k in (*VARIANT_ASSETS, "benchmark_report", "deployment_package")])
    assert result.success
    evals = check_results(result)
    for a in VARIANT_ASSETS:
        e = evals[f"{a}:served_answer_vs_fp32"]
        assert not e.passed and e.metadata["bar_points"].value == -101.0
    assert not evals["model_size_budget"].passed and evals["model_size_budget"].metadata["total_mb"].value > 0
    assert evals["package_integrity"].passed
    assert len(packages(root / "registry")) == len(before) + 1
    # every variant failed its bar, so the benchmark ships fp32
    assert json.loads((root / "store" / "benchmark" / "benchmark.json").read_text())["shipped_variant"] == "fp32"


def test_package_integrity_fails_on_a_corrupted_package(pipeline):
    root, instance, _, _ = pipeline
    path = Path(instance.get_latest_materialization_event(PACKAGE).asset_materialization.metadata["path"].value)
    ok = package_defs.package_integrity(dg.build_asset_check_context(instance=instance))
    assert ok.passed and ok.metadata["files_verified"].value >= 8 and ok.metadata["sample_gcode"].value is not None
    graph = path / "model.decoder.onnx"
    graph.chmod(0o644)
    original = graph.read_bytes()
    graph.write_bytes(original[:-10] + b"0123456789")
    try:
        bad = package_defs.package_integrity(dg.build_asset_check_context(instance=instance))
    finally:
        graph.write_bytes(original)  # the session's registry stays sound for the other tests
    assert not bad.passed and "model.decoder.onnx" in bad.metadata["error"].value


def test_sensor_logs_reads_a_configured_folder_in_place(tmp_path):
    """A configured logs folder is read where it is (never copied); a missing one is a clear error."""
    from gcodefp_core.synthetic import write_synthetic_logs

    logs = tmp_path / "logs"
    write_synthetic_logs(logs, runs_per_operation=1, operations=["face"])
    defs = build_definitions(executor=dg.in_process_executor, resources={
        "pipeline_config": PipelineConfig(config_path=str(REPO / "configs" / "tiny.json"), data_dir=str(logs)),
        "artifacts": ArtifactStore(root=str(tmp_path / "store"))})
    job = defs.resolve_job_def("prepare_data")
    result = job.execute_in_process(asset_selection=[dg.AssetKey("sensor_logs")])
    meta = result.asset_materializations_for_node("sensor_logs")[0].metadata
    assert meta["path"].value == str(logs) and meta["files"].value == 1 and meta["source"].value == "folder"
    assert not (tmp_path / "store" / "logs" / "synthetic").exists()
    with pytest.raises(FileNotFoundError, match="missing-folder"):
        job.execute_in_process(asset_selection=[dg.AssetKey("sensor_logs")], run_config={
            "ops": {"sensor_logs": {"config": {"logs_dir": str(tmp_path / "missing-folder")}}}})
