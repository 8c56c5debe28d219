"""Data: the raw sensor logs and the windowed training dataset built from them."""

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import dagster as dg

from gcodefp_core.fileio import write_atomic
from gcodefp_core.paths import resolve

from ...automation import DOWNSTREAM, RETRAIN
from ...resources import ArtifactStore, PipelineConfig

GROUP = "data"


class SensorLogsConfig(dg.Config):
    logs_dir: Optional[str] = None          # overrides GCODEFP_DATA and the config's data.source
    synthetic_runs_per_operation: Optional[int] = None


class DatasetBuildConfig(dg.Config):
    """Overrides of the JSON config's "data" section (None = keep the file's value)."""
    feature_set: Optional[str] = None       # "full" | "side_channel"
    window: Optional[int] = None
    stride: Optional[int] = None
    seed: Optional[int] = None               # split seed


def overrides(cfg: dg.Config, exclude: tuple[str, ...] = ()) -> dict:
    return {k: v for k, v in cfg.model_dump().items() if v is not None and k not in exclude}


def logs_fingerprint(files: list[Path]) -> str:
    """sha256 over the logs' names and bytes: the data version of sensor_logs."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def logs_source(config: SensorLogsConfig, pipeline_config: PipelineConfig, data) -> tuple[str, str]:
    """-> (folder or "synthetic", a note when the configured default folder is absent)."""
    explicit = config.logs_dir or pipeline_config.data_dir
    source = explicit or data.source
    if not explicit and source != "synthetic" and not resolve(source).is_dir():
        return "synthetic", f"configured folder {resolve(source)} is absent; using synthetic logs"
    if source != "synthetic" and not resolve(source).is_dir():
        raise FileNotFoundError(f"logs folder not found: {resolve(source)} (from "
                                f"{'logs_dir' if config.logs_dir else 'GCODEFP_DATA/--data'})")
    return source, ""


@dg.asset(group_name=GROUP, kinds={"python", "csv"}, automation_condition=RETRAIN,
          description="CNC sensor logs (*_aligned.csv[.gz]): a configured folder read in place (never copied), or "
                      "synthetic logs written to the artifact store when the source is 'synthetic' or the "
                      "configured default folder is absent. Re-read on the retraining cron.")
def sensor_logs(context: dg.AssetExecutionContext, config: SensorLogsConfig, pipeline_config: PipelineConfig,
                artifacts: ArtifactStore) -> dg.MaterializeResult:
    from gcodefp_core.dataset import DatasetConfig
    from gcodefp_core.logs import list_log_files

    data = DatasetConfig.from_dict(pipeline_config.load().get("data", {}))
    source, note = logs_source(config, pipeline_config, data)
    if note:
        context.log.warning(note)
    if source == "synthetic":
        from gcodefp_core.synthetic import write_synthetic_logs

        with artifacts.publish(artifacts.logs() / "synthetic") as staging:
            write_synthetic_logs(staging, runs_per_operation=config.synthetic_runs_per_operation
                                 or data.synthetic_runs_per_operation, seed=data.synthetic_seed)
        folder = artifacts.logs() / "synthetic"
    else:
        folder = resolve(source)
    files = list_log_files(folder)
    version = logs_fingerprint(files)
    artifacts.logs().mkdir(parents=True, exist_ok=True)
    write_atomic(artifacts.logs() / "SOURCE", str(folder) + "\n")  # training_dataset reads the folder here
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version[:16]),
        metadata={"path": dg.MetadataValue.path(str(folder)), "source": "synthetic" if source == "synthetic" else "folder",
                  "files": len(files), "bytes": sum(f.stat().st_size for f in files), "content_hash": version,
                  **({"note": note} if note else {})})


def current_logs(artifacts: ArtifactStore) -> Path:
    ptr = artifacts.logs() / "SOURCE"
    if not ptr.is_file():
        raise FileNotFoundError(f"{ptr}: sensor_logs has not been materialized in this artifact store")
    return Path(ptr.read_text().strip())


@dg.asset(group_name=GROUP, kinds={"numpy"}, deps=[sensor_logs], automation_condition=DOWNSTREAM,
          description="Windows over the validated logs, split by run, normalised on the train split "
                      "(gcodefp_core.dataset). Data version = the dataset's content hash.")
def training_dataset(context: dg.AssetExecutionContext, config: DatasetBuildConfig, pipeline_config: PipelineConfig,
                     artifacts: ArtifactStore) -> dg.MaterializeResult:
    from gcodefp_core.dataset import DatasetConfig, build_dataset, load_dataset

    data = pipeline_config.load().get("data", {}) | overrides(config)
    data["source"] = str(current_logs(artifacts))
    cfg = DatasetConfig.from_dict(data)
    build_dataset(cfg, artifacts.dataset())  # built beside it and swapped in whole
    ds = load_dataset(artifacts.dataset())
    m = ds.manifest
    windows = m["counts"]["windows"]
    context.log.info(f"dataset {artifacts.dataset()}: {m['counts']['runs']} runs, windows {windows}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(m["content_hash"][:16]),
        metadata={"path": dg.MetadataValue.path(str(artifacts.dataset())), "runs": m["counts"]["runs"],
                  "rows": m["counts"]["rows"], **{f"windows_{s}": n for s, n in windows.items()},
                  "features_continuous": len(ds.continuous_features), "features_categorical": len(ds.categorical_features),
                  "feature_set": m["features"]["feature_set"], "window": ds.window,
                  "vocab_size": m["tokenizer"]["vocab_size"], "max_tokens": ds.max_tokens,
                  "content_hash": m["content_hash"], "skipped_files": len(m.get("skipped_files", [])),
                  "build_seconds": m.get("build_seconds"), "config": dg.MetadataValue.json(asdict(cfg))})
