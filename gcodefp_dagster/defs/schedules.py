"""The retraining schedule: weekly by default (GCODEFP_RETRAIN_CRON), the whole graph over every
seed partition in one run, i.e. a new dataset, new checkpoints and a new package."""

import os

import dagster as dg

from .jobs import full_pipeline, seed_range_tags
from .resources import DEFAULT_CRON


def build_retrain_schedule(seeds: dg.StaticPartitionsDefinition, cron: str | None = None) -> dg.ScheduleDefinition:
    cron = cron or os.environ.get("GCODEFP_RETRAIN_CRON", DEFAULT_CRON)
    tags = seed_range_tags(seeds)

    @dg.schedule(job=full_pipeline, cron_schedule=cron, execution_timezone="UTC", name="retrain",
                 default_status=dg.DefaultScheduleStatus.RUNNING,
                 description=f"Retrain ({cron} UTC): rebuild the dataset, retrain seeds "
                             f"{', '.join(seeds.get_partition_keys())}, export, benchmark, package.")
    def retrain(context: dg.ScheduleEvaluationContext):
        stamp = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
        return dg.RunRequest(run_key=f"retrain-{stamp}", tags={**tags, "gcodefp/trigger": "schedule"})

    return retrain
