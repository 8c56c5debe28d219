"""The benchmark of every variant and the choice of the variant to ship (gcodefp_core.release),
with the blocking latency check of the shipped one."""

import json

import dagster as dg

from gcodefp_core.fileio import write_json
from gcodefp_core.paths import REPO_ROOT
from gcodefp_core.variants import VARIANTS

from ...automation import DOWNSTREAM
from ...resources import ArtifactStore, QualityGates
from ..onnx.assets import gate_verdict

GROUP = "evaluation"


class BenchmarkConfig(dg.Config):
    batch_sizes: list[int] = [1, 8]
    iterations: int = 200
    warmup: int = 20
    threads: int = 1                        # the server's setting
    ship_variant: str = "auto"              # or a variant name of gcodefp_core.variants


def markdown_table(rows: dict, shipped: str) -> str:
    lines = ["| variant | median ms | p95 ms | p99 ms | windows/s (batch 1) | size MB | served-answer drop, "
             "lower bound (points) | kept |", "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for v, r in rows.items():
        name = f"**{v}** (shipped)" if v == shipped else v
        lines.append(f"| {name} | {r['median_ms']:.3f} | {r['p95_ms']:.3f} | {r['p99_ms']:.3f} | "
                     f"{r['throughput_wps']:.0f} | {r['size_mb']:.2f} | {r['drop_low_points']:.3f} | "
                     f"{'yes' if r['within_accuracy_bar'] else 'no'} |")
    return "\n".join(lines)


def variant_rows(result: dict, artifacts: ArtifactStore, gates: QualityGates) -> dict:
    from gcodefp_core.benchmark import VARIANT_FORMAT

    rows = {}
    for v, spec in VARIANTS.items():
        stats = result["formats"][VARIANT_FORMAT[v]]["full"]["1"]
        meta = artifacts.read(artifacts.model_dir(v) / "model.json", f"the {v} variant")
        verdict = gate_verdict(artifacts, gates, v) if spec.builder else None
        rows[v] = {"median_ms": stats["median_ms"], "p95_ms": stats["p95_ms"], "p99_ms": stats["p99_ms"],
                   "throughput_wps": stats["throughput_wps"], "size_mb": meta["total_size_bytes"] / 2**20,
                   "drop_low_points": max((d.drop_low_points for d in verdict.metrics.values()), default=0.0)
                   if verdict else 0.0, "within_accuracy_bar": verdict.passed if verdict else True}
    return rows


def served_figures(results=REPO_ROOT / "results") -> dict:
    """Links to what callers of the server got (benchmarks/serving.py), when it has been run: the
    graph table above times the model alone, these time the whole request."""
    path = results / "serving.json"
    if not path.is_file():
        return {}
    try:
        bars = json.loads(path.read_text()).get("bars", {})
    except (json.JSONDecodeError, AttributeError):
        return {}
    out = {"served_figures": dg.MetadataValue.path(str(path)), "served_bars": dg.MetadataValue.json(bars)}
    if (results / "serving.png").is_file():
        out["served_plot"] = dg.MetadataValue.path(str(results / "serving.png"))
    return out


@dg.asset(group_name=GROUP, kinds={"onnx", "json"}, deps=["onnx_model", *(f"model_{v}" for v in VARIANTS if VARIANTS[v].builder)],
          automation_condition=DOWNSTREAM,
          description="Latency/throughput of every variant (gcodefp_core.benchmark, batch 1 first) and the variant to "
                      "ship (gcodefp_core.release.choose_variant): by default, among those that kept fp32's served "
                      "answer, the smallest within 10% of the fastest batch-1 p95.")
def benchmark_report(context: dg.AssetExecutionContext, config: BenchmarkConfig, artifacts: ArtifactStore,
                     gates: QualityGates) -> dg.MaterializeResult:
    from gcodefp_core.benchmark import run_benchmark
    from gcodefp_core.release import choose_variant

    batch_sizes = sorted(set([1] + list(config.batch_sizes)))
    result = run_benchmark(variants={v: artifacts.model_dir(v) / "model.json" for v in VARIANTS},
                           batch_sizes=batch_sizes, warmup=config.warmup, iterations=config.iterations,
                           threads=config.threads, dataset=artifacts.dataset(), modes=("full", "encoder"))
    rows = variant_rows(result, artifacts, gates)
    shipped, why = choose_variant(rows, config.ship_variant)
    out = artifacts.benchmark_report()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"shipped_variant": shipped, "why": why, "batch1": rows, "benchmark": result})
    table = markdown_table(rows, shipped)
    context.log.info(f"shipping {shipped}: {why}\n{table}")
    r = rows[shipped]
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(out)), "table": dg.MetadataValue.md(table), "shipped_variant": shipped,
        "why": why, "shipped_p95_ms": r["p95_ms"], "shipped_p99_ms": r["p99_ms"], "shipped_median_ms": r["median_ms"],
        "iterations": config.iterations, "threads": config.threads, "batch_sizes": dg.MetadataValue.json(batch_sizes),
        **served_figures()})


@dg.asset_check(asset=benchmark_report, blocking=True,
                description="The shipped variant answers a full prediction at batch 1 within the latency bars "
                            "(QualityGates: p95 < 20 ms, p99 < 50 ms). Blocking: a slow model is not packaged.")
def latency_sla(artifacts: ArtifactStore, gates: QualityGates) -> dg.AssetCheckResult:
    report = artifacts.read(artifacts.benchmark_report(), "benchmark_report")
    variant = report["shipped_variant"]
    row = report["batch1"][variant]
    return dg.AssetCheckResult(
        passed=bool(row["p95_ms"] < gates.latency_p95_ms and row["p99_ms"] < gates.latency_p99_ms),
        metadata={"variant": variant, "p95_ms": row["p95_ms"], "p99_ms": row["p99_ms"], "median_ms": row["median_ms"],
                  "bar_p95_ms": gates.latency_p95_ms, "bar_p99_ms": gates.latency_p99_ms,
                  "iterations": report["benchmark"]["iterations"]})
