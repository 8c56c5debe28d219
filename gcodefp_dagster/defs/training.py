"""Training assets: one checkpoint per seed (a static partition each) and the ensemble over them.

A run over several seed partitions (a partition range, or a single-run backfill) trains them in one
step; `parallel_seeds` > 1 trains that many seeds at once in worker processes."""

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import dagster as dg

from .data import dataset_folder, overrides, training_dataset
from .resources import ArtifactStore, PipelineConfig

GROUP = "training"


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
    parallel_seeds: int = 1                 # seeds trained at once in worker processes
    wandb_mode: Optional[str] = None        # "offline" | "online" | "disabled"


def checkpoint_dir(artifacts: ArtifactStore, seed: int | str) -> Path:
    return artifacts.path("checkpoints", f"seed{seed}")


def train_config(base: dict, cfg: TrainOverrides) -> dict:
    out = dict(base)
    out["train"] = base.get("train", {}) | overrides(cfg, exclude=("parallel_seeds", "wandb_mode"))
    if cfg.wandb_mode:
        out["wandb"] = base.get("wandb", {}) | {"mode": cfg.wandb_mode}
    return out


def _train_seed(config: dict, dataset_path: str, run_dir: str, seed: int) -> dict:
    """One seed, fresh (never resumed: a new dataset means new weights). Module level: runs in workers."""
    from gcodefp_core.dataset import load_dataset
    from gcodefp_core.train import train_model

    return train_model(config, load_dataset(dataset_path), run_dir, seed)


def seed_metadata(result: dict) -> dict:
    return {"seed": result["seed"], "path": dg.MetadataValue.path(str(Path(result["run_dir"]) / "checkpoint_best.pt")),
            "epochs": result["epochs"], "best_epoch": result["best_epoch"], "train_seconds": result["train_seconds"],
            "parameters": result["parameters"],
            **{k: float(v) for k, v in result.items() if k.startswith("val_")}}


def build_training_assets(seeds: dg.StaticPartitionsDefinition) -> list:
    @dg.asset(group_name=GROUP, kinds={"pytorch"}, deps=[training_dataset], partitions_def=seeds,
              backfill_policy=dg.BackfillPolicy.single_run(),
              description="One model per seed partition (gcodefp_core.train.train_model): checkpoint_best.pt with its "
                          "validation metrics. A run over several partitions trains them in one step.")
    def checkpoint(context: dg.AssetExecutionContext, config: TrainOverrides, pipeline_config: PipelineConfig,
                   artifacts: ArtifactStore) -> dg.MaterializeResult:
        cfg = train_config(pipeline_config.load(), config)
        data = str(dataset_folder(artifacts))
        keys = list(context.partition_keys)
        jobs = [(cfg, data, str(checkpoint_dir(artifacts, k)), int(k)) for k in keys]
        context.log.info(f"training seeds {keys} ({min(config.parallel_seeds, len(keys))} at a time)")
        if config.parallel_seeds > 1 and len(keys) > 1:
            with ProcessPoolExecutor(min(config.parallel_seeds, len(keys)),
                                     mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(pool.map(_train_seed, *zip(*jobs)))
        else:
            results = [_train_seed(*job) for job in jobs]
        for key, result in zip(keys, results):
            context.log.info(f"seed {key}: best epoch {result['best_epoch']}/{result['epochs']}, "
                             f"val score {result.get('val_score', float('nan')):.4f}")
            context.add_asset_metadata(seed_metadata(result), partition_key=key)
        return dg.MaterializeResult()

    @dg.asset(group_name=GROUP, kinds={"json"}, deps=[checkpoint],
              description="The ensemble of every seed's checkpoint (ensemble_config.json, gcodefp train's format) and "
                          "the member to ship: the best on the training config's monitored validation metric.")
    def ensemble_config(context: dg.AssetExecutionContext, pipeline_config: PipelineConfig,
                        artifacts: ArtifactStore) -> dg.MaterializeResult:
        import torch

        from gcodefp_core.config import TrainConfig
        from gcodefp_core.dataset import load_dataset

        ds_hash = load_dataset(dataset_folder(artifacts)).manifest["content_hash"]
        members = []
        for key in seeds.get_partition_keys():
            path = checkpoint_dir(artifacts, key) / "checkpoint_best.pt"
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint partition {key}: {path} is missing; materialize every seed "
                                        "partition of `checkpoint` first")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if ckpt["dataset"].get("content_hash") != ds_hash:
                raise ValueError(f"checkpoint partition {key}: trained on dataset {ckpt['dataset'].get('content_hash', '?')[:16]}, "
                                 f"not the current training_dataset {ds_hash[:16]}; rematerialize it")
            members.append({"name": f"seed{key}", "seed": int(key), "checkpoint": str(path),
                            "val_metrics": {k: float(v) for k, v in ckpt["metrics"].items()}})
        monitor = TrainConfig.from_dict(pipeline_config.load().get("train", {})).monitor
        metric = "val_loss" if monitor == "loss" else f"val_{monitor}"
        best = (min if monitor == "loss" else max)(members, key=lambda m: m["val_metrics"][metric])
        doc = {"members": members, "selected": best["name"], "selection_metric": metric,
               "dataset": str(dataset_folder(artifacts)), "dataset_content_hash": ds_hash}
        out = artifacts.path("ensemble", "ensemble_config.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(out)
        table = "| member | " + " | ".join(m for m in best["val_metrics"]) + " |\n|---|" + "---|" * len(best["val_metrics"])
        for m in members:
            mark = " (shipped)" if m is best else ""
            table += f"\n| {m['name']}{mark} | " + " | ".join(f"{v:.4f}" for v in m["val_metrics"].values()) + " |"
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(out)), "members": len(members), "selected": best["name"],
            "selected_checkpoint": dg.MetadataValue.path(best["checkpoint"]), "selection_metric": metric,
            f"selected_{metric}": best["val_metrics"][metric], "metrics": dg.MetadataValue.md(table)})

    return [checkpoint, ensemble_config]


def selected_checkpoint(artifacts: ArtifactStore) -> tuple[Path, dict]:
    """-> (the shipped member's checkpoint, its ensemble entry), from ensemble_config.json."""
    path = artifacts.path("ensemble", "ensemble_config.json")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ensemble_config has not been materialized in this artifact store")
    doc = json.loads(path.read_text())
    member = next(m for m in doc["members"] if m["name"] == doc["selected"])
    return Path(member["checkpoint"]), member
