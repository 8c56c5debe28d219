"""Asset checks. Blocking checks stop everything downstream: a failing export or a slow shipped
variant never reaches a package. Every check records the figures it judged."""

import json
from pathlib import Path

import dagster as dg

from .benchmark import read_report
from .data import dataset_folder
from .export import VARIANT_METHODS, model_dir, read_accuracy
from .resources import ArtifactStore, QualityGates


@dg.asset_check(asset="onnx_model", blocking=True,
                description="The fp32 graphs reproduce the PyTorch checkpoint on dataset windows (max |diff| of every "
                            "output <= 1e-3, greedy lines identical on >= 99.9% of windows). Blocking.")
def onnx_parity(artifacts: ArtifactStore, gates: QualityGates) -> dg.AssetCheckResult:
    from gcodefp_core.export import verify

    meta_path = model_dir(artifacts, "fp32") / "model.json"
    try:
        report = verify(meta_path, dataset=dataset_folder(artifacts), windows=gates.parity_windows)
    except Exception as exc:  # an unloadable or inconsistent graph is a failed check, with the reason
        return dg.AssetCheckResult(passed=False, metadata={"error": f"{type(exc).__name__}: {exc}",
                                                           "model": dg.MetadataValue.path(str(meta_path))})
    return dg.AssetCheckResult(passed=bool(report["passed"]), metadata={
        "windows": report["windows"], "data": report["data"],
        **{f"max_abs_diff_{k}": float(v) for k, v in report["max_abs_diff"].items()},
        **{f"greedy_identical_{k}": float(v) for k, v in report.get("greedy_identical", {}).items()},
        "bar_max_abs_diff": report["bars"]["max_abs_diff"], "bar_min_greedy_identical": report["bars"]["min_greedy_identical"],
        "failures": dg.MetadataValue.json(report["failures"])})


def build_accuracy_check(variant: str):
    @dg.asset_check(asset=f"model_{variant}", name="accuracy_vs_fp32",
                    description=f"{variant} loses at most its bar (fp16 0.1, int8 0.5 points) of operation and token "
                                "accuracy against fp32 on the test split.")
    def accuracy_check(artifacts: ArtifactStore, gates: QualityGates) -> dg.AssetCheckResult:
        drops = read_accuracy(artifacts, variant)["drop_points_vs_fp32"]
        bar = gates.max_drop(variant)
        token = max(drops["token_acc_greedy"], drops["token_acc_tf"])
        return dg.AssetCheckResult(
            passed=bool(drops["op_acc"] <= bar and token <= bar),
            metadata={"bar_points": bar, "op_acc_drop_points": drops["op_acc"], "token_acc_drop_points": token,
                      "token_acc_greedy_drop_points": drops["token_acc_greedy"],
                      "token_acc_tf_drop_points": drops["token_acc_tf"], "exact_match_drop_points": drops["exact_match"]})

    return accuracy_check


@dg.asset_check(asset="benchmark_report", blocking=True,
                description="The shipped variant answers a full prediction at batch 1 within p95 < 20 ms and "
                            "p99 < 50 ms. Blocking: a slow model is not packaged.")
def latency_sla(artifacts: ArtifactStore, gates: QualityGates) -> dg.AssetCheckResult:
    report = read_report(artifacts)
    variant = report["shipped_variant"]
    row = report["batch1"][variant]
    return dg.AssetCheckResult(
        passed=bool(row["p95_ms"] < gates.latency_p95_ms and row["p99_ms"] < gates.latency_p99_ms),
        metadata={"variant": variant, "p95_ms": row["p95_ms"], "p99_ms": row["p99_ms"], "median_ms": row["median_ms"],
                  "bar_p95_ms": gates.latency_p95_ms, "bar_p99_ms": gates.latency_p99_ms,
                  "iterations": report["benchmark"]["iterations"]})


def latest_package(context: dg.AssetCheckExecutionContext) -> Path:
    event = context.instance.get_latest_materialization_event(dg.AssetKey("deployment_package"))
    if event is None or event.asset_materialization is None:
        raise FileNotFoundError("deployment_package has no materialization")
    return Path(event.asset_materialization.metadata["path"].value)


@dg.asset_check(asset="deployment_package",
                description="A fresh onnxruntime session loads the package from disk after its checksums verify, and "
                            "predicts on the package's own sample request.")
def package_integrity(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    import numpy as np

    from gcodefp_core.package import verify_package
    from gcodefp_core.runtime import OnnxPredictor

    path = latest_package(context)
    try:
        manifest = verify_package(path)
        predictor = OnnxPredictor.load(path, intra_op_threads=1)
        window = json.loads((path / "sample_request.json").read_text())["sensor_data"]
        cont, cat = predictor.features.transform_arrays(np.asarray(window["continuous"], np.float64),
                                                        window["categorical"])
        pred = predictor.predict(cont[None], cat[None].astype(np.int64))[0]
    except Exception as exc:
        return dg.AssetCheckResult(passed=False, metadata={"package": dg.MetadataValue.path(str(path)),
                                                           "error": f"{type(exc).__name__}: {exc}"})
    ok = (isinstance(pred["gcode"], str) and bool(np.isfinite(pred["fingerprint"]).all())
          and bool(np.isfinite(pred["operation_confidence"])) and pred["operation"] in predictor.operations)
    return dg.AssetCheckResult(passed=ok, metadata={
        "package": dg.MetadataValue.path(str(path)), "version": manifest["version"], "files_verified": len(manifest["files"]),
        "variant": predictor.variant, "sample_gcode": pred["gcode"], "sample_operation": pred["operation"],
        "sample_operation_confidence": float(pred["operation_confidence"])})


@dg.asset_check(asset="deployment_package",
                description="The package's graphs fit the size budget (QualityGates.max_package_mb).")
def model_size_budget(context: dg.AssetCheckExecutionContext, gates: QualityGates) -> dg.AssetCheckResult:
    path = latest_package(context)
    sizes = {p.name: p.stat().st_size for p in sorted(path.glob("*.onnx"))}
    total_mb = sum(sizes.values()) / 2**20
    return dg.AssetCheckResult(passed=bool(sizes) and total_mb <= gates.max_package_mb, metadata={
        "total_mb": round(total_mb, 3), "budget_mb": gates.max_package_mb, "graphs": dg.MetadataValue.json(sizes)})


def all_checks() -> list:
    return [onnx_parity, latency_sla, package_integrity, model_size_budget,
            *(build_accuracy_check(v) for v in VARIANT_METHODS)]
