"""Shared fixtures. Tests use synthetic data and tiny models; real-data tests skip when ../shared is absent."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

# The API fixtures (a tiny trained, exported and packaged model) are session-scoped and shared by the
# API, client and native-stack tests, so the tiny model is trained once per test session.
pytest_plugins = ["api_fixtures", "dagster_fixtures"]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def real_data_dir():
    from gcodefp_core.paths import has_real_data, real_data_dir

    if not has_real_data():
        pytest.skip("real data (../shared/data/cnc-sensor-logs) is absent")
    return real_data_dir()


def built_once(tmp_path_factory, name: str, build) -> Path:
    """build(folder) once per test session, even when pytest-xdist runs the session in several worker
    processes: the first worker builds under a file lock into the folder all workers share, the others
    wait and reuse it (training the tiny model twice would cost each worker ~45 s of a 2-core machine).
    Deterministic builds only: every worker must get what it would have built itself."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / f"shared-{name}"
    with FileLock(f"{shared}.lock"):
        if not (shared / ".built").is_file():
            shutil.rmtree(shared, ignore_errors=True)
            shared.mkdir()
            build(shared)
            (shared / ".built").touch()   # a worker that died mid-build leaves no marker: rebuilt
    return shared


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """A small synthetic dataset (3 runs per operation, window 32), built once per session."""
    from gcodefp_core.dataset import build_synthetic_dataset

    def build(folder: Path) -> None:
        build_synthetic_dataset(folder / "ds", runs_per_operation=3, window=32)
    return built_once(tmp_path_factory, "data", build) / "ds"


@pytest.fixture(scope="session")
def exported(synthetic_dataset, tmp_path_factory):
    """{"checkpoint", "model_json", "meta", "dataset"}: a tiny model trained for a few epochs on the
    synthetic dataset and exported (fp32), once per session; the export, runtime, quantize, stream
    and benchmark tests share it."""
    import torch

    from gcodefp_core.config import load_config
    from gcodefp_core.dataset import load_dataset
    from gcodefp_core.export import export_checkpoint
    from gcodefp_core.train import train_model

    torch.set_num_threads(1)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.json")
    cfg["train"].update(epochs=4, samples_per_epoch=2048)
    cfg["wandb"] = {"mode": "disabled"}

    def build(root: Path) -> None:
        train_model(cfg, load_dataset(synthetic_dataset), root / "run", seed=0)
        export_checkpoint(root / "run" / "checkpoint_best.pt", root / "fp32" / "model.onnx", dataset=synthetic_dataset,
                          verify_windows=512)
    root = built_once(tmp_path_factory, "exported", build)
    model_json = root / "fp32" / "model.json"
    return {"checkpoint": root / "run" / "checkpoint_best.pt", "model_json": model_json,
            "meta": json.loads(model_json.read_text()), "dataset": synthetic_dataset}
