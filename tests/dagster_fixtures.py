"""Fixtures for the Dagster tests: the asset graph's tiny run configuration, definitions bound to a
temporary artifact store, and the whole graph materialized once per session (shared by the asset
and crash-safety tests). Loaded through `pytest_plugins` in tests/conftest.py."""
from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from gcodefp_core.variants import QUANTIZED
from gcodefp_dagster.definitions import build_definitions
from gcodefp_dagster.defs.training.assets import register_seeds
from gcodefp_dagster.resources import Alerter, ArtifactStore, PipelineConfig, QualityGates

REPO = Path(__file__).resolve().parents[1]
PACKAGE = dg.AssetKey("deployment_package")
VARIANT_ASSETS = [f"model_{v}" for v in QUANTIZED]
EXPORT_ONWARDS = [dg.AssetKey(k) for k in ("onnx_model", *VARIANT_ASSETS, "benchmark_report", "deployment_package")]
# Tiny everything: 1 epoch over 256 windows, few windows verified, scored and timed.
RUN_CONFIG = {"ops": {
    "checkpoint": {"config": {"epochs": 1, "samples_per_epoch": 256, "val_max_windows": 128, "num_threads": 1,
                              "wandb_mode": "disabled"}},
    "onnx_model": {"config": {"verify_windows": 32, "eval_windows": 64}},
    "encoder_onnx": {"config": {"verify_windows": 32}},
    **{name: {"config": {"calibration_windows": 128, "eval_windows": 64}} for name in VARIANT_ASSETS},
    "benchmark_report": {"config": {"batch_sizes": [1], "iterations": 30, "warmup": 5}}}}


def make_defs(root: Path, gates: QualityGates | None = None) -> dg.Definitions:
    return build_definitions(executor=dg.in_process_executor, resources={
        "pipeline_config": PipelineConfig(config_path=str(REPO / "configs" / "tiny.json")),
        "artifacts": ArtifactStore(root=str(root / "store"), registry_root=str(root / "registry")),
        "alerter": Alerter(log_path=str(root / "alerts.jsonl")), "gates": gates or QualityGates(parity_windows=32)})


def run(defs, instance, selection=None, raise_on_error=False):
    register_seeds(instance, ["42"])
    return defs.resolve_job_def("full_pipeline").execute_in_process(
        run_config=RUN_CONFIG, instance=instance, partition_key="42", asset_selection=selection,
        raise_on_error=raise_on_error)


def check_results(result) -> dict[str, dg.AssetCheckEvaluation]:
    """Evaluations by check name; the per-variant gates as "<asset>:<check>"."""
    out = {}
    for e in result.all_events:
        if e.event_type_value == "ASSET_CHECK_EVALUATION":
            ev, asset = e.event_specific_data, e.event_specific_data.asset_key.to_user_string()
            out[f"{asset}:{ev.check_name}" if asset.startswith("model_") else ev.check_name] = ev
    return out


def materialized(result) -> set[str]:
    return {e.event_specific_data.materialization.asset_key.to_user_string()
            for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"}


def packages(registry: Path) -> list[str]:
    return sorted(p.name for p in (registry / "packages").iterdir()) if (registry / "packages").is_dir() else []


@pytest.fixture(scope="session")
def dagster_pipeline(tmp_path_factory):
    """The whole graph materialized once per session, in process, on tiny synthetic data:
    (root folder, instance, definitions, the run's result)."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dagster_pipeline")
    instance = dg.DagsterInstance.ephemeral()
    defs = make_defs(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        result = run(defs, instance, raise_on_error=True)
    return root, instance, defs, result


