"""Redeploy: promote a package in the registry and confirm that the API server serves it; the
sensor that starts it for the newest sound package. Never backwards by accident: the sensor
coalesces a backlog to the newest package whose checks passed (the ones it supersedes are listed
in the tick's log and the run's tags), and the job refuses to replace CURRENT with an older
package unless the run asks for a rollback."""

import dagster as dg

from ...resources import Alerter, ApiServer, ArtifactStore
from .package import PACKAGE

INTEGRITY = dg.AssetCheckKey(PACKAGE, "package_integrity")
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


class RedeployConfig(dg.Config):
    version: str                            # the package version to promote
    rollback: bool = False                  # allow an older package to replace CURRENT
    superseded: list[str] = []              # newer-than-served packages skipped in its favour (for the record)


def _roll_back(root, old: str | None, new: str) -> str | None:
    """Point CURRENT back at `old` (the version served before) if there was one."""
    from gcodefp_core import package as pkg

    if old is None or old == new:
        return None
    pkg.promote(root, old)
    return old


def _fail(context, alerter: Alerter, outcome: dict, message: str):
    alerter.send("redeploy_failed", message, run_id=context.run_id, **outcome)
    raise dg.Failure(message, metadata=outcome)


@dg.op(description="Promote the package (CURRENT; the old one becomes PREVIOUS) and confirm that the API server "
                   "serves it (GET /info). Refuses an older package than CURRENT unless rollback is set. A server "
                   "that does not take it rolls the registry back to the previous version.")
def promote_and_confirm(context: dg.OpExecutionContext, config: RedeployConfig, artifacts: ArtifactStore,
                        api_server: ApiServer, alerter: Alerter) -> dg.Output:
    from gcodefp_core import package as pkg
    from gcodefp_core.release import check_forward

    root = artifacts.registry
    outcome = {"version": config.version, "registry": str(root), "server": api_server.url,
               "rollback": config.rollback, "superseded": config.superseded}
    try:
        check_forward(root, pkg.current_version(root), config.version, config.rollback)
    except ValueError as exc:
        _fail(context, alerter, outcome | {"result": "refused", "current": pkg.current_version(root)}, str(exc))
    old = pkg.promote(root, config.version)
    outcome["previous"] = old
    context.log.info(f"registry {root}: CURRENT {config.version} (previous {old})")
    if not api_server.reachable():
        if api_server.require_server:
            rolled = _roll_back(root, old, config.version)
            _fail(context, alerter, outcome | {"result": "failed: server unreachable", "rolled_back_to": rolled},
                  f"API server {api_server.url} is unreachable; registry rolled back to {rolled}")
        outcome["result"] = "promoted; no server reachable (require_server=False)"
        context.log.warning(outcome["result"])
        return dg.Output(None, metadata=outcome)
    outcome["reload"] = api_server.request_reload()
    info = api_server.wait_for_version(config.version)
    if info is None:
        served = (api_server.info() or {}).get("version")
        rolled = _roll_back(root, old, config.version)
        _fail(context, alerter, outcome | {"result": f"failed: server serves {served} after {api_server.timeout_s}s",
                                           "served": served, "rolled_back_to": rolled},
              f"server {api_server.url} serves {served}, not {config.version}; registry rolled back to {rolled}")
    outcome.update(result="served", served=info["version"], variant=info.get("variant"), loaded_at=info.get("loaded_at"))
    context.log.info(f"server {api_server.url} serves {info['version']}")
    return dg.Output(None, metadata=outcome)


@dg.job(name="redeploy", tags={"gcodefp/kind": "redeploy"},
        description="Promote a deployment package and confirm the server serves it.")
def redeploy():
    promote_and_confirm()


def check_passed(instance: dg.DagsterInstance, run_id: str, key: dg.AssetCheckKey) -> bool | None:
    """Whether `key` passed in this run (None: not evaluated)."""
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        ev = entry.dagster_event.event_specific_data
        if ev.asset_check_key == key:
            return bool(ev.passed)
    return None


def sound_packages(context: dg.SensorEvaluationContext) -> tuple[list[str], list[str], int]:
    """New package materializations whose runs finished: -> (versions whose integrity check did not
    fail, oldest first; reasons for the others; the cursor after the last finished one)."""
    cursor = int(context.cursor or 0)
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=PACKAGE, after_storage_id=cursor), limit=100, ascending=True)
    sound, rejected = [], []
    for rec in records.records:
        run = context.instance.get_run_by_id(rec.run_id)
        if run is not None and run.status not in FINISHED:
            break  # its checks may still be running: look again next tick, from here
        cursor = rec.storage_id
        version = rec.asset_materialization.metadata["version"].value
        if check_passed(context.instance, rec.run_id, INTEGRITY) is False:
            rejected.append(f"{version} (package_integrity failed)")
        else:
            sound.append(version)
    return sound, rejected, cursor


@dg.sensor(job=redeploy, minimum_interval_seconds=15, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Redeploys the newest new deployment_package whose run finished with package_integrity passed; "
                       "a backlog (e.g. after downtime) becomes one redeploy, of the newest, the others listed.")
def redeploy_on_new_package(context: dg.SensorEvaluationContext):
    sound, rejected, cursor = sound_packages(context)
    context.update_cursor(str(cursor))
    if not sound:
        return dg.SkipReason("; ".join(rejected) or "no new deployment package (or its run is still going)")
    newest, superseded = sound[-1], sound[:-1]
    note = f"redeploying {newest}" + (f"; superseded, not deployed: {', '.join(superseded)}" if superseded else "") \
        + (f"; rejected: {'; '.join(rejected)}" if rejected else "")
    context.log.info(note)
    return dg.RunRequest(run_key=f"redeploy-{newest}",
                         tags={"gcodefp/package_version": newest, "gcodefp/superseded": ",".join(superseded) or "-"},
                         run_config=dg.RunConfig(ops={"promote_and_confirm": RedeployConfig(version=newest,
                                                                                            superseded=superseded)}))
