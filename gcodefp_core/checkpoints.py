"""Checkpoints: the weights, the ModelBundle they need, and the training record, in one file.

A checkpoint is a dict saved with torch.save and read with weights_only=True (no pickled code):
    format, model_config, state_dict        the network
    dataset                                  the data reference: path, content hash, features, tokenizer,
                                             operations (the bundle's inputs and outputs)
    line_table, program_path, program_clock, program_tracker   the bundle's attachments (plain dicts;
                                             None when absent)
    config, seed, parameters, epoch, metrics the training record
`load_checkpoint` returns the model, its ModelBundle and that dict; the bundle is never hung on
the nn.Module. Fitting the program path, clock and tracker after training (attach_*) rewrites the
file atomically.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .model import GCodeFingerprintModel, build_model
from .runtime.bundle import ATTACHMENTS, ModelBundle

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "gcodefp-checkpoint-v1"


class LoadedCheckpoint(NamedTuple):
    model: GCodeFingerprintModel     # in eval mode
    bundle: ModelBundle
    payload: dict                    # the whole checkpoint dict (metrics, config, dataset reference, ...)


def bundle_of(payload: dict) -> ModelBundle:
    """The ModelBundle a checkpoint dict describes."""
    ref, cfg = payload.get("dataset", {}), payload["model_config"]
    missing = [k for k in ("features", "tokenizer", "operations") if k not in ref]
    if missing:
        raise ValueError(f"the checkpoint's dataset reference lacks {missing}; it cannot be served")
    return ModelBundle.from_dict({"features": ref["features"], "tokenizer": ref["tokenizer"],
                                  "operations": ref["operations"], "window": cfg["window"],
                                  "max_tokens": cfg["max_decode_len"],
                                  **{k: payload.get(k) for k in ATTACHMENTS}}, "checkpoint")


def load_checkpoint(path, map_location="cpu") -> LoadedCheckpoint:
    """Load a checkpoint written by gcodefp_core.train -> (model in eval mode, bundle, checkpoint dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path}: not a gcodefp checkpoint (missing state_dict/model_config)")
    model = build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    try:
        bundle = bundle_of(ckpt)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return LoadedCheckpoint(model, bundle, ckpt)


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save through a temporary file: a reader never sees half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def attach_program_path(best_path: Path, ds, val_ids: np.ndarray) -> dict:
    """The program path of a model with controller positions, its snapping tolerance chosen on the
    validation windows, saved into the checkpoint; {} when the feature set has no positions."""
    from .path_fitting import path_for_model

    model, bundle, ckpt = load_checkpoint(best_path)
    path, scores = path_for_model(model, bundle, ds, val_ids)
    if path is None:
        return {}
    metrics = {"val_path_tolerance_mm": path.tolerance_mm, "val_path_exact_match": scores[path.tolerance_mm]}
    ckpt["program_path"] = path.to_dict()
    ckpt["metrics"] = ckpt.get("metrics", {}) | metrics
    save_checkpoint(best_path, ckpt)
    log.info("program path: %d segments, tolerance %g mm, validation exact line %.4f (line head alone %.4f)",
             path.n_segments, path.tolerance_mm, scores[path.tolerance_mm], scores[0.0])
    return metrics


def attach_program_clock(best_path: Path, ds, val_ids: np.ndarray) -> dict:
    """Streaming mode's program clock, its weight chosen on the validation windows, saved into the
    checkpoint with the streamed validation metrics."""
    from . import evaluate
    from .clock_fitting import fit_program_clock

    model, bundle, ckpt = load_checkpoint(best_path)
    pred = evaluate.predict([model], bundle, ds, val_ids, greedy=False)
    clock, _ = fit_program_clock(ds, bundle.line_table, pred, val_ids)
    streamed = evaluate.stream_report(clock, bundle.line_table, ds, val_ids, pred)["overall"]
    # val_clock_*: the row clock streamed from each run's start (what older packages serve); what /stream
    # serves with a tracker is val_tracker_* (attach_program_tracker)
    metrics = {f"val_clock_{k}": streamed[k] for k in ("op_acc", "exact_match", "word_acc")}
    metrics["val_clock_weight"] = clock.weight
    ckpt["program_clock"] = clock.to_dict()
    ckpt["metrics"] = ckpt.get("metrics", {}) | metrics
    save_checkpoint(best_path, ckpt)
    log.info("program clock: weight %g, streamed validation op %.4f exact %.4f (per window: op %.4f exact %.4f)",
             clock.weight, metrics["val_clock_op_acc"], metrics["val_clock_exact_match"],
             ckpt["metrics"].get("val_op_acc", float("nan")), ckpt["metrics"].get("val_exact_match", float("nan")))
    return metrics


def attach_program_tracker(best_path: Path, ds, seed: int = 0, max_streams: int | None = None) -> dict:
    """Streaming mode's program tracker: built from the training runs, its temperatures fitted on the
    validation windows, its weights (and whether operation templates ship) chosen on the validation
    streams (each validation run from the program start, and attached late with rows lost; at most
    max_streams of them), saved into the checkpoint with the figures it reached there. On the real
    data (21 validation runs, 42 streams) this takes about a minute; with 7 streams, the template
    weight chosen differed from the one all 42 choose in 2 of 3 seeds."""
    from .fit_program_tracker import TRAINING_GRID, fit_program_tracker

    model, bundle, ckpt = load_checkpoint(best_path)
    tracker, report = fit_program_tracker([model], ds, bundle.line_table, seed=seed, max_streams=max_streams,
                                          grid=TRAINING_GRID)
    metrics = {"val_tracker_exact_match": report["exact_match"], "val_tracker_op_acc": report["op_acc"],
               "val_tracker_streams": report["streams"]}
    for condition, scores in report["conditions"].items():
        metrics |= {f"val_tracker_{condition}_{k}": v for k, v in scores.items() if k != "streams"}
    ckpt["program_tracker"] = tracker.to_dict()
    ckpt["metrics"] = ckpt.get("metrics", {}) | metrics
    save_checkpoint(best_path, ckpt)
    metrics["val_tracker_template_weight"] = tracker.params["template_weight"]
    metrics["val_tracker_spread_weight"] = tracker.params["spread_weight"]
    log.info("program tracker: %d states, line weight %g, op weight %g, window weight %g (from a program start "
             "%g), template weight %g, spread weight %g; validation streams: exact %.4f op %.4f", tracker.n_states,
             tracker.params["line_weight"], tracker.params["op_weight"], tracker.params["window_weight"],
             tracker.params["window_weight_start"],
             tracker.params["template_weight"], tracker.params["spread_weight"], report["exact_match"], report["op_acc"])
    return metrics
