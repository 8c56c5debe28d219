"""The deployment package: the shipped variant written as a new, immutable version into the registry
(gcodefp_core.package.build_package: temp folder + rename). Promotion is the redeploy job's business."""

from typing import Optional

import dagster as dg

from .benchmark import read_report
from .export import model_dir, read_accuracy
from .resources import ArtifactStore, PackageRegistry
from .training import selected_checkpoint

GROUP = "deployment"


class PackageConfig(dg.Config):
    version: Optional[str] = None           # default: v<UTC time>-<hash of model.json>


@dg.asset(group_name=GROUP, kinds={"onnx", "json"}, deps=["benchmark_report", "encoder_onnx"],
          description="A versioned, self-contained package in the registry: the shipped variant's graphs (with the "
                      "encoder-only graph), model.json (feature schema, normalisation, vocabulary), model card with "
                      "metrics, benchmark, sample request and a manifest with the SHA-256 of every file.")
def deployment_package(context: dg.AssetExecutionContext, config: PackageConfig, artifacts: ArtifactStore,
                       registry: PackageRegistry) -> dg.MaterializeResult:
    from gcodefp_core.package import build_package, verify_package

    report = read_report(artifacts)
    variant = report["shipped_variant"]
    _, member = selected_checkpoint(artifacts)
    acc = read_accuracy(artifacts, variant)
    metrics = {**member["val_metrics"], **{f"test_{k}": v for k, v in acc["accuracy"].items()},
               "member": member["name"], "seed": member["seed"]}
    bench = {"variant": variant, "why": report["why"], "threads": report["benchmark"]["threads"],
             **{f"batch1_{k}": v for k, v in report["batch1"][variant].items()},
             "all_variants_batch1": report["batch1"]}
    path = build_package(model_dir(artifacts, variant), registry.path, version=config.version, benchmark=bench,
                         metrics=metrics)
    manifest = verify_package(path)
    context.log.info(f"package {manifest['version']} written to {path}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(manifest["version"]),
        metadata={"path": dg.MetadataValue.path(str(path)), "version": manifest["version"], "variant": variant,
                  "registry": dg.MetadataValue.path(str(registry.path)), "files": len(manifest["files"]),
                  "size_bytes": sum(f["size"] for f in manifest["files"].values()),
                  "member": member["name"], "manifest": dg.MetadataValue.json(manifest["files"])})
