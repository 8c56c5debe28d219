"""Export a trained checkpoint to ONNX and verify it against PyTorch.

Files: `--output DIR/model.onnx` names the *stem* "model"; the export writes, side by side,
    DIR/model.encoder.onnx       encoder      (continuous, categorical -> memory, op_logits, fingerprint, h0)
    DIR/model.decoder.onnx       decoder step (tokens, h, memory -> logits, h_next)
    DIR/model.encoder_only.onnx  op_logits + fingerprint only (what --encoder-only writes alone)
    DIR/model.predict.onnx       line head: the whole answer in one call (models with a line head),
                                 and the line head's unrestricted line_logits (the program tracker's evidence)
    DIR/model.json               the ModelBundle + this export's description (gcodefp_core.runtime.bundle)
Quantized variants use their own stem (model_int8_dynamic.*), so variants can share a folder.

The graphs come from torch.onnx's default (dynamo) exporter as single files (external_data=False).
Verification (onnx.checker, then PyTorch vs onnxruntime on real, synthetic or random windows) runs
before model.json is written: a failed one leaves `<stem>.failed.json` with the figures instead, so
no server can load the model, and raises VerificationError.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np

from .fileio import sha256_file, write_json  # noqa: F401  (re-exported for quantize)
from .runtime import OnnxPredictor, decoding, read_model_json, write_model_json
from .runtime.program_tracker import log_softmax
from .variants import REFERENCE

# 20: GELU exports as one Gelu op (opset 18 spells it as five Erf-based nodes: 12% of the int8
# model's batch-1 latency on the real-data model).
DEFAULT_OPSET = 20
GRAPH_IO = {
    "encoder": (["continuous", "categorical"], ["memory", "op_logits", "fingerprint", "h0"]),
    "decoder": (["tokens", "h", "memory"], ["logits", "h_next"]),
    "encoder_only": (["continuous", "categorical"], ["op_logits", "fingerprint"]),
    "predict": (["continuous", "categorical"], ["line", "line_confidence", "op_logits", "fingerprint", "line_logits"]),
}
# fp32 parity bars: onnxruntime fuses and reorders float ops, so ~1e-5 is normal; 1e-3 means a real bug.
MAX_ABS_DIFF = 1e-3
MIN_GREEDY_IDENTICAL = 0.999


class VerificationError(ValueError):
    """The exported graphs do not reproduce the PyTorch model."""


def stem_paths(output: str | Path) -> tuple[Path, str]:
    """`DIR/model.onnx` (or `DIR/model`, or `DIR/`) -> (DIR, "model")."""
    output = Path(output)
    if output.is_dir() or str(output).endswith(os.sep):
        return output, "model"
    return output.parent, output.name.split(".")[0]


def graph_signature(path: Path) -> dict:
    """Inputs/outputs of a graph with element types and shapes (symbolic dims by name)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape})
        return out

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output), "opset": opset}


def _wrappers(model):
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, continuous, categorical):
            return self.m.encode(continuous, categorical)

    class EncoderOnly(Encoder):
        def forward(self, continuous, categorical):
            _, op_logits, fingerprint, _ = self.m.encode(continuous, categorical)
            return op_logits, fingerprint

    class Decoder(Encoder):
        def forward(self, tokens, h, memory):
            return self.m.decode_step(tokens, h, memory)

    class Predict(Encoder):
        def forward(self, continuous, categorical):
            return self.m.predict_line(continuous, categorical)

    # eval() on the wrapper too: the exporter restores the wrapper's mode recursively afterwards.
    return {"encoder": Encoder().eval(), "decoder": Decoder().eval(), "encoder_only": EncoderOnly().eval(),
            "predict": Predict().eval()}


def export_graph(module, name: str, example: tuple, path: Path, dynamic_batch: bool, opset: int) -> None:
    import onnx
    import torch

    inputs, outputs = GRAPH_IO[name]
    kwargs = {}
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=65536)
        kwargs["dynamic_shapes"] = tuple({0: batch} for _ in inputs)
    tmp = path.with_name(f".{path.name}.tmp")
    # The exporter's chatter (deprecations, "torchvision is not installed") is not the user's concern.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, example, input_names=inputs, output_names=outputs, opset_version=opset,
                                 dynamo=True, external_data=False, verbose=False, **kwargs)
    model = prog.model_proto
    for node in model.graph.node:  # per-node stack traces and scopes: half the file of a small model
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(model, str(tmp))
    tmp.replace(path)


def export_checkpoint(checkpoint: str | Path, output: str | Path, encoder_only: bool = False,
                      batch_size: int | None = None, seq_len: int | None = None,
                      opset: int | None = None, verify_windows: int | None = None,
                      dataset: str | Path | None = None) -> dict:
    """Export a checkpoint (a dynamic batch axis unless batch_size fixes one); verify; write
    model.json. Returns the model.json dict."""
    import onnx
    import torch

    from .checkpoints import load_checkpoint
    from .model import count_parameters

    checkpoint = Path(checkpoint)
    model, bundle, ckpt = load_checkpoint(checkpoint)
    cfg, ref = model.cfg, ckpt.get("dataset", {})
    seq_len = seq_len or cfg.window
    if seq_len != cfg.window:
        raise ValueError(f"--seq-len {seq_len}: the model was trained on windows of {cfg.window} rows; "
                         "the encoder's last-rows path and the training targets assume that length")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    dynamic_batch = batch_size is None
    opset = opset or DEFAULT_OPSET
    folder, stem = stem_paths(output)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (folder / f"{stem}.json", folder / f"{stem}.failed.json"):
        stale.unlink(missing_ok=True)  # never leave an old description next to new graphs

    b = batch_size or 2  # an example batch of 2 keeps the exporter from specialising the axis to 1
    gen = torch.Generator().manual_seed(0)
    cont = torch.randn(b, seq_len, cfg.n_continuous, generator=gen)
    cat = torch.zeros(b, seq_len, len(cfg.cardinalities), dtype=torch.long)
    with torch.no_grad():
        memory, _, _, h0 = model.encode(cont, cat)
    examples = {"encoder": (cont, cat), "encoder_only": (cont, cat), "predict": (cont, cat),
                "decoder": (torch.full((b,), decoding.BOS, dtype=torch.long), h0, memory)}
    graphs = ["encoder_only"] if encoder_only else ["encoder", "decoder", "encoder_only"]
    if cfg.n_lines and not encoder_only:
        if bundle.line_table is None:
            raise ValueError(f"{checkpoint}: the model has a line head but the checkpoint has no line_table")
        graphs.append("predict")
    else:  # the line table, path, clock and tracker serve the predict graph only
        bundle = bundle.replace(line_table=None, program_path=None, program_clock=None, program_tracker=None)
    modules = _wrappers(model)
    files, signatures = {}, {}
    t0 = time.perf_counter()
    for name in graphs:
        path = folder / f"{stem}.{name}.onnx"
        export_graph(modules[name], name, examples[name], path, dynamic_batch, opset)
        onnx.checker.check_model(str(path), full_check=True)
        files[name], signatures[name] = path.name, graph_signature(path)
    description = {
        "variant": REFERENCE, "kind": "encoder_only" if encoder_only else "full", "files": files,
        "graphs": signatures, "opset": opset, "dynamic_batch": dynamic_batch, "batch_size": batch_size,
        "model_config": cfg.to_dict(), "parameter_count": count_parameters(model),
        "train_config": (ckpt.get("config") or {}).get("train", {}),
        "file_sizes": {n: (folder / f).stat().st_size for n, f in files.items()},
        "source_checkpoint": {"path": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint),
                              "dataset_content_hash": ref.get("content_hash"), "metrics": ckpt.get("metrics", {})},
        "export_seconds": round(time.perf_counter() - t0, 2), "torch_version": torch.__version__,
        "onnx_version": onnx.__version__, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    description["total_size_bytes"] = sum(description["file_sizes"].values())
    failed = folder / f"{stem}.failed.json"
    # verify() reads the description; renamed to <stem>.json once it passes, so no server loads a failed export.
    meta = write_model_json(failed, description, bundle)
    try:
        meta["parity"] = verify(failed, model=model, dataset=dataset, windows=verify_windows, _meta=meta)
    except Exception as exc:
        meta["parity"] = {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
        write_model_json(failed, meta)
        raise
    write_model_json(failed, meta)
    if not meta["parity"]["passed"]:
        raise VerificationError(f"ONNX verification failed ({'; '.join(meta['parity']['failures'])}); "
                                f"figures in {failed}")
    final = folder / f"{stem}.json"
    failed.replace(final)
    return meta


def verify(model_json: str | Path, model=None, checkpoint: str | Path | None = None, dataset: str | Path | None = None,
           windows: int | None = None, batch_size: int = 256, max_abs_diff: float | None = MAX_ABS_DIFF,
           min_identical: float | None = MIN_GREEDY_IDENTICAL, _meta: dict | None = None) -> dict:
    """PyTorch vs onnxruntime on the same windows. The reference is `model`, else `checkpoint`, else
    the checkpoint recorded in model.json. Returns the parity figures; `passed` applies the bars
    (None disables a bar: quantized variants are judged on accuracy instead, see quantize.py)."""
    import onnx
    import torch

    from .checkpoints import load_checkpoint
    from .model import TorchStep

    meta, meta_path = read_model_json(model_json)[::2] if _meta is None else (_meta, Path(model_json))
    for name, file in meta["files"].items():
        onnx.checker.check_model(str(meta_path.parent / file), full_check=True)
    if model is None:
        model = load_checkpoint(checkpoint or meta["source_checkpoint"]["path"]).model
    if model.cfg.to_dict() != meta["model_config"]:
        raise VerificationError(f"{meta_path}: the reference model's config differs from the exported one")
    model.eval()
    pred = OnnxPredictor(meta, meta_path.parent, intra_op_threads=1)
    cont, cat, source = sample_windows(meta, dataset=dataset, n=windows or 1024)
    if meta.get("batch_size"):  # a fixed-batch graph takes exactly that many windows per call
        batch_size = meta["batch_size"]
        cont, cat = cont[:len(cont) // batch_size * batch_size], cat[:len(cat) // batch_size * batch_size]
    diffs: dict[str, float] = {}
    same = {"greedy_stepwise": 0}
    has_lines = "predict" in pred.sessions
    torch_step = TorchStep(model)

    def diff(key, a, b):
        d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        # NaN (e.g. inf - inf from a broken graph) must not vanish in max(): count it as infinite.
        worst = float(d.max()) if np.isfinite(d).all() else float("inf")
        diffs[key] = max(diffs.get(key, 0.0), worst)

    with torch.no_grad():
        for s in range(0, len(cont), batch_size):
            c, k = cont[s:s + batch_size], cat[s:s + batch_size]
            state, op_ref, fp_ref = torch_step.initial_state(c, k)
            got = pred.encode(c, k)
            diff("op_logits", got["op_logits"], op_ref)
            diff("fingerprint", got["fingerprint"], fp_ref)
            if has_lines:
                line_ref, conf_ref, _, _, logits_ref = (t.numpy() for t in model.predict_line(torch.as_tensor(c),
                                                                                               torch.as_tensor(k)))
                lines = pred.predict_lines(c, k, snap=False)  # the graph against PyTorch's; snapping is numpy on both sides
                same["line"] = same.get("line", 0) + int((lines["line"] == line_ref).sum())
                diff("line_confidence", lines["line_confidence"], conf_ref)
                if "line_logits" in lines:  # exports before the program tracker lack it
                    # As probabilities (what the tracker reads): logits of a sharp head reach magnitudes
                    # where float32 reordering alone moves them by more than the absolute bar.
                    diff("line_probabilities", np.exp(log_softmax(lines["line_logits"])), np.exp(log_softmax(logits_ref)))
                diff("predict_op_logits", lines["op_logits"], op_ref)
            if "decoder" not in pred.sessions:
                continue
            diff("memory", got["memory"], state["memory"])
            diff("h0", got["h0"], state["h"])
            bos = np.full(len(c), decoding.BOS, np.int64)
            diff("decoder_logits", pred.step(bos, state)[0], torch_step(bos, state)[0])
            ref = decoding.greedy(torch_step, state, len(c), meta["max_tokens"])
            stepwise = pred.predict_arrays(c, k, method="greedy")[0]
            same["greedy_stepwise"] += int((stepwise == ref).all(axis=1).sum())
    report = {"windows": int(len(cont)), "data": source, "max_abs_diff": diffs, "failures": []}
    if pred.can_decode:  # the share of windows whose G-code answer is identical to PyTorch's, per path
        report["greedy_identical"] = {k: v / len(cont) for k, v in same.items()}
    if max_abs_diff is not None:
        report["failures"] += [f"{k} max |diff| {v:.2e} > {max_abs_diff:g}" for k, v in diffs.items()
                               if not v <= max_abs_diff]  # `not <=` also catches NaN
    if min_identical is not None and pred.can_decode:
        report["failures"] += [f"{k} identical {v:.4f} < {min_identical}" for k, v in report["greedy_identical"].items()
                               if v < min_identical]
    report["passed"] = not report["failures"]
    report["bars"] = {"max_abs_diff": max_abs_diff, "min_greedy_identical": min_identical}
    return report


def sample_windows(meta: dict, dataset: str | Path | None = None, n: int = 1024, split: str = "test",
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """Normalised windows to check or calibrate a model with -> (continuous, categorical, where from).
    A dataset folder (its windows of `split`, evenly spaced) if given; else synthetic logs put through
    the model's own FeatureSpec; random windows only if the synthetic generator is unavailable."""
    from .features import FeatureSpec

    spec, w = FeatureSpec.from_dict(meta["features"]), int(meta["window"])
    if dataset is not None:
        from .dataset import load_dataset

        ds = load_dataset(dataset)
        if ds.manifest["features"] != meta["features"] or ds.window != w:
            raise ValueError(f"dataset {ds.path}: its features/normalisation or window ({ds.window}) differ from "
                             f"the model's (window {w}); use the dataset the model was trained on")
        ids = ds.split_windows(split)
        if len(ids) == 0:
            ids = np.concatenate([ds.split_windows(s) for s in ("train", "val", "test")])
        ids = ids[np.linspace(0, len(ids) - 1, min(n, len(ids))).astype(np.int64)]
        b = ds.batch(ids)
        return b["continuous"], b["categorical"], f"dataset {ds.path} ({split}, {len(ids)} windows)"
    rng = np.random.default_rng(seed)
    try:
        from .synthetic import generate_run

        conts, cats = [], []
        for i, op in enumerate(meta["operations"]):
            cont, cat = spec.transform(generate_run(op, 100 + seed, seed=seed))
            if len(cont) < w:
                continue
            ends = rng.choice(np.arange(w - 1, len(cont)), size=min(len(cont) - w + 1, -(-n // len(meta["operations"]))),
                              replace=False)
            rows = ends[:, None] + np.arange(-w + 1, 1)
            conts.append(cont[rows])
            cats.append(cat[rows])
        cont, cat = np.concatenate(conts)[:n], np.concatenate(cats)[:n].astype(np.int64)
        return cont, cat, f"synthetic logs normalised with the model's features ({len(cont)} windows)"
    except ImportError:
        cards = [len(spec.categorical_maps.get(c, {})) + 1 for c in spec.categorical]
        cont = rng.standard_normal((n, w, len(spec.continuous))).astype(np.float32)
        cat = np.stack([rng.integers(0, k, (n, w)) for k in cards], axis=-1) if cards else np.zeros((n, w, 0), np.int64)
        return cont, cat.astype(np.int64), f"random windows ({n})"
