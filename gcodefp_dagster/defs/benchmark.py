"""The benchmark of every variant, and the choice of the variant to ship."""

import json
from pathlib import Path

import dagster as dg

from gcodefp_core.fileio import write_json
from gcodefp_core.variants import VARIANTS as ALL_VARIANTS

from .data import dataset_folder
from .export import model_dir, read_accuracy
from .resources import ArtifactStore, QualityGates

GROUP = "evaluation"
VARIANTS = tuple(ALL_VARIANTS)


class BenchmarkConfig(dg.Config):
    batch_sizes: list[int] = [1, 8]
    iterations: int = 200
    warmup: int = 20
    threads: int = 1                        # the server's setting
    ship_variant: str = "auto"              # or one of fp32, fp16, int8_dynamic, int8_static


def report_path(artifacts: ArtifactStore) -> Path:
    return artifacts.path("benchmark", "benchmark.json")


def read_report(artifacts: ArtifactStore) -> dict:
    path = report_path(artifacts)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: benchmark_report has not been materialized in this artifact store")
    return json.loads(path.read_text())


def choose_variant(rows: dict, requested: str) -> tuple[str, str]:
    """-> (variant, why). auto: the lowest batch-1 p95 among variants within their accuracy bars
    (fp32 always qualifies)."""
    if requested != "auto":
        if requested not in rows:
            raise ValueError(f"ship_variant: {requested!r} is not one of {sorted(rows)} (or 'auto')")
        return requested, "requested in config"
    ok = {v: r for v, r in rows.items() if r["within_accuracy_bar"]}
    best = min(ok, key=lambda v: ok[v]["p95_ms"])
    return best, f"lowest batch-1 p95 among variants within their accuracy bars ({', '.join(sorted(ok))})"


def markdown_table(rows: dict, shipped: str) -> str:
    lines = ["| variant | median ms | p95 ms | p99 ms | windows/s (batch 1) | size MB | max drop (points) | within bar |",
             "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for v, r in rows.items():
        name = f"**{v}** (shipped)" if v == shipped else v
        lines.append(f"| {name} | {r['median_ms']:.3f} | {r['p95_ms']:.3f} | {r['p99_ms']:.3f} | "
                     f"{r['throughput_wps']:.0f} | {r['size_mb']:.2f} | {r['max_drop_points']:.3f} | "
                     f"{'yes' if r['within_accuracy_bar'] else 'no'} |")
    return "\n".join(lines)


@dg.asset(group_name=GROUP, kinds={"onnx", "json"}, deps=["onnx_model", "model_fp16", "model_int8_dynamic",
                                                        "model_int8_static"],
          description="Latency/throughput of every variant (gcodefp_core.benchmark, batch 1 first) and the variant to "
                      "ship: by default the fastest at batch 1 whose accuracy stays within its bar against fp32.")
def benchmark_report(context: dg.AssetExecutionContext, config: BenchmarkConfig, artifacts: ArtifactStore,
                     gates: QualityGates) -> dg.MaterializeResult:
    from gcodefp_core.benchmark import VARIANT_FORMAT, run_benchmark

    paths = {v: model_dir(artifacts, v) / "model.json" for v in VARIANTS}
    batch_sizes = sorted(set([1] + list(config.batch_sizes)))
    result = run_benchmark(variants=paths, batch_sizes=batch_sizes, warmup=config.warmup, iterations=config.iterations,
                           threads=config.threads, dataset=dataset_folder(artifacts), modes=("full", "encoder"))
    rows = {}
    for v in VARIANTS:
        stats = result["formats"][VARIANT_FORMAT[v]]["full"]["1"]
        meta = json.loads(paths[v].read_text())
        drops = read_accuracy(artifacts, v).get("drop_points_vs_fp32", {})
        worst = max([drops.get("op_acc", 0.0), drops.get("token_acc_greedy", 0.0), drops.get("token_acc_tf", 0.0)])
        rows[v] = {"median_ms": stats["median_ms"], "p95_ms": stats["p95_ms"], "p99_ms": stats["p99_ms"],
                   "throughput_wps": stats["throughput_wps"], "size_mb": meta["total_size_bytes"] / 2**20,
                   "max_drop_points": worst, "within_accuracy_bar": v == "fp32" or worst <= gates.max_drop(v)}
    shipped, why = choose_variant(rows, config.ship_variant)
    report = {"shipped_variant": shipped, "why": why, "batch1": rows, "benchmark": result}
    out = report_path(artifacts)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    table = markdown_table(rows, shipped)
    context.log.info(f"shipping {shipped}: {why}\n{table}")
    r = rows[shipped]
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(out)), "table": dg.MetadataValue.md(table), "shipped_variant": shipped,
        "why": why, "shipped_p95_ms": r["p95_ms"], "shipped_p99_ms": r["p99_ms"], "shipped_median_ms": r["median_ms"],
        "iterations": config.iterations, "threads": config.threads, "batch_sizes": dg.MetadataValue.json(batch_sizes)})
