"""What /stream answers under a monitor's real conditions, measured through the server on unseen runs.

    python benchmarks/stream_conditions.py --dataset artifacts/pipeline-side/dataset \
        --packages P1 [P2 P3 ...] [--data ../shared/data/cnc-sensor-logs] [--output results/stream_conditions.json]

Each package (one per seed) is served by `gcodefp serve --registry R --workers 1` from a registry
holding it and the package the swap condition swaps to. Every test run of
the dataset (runs no model saw: the split is the dataset's) is read raw from its log, in the
package's feature order, and posted to POST /stream/{machine} under each condition, the way a
monitor would (chunks of --chunk rows, JSON bodies, nulls for absent readings):
- start:           every row from the program start, `"start": true`; scored from row W-1;
- attached:        the monitor attaches at a random row 25-75% into the run and says nothing else;
- attached_loss5 / attached_loss20: the same, and each row is lost in transit with probability 5% / 20%;
                   attached conditions are scored from 30 received rows after attachment;
- pause:           from the start; at a random row in the middle third the machine stands still and
                   that row's readings arrive 60 more times; scored from row W-1, pause rows included;
- swap:            from the start; at a chunk boundary in the middle third the server swaps models
                   (POST /admin/reload) to the next package of --packages (with one package: itself
                   under another version), as a scheduled retraining does; scored from the swap on.
The conditions are gcodefp_core.monitor_streams.make_stream's, seeded per package and condition.
--drop templates|spread serves each package with that kind of the tracker's operation evidence
removed (its weight 0), on the same streams: an A/B of what the evidence adds.
Scores per condition and operation: the streamed answer (top level of each prediction) and the window
model's own answer on the same received rows (its `window` field: what /predict says), operation
accuracy and exact line (the answer's line equals the row's canonical G-code line), over the answered
rows (--every: a tracker answers each chunk's last row and every Nth before it). Mean [min-max]
over packages; the table is printed and written as JSON.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONDITIONS = {"start": dict(), "attached": dict(attach=0.25), "attached_loss5": dict(attach=0.25, loss=0.05),
              "attached_loss20": dict(attach=0.25, loss=0.2), "pause": dict(pause_rows=60), "swap": dict()}
ADMIN_TOKEN = "stream-conditions"
METRICS = ("op", "exact", "window_op", "window_exact")


def serve(registry: Path, log_path: Path):
    """`gcodefp serve --registry` on a free loopback port -> (process, base url), once /ready says 200."""
    import httpx

    sys.path.insert(0, str(REPO / "benchmarks"))
    from serving import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gcodefp_core.cli", "serve", "--registry", str(registry),
                             "--workers", "1", "--port", str(port)], cwd=REPO, stdout=open(log_path, "wb"),
                            stderr=subprocess.STDOUT,
                            env={"GCODEFP_LOG_LEVEL": "WARNING", "GCODEFP_ADMIN_TOKEN": ADMIN_TOKEN, **_env()})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{package}: the server did not become ready; see {log_path}")


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("GCODEFP_", "PROMETHEUS_"))}


def test_runs(dataset: Path, data: Path, spec) -> list[dict]:
    """The dataset's test runs, raw, in spec's feature order: continuous (None = absent), categorical, labels."""
    from gcodefp_core.dataset import DatasetConfig, read_runs
    from gcodefp_core.logs import list_log_files
    from gcodefp_core.schema import TARGET_COLUMN
    from gcodefp_core.tokenizer import canonicalize

    manifest = json.loads((dataset / "manifest.json").read_text())
    names = set(manifest["splits"]["test"])
    files = [f for f in list_log_files(data) if f.name.split(".csv")[0] in names]
    runs, _ = read_runs(files, DatasetConfig.from_dict(manifest["config"]))
    out = []
    for run in runs:
        # What the machine logged, as a client would post it: positions in the log's own units (the server
        # converts inches with the unit column, as training did); categorical keys as logged.
        cont = np.full((len(run), len(spec.continuous)), np.nan)
        for j, name in enumerate(spec.continuous):
            if name in run.frame:
                cont[:, j] = np.asarray(run.frame[name], np.float64)
        cat = spec.raw_matrix(run.frame)[1]
        out.append({"name": run.name, "operation": run.operation,
                    "continuous": [[None if v != v else v for v in row] for row in cont.tolist()],
                    "categorical": np.asarray(cat).tolist(),
                    "lines": [canonicalize(g) for g in run.frame[TARGET_COLUMN]]})
    if len(out) != len(names):
        raise RuntimeError(f"found {len(out)} of the dataset's {len(names)} test runs in {data}")
    return out


def reload(client, url: str, version: str) -> None:
    r = client.post(f"{url}/admin/reload", json={"version": version}, timeout=120,
                    headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    if r.status_code != 200:
        raise RuntimeError(f"reload to {version}: HTTP {r.status_code}: {r.text[:300]}")


def stream_run(client, url: str, machine: str, run: dict, offsets: np.ndarray, chunk: int, start: bool,
               every: int | None, swap_at: int | None = None) -> list[dict]:
    """Post the run's rows at `offsets`, in order, in chunks -> the predictions (tracker: the rows judged at
    `every`, None: the server's default; clock: one per window). swap_at: before the chunk holding that
    received row, the server swaps to the registry's "next" version (and back to "measured" after the run)."""
    answers = []
    for s in range(0, len(offsets), chunk):
        if swap_at is not None and s <= swap_at < s + chunk:
            reload(client, url, "next")
        idx = offsets[s:s + chunk]
        body = {"sensor_data": {"continuous": [run["continuous"][i] for i in idx],
                                "categorical": [run["categorical"][i] for i in idx]}, "start": start and s == 0}
        if every is not None:
            body["every"] = every
        r = client.post(f"{url}/stream/{machine}", json=body, timeout=120)
        if r.status_code != 200:
            raise RuntimeError(f"{machine}: HTTP {r.status_code}: {r.text[:300]}")
        answers += r.json()["predictions"]
    client.delete(f"{url}/stream/{machine}", timeout=30)
    if swap_at is not None:
        reload(client, url, "measured")
    return answers


def score(run: dict, offsets: np.ndarray, answers: list[dict], first_scored: int, every: int | None) -> dict[str, np.ndarray]:
    """The answered rows from first_scored on; with every == 1 (or a clock) a row without an answer is wrong."""
    by_row = {a["row"]: a for a in answers}  # "row": the received row's index since the session started
    got = [(i, by_row.get(i)) for i in range(first_scored, len(offsets)) if every == 1 or i in by_row]
    line = [run["lines"][offsets[i]] for i, _ in got]
    missing = {"gcode_sequence": None, "operation": {"name": None}, "window": {"gcode_sequence": None,
                                                                              "operation": {"name": None}}}
    a = [x if x is not None else missing for _, x in got]
    return {"op": np.array([x["operation"]["name"] == run["operation"] for x in a]),
            "exact": np.array([x["gcode_sequence"] == y for x, y in zip(a, line)]),
            "window_op": np.array([x["window"]["operation"]["name"] == run["operation"] for x in a]),
            "window_exact": np.array([x["window"]["gcode_sequence"] == y for x, y in zip(a, line)])}


EVIDENCE_WEIGHT = {"templates": "template_weight", "spread": "spread_weight"}


def without_evidence(package: Path, kind: str, work: Path) -> Path:
    """A copy of the package's model whose tracker lacks operation evidence of this kind -> its model.json."""
    import shutil

    dst = work / f"without-{kind}-{package.name}"
    if not dst.exists():
        meta = json.loads((package / "model.json").read_text())
        dst.mkdir(parents=True)
        for name in set(meta["files"].values()):
            shutil.copy2(package / name, dst / name)
        tracker = meta.get("program_tracker") or {}
        if tracker:
            tracker[kind] = None
            tracker["params"][EVIDENCE_WEIGHT[kind]] = 0.0
        (dst / "model.json").write_text(json.dumps(meta))
    return dst / "model.json"


def measure_package(package: Path, swap_to: Path, runs: list[dict], seed: int, chunk: int, every: int | None,
                    work: Path, drop: str | None = None) -> dict:
    import httpx

    from gcodefp_core import package as pkg
    from gcodefp_core.monitor_streams import make_stream

    registry = work / f"registry-{package.name}"
    source = (lambda p: without_evidence(p, drop, work)) if drop else (lambda p: p / "model.json")
    pkg.build_package(source(package), registry, version="measured")
    pkg.build_package(source(swap_to), registry, version="next")
    pkg.promote(registry, "measured")
    proc, url = serve(registry, work / f"server-{package.name}.log")
    result: dict = {"package": str(package), "swap_to": str(swap_to), "every": every, "dropped": drop, "conditions": {}}
    try:
        with httpx.Client() as client:
            info = client.get(f"{url}/info", timeout=30).json()
            window = info.get("window", 64)
            for name, cond in CONDITIONS.items():
                rng = np.random.default_rng([seed, len(name)])
                pooled: dict[str, list] = {m: [] for m in METRICS}
                per_op: dict[str, dict[str, list]] = {}
                t0, rows = time.perf_counter(), 0
                for k, run in enumerate(runs):
                    offsets = make_stream(len(run["lines"]), rng, **cond)
                    # swap: at a chunk boundary in the middle third, scored from there on
                    swap_at = int(rng.integers(len(offsets) // 3, 2 * len(offsets) // 3)) // chunk * chunk \
                        if name == "swap" else None
                    answers = stream_run(client, url, f"bench-{name}-{k}", run, offsets, chunk, "attach" not in cond,
                                         every, swap_at)
                    first = swap_at if swap_at is not None else 30 if "attach" in cond else window - 1
                    s = score(run, offsets, answers, first, every)
                    rows += len(offsets)
                    for m in METRICS:
                        pooled[m].append(s[m])
                        per_op.setdefault(run["operation"], {}).setdefault(m, []).append(s[m])
                mean = lambda parts: float(np.concatenate(parts).mean())  # noqa: E731
                result["conditions"][name] = {
                    "overall": {m: mean(v) for m, v in pooled.items()},
                    "per_operation": {op: {m: mean(v) for m, v in d.items()} for op, d in sorted(per_op.items())},
                    "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
                o = result["conditions"][name]["overall"]
                print(f"  {package.name} {name:<16} streamed op {100 * o['op']:5.1f} exact {100 * o['exact']:5.1f} | "
                      f"window op {100 * o['window_op']:5.1f} exact {100 * o['window_exact']:5.1f}", flush=True)
            result["mode"] = info.get("stream_mode")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return result


def summarise(per_package: list[dict]) -> dict:
    """condition -> row (overall / operation) -> metric -> [mean, min, max] over packages."""
    out = {}
    for name in CONDITIONS:
        reps = [p["conditions"][name] for p in per_package]
        rows = {"overall": [r["overall"] for r in reps]}
        for op in reps[0]["per_operation"]:
            rows[op] = [r["per_operation"][op] for r in reps if op in r["per_operation"]]
        out[name] = {row: {m: [float(np.mean([v[m] for v in vals])), float(np.min([v[m] for v in vals])),
                               float(np.max([v[m] for v in vals]))] for m in METRICS} for row, vals in rows.items()}
    return out


def print_table(summary: dict) -> None:
    cell = lambda v: f"{100 * v[0]:.1f} [{100 * v[1]:.1f}-{100 * v[2]:.1f}]"  # noqa: E731
    for name, rows in summary.items():
        print(f"\n{name}\n| operation | streamed op | streamed exact | window op | window exact |\n|---|---|---|---|---|")
        for row, m in rows.items():
            print(f"| {row} | " + " | ".join(cell(m[k]) for k in METRICS) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, required=True, help="the dataset the packages were trained on (its split)")
    ap.add_argument("--packages", type=Path, nargs="+", required=True, help="package folders, one per seed")
    ap.add_argument("--data", type=Path, default=None, help="the raw logs (default: the real data folder)")
    ap.add_argument("--chunk", type=int, default=32, help="rows per POST")
    ap.add_argument("--every", type=int, default=None,
                    help="tracker: answer every Nth row of a chunk (1: every row; default: the server's, 4)")
    ap.add_argument("--drop", choices=sorted(EVIDENCE_WEIGHT), default=None,
                    help="serve the packages without this kind of the tracker's operation evidence (an A/B)")
    ap.add_argument("--output", type=Path, default=REPO / "results" / "stream_conditions.json")
    args = ap.parse_args()
    from gcodefp_core.fileio import write_json
    from gcodefp_core.paths import real_data_dir
    from gcodefp_core.runtime import read_model_json

    _, bundle, _ = read_model_json(args.packages[0] / "model.json")
    runs = test_runs(args.dataset, args.data or real_data_dir(), bundle.features)
    print(f"{len(runs)} test runs, {sum(len(r['lines']) for r in runs)} rows", flush=True)
    work = Path(tempfile.mkdtemp(prefix="gcodefp-stream-conditions-"))
    # the swap condition swaps to the next package (seeds of one config: a retrained model of the same programs)
    swap_to = args.packages[1:] + args.packages[:1]
    per_package = [measure_package(p, q, runs, seed, args.chunk, args.every, work, args.drop)
                   for seed, (p, q) in enumerate(zip(args.packages, swap_to))]
    summary = summarise(per_package)
    print_table(summary)
    write_json(args.output, {"summary": summary, "per_package": per_package, "conditions": CONDITIONS,
                             "chunk": args.chunk, "every": args.every, "dropped": args.drop, "dataset": str(args.dataset),
                             "date": time.strftime("%Y-%m-%d %H:%M")})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
