"""Sensors: redeploy every new package that passed its integrity check, and alert on failed asset
checks (also those of green runs: non-blocking failures do not fail a run) and on failed runs."""

import dagster as dg

from .jobs import RedeployConfig, redeploy
from .resources import Alerter

PACKAGE = dg.AssetKey("deployment_package")
INTEGRITY = dg.AssetCheckKey(PACKAGE, "package_integrity")
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


def failed_checks(instance: dg.DagsterInstance, run_id: str) -> list[dict]:
    """The failed asset-check evaluations of a run, with the figures they judged."""
    out = []
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        ev = entry.dagster_event.event_specific_data
        if not ev.passed:
            out.append({"asset": ev.asset_key.to_user_string(), "check": ev.check_name, "severity": ev.severity.value,
                        "metadata": {k: getattr(v, "value", v) for k, v in ev.metadata.items()}})
    return out


def check_passed(instance: dg.DagsterInstance, run_id: str, key: dg.AssetCheckKey) -> bool | None:
    """Whether `key` passed in this run (None: not evaluated)."""
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        ev = entry.dagster_event.event_specific_data
        if ev.asset_check_key == key:
            return bool(ev.passed)
    return None


@dg.sensor(job=redeploy, minimum_interval_seconds=15, default_status=dg.DefaultSensorStatus.RUNNING,
           description="When deployment_package materializes and its run has finished with package_integrity "
                       "passed, run `redeploy` for that version (one run per version).")
def redeploy_on_new_package(context: dg.SensorEvaluationContext):
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=PACKAGE, after_storage_id=int(context.cursor or 0)), limit=10, ascending=True)
    if not records.records:
        return dg.SkipReason("no new deployment package")
    requests, skipped, cursor = [], [], int(context.cursor or 0)
    for rec in records.records:
        run = context.instance.get_run_by_id(rec.run_id)
        if run is not None and run.status not in FINISHED:
            break  # its checks may still be running: look again next tick, from here
        cursor = rec.storage_id
        version = rec.asset_materialization.metadata["version"].value
        verdict = check_passed(context.instance, rec.run_id, INTEGRITY)
        if verdict is False:
            skipped.append(f"{version}: package_integrity failed")
            continue
        requests.append(dg.RunRequest(run_key=f"redeploy-{version}", tags={"gcodefp/package_version": version},
                                      run_config=dg.RunConfig(ops={"promote_and_confirm": RedeployConfig(version=version)})))
    context.update_cursor(str(cursor))
    if not requests:
        return dg.SkipReason("; ".join(skipped) or "waiting for the package's run to finish")
    return requests


@dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, default_status=dg.DefaultSensorStatus.RUNNING,
                      minimum_interval_seconds=15,
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


def all_sensors() -> list:
    return [redeploy_on_new_package, failed_check_alerts, run_failure_alerts]
