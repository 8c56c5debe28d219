"""Latency and throughput of the model formats (PyTorch eager, ONNX fp32/fp16/int8) in one run.

Per format and batch size, timings after warm-up:
- "full":    the model's whole answer as the server computes it (OnnxPredictor.predict_arrays with
             the default method): for a model with a line head, one forward pass that picks the
             line among the predicted program's lines (PyTorch: model.predict_line), snapped onto
             the program path when the model has one (the same numpy on both sides); otherwise as
             "decoder";
- "decoder": encode + decode a whole G-code line greedily, stopping at EOS: the same loop
             (gcodefp_core.runtime.decoding.greedy) over PyTorch eager steps or over the ONNX decoder graph;
- "encoder": the encoder alone (operation logits, fingerprint, decoder memory).
Latency statistics are per call (ms); throughput = windows / total timed seconds; speedup is against
PyTorch eager at the same batch size and mode, measured in the same run. Memory: the process peak
RSS while a format loads and runs (Linux VmHWM, reset per format through /proc/self/clear_refs) and
its growth over the RSS before loading (peak_delta_mb). In one process the delta understates what a
format needs when the allocator reuses memory freed by the previous format; the first format
(PyTorch, with torch already imported) and a fresh server process are the honest figures.
Both runtimes get the same thread count (default 1, the server's setting).
"""
from __future__ import annotations

import gc
import os
import platform
import time
from pathlib import Path

import numpy as np

from .variants import LABELS

VARIANT_FORMAT = LABELS                                   # variant -> its column
FORMATS = ("pytorch",) + tuple(VARIANT_FORMAT.values())
MODES = ("full", "decoder", "encoder")
STAT_FIELDS = ("mean_ms", "median_ms", "std_ms", "min_ms", "max_ms", "p95_ms", "p99_ms", "throughput_wps")
# The component bars this benchmark reports against (median, batch 1, same run): the model must
# stay a small part of a served request.
BAR_FULL_MS, BAR_SPEEDUP, BAR_THROUGHPUT = 2.0, 4.0, 2000.0


def latency_stats(seconds: list[float], batch: int) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"mean_ms": float(ms.mean()), "median_ms": float(np.median(ms)), "std_ms": float(ms.std()),
            "min_ms": float(ms.min()), "max_ms": float(ms.max()), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "throughput_wps": float(batch * len(ms) / (ms.sum() / 1e3)),
            "iterations": int(len(ms))}


def time_calls(fn, warmup: int, iterations: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iterations):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _status_kb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _torch_runner(checkpoint: str | Path, device: str, threads: int):
    import torch

    from .checkpoints import load_checkpoint
    from .model import TorchStep
    from .runtime import decoding

    torch.set_num_threads(threads)
    model, bundle, ckpt = load_checkpoint(checkpoint, map_location=device)
    step, max_len = TorchStep(model), model.cfg.max_decode_len
    path, op_program = bundle.program_path, model.op_program.cpu().numpy()

    def run(mode: str, cont: np.ndarray, cat: np.ndarray):
        c, k = torch.as_tensor(cont, device=device), torch.as_tensor(cat, device=device)

        def call():
            with torch.inference_mode():
                if mode == "full" and model.cfg.n_lines:  # numpy out, snapped onto the program path, as the runtime
                    out = [t.cpu().numpy() for t in model.predict_line(c, k)]
                    if path is not None:
                        program = op_program[out[2].argmax(1)]
                        out[0], out[1], _ = path.snap(program, cont[:, -1], out[0], out[1])
                elif mode in ("full", "decoder"):  # numpy in, numpy out, as the runtime
                    state = step.initial_state(cont, cat)[0]
                    out = decoding.greedy(step, state, len(cont), max_len)
                else:
                    out = model.encode(c, k)
            if device != "cpu":
                torch.cuda.synchronize()
            return out
        return call
    return run, ckpt


def _onnx_runner(model_json: str | Path, device: str, threads: int):
    from .runtime import OnnxPredictor

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    pred = OnnxPredictor.load(model_json, intra_op_threads=threads, providers=providers)

    def run(mode: str, cont: np.ndarray, cat: np.ndarray):
        if mode == "encoder":
            return lambda: pred.encode(cont, cat)
        if mode == "full":
            return lambda: pred.predict_arrays(cont, cat)
        return lambda: pred.predict_arrays(cont, cat, method="greedy")
    return run, pred.metadata


def run_benchmark(checkpoint: str | Path | None = None, onnx: str | Path | None = None,
                  variants: dict[str, str | Path] | None = None, batch_sizes=(1, 2, 4, 8, 16), device: str = "cpu",
                  warmup: int = 20, iterations: int = 200, threads: int = 1, dataset: str | Path | None = None,
                  modes=("full", "encoder")) -> dict:
    """Benchmark the PyTorch checkpoint and/or ONNX variants ({variant: model.json}; `onnx` adds one).
    Without a checkpoint, the one recorded in the ONNX model.json is used as baseline if it exists."""
    from .export import sample_windows
    from .runtime import read_model_json

    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device: unknown {device!r}; choose cpu or cuda")
    if device == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError("--device cuda: this onnxruntime build has no CUDAExecutionProvider")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes: unknown {bad}; choose from {MODES}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"--batch-sizes must be positive integers, got {list(batch_sizes)}")
    models: dict[str, Path] = {}
    for variant, path in (variants or {}).items():
        models[VARIANT_FORMAT.get(variant, variant)] = Path(path)
    if onnx is not None:
        models[VARIANT_FORMAT[read_model_json(onnx)[0]["variant"]]] = Path(onnx)
    unknown = [f for f in models if f not in FORMATS]
    if unknown:
        raise ValueError(f"variants: unknown {unknown}; known: {list(VARIANT_FORMAT)}")
    meta = read_model_json(next(iter(models.values())))[0] if models else None
    if checkpoint is None and meta and Path(meta["source_checkpoint"]["path"]).is_file():
        checkpoint = meta["source_checkpoint"]["path"]
    if checkpoint is None and not models:
        raise ValueError("nothing to benchmark: give a checkpoint and/or ONNX models")
    if meta is None:
        import torch

        ref = torch.load(checkpoint, map_location="cpu", weights_only=True)["dataset"]
        meta = {"features": ref["features"], "window": ref["window"], "operations": ref["operations"]}
    cont, cat, source = sample_windows(meta, dataset, max(batch_sizes), split="test")
    if len(cont) < max(batch_sizes):  # a small test split: tile it
        reps = -(-max(batch_sizes) // len(cont))
        cont, cat = np.concatenate([cont] * reps), np.concatenate([cat] * reps)
    result = {"device": device, "threads": threads, "batch_sizes": list(batch_sizes), "modes": list(modes),
              "warmup": warmup, "iterations": iterations, "data": source, "environment": _environment(),
              "formats": {}}
    order = (["pytorch"] if checkpoint is not None else []) + [f for f in FORMATS if f in models]
    for fmt in order:
        reset = _reset_peak_rss()
        rss_before = _status_kb("VmRSS")
        run, _ = _torch_runner(checkpoint, device, threads) if fmt == "pytorch" else _onnx_runner(models[fmt], device, threads)
        entry: dict = {"source": str(checkpoint if fmt == "pytorch" else models[fmt])}
        for mode in modes:
            entry[mode] = {}
            for b in batch_sizes:
                c, k = np.ascontiguousarray(cont[:b]), np.ascontiguousarray(cat[:b])
                entry[mode][str(b)] = latency_stats(time_calls(run(mode, c, k), warmup, iterations), b)
        peak = _status_kb("VmHWM")
        entry["memory"] = {"peak_rss_mb": peak / 1024 if peak else None,
                           "rss_before_mb": rss_before / 1024 if rss_before else None,
                           # what loading and running this format added on top of the process
                           "peak_delta_mb": max(0.0, (peak - rss_before) / 1024) if reset and peak and rss_before else None}
        result["formats"][fmt] = entry
        del run
        gc.collect()
    _add_speedups(result)
    result["summary"] = summarise(result)
    result["environment"]["loadavg_end"] = _loadavg()
    return result


def _add_speedups(result: dict) -> None:
    base = result["formats"].get("pytorch")
    for fmt, entry in result["formats"].items():
        for mode in result["modes"]:
            for b, stats in entry.get(mode, {}).items():
                ref = (base or {}).get(mode, {}).get(b)
                stats["speedup_vs_pytorch"] = ref["median_ms"] / stats["median_ms"] if ref else None


def summarise(result: dict) -> dict:
    """Best format at batch 1 (full prediction median) and the component bars."""
    rows = {f: e["full"]["1"] for f, e in result["formats"].items() if "full" in e and "1" in e["full"]}
    onnx_rows = {f: r for f, r in rows.items() if f != "pytorch"}
    if not onnx_rows:
        return {"best_format": None}
    best = min(onnx_rows, key=lambda f: onnx_rows[f]["median_ms"])
    throughput = max(s["throughput_wps"] for s in result["formats"][best]["full"].values())
    out = {"best_format": best, "best_full_batch1_median_ms": onnx_rows[best]["median_ms"],
           "best_speedup_vs_pytorch_batch1": onnx_rows[best]["speedup_vs_pytorch"],
           "best_max_throughput_wps": throughput}
    out["bars"] = {"full_batch1_median_ms<=2": onnx_rows[best]["median_ms"] <= BAR_FULL_MS,
                   "speedup>=4": (onnx_rows[best]["speedup_vs_pytorch"] or 0) >= BAR_SPEEDUP,
                   "throughput>=2000": throughput >= BAR_THROUGHPUT}
    return out


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _environment() -> dict:
    import onnxruntime

    env = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
           "onnxruntime": onnxruntime.__version__, "loadavg_start": _loadavg()}
    try:
        import torch

        env["torch"] = torch.__version__
    except ImportError:
        pass
    return env


def format_table(result: dict) -> str:
    """The comparison table: one row per format and batch size."""
    extra = [m for m in ("decoder",) if m in result["modes"]]  # a column pair each
    head = (f"{'format':<14}{'batch':>6}{'full med ms':>13}{'p99 ms':>9}{'windows/s':>11}{'speedup':>9}"
            f"{'enc med ms':>12}{'enc speedup':>13}{'+peak MB':>9}"
            + "".join(f"{m.split('_')[-1][:5] + ' ms':>10}{m.split('_')[-1][:5] + ' spd':>11}" for m in extra))
    lines = [head, "-" * len(head)]
    for fmt, e in result["formats"].items():
        for b in map(str, result["batch_sizes"]):
            f, enc = e.get("full", {}).get(b), e.get("encoder", {}).get(b)

            def num(x, spec):
                return format(x, spec) if x is not None else "-".rjust(int(spec.split(".")[0]))
            lines.append(f"{fmt:<14}{b:>6}{num(f and f['median_ms'], '13.3f')}{num(f and f['p99_ms'], '9.3f')}"
                         f"{num(f and f['throughput_wps'], '11.0f')}{num(f and f['speedup_vs_pytorch'], '9.2f')}"
                         f"{num(enc and enc['median_ms'], '12.3f')}{num(enc and enc['speedup_vs_pytorch'], '13.2f')}"
                         f"{num(e['memory']['peak_delta_mb'], '9.1f')}"
                         + "".join(num(e.get(m, {}).get(b, {}).get("median_ms"), "10.3f")
                                   + num(e.get(m, {}).get(b, {}).get("speedup_vs_pytorch"), "11.2f") for m in extra))
    s = result.get("summary", {})
    if s.get("best_format"):
        lines.append(f"best: {s['best_format']} {s['best_full_batch1_median_ms']:.3f} ms at batch 1, "
                     f"{(s['best_speedup_vs_pytorch_batch1'] or float('nan')):.1f}x PyTorch eager, "
                     f"max {s['best_max_throughput_wps']:.0f} windows/s; bars: "
                     + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in s["bars"].items()))
    return "\n".join(lines)
