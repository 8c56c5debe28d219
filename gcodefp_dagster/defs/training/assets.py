"""Training: one checkpoint per seed partition, each seed its own run, and the ensemble over them.

Seeds are dynamic partitions (SEEDS, defined here once). Materializing several seeds is a backfill
of independent runs, one per seed: the run queue and the `training` pool decide how many train at
once (dagster.yaml), and a run launcher (K8sRunLauncher) can place each on its own machine."""

import json
import os
from typing import Optional

import dagster as dg

from ...automation import DOWNSTREAM
from ...resources import ArtifactStore, PipelineConfig
from ..data.assets import overrides
from .progress import EpochReporter, learning_curve

GROUP = "training"
SEEDS = dg.DynamicPartitionsDefinition(name="seed")
TRAINING_POOL = "training"
DEFAULT_SEEDS = (42, 43, 44)


class TrainOverrides(dg.Config):
    """Overrides of the JSON config's "train" section (None = keep the file's value)."""
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    patience: Optional[int] = None
    samples_per_epoch: Optional[int] = None
    val_max_windows: Optional[int] = None
    max_minutes: Optional[float] = None
    num_threads: Optional[int] = None
    wandb_mode: Optional[str] = None        # "offline" | "online" | "disabled"


def train_config(base: dict, cfg: TrainOverrides) -> dict:
    out = dict(base)
    out["train"] = base.get("train", {}) | overrides(cfg, exclude=("wandb_mode",))
    if cfg.wandb_mode:
        out["wandb"] = base.get("wandb", {}) | {"mode": cfg.wandb_mode}
    return out


def seeds_from_env() -> list[str]:
    """GCODEFP_SEEDS (e.g. 42,43,44), read when the seed sensor runs, not when the code loads."""
    raw = os.environ.get("GCODEFP_SEEDS", "").replace(",", " ").split()
    try:
        seeds = [int(s) for s in raw] or list(DEFAULT_SEEDS)
    except ValueError:
        raise ValueError(f"GCODEFP_SEEDS={os.environ['GCODEFP_SEEDS']!r}: expected integers, e.g. 42,43,44") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"GCODEFP_SEEDS: duplicate seeds in {seeds}")
    return [str(s) for s in seeds]


def register_seeds(instance: dg.DagsterInstance, seeds) -> list[str]:
    """Add seed partitions the instance does not have yet; -> the ones added."""
    have = set(instance.get_dynamic_partitions(SEEDS.name))
    new = [str(s) for s in seeds if str(s) not in have]
    if new:
        instance.add_dynamic_partitions(SEEDS.name, new)
    return new


@dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Registers the seeds of GCODEFP_SEEDS (default 42,43,44) as partitions of `checkpoint`; "
                       "seeds added in the UI stay.")
def seed_partitions(context: dg.SensorEvaluationContext):
    have = set(context.instance.get_dynamic_partitions(SEEDS.name))
    new = [s for s in seeds_from_env() if s not in have]
    if not new:
        return dg.SkipReason(f"seeds {sorted(have, key=int)} registered")
    return dg.SensorResult(dynamic_partitions_requests=[SEEDS.build_add_request(new)])


@dg.asset(group_name=GROUP, kinds={"pytorch"}, deps=["training_dataset"], partitions_def=SEEDS, pool=TRAINING_POOL,
          automation_condition=DOWNSTREAM,
          description="One model per seed partition (gcodefp_core.train.train_model), one run per seed: "
                      "checkpoint_best.pt with its validation metrics and learning curve. Each epoch's line "
                      "(loss, validation metrics, time, ETA) goes to the run's log as it finishes.")
def checkpoint(context: dg.AssetExecutionContext, config: TrainOverrides, pipeline_config: PipelineConfig,
               artifacts: ArtifactStore) -> dg.MaterializeResult:
    from gcodefp_core.dataset import load_dataset
    from gcodefp_core.train import train_model

    seed = context.partition_key
    cfg = train_config(pipeline_config.load(), config)
    progress = EpochReporter(context.log, seed, cfg["train"].get("max_minutes"))
    folder = artifacts.checkpoint_dir(seed)
    with artifacts.publish(folder) as staging:  # never resumed: a new dataset means new weights
        result = train_model(cfg, load_dataset(artifacts.dataset()), staging, int(seed), on_epoch=progress)
    history = json.loads((folder / "metrics.json").read_text())["history"]
    return dg.MaterializeResult(metadata={
        "seed": int(seed), "path": dg.MetadataValue.path(str(folder / "checkpoint_best.pt")),
        "epochs": result["epochs"], "best_epoch": result["best_epoch"], "train_seconds": result["train_seconds"],
        "parameters": result["parameters"], **{k: float(v) for k, v in result.items() if k.startswith("val_")},
        "learning_curve": dg.MetadataValue.md(learning_curve(history))})


class EnsembleConfig(dg.Config):
    seeds: Optional[list[int]] = None       # members; default: every registered seed partition


def read_member(artifacts: ArtifactStore, seed: str, dataset_hash: str) -> dict:
    import torch

    path = artifacts.checkpoint_dir(seed) / "checkpoint_best.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint partition {seed}: {path} is missing; materialize it first")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt["dataset"].get("content_hash") != dataset_hash:
        raise ValueError(f"checkpoint partition {seed}: trained on dataset {ckpt['dataset'].get('content_hash', '?')[:16]}, "
                         f"not the current training_dataset {dataset_hash[:16]}; rematerialize it")
    return {"name": f"seed{seed}", "seed": int(seed), "checkpoint": str(path),
            "val_metrics": {k: float(v) for k, v in ckpt["metrics"].items()}}


def members_table(members: list[dict], selected: str) -> str:
    keys = list(members[0]["val_metrics"])
    rows = ["| member | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for m in members:
        mark = " (shipped)" if m["name"] == selected else ""
        rows.append(f"| {m['name']}{mark} | " + " | ".join(f"{m['val_metrics'][k]:.4f}" for k in keys) + " |")
    return "\n".join(rows)


@dg.asset(group_name=GROUP, kinds={"json"}, deps=["checkpoint"], automation_condition=DOWNSTREAM,
          description="The ensemble of the seeds' checkpoints (ensemble_config.json, gcodefp train's format) and the "
                      "member to ship (gcodefp_core.release.select_member: best on the monitored validation metric).")
def ensemble_config(context: dg.AssetExecutionContext, config: EnsembleConfig, pipeline_config: PipelineConfig,
                    artifacts: ArtifactStore) -> dg.MaterializeResult:
    from gcodefp_core.dataset import load_dataset
    from gcodefp_core.fileio import write_json
    from gcodefp_core.release import select_member, selection_metric
    from gcodefp_core.config import TrainConfig

    seeds = [str(s) for s in config.seeds] if config.seeds else context.instance.get_dynamic_partitions(SEEDS.name)
    if not seeds:
        raise ValueError("no seed partitions: add some (UI, GCODEFP_SEEDS or `gcodefp pipeline --seeds`)")
    ds_hash = load_dataset(artifacts.dataset()).manifest["content_hash"]
    members = [read_member(artifacts, s, ds_hash) for s in sorted(seeds, key=int)]
    monitor = TrainConfig.from_dict(pipeline_config.load().get("train", {})).monitor
    best, metric = select_member(members, monitor), selection_metric(monitor)
    out = artifacts.ensemble_config()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"members": members, "selected": best["name"], "selection_metric": metric,
                     "dataset": str(artifacts.dataset()), "dataset_content_hash": ds_hash})
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(out)), "members": len(members), "selected": best["name"],
        "selected_checkpoint": dg.MetadataValue.path(best["checkpoint"]), "selection_metric": metric,
        f"selected_{metric}": best["val_metrics"][metric], "metrics": dg.MetadataValue.md(members_table(members, best["name"]))})


def selected_checkpoint(artifacts: ArtifactStore):
    """-> (the shipped member's checkpoint path, its ensemble entry), from ensemble_config.json."""
    from pathlib import Path

    doc = artifacts.read(artifacts.ensemble_config(), "ensemble_config")
    member = next(m for m in doc["members"] if m["name"] == doc["selected"])
    return Path(member["checkpoint"]), member
