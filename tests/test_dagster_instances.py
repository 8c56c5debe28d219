"""Instance configs: the Kubernetes one (deploy/dagster/dagster.k8s.yaml) against the schemas of the
pinned Dagster (instance) and dagster-k8s (K8sRunLauncher), without a cluster; the local dagster.yaml."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "dagster" / "dagster.k8s.yaml"


def k8s_config() -> dict:
    return yaml.safe_load(K8S.read_text())


def test_instance_config_matches_dagsters_schema(monkeypatch):
    from dagster._config import process_config

    for name, value in {"DAGSTER_PG_HOST": "postgres", "DAGSTER_PG_PORT": "5432", "DAGSTER_PG_DB": "dagster",
                        "DAGSTER_PG_USERNAME": "dagster", "DAGSTER_PG_PASSWORD": "secret"}.items():
        monkeypatch.setenv(name, value)  # the pods get these from the chart's secret and config map
    from dagster._core.instance.config import dagster_instance_config_schema

    result = process_config(dagster_instance_config_schema(), k8s_config())
    assert result.success, [e.message for e in result.errors]


def test_run_launcher_config_matches_dagster_k8s_schema(monkeypatch):
    pytest.importorskip("dagster_k8s", reason="the `k8s` extra (dagster-k8s) is not installed")
    import dagster_k8s
    from dagster._config import process_config

    launcher = k8s_config()["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    assert dagster_k8s.K8sRunLauncher.__module__.startswith(launcher["module"])
    result = process_config(dagster_k8s.K8sRunLauncher.config_type(), launcher["config"])
    assert result.success, [e.message for e in result.errors]
    # a typo is caught by the same schema, so the check above can fail
    bad = process_config(dagster_k8s.K8sRunLauncher.config_type(), launcher["config"] | {"job_imagee": "x"})
    assert not bad.success


def test_every_run_gets_its_own_pod_and_seeds_queue_by_pool():
    cfg = k8s_config()
    assert cfg["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert cfg["concurrency"]["pools"]["granularity"] == "run"
    from gcodefp_dagster.defs.training.assets import TRAINING_POOL, checkpoint

    assert checkpoint.op.pool == TRAINING_POOL and checkpoint.backfill_policy is None  # one run per seed


def test_local_instance_has_no_onboarding_popups_and_queues_seeds_by_pool(tmp_path):
    """The repository's dagster.yaml (copied into every fresh DAGSTER_HOME): the UI opens without the
    community/onboarding modal, and runs wait in the queue for the `training` pool."""
    import shutil

    import dagster as dg

    shutil.copy(REPO / "dagster.yaml", tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.nux_enabled is False
        pools = instance.get_concurrency_config().pool_config
        assert pools.pool_granularity.value == "run" and pools.default_pool_limit >= 1
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
