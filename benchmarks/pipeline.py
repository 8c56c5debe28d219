"""The whole Dagster pipeline on the real logs (3 seeds): wall time and time per run and per
asset/check step (bar: under 15 minutes on this machine).

    .venv/bin/python benchmarks/pipeline.py [--config configs/production.json] [--parallel-seeds 2]
        [--threads 1] [--output results/bench_pipeline.json]

Runs `gcodefp pipeline` (the runs the daemon would make: prepare_data, one train_seed run per seed,
release) into artifacts/pipeline-bench/ and the Dagster instance in $DAGSTER_HOME (default
.dagster_home/, so the UI shows the runs), then reads the step timings from each run's event log.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from gcodefp_core.paths import REPO_ROOT, has_real_data, real_data_dir

BAR_MINUTES = 15


def step_timings(instance, run_id: str) -> dict[str, dict]:
    """Per step key: start offset and duration (s) from the run's STEP_START/STEP_SUCCESS|FAILURE events."""
    events = instance.all_logs(run_id)
    t_run = events[0].timestamp
    out: dict[str, dict] = {}
    for e in events:
        if e.dagster_event is None or e.step_key is None:
            continue
        kind = e.dagster_event.event_type_value
        if kind == "STEP_START":
            out[e.step_key] = {"start_s": round(e.timestamp - t_run, 1)}
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE") and e.step_key in out:
            out[e.step_key] |= {"seconds": round(e.timestamp - t_run - out[e.step_key]["start_s"], 1),
                                "status": "success" if kind == "STEP_SUCCESS" else "failure"}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "production.json")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--parallel-seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", type=Path, default=REPO_ROOT / "results" / "bench_pipeline.json")
    args = ap.parse_args()
    if not has_real_data():
        print(f"real data absent ({real_data_dir()}); nothing to benchmark", file=sys.stderr)
        return 2
    from gcodefp_dagster.cli import ensure_dagster_home

    ensure_dagster_home()
    cmd = [sys.executable, "-m", "gcodefp_core.cli", "pipeline", "--config", str(args.config),
           "--data", str(real_data_dir()), "--seeds", *map(str, args.seeds), "--parallel-seeds", str(args.parallel_seeds),
           "--threads", str(args.threads), "--artifacts", str(REPO_ROOT / "artifacts" / "pipeline-bench"),
           "--registry", str(REPO_ROOT / "artifacts" / "registry-bench")]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=os.environ | {"WANDB_MODE": os.environ.get("WANDB_MODE", "offline")},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.monotonic() - t0
    print(proc.stdout[-6000:])
    runs = re.findall(r"^run (\S+) \(([^)]+)\): (\S+)", proc.stdout, re.M)
    ok = re.search(r"^pipeline: SUCCESS", proc.stdout, re.M) is not None
    if not runs:
        print("could not find the run ids in the command's output", file=sys.stderr)
        return 1
    import dagster as dg

    instance = dg.DagsterInstance.get()
    steps = {f"{label}:{step}": t for run_id, label, _ in runs for step, t in step_timings(instance, run_id).items()}
    ckpts = [e.asset_materialization for e in instance.fetch_materializations(dg.AssetKey("checkpoint"), limit=len(args.seeds)).records]
    result = {"runs": [{"run_id": r, "run": label, "status": st} for r, label, st in runs],
              "status": "SUCCESS" if ok else "FAILURE", "wall_minutes": round(wall / 60, 2),
              "bar_minutes": BAR_MINUTES, "within_bar": ok and wall / 60 <= BAR_MINUTES,
              "seeds": args.seeds, "parallel_seeds": args.parallel_seeds, "threads": args.threads,
              "config": str(args.config), "cpu_count": os.cpu_count(), "loadavg_end": list(os.getloadavg()),
              "steps": steps,
              "checkpoints": {c.partition: {k: v.value for k, v in c.metadata.items() if k.startswith("val_") or
                                            k in ("epochs", "best_epoch", "train_seconds")} for c in ckpts},
              "package": next((line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("package ")), None)}
    print(f"{'run:step (start s = from its run start)':<42}{'start s':>9}{'seconds':>9}")
    for k, v in result["steps"].items():
        print(f"{k:<42}{v['start_s']:>9}{v.get('seconds', float('nan')):>9}")
    print(f"total {result['wall_minutes']} min ({'within' if result['within_bar'] else 'NOT within'} {BAR_MINUTES} min)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(args.output)
    return 0 if result["within_bar"] else 1


if __name__ == "__main__":
    sys.exit(main())
