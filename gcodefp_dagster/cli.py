"""`gcodefp pipeline`: materialize the whole Dagster asset graph from the terminal.

The same assets the UI runs, as the same runs the daemon would make: one `prepare_data` run, one
`train_seed` run per seed partition (at most --parallel-seeds at once, each its own process), then
one `release` run. All are recorded in the Dagster instance ($DAGSTER_HOME, default .dagster_home/),
so the UI shows them. Registered into `gcodefp` through the `gcodefp.commands` entry point; Dagster
is imported when the command runs, not when `gcodefp` starts.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path

STAGES = ("data", "training", "release")


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="run the whole Dagster pipeline (data -> package) from the terminal",
                       description="Materialize every asset (logs, dataset, one checkpoint per seed, ensemble, ONNX "
                                   "and quantized variants, benchmark, deployment package) with their checks: one run "
                                   "for the data, one per seed, one for the release, recorded in the Dagster instance "
                                   "the UI reads ($DAGSTER_HOME, default .dagster_home/). Prints where the package landed.")
    p.add_argument("--config", type=Path, required=True, help="JSON config (data/model/train sections)")
    p.add_argument("--data", type=Path, help="folder of *_aligned.csv[.gz] logs (default: the config's data.source; "
                                             "synthetic logs when that is 'synthetic' or absent)")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="seeds, one model and one run each")
    p.add_argument("--artifacts", type=Path, help="artifact store (default artifacts/pipeline)")
    p.add_argument("--registry", type=Path, help="package registry (default artifacts/registry)")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--parallel-seeds", type=int, default=1, help="seed runs at once (each its own process)")
    p.add_argument("--threads", type=int, help="torch threads per training run (train.num_threads; default: the "
                                               "machine's cores shared among the runs at once)")
    p.add_argument("--until", choices=STAGES, default="release", help="stop after this stage (default: all)")
    p.add_argument("--verbose", action="store_true", help="show Dagster's own event log on the terminal")
    p.set_defaults(handler=_pipeline)


def ensure_dagster_home() -> Path:
    """$DAGSTER_HOME, or the project-local .dagster_home/ (created, with the repository's dagster.yaml)."""
    from gcodefp_core.paths import REPO_ROOT

    home = Path(os.environ.get("DAGSTER_HOME") or REPO_ROOT / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists() and (REPO_ROOT / "dagster.yaml").is_file():
        shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def _configure_env(args) -> None:
    """Settings travel as environment variables: each run's step process rebuilds the resources from them."""
    if not args.config.is_file():
        raise FileNotFoundError(f"--config: not found: {args.config}")
    from gcodefp_core.config import load_config

    load_config(args.config)  # fail here, naming the field, rather than inside a run
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds: duplicates in {args.seeds}")
    if args.parallel_seeds < 1:
        raise ValueError(f"--parallel-seeds must be >= 1, got {args.parallel_seeds}")
    os.environ["GCODEFP_CONFIG"] = str(args.config.resolve())
    if args.data is not None:
        if not args.data.is_dir():
            raise FileNotFoundError(f"--data: not a folder: {args.data}")
        os.environ["GCODEFP_DATA"] = str(args.data.resolve())
    if args.artifacts:
        os.environ["GCODEFP_PIPELINE_ARTIFACTS"] = str(args.artifacts.resolve())
    if args.registry:
        os.environ["GCODEFP_REGISTRY"] = str(args.registry.resolve())


def job(name: str):
    from gcodefp_dagster.definitions import defs

    return defs.resolve_job_def(name)


def prepare_data_job():
    return job("prepare_data")


def release_job():
    return job("release")


def threads_per_run(args, cores: int | None = None) -> int:
    """Torch threads for each seed run: --threads, or the cores shared among the runs at once.
    Left to torch, every one of N concurrent runs starts a thread per core: on 2 cores, 3 runs of 2
    busy-waiting threads each took 400-500 s an epoch, against 100-120 s with one thread each."""
    if args.threads:
        return args.threads
    at_once = max(1, min(args.parallel_seeds, len(args.seeds)))
    return max(1, (cores or os.cpu_count() or 1) // at_once)


def run_config(args, train: bool = False, release_seeds: list[int] | None = None) -> dict:
    cfg: dict = {"loggers": {"console": {"config": {"log_level": "DEBUG" if args.verbose else "WARNING"}}}}
    if train:
        overrides = ({"epochs": args.epochs} if args.epochs else {}) | {"num_threads": threads_per_run(args)}
        cfg["ops"] = {"checkpoint": {"config": overrides}}
    if release_seeds:
        cfg["ops"] = {"ensemble_config": {"config": {"seeds": release_seeds}}}
    return cfg


def describe(event, run_label: str, t0: float) -> str | None:
    """One progress line for a run's event (None: not worth a line)."""
    stamp = f"[{time.monotonic() - t0:7.1f}s] {run_label}"
    if event.dagster_event is None:  # a log line of the asset body: epoch progress and the like
        return f"{stamp} {event.user_message}" if event.level >= 20 and event.step_key else None
    kind, step, data = event.dagster_event.event_type_value, event.step_key, event.dagster_event.event_specific_data
    if kind == "STEP_START":
        return f"{stamp} {step} started"
    if kind == "STEP_SUCCESS":
        return f"{stamp} {step} done ({data.duration_ms / 1000:.1f}s)"
    if kind == "STEP_FAILURE":
        return f"{stamp} {step} FAILED: {data.error.message.strip().splitlines()[-1] if data.error else ''}"
    if kind == "ASSET_MATERIALIZATION":
        m = data.materialization
        path = m.metadata.get("path")
        return f"{stamp} materialized {m.asset_key.to_user_string()}" + (f" -> {path.value}" if path else "")
    if kind == "ASSET_CHECK_EVALUATION":
        return f"{stamp} check {data.asset_key.to_user_string()}:{data.check_name} {'passed' if data.passed else 'FAILED'}"
    return None


def follow(instance, token: str, stop: threading.Event, t0: float) -> None:
    """Print progress lines for every run tagged `token` until `stop` is set (a thread beside the runs)."""
    from dagster import RunsFilter

    cursors: dict[str, int] = {}
    while not stop.is_set():
        for run in instance.get_runs(RunsFilter(tags={"gcodefp/cli_token": token})):
            label = run.job_name + (f"[{run.tags['dagster/partition']}]" if "dagster/partition" in run.tags else "")
            entries = instance.all_logs(run.run_id)
            for entry in entries[cursors.get(run.run_id, 0):]:
                line = describe(entry, label, t0)
                if line:
                    print(line, flush=True)
            cursors[run.run_id] = len(entries)
        stop.wait(1.0)


def execute(job_fn, instance, token: str, run_config: dict, partition: str | None = None):
    import dagster as dg

    tags = {"gcodefp/trigger": "cli", "gcodefp/cli_token": token} | ({"dagster/partition": partition} if partition else {})
    result = dg.execute_job(dg.reconstructable(job_fn), instance, run_config=run_config, tags=tags, raise_on_error=False)
    print(f"run {result.run_id} ({result.job_def.name}{f'[{partition}]' if partition else ''}): "
          f"{'SUCCESS' if result.success else 'FAILURE'}", flush=True)
    return result


def _pipeline(args) -> int:
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations of a new instance: noise
    if not args.verbose:
        logging.getLogger("dagster").setLevel(logging.WARNING)
        os.environ.setdefault("WANDB_SILENT", "true")
    _configure_env(args)
    home = ensure_dagster_home()
    import dagster as dg

    from gcodefp_dagster.defs.training.assets import register_seeds

    instance = dg.DagsterInstance.get()
    register_seeds(instance, args.seeds)
    token, t0 = uuid.uuid4().hex, time.monotonic()
    print(f"gcodefp pipeline: seeds {args.seeds} ({args.parallel_seeds} at a time, {threads_per_run(args)} torch "
          f"thread(s) each), config {args.config}, Dagster instance {home}", flush=True)
    stop = threading.Event()
    printer = threading.Thread(target=follow, args=(instance, token, stop, t0), daemon=True)
    printer.start()
    try:
        ok, package = _stages(args, instance, token)
    finally:
        time.sleep(1.5)  # let the printer catch the last events
        stop.set()
        printer.join(5)
    print(f"pipeline: {'SUCCESS' if ok else 'FAILURE'} in {time.monotonic() - t0:.0f}s "
          "(open the Dagster UI on the same DAGSTER_HOME to inspect the runs)")
    if not ok:
        return 1
    if package is None:
        return 0
    meta = package.metadata
    print(f"package {meta['version'].value} ({meta['variant'].value}): {meta['path'].value}")
    registry = Path(meta["path"].value).parent.parent
    print("\nNext:\n"
          f"  UI:     DAGSTER_HOME={home} GCODEFP_CONFIG={args.config.resolve()} "
          "dagster dev -w workspace.yaml   # http://127.0.0.1:3000\n"
          f"  serve:  gcodefp package promote --registry {registry} {meta['version'].value} && "
          f"gcodefp serve --registry {registry} --port 8000\n"
          "  call:   curl -s http://127.0.0.1:8000/info   (API docs: http://127.0.0.1:8000/docs)")
    return 0


def train_seeds(args, instance, token: str) -> bool:
    """One `train_seed` run per seed, each in its own `dagster job execute` process, at most
    --parallel-seeds at once; -> whether every run succeeded."""
    import json
    import subprocess
    import tempfile

    import dagster as dg

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(run_config(args, train=True), f)
    cmd = [sys.executable, "-m", "dagster", "job", "execute", "-m", "gcodefp_dagster.definitions", "-a", "defs",
           "-j", "train_seed", "-c", f.name]
    waiting, running = [str(s) for s in args.seeds], []
    try:
        while waiting or running:
            while waiting and len(running) < args.parallel_seeds:
                seed = waiting.pop(0)
                tags = {"gcodefp/trigger": "cli", "gcodefp/cli_token": token, "dagster/partition": seed}
                running.append(subprocess.Popen(cmd + ["--tags", json.dumps(tags)], stdout=subprocess.DEVNULL,
                                                stderr=None if args.verbose else subprocess.DEVNULL))
            time.sleep(0.5)
            running = [p for p in running if p.poll() is None]
    finally:
        Path(f.name).unlink(missing_ok=True)
    runs = instance.get_runs(dg.RunsFilter(job_name="train_seed", tags={"gcodefp/cli_token": token}))
    for run in runs:
        print(f"run {run.run_id} (train_seed[{run.tags['dagster/partition']}]): {run.status.value}", flush=True)
    return len(runs) == len(args.seeds) and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)


def _stages(args, instance, token: str):
    """-> (every run succeeded, the package materialization or None)."""
    if not execute(prepare_data_job, instance, token, run_config(args)).success:
        return False, None
    if args.until == "data":
        return True, None
    if not train_seeds(args, instance, token):
        print("a seed run failed (see its lines above); no release", file=sys.stderr)
        return False, None
    if args.until == "training":
        return True, None
    result = execute(release_job, instance, token, run_config(args, release_seeds=args.seeds))
    package = result.asset_materializations_for_node("deployment_package") if result.success else []
    if not package:
        print("no package was written (see the failed steps or checks above)", file=sys.stderr)
        return False, None
    return True, package[-1]
