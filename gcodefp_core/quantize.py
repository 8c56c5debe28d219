"""Quantized variants of an exported model (fp16, int8 dynamic, int8 static QDQ) and their comparison.

A variant is a set of graphs plus its own model.json ("variant": fp16 | int8_dynamic | int8_static),
written with the export's naming (`DIR/<stem>.<graph>.onnx` + `DIR/<stem>.json`). `compare_variants`
writes one folder per variant (`<out>/<variant>/model.json`), the layout the package builder takes.

Choices (measured on the real-data model, 2,000 test windows, 2 shared cores): int8 graphs are
pre-processed with onnxruntime's quant_pre_process (shape inference + fusions; without it some ops
stay float); both int8 variants keep Fourier-feature projections float (onnx_rewrites.periodic_nodes). int8
dynamic quantizes MatMul/Gemm/Conv/Gather per channel: 28% of fp32, but slower than fp32 at batch 1
(per-call activation quantization; ConvInteger) -- the size variant. int8 static (QDQ, Percentile
calibration) quantizes MatMul/Gemm/Conv only (quantizing every op has broken masks and softmaxes in
decoders) and rewrites the graphs around the quantizer (why: at each function): 28% of fp32, within
0.15 point of fp32 accuracy, about fp32's batch-1 latency (QLinearConv/MatMul fusions). fp16 keeps
float32 inputs/outputs so callers need not change; on the CPU provider it is a size artifact (ORT
inserts casts; slower than fp32), for GPUs.
"""
from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from . import onnx_rewrites
from .export import graph_signature, sample_windows, sha256_file, stem_paths, write_json
from .runtime import OnnxPredictor, read_model_json, write_model_json
from .variants import METHODS, QUANTIZED, REFERENCE, VARIANTS, Variant

STATIC_OP_TYPES = ["MatMul", "Gemm", "Conv"]
# Percentile (99.999%) ranges: one outlier window no longer stretches an activation's whole int8 scale
# (MinMax lost more operation/greedy agreement on the tiny test model); Entropy crashed on masks.
STATIC_CALIBRATION = "Percentile"
MIN_CALIBRATION_WINDOWS = 100


class CalibrationReader:
    """onnxruntime CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict]):
        self._feeds = feeds
        self.rewind()

    def get_next(self):
        return next(self._iter, None)

    def rewind(self):
        self._iter = iter(self._feeds)


def calibration_feeds(fp32: OnnxPredictor, cont: np.ndarray, cat: np.ndarray, batch: int = 32) -> dict[str, list]:
    """Per graph, feeds that follow the data's real path: the decoder sees the (tokens, h, memory) of
    greedy decoding by the fp32 model, not random states."""
    feeds: dict[str, list] = {name: [] for name in fp32.sessions}
    for s in range(0, len(cont), batch):
        c, k = cont[s:s + batch], cat[s:s + batch]
        for name in feeds:
            if name != "decoder":
                feeds[name].append(fp32._window_feeds(name, c, k))
        if "decoder" in feeds:
            enc = fp32.encode(c, k)
            state = {"h": enc["h0"], "memory": enc["memory"]}
            tokens = np.full(len(c), 1, np.int64)  # BOS
            for _ in range(fp32.max_tokens):
                feeds["decoder"].append({"tokens": tokens, "h": state["h"], "memory": state["memory"]})
                logits, state = fp32.step(tokens, state)
                tokens = logits.argmax(axis=1).astype(np.int64)
    return feeds


def fp16_graph(src: Path, tmp: Path, feeds: list[dict] | None, work: Path) -> None:
    import onnx
    from onnxconverter_common import float16

    with warnings.catch_warnings():  # "1e-12 will be truncated to 1e-07": F.normalize's eps, harmless
        warnings.simplefilter("ignore")
        model = float16.convert_float_to_float16(onnx_rewrites.isolate_outputs(onnx.load(str(src))), keep_io_types=True)
    onnx.save(model, str(tmp))


def _pre_processed(src: Path, work: Path, split_gemm: bool):
    """The graph after onnxruntime's quant_pre_process (shape inference + fusions; without it some ops stay float)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    clean, pre = work / f"{src.stem}.clean.onnx", work / f"{src.stem}.pre.onnx"
    onnx.save(onnx_rewrites.prepare_for_quantization(onnx.load(str(src))), str(clean))
    try:
        quant_pre_process(str(clean), str(pre))
    except Exception:  # symbolic shape inference cannot follow F.normalize's Expand; ONNX's can
        quant_pre_process(str(clean), str(pre), skip_symbolic_shape=True)
    model = onnx.load(str(pre))
    del model.graph.value_info[:]
    if split_gemm:
        onnx_rewrites.split_gemm_bias(model)  # after pre-processing: its fusions would make the Gemms again
    onnx.save(model, str(pre))
    return model, pre


# Shape inference loses some element types inside unrolled loops; all are float.
def _extra_options() -> dict:
    import onnx

    return {"DefaultTensorType": onnx.TensorProto.FLOAT}


def int8_dynamic_graph(src: Path, tmp: Path, feeds: list[dict] | None, work: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, pre = _pre_processed(src, work, split_gemm=False)
    quantize_dynamic(str(pre), str(tmp), weight_type=QuantType.QInt8, per_channel=True, extra_options=_extra_options(),
                     nodes_to_exclude=sorted(onnx_rewrites.periodic_nodes(model)))


def int8_static_graph(src: Path, tmp: Path, feeds: list[dict] | None, work: Path) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model, pre = _pre_processed(src, work, split_gemm=True)
    periodic = onnx_rewrites.periodic_nodes(model)
    # The input projection's activations stay float: ~170 sensor channels with their own scales do
    # not share one calibrated uint8 range (4-5 points of operation agreement); its weight is int8.
    projection = {n.name for n in model.graph.node if "continuous" in n.input}
    with contextlib.redirect_stdout(io.StringIO()):  # the percentile calibrator prints its progress
        quantize_static(str(pre), str(tmp), CalibrationReader(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=STATIC_OP_TYPES, per_channel=True,
                        nodes_to_exclude=sorted(projection | periodic),
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, extra_options=_extra_options(),
                        calibrate_method=getattr(CalibrationMethod, STATIC_CALIBRATION))
    model = onnx.load(str(tmp))
    onnx_rewrites.int8_weights_only(model, projection - periodic)
    onnx_rewrites.dequantize_gathered_rows(model)
    onnx_rewrites.prune(model)  # the float weights and dequantized tables nobody reads any more
    onnx.save(model, str(tmp))


def _quantize_graph(src: Path, dst: Path, variant: Variant, feeds: list[dict] | None, work: Path) -> None:
    """Write `variant`'s version of one graph through a temporary file (checked before the rename)."""
    import onnx

    tmp = dst.with_name(f".{dst.name}.tmp")
    globals()[variant.builder](src, tmp, feeds, work)
    onnx.checker.check_model(str(tmp))
    tmp.replace(dst)


def quantize_model(model_json_or_onnx: str | Path, output: str | Path, method: str,
                   calibration_dataset: str | Path | None = None, calibration_windows: int = 256) -> dict:
    """Write the `method` variant of an fp32 export next to `output`; returns its model.json dict."""
    variant = VARIANTS.get(METHODS.get(method, method))
    if variant is None or not variant.builder:
        raise ValueError(f"--method: unknown {method!r}; choose one of {', '.join(METHODS)}")
    meta, bundle, meta_path = read_model_json(model_json_or_onnx)
    if meta["variant"] != REFERENCE:
        raise ValueError(f"{meta_path}: quantize an fp32 export, not a {meta['variant']} variant")
    if meta.get("batch_size"):
        raise ValueError(f"{meta_path}: quantize a dynamic-batch export (this one takes batches of {meta['batch_size']})")
    folder, stem = stem_paths(output)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    fp32 = OnnxPredictor(meta, meta_path.parent, bundle=bundle)
    calib = None
    if variant.calibrated:
        if calibration_windows < MIN_CALIBRATION_WINDOWS:
            raise ValueError(f"calibration needs >= {MIN_CALIBRATION_WINDOWS} windows, got {calibration_windows}")
        cont, cat, source = sample_windows(meta, calibration_dataset, calibration_windows, split="train", seed=1)
        if len(cont) < MIN_CALIBRATION_WINDOWS:
            raise ValueError(f"calibration data {source}: {len(cont)} windows < {MIN_CALIBRATION_WINDOWS}")
        calib = {"data": source, "windows": int(len(cont)), "method": STATIC_CALIBRATION, "op_types": STATIC_OP_TYPES}
        feeds = calibration_feeds(fp32, cont, cat)
    files = {}
    with tempfile.TemporaryDirectory(prefix="gcodefp-quant-") as work:
        for name, file in meta["files"].items():
            dst = folder / f"{stem}.{name}.onnx"
            _quantize_graph(meta_path.parent / file, dst, variant, feeds[name] if calib else None, Path(work))
            files[name] = dst.name
    out = dict(meta, variant=variant.name, files=files,
               graphs={n: graph_signature(folder / f) for n, f in files.items()},
               file_sizes={n: (folder / f).stat().st_size for n, f in files.items()})
    out["total_size_bytes"] = sum(out["file_sizes"].values())
    out["quantization"] = {"method": variant.method, "variant": variant.name, "source": str(meta_path.resolve()),
                           "source_sha256": {n: sha256_file(meta_path.parent / f) for n, f in meta["files"].items()},
                           "calibration": calib,
                           "size_ratio_vs_fp32": out["total_size_bytes"] / meta["total_size_bytes"],
                           "seconds": round(time.perf_counter() - t0, 2)}
    cont, cat, source = sample_windows(meta, calibration_dataset, 512, split="test")
    out["parity"] = agreement(fp32, OnnxPredictor(out, folder, bundle=bundle), cont, cat) | {
        "reference": "fp32 ONNX", "data": source}
    return write_model_json(folder / f"{stem}.json", out)


def agreement(ref: OnnxPredictor, other: OnnxPredictor, cont: np.ndarray, cat: np.ndarray) -> dict:
    """How closely `other` follows `ref` on the same windows (no labels needed)."""
    a, b = ref.encode(cont, cat), other.encode(cont, cat)
    out = {"windows": int(len(cont)),
           "op_agreement": float((a["op_logits"].argmax(1) == b["op_logits"].argmax(1)).mean()),
           "op_logits_max_abs_diff": float(np.abs(a["op_logits"] - b["op_logits"]).max()),
           "fingerprint_min_cosine": float((a["fingerprint"] * b["fingerprint"]).sum(1).min())}
    if ref.can_decode and other.can_decode:
        out["greedy_identical"] = float((ref.predict_arrays(cont, cat)[0] == other.predict_arrays(cont, cat)[0])
                                        .all(axis=1).mean())
    return out


def accuracy(pred: OnnxPredictor, dataset, split: str = "test", max_windows: int | None = None,
             batch_size: int = 512) -> dict:
    """Operation accuracy, token accuracy (greedy and teacher-forced) and exact-line match on a split,
    with the definitions of gcodefp_core.evaluate (targets: tokens after BOS, EOS in, PAD out)."""
    ids = dataset.split_windows(split)
    if max_windows and len(ids) > max_windows:
        ids = ids[np.linspace(0, len(ids) - 1, max_windows).astype(np.int64)]
    if len(ids) == 0:
        raise ValueError(f"dataset {dataset.path}: split {split!r} has no windows")
    op_ok = tok_ok = tf_ok = n_tok = exact = 0
    lines = dataset.target_lines(ids)
    for s in range(0, len(ids), batch_size):
        b = dataset.batch(ids[s:s + batch_size])
        target = b["tokens"][:, 1:]
        mask = target != 0
        tokens, op_logits, _ = pred.predict_arrays(b["continuous"], b["categorical"])
        width = min(tokens.shape[1], target.shape[1])
        got = np.zeros_like(target)
        got[:, :width] = tokens[:, :width]
        op_ok += int((op_logits.argmax(1) == b["operation"]).sum())
        tok_ok += int(((got == target) & mask).sum())
        n_tok += int(mask.sum())
        exact += sum(p["gcode"] == t for p, t in zip(pred.predict(b["continuous"], b["categorical"]), lines[s:s + batch_size]))
        enc = pred.encode(b["continuous"], b["categorical"])
        state = {"h": enc["h0"], "memory": enc["memory"]}
        for t in range(target.shape[1]):  # teacher forcing through the decoder graph
            logits, state = pred.step(np.ascontiguousarray(b["tokens"][:, t]), state)
            tf_ok += int(((logits.argmax(1) == target[:, t]) & mask[:, t]).sum())
    n = len(ids)
    return {"windows": n, "op_acc": op_ok / n, "token_acc_greedy": tok_ok / max(n_tok, 1),
            "token_acc_tf": tf_ok / max(n_tok, 1), "exact_match": exact / n}


def batch1_latency_ms(pred: OnnxPredictor, cont: np.ndarray, cat: np.ndarray, iterations: int = 200) -> dict:
    c, k = cont[:1], cat[:1]
    for _ in range(20):
        pred.predict_arrays(c, k)
    times = []
    for i in range(iterations):
        t = time.perf_counter()
        pred.predict_arrays(c, k)
        times.append(time.perf_counter() - t)
    return {"median": float(np.median(times) * 1e3), "p95": float(np.percentile(times, 95) * 1e3)}


def compare_variants(model_json: str | Path, output_dir: str | Path, dataset: str | Path,
                     calibration_dataset: str | Path | None = None, split: str = "test",
                     max_windows: int | None = None, latency_iterations: int = 200) -> dict:
    """Write every variant (`<output_dir>/<variant>/model.json`; fp32 copied in) and compare them on
    the dataset's split against fp32. Writes and returns quantization_results.json."""
    from .dataset import load_dataset

    meta, _, meta_path = read_model_json(model_json)
    output_dir = Path(output_dir)
    ds = load_dataset(dataset)
    sample_windows(meta, dataset, 1)  # fails early, naming the dataset, if it does not fit the model
    fp32_dir = output_dir / REFERENCE
    fp32_dir.mkdir(parents=True, exist_ok=True)
    for file in meta["files"].values():
        shutil.copy2(meta_path.parent / file, fp32_dir / file)
    write_model_json(fp32_dir / "model.json", meta)
    metas = {REFERENCE: meta}
    for name in QUANTIZED:
        metas[name] = quantize_model(fp32_dir / "model.json", output_dir / name / "model.onnx", name,
                                     calibration_dataset or dataset)
    cont, cat, _ = sample_windows(meta, dataset, 64)
    results: dict = {"dataset": str(ds.path), "split": split, "variants": {}}
    for variant, m in metas.items():
        pred = OnnxPredictor.load(output_dir / variant)
        results["variants"][variant] = {
            "model_json": str(output_dir / variant / "model.json"), "size_bytes": m["total_size_bytes"],
            "size_ratio_vs_fp32": m["total_size_bytes"] / meta["total_size_bytes"],
            "latency_batch1_ms": batch1_latency_ms(pred, cont, cat, latency_iterations),
            "accuracy": accuracy(pred, ds, split, max_windows)}
    base = results["variants"][REFERENCE]["accuracy"]
    for name, r in results["variants"].items():
        drops = {k: 100 * (base[k] - r["accuracy"][k]) for k in ("op_acc", "token_acc_greedy", "token_acc_tf", "exact_match")}
        r["drop_points_vs_fp32"] = drops
        variant = VARIANTS[name]
        if variant.max_drop_points is None:
            continue
        bar = variant.max_drop_points
        checks = {"op_acc": drops["op_acc"] <= bar, "token_acc": max(drops["token_acc_greedy"], drops["token_acc_tf"]) <= bar}
        if variant.max_size_ratio is not None:
            checks["size"] = r["size_ratio_vs_fp32"] <= variant.max_size_ratio
        r["bars"] = {"max_drop_points": bar, "checks": checks, "passed": all(checks.values())}
    write_json(output_dir / "quantization_results.json", results)
    return results
