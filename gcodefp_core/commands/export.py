"""`gcodefp export`, `gcodefp quantize` and `gcodefp benchmark`: thin wrappers over
gcodefp_core.export / quantize / benchmark (which return dicts and never print)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from gcodefp_core.variants import METHODS


def register(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX and verify it against PyTorch",
                       description="Export the predict (line head), encoder, decoder step and encoder-only graphs plus "
                                   "model.json; verification (onnx.checker + PyTorch vs onnxruntime) runs "
                                   "automatically and a failure exits non-zero.")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint_best.pt from gcodefp train")
    p.add_argument("--output", "-o", type=Path, required=True,
                   help="DIR/model.onnx: writes DIR/model.<graph>.onnx and DIR/model.json")
    p.add_argument("--encoder-only", action="store_true", help="only operation logits + fingerprint")
    p.add_argument("--batch-size", type=int, help="fixed batch size instead of the default dynamic batch axis")
    p.add_argument("--seq-len", type=int, help="rows per window (must equal the trained window)")
    p.add_argument("--opset", type=int, help="ONNX opset (default 20)")
    p.add_argument("--dataset", type=Path, help="verify on this dataset's test windows (default: synthetic logs)")
    p.add_argument("--verify-windows", type=int, default=1024, help="windows compared (default 1024)")
    p.set_defaults(handler=_export)

    p = sub.add_parser("quantize", help="fp16 / int8 / int8-static variants of an exported model",
                       description="Write a quantized variant of an fp32 export; --compare writes all "
                                   "variants (one folder each) and quantization_results.json.")
    p.add_argument("--model", type=Path, required=True, help="the fp32 model.json (or its folder)")
    p.add_argument("--output", "-o", type=Path, required=True,
                   help="DIR/model.onnx for one variant; a folder with --compare")
    p.add_argument("--method", choices=list(METHODS), help="required unless --compare")
    p.add_argument("--calibration-data", type=Path,
                   help="dataset folder: train windows calibrate int8-static, test windows score --compare")
    p.add_argument("--compare", action="store_true", help="all variants + accuracy/size/latency vs fp32")
    p.add_argument("--max-windows", type=int, help="cap on test windows scored by --compare")
    p.set_defaults(handler=_quantize)

    p = sub.add_parser("benchmark", help="latency/throughput of PyTorch vs ONNX variants",
                       description="Time full predictions (encode + greedy line) and the encoder alone per "
                                   "format and batch size; prints the table and writes JSON.")
    p.add_argument("--checkpoint", type=Path, help="PyTorch checkpoint (the eager baseline)")
    p.add_argument("--onnx", type=Path, help="a model.json (any variant)")
    p.add_argument("--compare-all", action="store_true",
                   help="pytorch + every variant (from --variants-dir, or built now)")
    p.add_argument("--variants-dir", type=Path, help="folder of <variant>/model.json (quantize --compare output)")
    p.add_argument("--dataset", type=Path, help="windows from this dataset (default: synthetic logs)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for both runtimes (default 1)")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--output", "-o", type=Path, default=Path("results/benchmark.json"))
    p.set_defaults(handler=_benchmark)


def _export(args) -> int:
    from gcodefp_core.export import export_checkpoint

    meta = export_checkpoint(args.checkpoint, args.output, encoder_only=args.encoder_only,
                             batch_size=args.batch_size, seq_len=args.seq_len, opset=args.opset,
                             verify_windows=args.verify_windows, dataset=args.dataset)
    par = meta["parity"]
    print(f"exported {meta['kind']} model ({meta['parameter_count']:,} parameters, opset {meta['opset']}, "
          f"{meta['total_size_bytes'] / 1e6:.2f} MB): {', '.join(meta['files'].values())}")
    print(f"verification on {par['data']}: " + ", ".join(f"{k} {v:.1e}" for k, v in par["max_abs_diff"].items())
          + "".join(f"; {k} identical {100 * v:.2f}%" for k, v in par.get("greedy_identical", {}).items()) + ": PASSED")
    return 0


def _quantize(args) -> int:
    from gcodefp_core.quantize import compare_variants, quantize_model

    if args.compare:
        if args.calibration_data is None:
            raise ValueError("--compare scores accuracy on a dataset's test split: give --calibration-data DIR")
        res = compare_variants(args.model, args.output, args.calibration_data, max_windows=args.max_windows)
        print(f"{'variant':<14}{'size MB':>9}{'ratio':>7}{'b1 ms':>8}{'op acc':>8}{'tok acc':>9}{'tf acc':>8}"
              f"{'exact':>8}  bars")
        for v, r in res["variants"].items():
            a = r["accuracy"]
            bars = "-" if "bars" not in r else ("PASS" if r["bars"]["passed"] else
                                                "FAIL " + ",".join(k for k, ok in r["bars"]["checks"].items() if not ok))
            print(f"{v:<14}{r['size_bytes'] / 1e6:>9.2f}{r['size_ratio_vs_fp32']:>7.2f}"
                  f"{r['latency_batch1_ms']['median']:>8.3f}{100 * a['op_acc']:>8.2f}{100 * a['token_acc_greedy']:>9.2f}"
                  f"{100 * a['token_acc_tf']:>8.2f}{100 * a['exact_match']:>8.2f}  {bars}")
        print(f"wrote {Path(args.output) / 'quantization_results.json'}")
        return 0
    if args.method is None:
        raise ValueError(f"--method is required ({', '.join(METHODS)}) unless --compare is given")
    meta = quantize_model(args.model, args.output, args.method, args.calibration_data)
    q, par = meta["quantization"], meta["parity"]
    print(f"{meta['variant']}: {', '.join(meta['files'].values())} ({meta['total_size_bytes'] / 1e6:.2f} MB, "
          f"{100 * q['size_ratio_vs_fp32']:.0f}% of fp32); vs fp32 on {par['windows']} windows: "
          f"operation agreement {100 * par['op_agreement']:.2f}%"
          + (f", greedy identical {100 * par['greedy_identical']:.2f}%" if "greedy_identical" in par else ""))
    return 0


def _benchmark(args) -> int:
    from gcodefp_core.benchmark import format_table, run_benchmark
    from gcodefp_core.export import write_json

    if not (args.checkpoint or args.onnx or args.compare_all):
        raise ValueError("give --checkpoint, --onnx or --compare-all")
    variants = None
    with tempfile.TemporaryDirectory(prefix="gcodefp-bench-") as work:
        if args.compare_all:
            variants = _all_variants(args, Path(work))
        res = run_benchmark(args.checkpoint, None if args.compare_all else args.onnx, variants, args.batch_sizes,
                            args.device, args.warmup, args.iterations, args.threads, args.dataset,
                            ("full", "encoder"))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, res)
    print(format_table(res))
    print(f"wrote {args.output}")
    return 0


def _all_variants(args, work: Path) -> dict:
    """{variant: model.json}: from --variants-dir, else exported/quantized into `work` now."""
    from gcodefp_core.quantize import quantize_model
    from gcodefp_core.variants import QUANTIZED, REFERENCE

    if args.variants_dir:
        found = {d.name: d / "model.json" for d in sorted(args.variants_dir.iterdir()) if (d / "model.json").is_file()}
        if not found:
            raise FileNotFoundError(f"--variants-dir {args.variants_dir}: no <variant>/model.json inside")
        return found
    fp32 = args.onnx
    if fp32 is None:
        if args.checkpoint is None:
            raise ValueError("--compare-all needs --variants-dir, --onnx (fp32) or --checkpoint")
        from gcodefp_core.export import export_checkpoint

        export_checkpoint(args.checkpoint, work / REFERENCE / "model.onnx", dataset=args.dataset)
        fp32 = work / REFERENCE / "model.json"
    out = {REFERENCE: Path(fp32)}
    for variant in QUANTIZED:
        quantize_model(fp32, work / variant / "model.onnx", variant, args.dataset)
        out[variant] = work / variant / "model.json"
    return out

