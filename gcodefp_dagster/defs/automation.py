"""The sensor that evaluates the assets' automation conditions (gcodefp_dagster/automation.py):
the retraining cron on the raw logs and the eager, check-gated rebuild of everything after them.
Partitioned assets get one run per seed partition."""

import dagster as dg

automation = dg.AutomationConditionSensorDefinition(
    "retraining_automation", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30)
