"""Experiment tracking with Weights & Biases: offline by default, online when configured.

The mode comes from $WANDB_MODE if set, else the config's "wandb.mode" ("offline", "online" or
"disabled"), else "offline": an offline run is a local folder (<run dir>/wandb/offline-run-*) that
`wandb sync` can upload later, so training never needs the network.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)
MODES = ("offline", "online", "disabled")
WANDB_FIELDS = {"mode", "project", "entity", "tags", "log_checkpoint"}


def resolve_mode(wandb_cfg: dict | None) -> str:
    mode = os.environ.get("WANDB_MODE") or (wandb_cfg or {}).get("mode") or "offline"
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"wandb.mode: unknown value {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def validate_config(wandb_cfg: dict) -> None:
    unknown = sorted(set(wandb_cfg) - WANDB_FIELDS)
    if unknown:
        raise ValueError(f"wandb config: unknown field(s) {unknown}; known: {sorted(WANDB_FIELDS)}")
    resolve_mode(wandb_cfg)


class Tracker:
    """One W&B run per trained model: config, per-epoch metrics, final summary, best checkpoint."""

    def __init__(self, wandb_cfg: dict | None, run_dir: Path, config: dict, name: str, group: str | None = None):
        self.cfg = dict(wandb_cfg or {})
        self.mode = resolve_mode(self.cfg)
        self.run = None
        if self.mode == "disabled":
            return
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=self.cfg.get("project", "gcodefp"), entity=self.cfg.get("entity"),
                              dir=str(run_dir), config=config, name=name, group=group, tags=self.cfg.get("tags"),
                              mode=self.mode, reinit="create_new")
        log.info("wandb %s run: %s", self.mode, self.run.dir)

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def log_checkpoint(self, path: Path, name: str, metadata: dict) -> None:
        if self.run is None or not self.cfg.get("log_checkpoint", True):
            return
        import wandb

        art = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]", "-", name), type="model", metadata=metadata)
        art.add_file(str(path))
        self.run.log_artifact(art)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


SWEEP_ID = re.compile(r"^[\w.-]+/[\w.-]+/[\w]+$")


def best_sweep_config(sweep_id: str, wandb_cfg: dict | None) -> tuple[dict, str]:
    """The config of a sweep's best run (by the sweep's metric) -> (config dict, run id).
    Needs W&B online: offline there is no sweep to read, so fail clearly instead of guessing."""
    if not SWEEP_ID.match(sweep_id):
        raise ValueError(f"--sweep-id: expected ENTITY/PROJECT/SWEEP_ID, got {sweep_id!r}")
    mode = resolve_mode(wandb_cfg)
    if mode != "online":
        raise ValueError(f"--sweep-id needs W&B online, but the mode is {mode!r}: set WANDB_MODE=online "
                         "(and log in with `wandb login` or WANDB_API_KEY), or drop --sweep-id")
    import wandb

    try:
        sweep = wandb.Api().sweep(sweep_id)
        best = sweep.best_run()
    except Exception as exc:  # network, auth or unknown sweep: report it as bad input
        raise ValueError(f"--sweep-id {sweep_id}: cannot read the sweep ({type(exc).__name__}: {exc})") from None
    if best is None:
        raise ValueError(f"--sweep-id {sweep_id}: the sweep has no finished run yet")
    return {k: v for k, v in dict(best.config).items() if not k.startswith("_")}, best.id


def apply_sweep_config(config: dict, sweep_config: dict, tunable: dict[str, set[str]]) -> dict:
    """Merge a sweep run's config into ours. Accepts nested sections ({"train": {...}}), dotted keys
    ("train.lr") and bare keys that name a tunable field of exactly one section ("lr")."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for key, value in sweep_config.items():
        if key in tunable and isinstance(value, dict):
            for sub, v in value.items():
                if sub in tunable[key]:
                    out.setdefault(key, {})[sub] = v
        elif "." in key and key.split(".", 1)[0] in tunable:
            section, sub = key.split(".", 1)
            if sub in tunable[section]:
                out.setdefault(section, {})[sub] = value
        else:
            owners = [s for s, fields in tunable.items() if key in fields]
            if len(owners) == 1:
                out.setdefault(owners[0], {})[key] = value
    return out
