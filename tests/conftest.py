"""Shared fixtures. Tests use synthetic data and tiny models; real-data tests skip when ../shared is absent."""
from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """A small synthetic dataset (3 runs per operation, window 32), built once per session."""
    from gcodefp_core.dataset import build_synthetic_dataset

    return build_synthetic_dataset(tmp_path_factory.mktemp("data") / "ds", runs_per_operation=3, window=32)


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
    root = tmp_path_factory.mktemp("exported")
    train_model(cfg, load_dataset(synthetic_dataset), root / "run", seed=0)
    ckpt = root / "run" / "checkpoint_best.pt"
    meta = export_checkpoint(ckpt, root / "fp32" / "model.onnx", dataset=synthetic_dataset, verify_windows=512)
    return {"checkpoint": ckpt, "model_json": root / "fp32" / "model.json", "meta": meta, "dataset": synthetic_dataset}
