"""The deployment package: the shipped variant written as a new, immutable version into the
registry (gcodefp_core.package.build_package: temp folder + rename), with its checks. Promotion is
the redeploy job's business (redeploy.py)."""

import json
from pathlib import Path
from typing import Optional

import dagster as dg

from ...automation import DOWNSTREAM
from ...resources import ArtifactStore, QualityGates
from ..training.assets import selected_checkpoint

GROUP = "deployment"
PACKAGE = dg.AssetKey("deployment_package")


class PackageConfig(dg.Config):
    version: Optional[str] = None           # default: v<UTC time>-<hash of model.json> (-2, -3 within one second)


@dg.asset(group_name=GROUP, kinds={"onnx", "json"}, deps=["benchmark_report", "encoder_onnx"],
          automation_condition=DOWNSTREAM,
          description="A versioned, self-contained package in the registry: the shipped variant's graphs (with the "
                      "encoder-only graph), model.json, model card with metrics, benchmark, sample request and a "
                      "manifest with the SHA-256 of every file.")
def deployment_package(context: dg.AssetExecutionContext, config: PackageConfig,
                       artifacts: ArtifactStore) -> dg.MaterializeResult:
    from gcodefp_core.package import build_package, verify_package

    report = artifacts.read(artifacts.benchmark_report(), "benchmark_report")
    variant = report["shipped_variant"]
    _, member = selected_checkpoint(artifacts)
    acc = artifacts.read(artifacts.accuracy(variant), f"model_{variant}")["accuracy_points"]
    metrics = {**member["val_metrics"], **{f"test_served_{k}": v for k, v in acc.items()},
               "member": member["name"], "seed": member["seed"]}
    bench = {"variant": variant, "why": report["why"], "threads": report["benchmark"]["threads"],
             **{f"batch1_{k}": v for k, v in report["batch1"][variant].items()}, "all_variants_batch1": report["batch1"]}
    path = build_package(artifacts.model_dir(variant), artifacts.registry, version=config.version, benchmark=bench,
                         metrics=metrics)
    manifest = verify_package(path)
    context.log.info(f"package {manifest['version']} written to {path}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(manifest["version"]),
        metadata={"path": dg.MetadataValue.path(str(path)), "version": manifest["version"], "variant": variant,
                  "registry": dg.MetadataValue.path(str(artifacts.registry)), "files": len(manifest["files"]),
                  "size_bytes": sum(f["size"] for f in manifest["files"].values()), "created_at": manifest["created_at"],
                  "member": member["name"], "manifest": dg.MetadataValue.json(manifest["files"])})


def latest_package(context: dg.AssetCheckExecutionContext) -> Path:
    event = context.instance.get_latest_materialization_event(PACKAGE)
    if event is None or event.asset_materialization is None:
        raise FileNotFoundError("deployment_package has no materialization")
    return Path(event.asset_materialization.metadata["path"].value)


@dg.asset_check(asset=deployment_package,
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


@dg.asset_check(asset=deployment_package, description="The package's graphs fit the size budget (QualityGates.max_package_mb).")
def model_size_budget(context: dg.AssetCheckExecutionContext, gates: QualityGates) -> dg.AssetCheckResult:
    path = latest_package(context)
    sizes = {p.name: p.stat().st_size for p in sorted(path.glob("*.onnx"))}
    total_mb = sum(sizes.values()) / 2**20
    return dg.AssetCheckResult(passed=bool(sizes) and total_mb <= gates.max_package_mb, metadata={
        "total_mb": round(total_mb, 3), "budget_mb": gates.max_package_mb, "graphs": dg.MetadataValue.json(sizes)})
