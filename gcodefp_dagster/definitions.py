"""The code location: `dagster dev -w workspace.yaml` (or `dagster dev -m gcodefp_dagster.definitions`).

Configuration comes from the environment when the location loads (see defs/resources.py);
build_definitions() takes explicit seeds/resources for tests and for the `gcodefp pipeline` command.
"""

import dagster as dg

from .defs import benchmark, checks, data, export, package, schedules, sensors, training
from .defs.jobs import full_pipeline, redeploy
from .defs.resources import default_resources, seeds_from_env


def seed_partitions(seeds: list[int] | None = None) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([str(s) for s in (seeds or seeds_from_env())])


def build_definitions(seeds: list[int] | None = None, resources: dict | None = None,
                      executor: dg.ExecutorDefinition | None = None) -> dg.Definitions:
    parts = seed_partitions(seeds)
    assets = [data.sensor_logs, data.training_dataset, *training.build_training_assets(parts), export.onnx_model,
              export.encoder_onnx, export.model_fp16, export.model_int8_dynamic, export.model_int8_static,
              benchmark.benchmark_report, package.deployment_package]
    return dg.Definitions(
        assets=assets, asset_checks=checks.all_checks(), jobs=[full_pipeline, redeploy],
        schedules=[schedules.build_retrain_schedule(parts)], sensors=sensors.all_sensors(),
        resources=default_resources() | (resources or {}), executor=executor or dg.multi_or_in_process_executor)


defs = build_definitions()


def full_pipeline_job() -> dg.JobDefinition:
    """The full_pipeline job of the environment's definitions; a module-level function so that
    dg.reconstructable() can rebuild it in the multiprocess executor's workers."""
    return build_definitions().resolve_job_def("full_pipeline")
