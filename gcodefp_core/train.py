"""Training: loss, augmentation, the epoch loop (early stopping, clipping, warmup + cosine LR,
resume) and ensembles. The config sections are gcodefp_core.config's; checkpoints are
gcodefp_core.checkpoints'.

Same seed + same data + same thread count = same weights
on CPU: every source of randomness is seeded and the data order of epoch e comes from (seed, e),
which is also why a resumed run continues exactly where the interrupted one stopped.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import evaluate, tracking
from .checkpoints import (
    CHECKPOINT_FORMAT,
    attach_program_clock,
    attach_program_path,
    attach_program_tracker,
    save_checkpoint,
)
from .config import ModelConfig, TrainConfig, validate_config
from .fileio import write_json
from .model import GCodeFingerprintModel, build_model, count_parameters
from .programs import LineTable, build_line_table, row_classes
from .runtime.decoding import PAD
from .schema import CONTROLLER_NUMERIC

log = logging.getLogger(__name__)
FP_LOSS_WEIGHT = 0.5    # the fingerprint's cosine-classifier loss, against 1 for the token/op/line losses
FP_SCALE = 16.0         # its logit scale (cosine similarities live in [-1, 1])


def model_config_for(ds, model_section: dict, table: LineTable | None = None) -> ModelConfig:
    """The model config for a dataset. The line head (model.line_head, default on) and the factorised
    operation head (program x damaged-or-not) take their sizes from `table` (one class per distinct line)."""
    section = dict(model_section)
    line_head = section.pop("line_head", True)
    table = table or build_line_table(ds)
    programs = {"operation_program": table.operation_program, "operation_variant": table.operation_variant,
                "n_lines": table.n_lines if line_head else 0, "factorise_operations": True}
    # Fourier features go to the controller's numeric state (positions, feed) when the feature set has it.
    fourier = [i for i, name in enumerate(ds.continuous_features) if name in CONTROLLER_NUMERIC]
    # Decode as many steps as the longest *training* line needs: lines with unseen words are spelled
    # in characters (up to ~25 tokens), which the model never learns; unrolling for them would make
    # every exported greedy prediction ~4x slower.
    lengths = (ds.arrays["line_tokens"][ds.arrays["row_line"][ds.split_windows("train")]] != PAD).sum(1)
    return ModelConfig.from_dict({
        "n_continuous": len(ds.continuous_features), "cardinalities": list(ds.categorical_cardinalities),
        "n_operations": len(ds.operations), "vocab_size": ds.tokenizer.vocab_size, "window": ds.window,
        "max_decode_len": int(lengths.max()) - 1, "fourier_inputs": fourier, **programs, **section})


def trim_pad(tokens: np.ndarray) -> np.ndarray:
    """Drop trailing all-PAD columns (a batch's lines are usually far shorter than max_tokens)."""
    return tokens[:, :max(2, int((tokens != PAD).sum(1).max()))]


def dataset_reference(ds) -> dict:
    """What a checkpoint needs to know about its data: where, which build, and the input/output schema."""
    m = ds.manifest
    return {"path": str(Path(ds.path).resolve()), "content_hash": m.get("content_hash"), "feature_set": m["features"]["feature_set"],
            "features": m["features"], "tokenizer": m["tokenizer"], "operations": list(ds.operations),
            "window": ds.window, "max_tokens": ds.max_tokens}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def compute_loss(model: GCodeFingerprintModel, batch: dict, cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    """batch: ds.batch(...) plus "line_class" (the target's line-table class, -1 = unknown) when the
    model has a line head."""
    dev = next(model.parameters()).device
    tokens = torch.as_tensor(trim_pad(batch["tokens"]), device=dev)
    op = torch.as_tensor(batch["operation"], device=dev)
    tok_logits, op_logits, fp, line_logits = model(torch.as_tensor(batch["continuous"], device=dev),
                                                   torch.as_tensor(batch["categorical"], device=dev), tokens)
    tok_loss = F.cross_entropy(tok_logits.flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=PAD,
                               label_smoothing=cfg.label_smoothing)
    op_loss = F.cross_entropy(op_logits, op, label_smoothing=cfg.label_smoothing)
    # Cosine classifier: pulls each fingerprint towards a learned unit "proxy" of its operation.
    fp_logits = FP_SCALE * fp @ F.normalize(model.fp_proxies, dim=-1).T
    fp_loss = F.cross_entropy(fp_logits, op)
    loss = tok_loss + op_loss + FP_LOSS_WEIGHT * fp_loss
    parts = {"tok_loss": tok_loss.item(), "op_loss": op_loss.item(), "fp_loss": fp_loss.item()}
    if line_logits is not None:
        line_loss = F.cross_entropy(line_logits, torch.as_tensor(batch["line_class"], device=dev), ignore_index=-1,
                                    label_smoothing=cfg.label_smoothing)
        loss = loss + line_loss
        parts["line_loss"] = line_loss.item()
    return loss, parts


class SensorLayout:
    """Which continuous features are sensors (not controller state), and which belong to each board."""

    def __init__(self, features: list[str]):
        self.sensors = np.array([j for j, c in enumerate(features) if c not in CONTROLLER_NUMERIC], np.int64)
        nodes = sorted({c.split(".", 1)[0] for c in features if "." in c})
        # [boards, features] 0/1: multiplying a window by (1 - dropped @ this) zeroes dropped boards.
        self.board_columns = np.array([[float(c.split(".", 1)[0] == n) for c in features] for n in nodes],
                                      np.float32).reshape(len(nodes), len(features))


def augment(batch: dict, cfg: TrainConfig, layout: SensorLayout, rng: np.random.Generator) -> dict:
    """Training-time augmentation (see TrainConfig.sensor_offset_std, board_dropout,
    categorical_dropout), in place."""
    cont, sensors = batch["continuous"], layout.sensors
    if cfg.sensor_offset_std > 0 and len(sensors):
        cont[:, :, sensors] += rng.normal(0.0, cfg.sensor_offset_std, (len(cont), 1, len(sensors))).astype(cont.dtype)
    if cfg.board_dropout > 0 and len(layout.board_columns):
        dropped = (rng.random((len(cont), len(layout.board_columns))) < cfg.board_dropout).astype(np.float32)
        cont *= (1.0 - np.minimum(dropped @ layout.board_columns, 1.0))[:, None, :]
    if cfg.categorical_dropout > 0 and batch["categorical"].shape[2]:
        cat = batch["categorical"]
        drop = rng.random((len(cat), 1, cat.shape[2])) < cfg.categorical_dropout
        batch["categorical"] = np.where(drop, 0, cat)
    return batch


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def validate(model, table: LineTable, ds, val_ids: np.ndarray) -> dict:
    """Validation metrics of the model as it is now (on a CPU copy when it trains elsewhere)."""
    if next(model.parameters()).device.type != "cpu":
        model = copy.deepcopy(model).cpu()
    pred = evaluate.predict([model], None, ds, val_ids)
    lines = table.lines if model.cfg.n_lines else None
    m = evaluate.summarise(evaluate.line_scores(pred, ds, val_ids, lines))
    m["score"] = (m["op_acc"] + m["token_acc_tf"] + m["exact_match"]) / 3
    return m


def cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def train_model(config: dict, ds, run_dir: Path | str, seed: int, resume: bool = False,
                stop_after: int | None = None, group: str | None = None, on_epoch=None) -> dict:
    """Train one model into run_dir (checkpoint_best.pt, checkpoint_last.pt, metrics.json).
    resume: continue from run_dir/checkpoint_last.pt. stop_after: stop after this many epochs in
    this call (the run stays resumable). on_epoch: called with each epoch's history row plus
    "epochs" (planned), "improved" and "elapsed" (s), e.g. to stream progress into an orchestrator's
    log. Returns the best validation metrics and run facts."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tcfg = TrainConfig.from_dict(config.get("train", {}))
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    seed_everything(seed)
    table = build_line_table(ds)
    mcfg = model_config_for(ds, config.get("model", {}), table)
    model = build_model(mcfg)
    if mcfg.n_lines:
        model.set_line_mask(table.mask)
    model.to(tcfg.device)
    line_class = row_classes(ds, table)
    train_ids, val_ids = ds.split_windows("train"), ds.split_windows("val")
    if len(train_ids) == 0 or len(val_ids) == 0:
        raise ValueError(f"dataset {ds.path}: train and val splits need windows (have {len(train_ids)}, {len(val_ids)})")
    if len(val_ids) > tcfg.val_max_windows:
        val_ids = val_ids[np.linspace(0, len(val_ids) - 1, tcfg.val_max_windows).astype(np.int64)]
    layout = SensorLayout(ds.continuous_features)
    per_epoch = min(tcfg.samples_per_epoch or len(train_ids), len(train_ids))
    steps_per_epoch = math.ceil(per_epoch / tcfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tcfg.warmup_steps, tcfg.epochs * steps_per_epoch))
    state = {"epoch": 0, "best": -math.inf, "best_epoch": 0, "bad_epochs": 0, "history": [], "finished": False,
             "elapsed": 0.0}
    last_path, best_path = run_dir / "checkpoint_last.pt", run_dir / "checkpoint_best.pt"
    if resume and last_path.is_file():
        ckpt = torch.load(last_path, weights_only=True)
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["torch_rng"])
        state = ckpt["train_state"]
        log.info("resumed %s at epoch %d", run_dir, state["epoch"])
    elif resume:
        log.warning("--resume: no %s, starting fresh", last_path)
    base = {"format": CHECKPOINT_FORMAT, "model_config": mcfg.to_dict(), "dataset": dataset_reference(ds),
            "line_table": table.to_dict(),
            "config": config, "seed": seed, "parameters": count_parameters(model)}
    tracker = tracking.Tracker(config.get("wandb"), run_dir, config | {"seed": seed, "parameters": base["parameters"]},
                               name=run_dir.name, group=group)
    try:
        epochs_this_call = 0
        while not state["finished"] and state["epoch"] < tcfg.epochs:
            epoch, t0 = state["epoch"] + 1, time.perf_counter()
            model.train()
            order = np.random.default_rng([seed, epoch]).permutation(len(train_ids))[:per_epoch]
            aug_rng = np.random.default_rng([seed, epoch, 1])
            sums, n = {}, 0
            for s in range(0, per_epoch, tcfg.batch_size):
                ids = np.sort(train_ids[order[s:s + tcfg.batch_size]])
                batch = ds.batch(ids)
                batch["line_class"] = line_class[ids]
                augment(batch, tcfg, layout, aug_rng)
                loss, parts = compute_loss(model, batch, tcfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
                opt.step()
                sched.step()
                for k, v in {"loss": loss.item(), **parts}.items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
            train_m = {f"train_{k}": v / n for k, v in sums.items()}
            val_m = validate(model, table, ds, val_ids)
            state["elapsed"] += time.perf_counter() - t0
            state["epoch"] = epoch
            improved = val_m[tcfg.monitor] > state["best"] + 1e-6 if tcfg.monitor != "loss" else -val_m["loss"] > state["best"] + 1e-6
            row = {"epoch": epoch, **train_m, **{f"val_{k}": v for k, v in val_m.items()},
                   "lr": opt.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 2)}
            state["history"].append(row)
            log.info("epoch %d/%d loss %.4f | val loss %.4f op %.4f tok %.4f exact %.4f word %.4f | lr %.2e %.1fs%s",
                     epoch, tcfg.epochs, row["train_loss"], val_m["loss"], val_m["op_acc"], val_m["token_acc_tf"],
                     val_m["exact_match"], val_m["word_acc"], row["lr"], row["seconds"], " *" if improved else "")
            tracker.log(row, step=epoch)
            if on_epoch is not None:
                on_epoch(row | {"epochs": tcfg.epochs, "improved": improved, "elapsed": state["elapsed"]})
            if improved:
                state.update(best=val_m[tcfg.monitor] if tcfg.monitor != "loss" else -val_m["loss"], best_epoch=epoch,
                             bad_epochs=0)
                save_checkpoint(best_path, base | {"state_dict": cpu_state(model), "epoch": epoch,
                                                   "metrics": {f"val_{k}": v for k, v in val_m.items()}})
            else:
                state["bad_epochs"] += 1
            out_of_time = tcfg.max_minutes is not None and state["elapsed"] > 60 * tcfg.max_minutes
            if state["bad_epochs"] >= tcfg.patience or out_of_time or epoch == tcfg.epochs:
                state["finished"] = True
                log.info("stopping after epoch %d: %s", epoch, "early stop" if state["bad_epochs"] >= tcfg.patience
                         else "time budget" if out_of_time else "last epoch")
            save_checkpoint(last_path, base | {"state_dict": cpu_state(model), "optimizer": opt.state_dict(),
                                               "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                                               "train_state": state, "epoch": epoch})
            epochs_this_call += 1
            if stop_after is not None and epochs_this_call >= stop_after:
                break
        if mcfg.n_lines:
            attach_program_path(best_path, ds, val_ids)   # first: the clock is fitted on the snapped lines
            attach_program_clock(best_path, ds, val_ids)
            attach_program_tracker(best_path, ds, seed=seed, max_streams=tcfg.tracker_streams)
        best = torch.load(best_path, weights_only=True)
        result = {"run_dir": str(run_dir), "seed": seed, "best_epoch": state["best_epoch"], "epochs": state["epoch"],
                  "finished": state["finished"], "train_seconds": round(state["elapsed"], 1),
                  "parameters": base["parameters"], **best["metrics"]}
        write_json(run_dir / "metrics.json", {**result, "history": state["history"]})
        tracker.summary(result)
        if state["finished"]:
            tracker.log_checkpoint(best_path, f"model-{run_dir.name}", {k: v for k, v in result.items() if k != "run_dir"})
        return result
    finally:
        tracker.finish()


def prepare_dataset(config: dict, output: Path, dataset_dir: Path | None = None):
    """A prebuilt dataset (--dataset), or one built from the "data" section into <output>/dataset
    (reused when its recorded build config matches)."""
    from .dataset import DatasetConfig, build_dataset, load_dataset

    if dataset_dir is not None:
        return load_dataset(dataset_dir)
    dcfg = DatasetConfig.from_dict(config.get("data", {}))
    cache = output / "dataset"
    if (cache / "manifest.json").is_file():
        if json.loads((cache / "manifest.json").read_text()).get("config") == asdict(dcfg):
            log.info("reusing dataset %s", cache)
            return load_dataset(cache)
    return load_dataset(build_dataset(dcfg, cache))


def train(config: dict, output: Path | str, seed: int = 42, ensemble: int | None = None,
          dataset_dir: Path | None = None, resume: bool = False) -> dict:
    """The `gcodefp train` entry point. One model -> <output>/model_seed{seed}/; an ensemble of N ->
    <output>/ensemble_model_{i}_seed{seed+i-1}/ and <output>/ensemble_config.json."""
    validate_config(config)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    ds = prepare_dataset(config, output, dataset_dir)
    if not ensemble:
        return train_model(config, ds, output / f"model_seed{seed}", seed, resume=resume)
    if ensemble < 1:
        raise ValueError(f"--ensemble must be >= 1, got {ensemble}")
    members = []
    for i in range(1, ensemble + 1):
        name = f"ensemble_model_{i}_seed{seed + i - 1}"
        res = train_model(config, ds, output / name, seed + i - 1, resume=resume, group=output.name)
        members.append({"name": name, "seed": seed + i - 1, "checkpoint": f"{name}/checkpoint_best.pt",
                        "val_metrics": {k: v for k, v in res.items() if k.startswith("val_")}})
    from .release import select_member, selection_metric

    monitor = TrainConfig.from_dict(config.get("train", {})).monitor
    key, best = selection_metric(monitor), select_member(members, monitor)
    doc = {"members": members, "selected": best["name"], "selection_metric": key, "dataset": str(ds.path)}
    write_json(output / "ensemble_config.json", doc)
    return doc
