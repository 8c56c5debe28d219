"""`gcodefp pipeline`: materialize the whole Dagster asset graph from the terminal.

The same job the UI runs (gcodefp_dagster full_pipeline, one run over every seed partition),
recorded in the same Dagster instance ($DAGSTER_HOME, default .dagster_home/ in the repository), so
the UI shows the run, its materializations and its checks. Registered into `gcodefp` through the
`gcodefp.commands` entry point; Dagster is imported when the command runs, not when `gcodefp` starts.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path

STEP_EVENTS = ("STEP_START", "STEP_SUCCESS", "STEP_FAILURE", "ASSET_MATERIALIZATION", "ASSET_CHECK_EVALUATION")


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="run the whole Dagster pipeline (data -> package) from the terminal",
                       description="Materialize every asset (logs, dataset, one checkpoint per seed, ensemble, ONNX "
                                   "and quantized variants, benchmark, deployment package) with their checks, "
                                   "recorded in the Dagster instance the UI reads ($DAGSTER_HOME, default "
                                   ".dagster_home/). Prints where the package landed.")
    p.add_argument("--config", type=Path, required=True, help="JSON config (data/model/train sections)")
    p.add_argument("--data", type=Path, help="folder of *_aligned.csv[.gz] logs (default: the config's data.source; "
                                             "synthetic logs when that is 'synthetic' or absent)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds, one model each (default 42 43 44)")
    p.add_argument("--artifacts", type=Path, help="artifact store (default artifacts/pipeline)")
    p.add_argument("--registry", type=Path, help="package registry (default artifacts/registry)")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--parallel-seeds", type=int, default=1, help="seeds trained at once (worker processes)")
    p.add_argument("--threads", type=int, help="torch threads per training process (train.num_threads)")
    p.add_argument("--executor", choices=["multiprocess", "in_process"], default="multiprocess",
                   help="Dagster executor (default multiprocess: independent assets run side by side)")
    p.add_argument("--max-concurrent", type=int, help="multiprocess executor: steps at once (default: CPU count)")
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
    """Settings travel as environment variables: the multiprocess executor's workers rebuild the
    definitions from them (gcodefp_dagster.definitions.full_pipeline_job)."""
    if not args.config.is_file():
        raise FileNotFoundError(f"--config: not found: {args.config}")
    from gcodefp_core.config import load_config

    load_config(args.config)  # fail here, naming the field, rather than inside a run
    os.environ["GCODEFP_CONFIG"] = str(args.config.resolve())
    if args.data is not None:
        if not args.data.is_dir():
            raise FileNotFoundError(f"--data: not a folder: {args.data}")
        os.environ["GCODEFP_DATA"] = str(args.data.resolve())
    if args.seeds:
        if len(set(args.seeds)) != len(args.seeds):
            raise ValueError(f"--seeds: duplicates in {args.seeds}")
        os.environ["GCODEFP_SEEDS"] = ",".join(map(str, args.seeds))
    if args.artifacts:
        os.environ["GCODEFP_PIPELINE_ARTIFACTS"] = str(args.artifacts.resolve())
    if args.registry:
        os.environ["GCODEFP_REGISTRY"] = str(args.registry.resolve())


def run_config(args) -> dict:
    if args.parallel_seeds < 1:
        raise ValueError(f"--parallel-seeds must be >= 1, got {args.parallel_seeds}")
    train = {"parallel_seeds": args.parallel_seeds} | ({"epochs": args.epochs} if args.epochs else {}) \
        | ({"num_threads": args.threads} if args.threads else {})
    cfg: dict = {"ops": {"checkpoint": {"config": train}},
                 "loggers": {"console": {"config": {"log_level": "DEBUG" if args.verbose else "WARNING"}}}}
    if args.executor == "in_process":
        cfg["execution"] = {"config": {"in_process": {}}}
    else:
        cfg["execution"] = {"config": {"multiprocess": {"max_concurrent": args.max_concurrent or 0}}}
    return cfg


def describe(event, t0: float) -> str | None:
    """One progress line for a run event (None: not worth a line)."""
    kind, step = event.event_type_value, event.step_key
    stamp = f"[{time.monotonic() - t0:7.1f}s]"
    data = event.event_specific_data
    if kind == "STEP_START":
        return f"{stamp} {step} started"
    if kind == "STEP_SUCCESS":
        return f"{stamp} {step} done ({data.duration_ms / 1000:.1f}s)"
    if kind == "STEP_FAILURE":
        return f"{stamp} {step} FAILED: {data.error.message.strip().splitlines()[-1] if data.error else ''}"
    if kind == "ASSET_MATERIALIZATION":
        m = data.materialization
        part = f"[{m.partition}]" if m.partition else ""
        path = m.metadata.get("path")
        return f"{stamp} materialized {m.asset_key.to_user_string()}{part}" + (f" -> {path.value}" if path else "")
    if kind == "ASSET_CHECK_EVALUATION":
        return f"{stamp} check {data.asset_key.to_user_string()}:{data.check_name} {'passed' if data.passed else 'FAILED'}"
    return None


def follow(instance, token: str, stop: threading.Event, t0: float) -> None:
    """Print progress lines for the run tagged `token` until `stop` is set (a thread beside the run)."""
    from dagster import RunsFilter

    run_id, cursor = None, -1
    while not stop.is_set():
        if run_id is None:
            runs = instance.get_runs(RunsFilter(tags={"gcodefp/cli_token": token}), limit=1)
            run_id = runs[0].run_id if runs else None
        if run_id is not None:
            for entry in instance.all_logs(run_id)[cursor + 1:]:
                cursor += 1
                if entry.dagster_event is not None and entry.dagster_event.event_type_value in STEP_EVENTS:
                    line = describe(entry.dagster_event, t0)
                    if line:
                        print(line, flush=True)
        stop.wait(1.0)


def _pipeline(args) -> int:
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations of a new instance: noise
    if not args.verbose:  # the multiprocess executor's own engine events; progress lines replace them
        logging.getLogger("dagster").setLevel(logging.WARNING)
    if not args.verbose:  # W&B's per-run banners, repeated by every seed's worker process
        os.environ.setdefault("WANDB_SILENT", "true")
    _configure_env(args)
    home = ensure_dagster_home()
    import dagster as dg

    from gcodefp_dagster.definitions import full_pipeline_job, seed_partitions
    from gcodefp_dagster.defs.jobs import seed_range_tags

    instance = dg.DagsterInstance.get()
    token = uuid.uuid4().hex
    tags = seed_range_tags(seed_partitions()) | {"gcodefp/trigger": "cli", "gcodefp/cli_token": token}
    print(f"gcodefp pipeline: seeds {os.environ.get('GCODEFP_SEEDS', '42,43,44')}, config {args.config}, "
          f"Dagster instance {home}", flush=True)
    t0 = time.monotonic()
    stop = threading.Event()
    printer = threading.Thread(target=follow, args=(instance, token, stop, t0), daemon=True)
    printer.start()
    try:
        result = dg.execute_job(dg.reconstructable(full_pipeline_job), instance, run_config=run_config(args), tags=tags)
    finally:
        time.sleep(1.5)  # let the printer catch the last events
        stop.set()
        printer.join(5)
    print(f"run {result.run_id}: {'SUCCESS' if result.success else 'FAILURE'} in {time.monotonic() - t0:.0f}s "
          "(open the Dagster UI on the same DAGSTER_HOME to inspect it)")
    package = [m for m in result.asset_materializations_for_node("deployment_package")] if result.success else []
    if not package:
        print("no package was written (see the failed steps or checks above)", file=sys.stderr)
        return 1
    meta = package[-1].metadata
    print(f"package {meta['version'].value} ({meta['variant'].value}): {meta['path'].value}")
    registry = Path(meta['path'].value).parent.parent
    print("\nNext:\n"
          f"  UI:     DAGSTER_HOME={home} GCODEFP_CONFIG={args.config.resolve()} "
          "dagster dev -w workspace.yaml   # http://127.0.0.1:3000\n"
          f"  serve:  gcodefp package promote --registry {registry} {meta['version'].value} && "
          f"gcodefp serve --registry {registry} --port 8000\n"
          "  call:   curl -s http://127.0.0.1:8000/info   (API docs: http://127.0.0.1:8000/docs)")
    return 0
