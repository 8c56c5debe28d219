"""Where things live: the repository root, the real data beside it, default artifact folders.

The library's environment settings, all read here (the server's are in api/settings.py, the
orchestrator's in gcodefp_dagster's resources):
| variable            | default                                   | meaning                          |
|---------------------|-------------------------------------------|----------------------------------|
| GCODEFP_REAL_DATA   | ../shared/data/cnc-sensor-logs beside the repository | the real CNC logs, read in place |
| GCODEFP_ARTIFACTS   | artifacts/ in the repository              | default artifact store           |
(W&B's own WANDB_MODE is honoured by gcodefp_core.tracking: offline unless configured.)
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path:
    """The real CNC logs, read in place (never copied): $GCODEFP_REAL_DATA or ../shared beside the repo."""
    env = os.environ.get("GCODEFP_REAL_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "cnc-sensor-logs"


def has_real_data() -> bool:
    d = real_data_dir()
    return d.is_dir() and any(d.glob("*_aligned.csv*"))


def resolve(path: str | os.PathLike) -> Path:
    """Resolve a config path: absolute as is, relative ones against the repository root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def artifacts_dir() -> Path:
    """Default artifact store (datasets, checkpoints, ONNX files); $GCODEFP_ARTIFACTS overrides."""
    return Path(os.environ.get("GCODEFP_ARTIFACTS", REPO_ROOT / "artifacts"))
