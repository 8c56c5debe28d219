"""Reproduce the inference comparison table (formats x batch sizes) on a trained model.

    python benchmarks/inference.py --checkpoint runs/model_seed42/checkpoint_best.pt [--dataset DIR]
    python benchmarks/inference.py --synthetic-demo      # no trained model: a short synthetic training first

Steps: export (verified against PyTorch) -> fp16 / int8 dynamic / int8 static variants with accuracy
on the dataset's test split (quantization_results.json) -> latency/throughput of PyTorch eager and
every variant at batch sizes 1..16 in one run (benchmark.json). Without --checkpoint, the newest
checkpoint_best.pt under models/ or artifacts/ whose training data was real is used.
The dataset defaults to the one recorded in the checkpoint (when it still exists).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def find_real_checkpoint() -> Path | None:
    import torch

    found = []
    for root in (REPO / "models", REPO / "artifacts"):
        for path in root.glob("**/checkpoint_best.pt") if root.is_dir() else []:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if ckpt.get("config", {}).get("data", {}).get("source", "synthetic") != "synthetic":
                found.append(path)
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def synthetic_demo(work: Path) -> tuple[Path, Path]:
    """Production-size model trained briefly on synthetic logs (timings are about size, not accuracy)."""
    from gcodefp_core.config import load_config
    from gcodefp_core.dataset import build_synthetic_dataset, load_dataset
    from gcodefp_core.train import train_model

    ds_dir = build_synthetic_dataset(work / "dataset", runs_per_operation=2, window=64)
    cfg = load_config(REPO / "configs" / "production.json")
    cfg["train"].update(epochs=2, samples_per_epoch=4096, max_minutes=3, num_threads=1)
    cfg["wandb"] = {"mode": "disabled"}
    train_model(cfg, load_dataset(ds_dir), work / "run", seed=0)
    return work / "run" / "checkpoint_best.pt", ds_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--dataset", type=Path, help="dataset the model was trained on (test split scores variants)")
    p.add_argument("--synthetic-demo", action="store_true", help="train a model on synthetic logs first")
    p.add_argument("--work", type=Path, default=REPO / "artifacts" / "inference_benchmark")
    p.add_argument("--output", type=Path, default=REPO / "results" / "benchmark.json")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--max-windows", type=int, default=3000, help="test windows scored per variant")
    args = p.parse_args(argv)

    from gcodefp_core.benchmark import format_table, run_benchmark
    from gcodefp_core.export import export_checkpoint, write_json
    from gcodefp_core.quantize import compare_variants, quantize_model
    from gcodefp_core.variants import QUANTIZED, REFERENCE

    ckpt, dataset = args.checkpoint, args.dataset
    if args.synthetic_demo:
        ckpt, dataset = synthetic_demo(args.work / "demo")
    ckpt = ckpt or find_real_checkpoint()
    if ckpt is None:
        p.error("no checkpoint trained on real data under models/ or artifacts/: pass --checkpoint or --synthetic-demo")
    if dataset is None:
        import torch

        recorded = Path(torch.load(ckpt, map_location="cpu", weights_only=True)["dataset"]["path"])
        dataset = recorded if (recorded / "manifest.json").is_file() else None
    print(f"checkpoint {ckpt}\ndataset {dataset or '(none: synthetic windows, no accuracy)'}")

    meta = export_checkpoint(ckpt, args.work / "export" / "model.onnx", dataset=dataset)
    print(f"export: {meta['parameter_count']:,} parameters, parity {meta['parity']['max_abs_diff']}, "
          f"identical answers {meta['parity']['greedy_identical']}")
    variants_dir = args.work / "variants"
    if dataset is not None:
        res = compare_variants(args.work / "export" / "model.json", variants_dir, dataset, max_windows=args.max_windows)
        for v, r in res["variants"].items():
            a, d = r["accuracy"], r["drop_points_vs_fp32"]
            print(f"{v:<13} {r['size_bytes'] / 1e6:6.2f} MB ({100 * r['size_ratio_vs_fp32']:3.0f}%)  "
                  f"op {100 * a['op_acc']:.2f} ({-d['op_acc']:+.2f})  tok {100 * a['token_acc_greedy']:.2f} "
                  f"({-d['token_acc_greedy']:+.2f})  tf {100 * a['token_acc_tf']:.2f} ({-d['token_acc_tf']:+.2f})  "
                  f"exact {100 * a['exact_match']:.2f}  bars {r.get('bars', {}).get('passed', '-')}")
    else:
        for variant in QUANTIZED:
            quantize_model(args.work / "export" / "model.json", variants_dir / variant / "model.onnx", variant)
    variants = {d.name: d / "model.json" for d in sorted(variants_dir.iterdir()) if (d / "model.json").is_file()}
    variants.setdefault(REFERENCE, args.work / "export" / "model.json")
    result = run_benchmark(ckpt, variants=variants, batch_sizes=args.batch_sizes, iterations=args.iterations,
                           warmup=30, dataset=dataset, modes=("full", "decoder", "encoder"))
    result["checkpoint"], result["dataset"] = str(ckpt), str(dataset) if dataset else None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, result)
    print(format_table(result))
    print(f"load average {result['environment']['loadavg_start']} -> {result['environment']['loadavg_end']} "
          f"on {result['environment']['cpu_count']} CPUs; wrote {args.output}")
    print(json.dumps(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
