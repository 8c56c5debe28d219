"""Alerts on failed asset checks (also those of green runs: non-blocking failures do not fail a
run) and on failed runs."""

import dagster as dg

from ...resources import Alerter


def failed_checks(instance: dg.DagsterInstance, run_id: str) -> list[dict]:
    """The failed asset-check evaluations of a run, with the figures they judged."""
    out = []
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        ev = entry.dagster_event.event_specific_data
        if not ev.passed:
            out.append({"asset": ev.asset_key.to_user_string(), "check": ev.check_name, "severity": ev.severity.value,
                        "metadata": {k: getattr(v, "value", v) for k, v in ev.metadata.items()}})
    return out


@dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, default_status=dg.DefaultSensorStatus.RUNNING,
                      minimum_interval_seconds=15, monitor_all_code_locations=False,
                      description="After each successful run, alert on its failed asset checks (non-blocking "
                                  "failures leave the run green).")
def failed_check_alerts(context: dg.RunStatusSensorContext, alerter: Alerter):
    failed = failed_checks(context.instance, context.dagster_run.run_id)
    if not failed:
        return dg.SkipReason(f"run {context.dagster_run.run_id}: no failed checks")
    alerter.send("check_failed", f"{len(failed)} asset check(s) failed in {context.dagster_run.job_name}: "
                 + ", ".join(f"{f['asset']}:{f['check']}" for f in failed),
                 run_id=context.dagster_run.run_id, job=context.dagster_run.job_name, checks=failed)


@dg.run_failure_sensor(default_status=dg.DefaultSensorStatus.RUNNING, minimum_interval_seconds=15,
                       description="Alert on every failed run, with its error and any failed asset checks.")
def run_failure_alerts(context: dg.RunFailureSensorContext, alerter: Alerter):
    run = context.dagster_run
    error = context.failure_event.message if context.failure_event else None
    steps = [e.step_key for e in context.get_step_failure_events()]
    alerter.send("run_failed", f"run of {run.job_name} failed" + (f" in {', '.join(steps)}" if steps else ""),
                 run_id=run.run_id, job=run.job_name, error=error, failed_steps=steps,
                 checks=failed_checks(context.instance, run.run_id))
