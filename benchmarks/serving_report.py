"""benchmarks/serving.py's bookkeeping: the server-side split from /metrics, the bars, the table, the plot."""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

# server-side histograms (api/metrics.py) -> the name of their share of a request
SPLIT = {"gcodefp_parse_duration_seconds": "parse", "gcodefp_normalise_duration_seconds": "normalise",
         "gcodefp_queue_duration_seconds": "queue",
         "gcodefp_inference_duration_seconds": "inference", "gcodefp_batched_call_windows": "windows_per_call"}
# graph calls, each counted once: their seconds over their windows is the model time per window
COUNTERS = ("gcodefp_graph_call_seconds_total", "gcodefp_graph_call_windows_total")
COUNTER_LINE = re.compile(r'^(\w+_total)(?:\{[^}]*\})? ([0-9.eE+-]+)$')
LINE = re.compile(r'^(\w+?)(_bucket|_sum|_count)(?:\{([^}]*)\})? ([0-9.eE+-]+|NaN)$')
BARS = {"json_w1_rate": 300, "json_w2_rate": 800, "binary_w2_rate": 1500, "p99_ms": 10.0, "stream_machines": 1000,
        "stream_p99_ms": 50.0, "rss_mb": 200.0, "inference_ratio": 1.2}


def scrape(text: str) -> dict:
    """Prometheus text -> {metric: {"sum", "count", "buckets": {le: cumulative count}}}, labels summed."""
    out: dict = defaultdict(lambda: {"sum": 0.0, "count": 0.0, "buckets": defaultdict(float)})
    for line in text.splitlines():
        c = COUNTER_LINE.match(line)
        if c and c.group(1) in COUNTERS:
            out[c.group(1)]["sum"] += float(c.group(2))
            continue
        m = LINE.match(line)
        if not m or m.group(1) not in SPLIT:
            continue
        name, part, labels, value = m.groups()
        if part == "_bucket":
            le = re.search(r'le="([^"]+)"', labels).group(1)
            out[name]["buckets"][float(le)] += float(value)
        else:
            out[name][part[1:]] += float(value)
    return out


def split(before: dict, after: dict) -> dict:
    """Per metric, over the step: mean and bucket-resolution p50 (ms; windows for windows_per_call)."""
    res = {}
    for name, label in SPLIT.items():
        a, b = after.get(name), before.get(name)
        if a is None:
            continue
        count = a["count"] - (b["count"] if b else 0)
        if count <= 0:
            continue
        total = a["sum"] - (b["sum"] if b else 0)
        scale = 1 if label == "windows_per_call" else 1000
        p50 = None
        for le in sorted(a["buckets"]):
            if a["buckets"][le] - (b["buckets"].get(le, 0) if b else 0) >= count / 2:
                p50 = le * scale
                break
        res[label] = {"mean": round(total / count * scale, 3), "p50_le": p50, "count": int(count)}
    seconds, windows = ((after.get(k, {}).get("sum", 0.0) - (before.get(k, {}).get("sum", 0.0))) for k in COUNTERS)
    if windows > 0:
        res["inference_per_window"] = {"mean": round(seconds * 1000 / windows, 4), "windows": int(windows)}
    return res


def line(name: str, s: dict) -> str:
    srv = s.get("server", {})
    parts = " ".join(f"{k} {v['mean']}" for k, v in srv.items())
    return (f"{name:34s} achieved {s['achieved_rate']:8.1f}/s  p50 {s['p50_ms']:8.2f}  p90 {s['p90_ms']:8.2f}  "
            f"p99 {s['p99_ms']:8.2f} ms  errors {s['errors']} (shed {s.get('shed', 0)})  | server mean: {parts}  "
            f"cpu/req {s.get('server_cpu_ms_per_request')} ms (shares {s.get('server_cpu_share_per_worker')})  rss {s.get('rss_mb_per_worker')} MB  "
            f"load {os.getloadavg()[0]:.1f}")


def best_rate(steps: list[dict], p99: float, key: str = "offered_rate") -> float:
    """The highest offered rate (or machines) served at >= 97% with p99 <= `p99` and no errors."""
    ok = [s.get(key, s.get("machines")) for s in steps
          if s["errors"] == 0 and s["p99_ms"] <= p99 and s["achieved_rate"] >= 0.97 * s.get(key, s.get("machines"))]
    return max(ok) if ok else 0


def bars(result: dict) -> dict:
    out = {}
    for run in result["runs"]:
        w, sw = run["workers"], run["sweeps"]
        for mode in ("json", "binary", "batch"):
            if mode in sw:
                out[f"{mode}_w{w}_max_rate_p99_10ms"] = best_rate(sw[mode], BARS["p99_ms"])
        for mode in ("json", "binary"):   # model time per window at the highest rate kept within p99 <= 10 ms
            best = best_rate(sw.get(mode, []), BARS["p99_ms"])
            step = next((s for s in sw.get(mode, []) if s.get("offered_rate") == best), None)
            per_window = (step or {}).get("server", {}).get("inference_per_window")
            if per_window:
                out[f"inference_w{w}_{mode}_per_window_ms_at_{best}"] = per_window["mean"]
                out[f"inference_w{w}_{mode}_per_window_ratio_to_bare_predict"] = round(
                    per_window["mean"] / result["bare"]["predict_ms"], 3)
        if "stream" in sw:
            best = out[f"stream_w{w}_max_machines_p99_50ms"] = best_rate(sw["stream"], BARS["stream_p99_ms"], "machines")
            step = next((s for s in sw["stream"] if s.get("machines") == best), None)
            if step and step.get("rss_mb_per_worker"):   # the memory of the load the bar names, not of a step past it
                out[f"rss_w{w}_mb_following_{best}_machines"] = max(step["rss_mb_per_worker"])
        requests = [max(s["rss_mb_per_worker"]) for m in ("json", "binary", "batch") for s in sw.get(m, [])
                    if s.get("rss_mb_per_worker")]
        if requests:
            out[f"rss_w{w}_requests_max_mb"] = max(requests)
        out[f"rss_w{w}_max_mb"] = max(run.get("rss_mb_per_worker") or [float("nan")])   # at the end of the run
        if "swap" in run:
            out[f"swap_w{w}"] = {"rate": run["swap"]["offered_rate"], "errors": run["swap"]["errors"],
                                 "served_by_new": run["swap"]["versions"].get(run["swap"]["to"], 0)}
        low = run.get("low_load", {})
        if "response_inference_ms_p50" in low:
            out[f"inference_w{w}_p50_ms"] = low["response_inference_ms_p50"]
            out[f"inference_w{w}_ratio_to_bare_predict"] = round(
                low["response_inference_ms_p50"] / result["bare"]["predict_ms"], 3)
        if "paired_inference" in run:   # the two timed in alternating rounds: the figure to judge the bar by
            out[f"inference_w{w}_paired_ratio_to_bare_predict"] = run["paired_inference"]["ratio_median"]
    return out


def table(result: dict) -> str:
    rows = ["| workers | mode | offered | achieved | p50 ms | p90 ms | p95 ms | p99 ms | errors | "
            "server parse/normalise/queue/inference ms (mean) | windows/call | inference ms per window | "
            "server CPU ms/req | load avg |",
            "|---" * 14 + "|"]
    for run in result["runs"]:
        for mode, steps in run["sweeps"].items():
            for s in steps:
                srv = s.get("server", {})
                f = lambda k: str(srv.get(k, {}).get("mean", "-"))
                offered = s.get("offered_rate", f"{s.get('machines')} machines")
                rows.append(f"| {run['workers']} | {mode} | {offered} | {s['achieved_rate']} | {s['p50_ms']} | "
                            f"{s['p90_ms']} | {s['p95_ms']} | {s['p99_ms']} | {s['errors']} | {f('parse')} / "
                            f"{f('normalise')} / {f('queue')} / {f('inference')} | {f('windows_per_call')} | "
                            f"{f('inference_per_window')} | "
                            f"{s.get('server_cpu_ms_per_request', '-')} | {s.get('load_average', 0):.1f} |")
        for mode, steps in run.get("concurrency", {}).items():
            for s in steps:
                rows.append(f"| {run['workers']} | {mode} closed | c={s['concurrency']} | {s['achieved_rate']} | "
                            f"{s['p50_ms']} | {s['p90_ms']} | {s['p95_ms']} | {s['p99_ms']} | {s['errors']} | | | | "
                            f"{s.get('server_cpu_ms_per_request', '-')} | |")
        rows.append(f"| {run['workers']} | RSS MB per worker | {run.get('rss_mb_per_worker')} |" + " |" * 11)
    bare = result["bare"]
    rows.append(f"\nbare (batch 1, this process): graph {bare['graph_run_ms']} ms, "
                f"normalise {bare['normalise_ms']} ms, "
                f"OnnxPredictor.predict {bare['predict_ms']} ms ({bare['variant']}); the same predict after the "
                f"request's parse {bare.get('predict_after_parse_ms', '-')} ms, after 1 ms idle "
                f"{bare.get('predict_after_1ms_idle_ms', '-')} ms")
    if "machine_start" in result:
        rows.append(f"machine speed (benchmarks/machine_speed.py) at the start {result['machine_start']}, "
                    f"at the end {result.get('machine_end', '-')}")
    rows.append("bars: " + json.dumps(result.get("bars", {})))
    return "\n".join(rows)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({m for run in result["runs"] for m in run["sweeps"]})
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for run in result["runs"]:
            steps = run["sweeps"].get(mode, [])
            x = [s.get("offered_rate", s.get("machines")) for s in steps]
            for q, style in (("p50_ms", "--"), ("p99_ms", "-")):
                ax.plot(x, [s[q] for s in steps], style, marker="o", label=f"{run['workers']} worker(s) {q[:-3]}")
        ax.axhline(50 if mode == "stream" else 10, color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("machines (4 rows/s each)" if mode == "stream" else "offered load (req/s)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{mode} - {result['package']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(path)
