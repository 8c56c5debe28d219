"""Shared fixtures. Tests use synthetic data and tiny models; real-data tests skip when ../shared is absent."""
from __future__ import annotations

import os

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
