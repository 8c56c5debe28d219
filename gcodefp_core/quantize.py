"""Quantized variants of an exported model (fp16, int8 dynamic, int8 static QDQ) and their comparison.

A variant is a set of graphs plus its own model.json ("variant": fp16 | int8_dynamic | int8_static),
written with the export's naming (`DIR/<stem>.<graph>.onnx` + `DIR/<stem>.json`). `compare_variants`
writes one folder per variant (`<out>/<variant>/model.json`), the layout the package builder takes.

Choices (measured on the real-data model, 2 shared cores): int8 graphs are pre-processed with
onnxruntime's quant_pre_process (shape inference + fusions; without it some ops stay float).
int8 dynamic quantizes MatMul/Gemm/Conv/Gather per channel: 28% of fp32, accuracy within 0.1
point, but ~2x slower than fp32 on this CPU (ConvInteger and per-call activation quantization cost
more than they save on matrices this small) -- it is the size variant. int8 static (QDQ) quantizes
MatMul/Gemm/Conv only (quantizing every op has broken masks and softmaxes in decoders), Percentile
calibration, input projection and embedding lookup left float (a Gather reading a dequantized
table re-dequantizes it at every decoder step: 10x slower steps): the fastest variant (QLinearConv/
MatMul fusions), but ~0.5 point of token accuracy lost and 52% of fp32 size. fp16 keeps float32 inputs/outputs so callers need not
change; on the CPU provider it is a size artifact (ORT inserts casts; slower than fp32), for GPUs.
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

from .export import graph_signature, sample_windows, sha256_file, stem_paths, write_json
from .runtime import OnnxPredictor, read_metadata

METHODS = {"fp16": "fp16", "int8": "int8_dynamic", "int8-static": "int8_static"}
STATIC_OP_TYPES = ["MatMul", "Gemm", "Conv"]
# Percentile (99.999%) ranges: one outlier window no longer stretches an activation's whole int8 scale
# (MinMax lost more operation/greedy agreement on the tiny test model); Entropy crashed on masks.
STATIC_CALIBRATION = "Percentile"
MIN_CALIBRATION_WINDOWS = 100
# Bars from the issue: accuracy points lost against fp32, and int8 size against fp32.
MAX_DROP_POINTS = {"fp16": 0.1, "int8_dynamic": 0.5, "int8_static": 0.5}
MAX_INT8_SIZE_RATIO = 0.30


class CalibrationReader:
    """onnxruntime CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict]):
        self._feeds, self._next = feeds, 0

    def get_next(self):
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return self._feeds[self._next - 1]

    def rewind(self):
        self._next = 0


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


def _isolate_outputs(model):
    """Give every graph output its own Identity node. The fp16 converter's keep_io_types mis-types a
    graph output that other nodes also read (the decoder's h_next feeds the attention), and its
    stale value_info types trip onnxruntime's type check, so both are cleared up front."""
    import onnx

    outs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name in outs:
                    names[i] = f"{name}__inner"
    model.graph.node.extend(onnx.helper.make_node("Identity", [f"{o}__inner"], [o]) for o in sorted(outs))
    del model.graph.value_info[:]
    return model


def _prepare_for_quantization(model, share_gather: bool = True):
    """Store every constant Gemm weight read with transB=1 pre-transposed (transB=0). The quantizer
    otherwise transposes such an initializer itself, which breaks when it is shared: by the greedy
    graph's unrolled steps (transposed once per step) or by the tied token embedding's Gather (which
    then reads the wrong rows). Also drops the exporter's value_info, whose stale shapes the
    quantizer's shape inference rejects."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    transposed: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        trans_b = next((a for a in node.attribute if a.name == "transB"), None)
        if trans_b is None or trans_b.i != 1:
            continue
        name = node.input[1]
        if name not in transposed:
            weight = numpy_helper.to_array(inits[name])
            transposed[name] = f"{name}__T"
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), transposed[name]))
        node.input[1] = transposed[name]
        trans_b.i = 0
    # A Gather of a weight that now also exists transposed (the tied token embedding) reads the
    # transposed copy along axis 1 and transposes back: one int8 table instead of two. Not for QDQ:
    # there the Gather would read DequantizeLinear(whole table), re-run at every decoder step (10x slower).
    extra = []
    for node in model.graph.node if share_gather else []:
        if node.op_type == "Gather" and node.input[0] in transposed and not any(a.name == "axis" and a.i for a in node.attribute):
            out = node.output[0]
            node.input[0] = transposed[node.input[0]]
            node.output[0] = f"{out}__DxB"
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("axis", 1))
            extra.append((node, onnx.helper.make_node("Transpose", [f"{out}__DxB"], [out], perm=[1, 0])))
    for node, transpose in reversed(extra):  # keep the node list topologically sorted
        model.graph.node.insert(list(model.graph.node).index(node) + 1, transpose)
    used = {x for n in model.graph.node for x in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    del model.graph.value_info[:]
    return model


def _quantize_graph(src: Path, dst: Path, variant: str, feeds: list[dict] | None, work: Path) -> None:
    import onnx

    tmp = dst.with_name(f".{dst.name}.tmp")
    if variant == "fp16":
        from onnxconverter_common import float16

        with warnings.catch_warnings():  # "1e-12 will be truncated to 1e-07": F.normalize's eps, harmless
            warnings.simplefilter("ignore")
            model = float16.convert_float_to_float16(_isolate_outputs(onnx.load(str(src))), keep_io_types=True)
        onnx.save(model, str(tmp))
    else:
        from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process

        clean, pre = work / f"{src.stem}.clean.onnx", work / f"{src.stem}.pre.onnx"
        onnx.save(_prepare_for_quantization(onnx.load(str(src)), share_gather=variant == "int8_dynamic"), str(clean))
        try:
            quant_pre_process(str(clean), str(pre))
        except Exception:  # symbolic shape inference cannot follow F.normalize's Expand; ONNX's can
            quant_pre_process(str(clean), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
        del model.graph.value_info[:]
        onnx.save(model, str(pre))
        # Shape inference loses some element types inside the unrolled greedy loop; all are float.
        extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
        if variant == "int8_dynamic":
            quantize_dynamic(str(pre), str(tmp), weight_type=QuantType.QInt8, per_channel=True, extra_options=extra)
        else:
            # The input projection stays float: ~170 sensor channels with their own scales do not share
            # one calibrated uint8 range (quantizing it cost 4-5 points of operation agreement).
            keep_float = [n.name for n in model.graph.node if "continuous" in n.input]
            with contextlib.redirect_stdout(io.StringIO()):  # the percentile calibrator prints its progress
                quantize_static(str(pre), str(tmp), CalibrationReader(feeds), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=STATIC_OP_TYPES, per_channel=True, nodes_to_exclude=keep_float,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, extra_options=extra,
                                calibrate_method=getattr(CalibrationMethod, STATIC_CALIBRATION))
    onnx.checker.check_model(str(tmp))
    tmp.replace(dst)


def quantize_model(model_json_or_onnx: str | Path, output: str | Path, method: str,
                   calibration_dataset: str | Path | None = None, calibration_windows: int = 256) -> dict:
    """Write the `method` variant of an fp32 export next to `output`; returns its model.json dict."""
    if method not in METHODS and method not in METHODS.values():
        raise ValueError(f"--method: unknown {method!r}; choose one of {', '.join(METHODS)}")
    variant = METHODS.get(method, method)
    meta, meta_path = read_metadata(model_json_or_onnx)
    if meta["variant"] != "fp32":
        raise ValueError(f"{meta_path}: quantize an fp32 export, not a {meta['variant']} variant")
    if meta.get("batch_size"):
        raise ValueError(f"{meta_path}: quantize a dynamic-batch export (this one takes batches of {meta['batch_size']})")
    folder, stem = stem_paths(output)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    fp32 = OnnxPredictor(meta, meta_path.parent)
    calib = None
    if variant == "int8_static":
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
    out = dict(meta, variant=variant, files=files,
               graphs={n: graph_signature(folder / f) for n, f in files.items()},
               file_sizes={n: (folder / f).stat().st_size for n, f in files.items()})
    out["total_size_bytes"] = sum(out["file_sizes"].values())
    out["quantization"] = {"method": method, "variant": variant, "source": str(meta_path.resolve()),
                           "source_sha256": {n: sha256_file(meta_path.parent / f) for n, f in meta["files"].items()},
                           "pre_processed": variant != "fp16", "calibration": calib,
                           "size_ratio_vs_fp32": out["total_size_bytes"] / meta["total_size_bytes"],
                           "seconds": round(time.perf_counter() - t0, 2)}
    cont, cat, source = sample_windows(meta, calibration_dataset, 512, split="test")
    out["parity"] = agreement(fp32, OnnxPredictor(out, folder), cont, cat) | {"reference": "fp32 ONNX", "data": source}
    write_json(folder / f"{stem}.json", out)
    return out


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

    meta, meta_path = read_metadata(model_json)
    output_dir = Path(output_dir)
    ds = load_dataset(dataset)
    sample_windows(meta, dataset, 1)  # fails early, naming the dataset, if it does not fit the model
    fp32_dir = output_dir / "fp32"
    fp32_dir.mkdir(parents=True, exist_ok=True)
    for file in meta["files"].values():
        shutil.copy2(meta_path.parent / file, fp32_dir / file)
    write_json(fp32_dir / "model.json", meta)
    metas = {"fp32": meta}
    for method, variant in METHODS.items():
        metas[variant] = quantize_model(fp32_dir / "model.json", output_dir / variant / "model.onnx", method,
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
    base = results["variants"]["fp32"]["accuracy"]
    for variant, r in results["variants"].items():
        drops = {k: 100 * (base[k] - r["accuracy"][k]) for k in ("op_acc", "token_acc_greedy", "token_acc_tf", "exact_match")}
        r["drop_points_vs_fp32"] = drops
        if variant == "fp32":
            continue
        bar = MAX_DROP_POINTS[variant]
        checks = {"op_acc": drops["op_acc"] <= bar, "token_acc": max(drops["token_acc_greedy"], drops["token_acc_tf"]) <= bar}
        if variant.startswith("int8"):
            checks["size"] = r["size_ratio_vs_fp32"] <= MAX_INT8_SIZE_RATIO
        r["bars"] = {"max_drop_points": bar, "checks": checks, "passed": all(checks.values())}
    write_json(output_dir / "quantization_results.json", results)
    return results
