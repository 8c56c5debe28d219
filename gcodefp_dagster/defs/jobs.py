"""Jobs: the whole asset graph (retraining through to a new package) and the redeploy of a package."""

import dagster as dg

from .resources import Alerter, ApiServer, PackageRegistry

FULL_JOB = "full_pipeline"
REDEPLOY_JOB = "redeploy"
PARTITION_RANGE_START = "dagster/asset_partition_range_start"
PARTITION_RANGE_END = "dagster/asset_partition_range_end"

full_pipeline = dg.define_asset_job(
    FULL_JOB, selection=dg.AssetSelection.all(),
    description="Logs -> dataset -> one checkpoint per seed -> ensemble -> ONNX + variants -> benchmark -> package. "
                "Run it over every seed partition (tags from seed_range_tags) so one run trains all seeds.")


def seed_range_tags(seeds: dg.StaticPartitionsDefinition) -> dict[str, str]:
    """Tags that make one run cover every seed partition (a partition-range run)."""
    keys = seeds.get_partition_keys()
    return {PARTITION_RANGE_START: keys[0], PARTITION_RANGE_END: keys[-1]}


class RedeployConfig(dg.Config):
    version: str                            # the package version to promote


@dg.op(description="Promote the package in the registry (CURRENT; the old one becomes PREVIOUS) and confirm that "
                   "the API server serves it (GET /info). Failure rolls the registry back to the previous version.")
def promote_and_confirm(context: dg.OpExecutionContext, config: RedeployConfig, registry: PackageRegistry,
                        api_server: ApiServer, alerter: Alerter) -> dg.Output:
    from gcodefp_core import package as pkg

    root = registry.path
    old = pkg.promote(root, config.version)
    context.log.info(f"registry {root}: CURRENT {config.version} (previous {old})")
    outcome = {"version": config.version, "previous": old, "registry": str(root), "server": api_server.url}
    if not api_server.reachable():
        if api_server.require_server:
            rolled = _roll_back(root, old, config.version)
            outcome.update(result="failed: server unreachable", rolled_back_to=rolled)
            alerter.send("redeploy_failed", f"redeploy {config.version}: server {api_server.url} unreachable",
                         run_id=context.run_id, **outcome)
            raise dg.Failure(f"API server {api_server.url} is unreachable; registry rolled back to {rolled}",
                             metadata=outcome)
        outcome["result"] = "promoted; no server reachable (require_server=False)"
        context.log.warning(outcome["result"])
        return dg.Output(None, metadata=outcome)
    outcome["reload"] = api_server.request_reload()
    info = api_server.wait_for_version(config.version)
    if info is None:
        served = (api_server.info() or {}).get("version")
        rolled = _roll_back(root, old, config.version)
        outcome.update(result=f"failed: server serves {served} after {api_server.timeout_s}s", served=served,
                       rolled_back_to=rolled)
        alerter.send("redeploy_failed", f"redeploy {config.version}: server serves {served}", run_id=context.run_id,
                     **outcome)
        raise dg.Failure(f"server {api_server.url} serves {served}, not {config.version}; registry rolled back to {rolled}",
                         metadata=outcome)
    outcome.update(result="served", served=info["version"], variant=info.get("variant"), loaded_at=info.get("loaded_at"))
    context.log.info(f"server {api_server.url} serves {info['version']}")
    return dg.Output(None, metadata=outcome)


def _roll_back(root, old: str | None, new: str) -> str | None:
    """Point CURRENT back at `old` (the version served before) if there was one."""
    from gcodefp_core import package as pkg

    if old is None or old == new:
        return None
    pkg.promote(root, old)
    return old


@dg.job(name=REDEPLOY_JOB, description="Promote a deployment package and confirm the server serves it.")
def redeploy():
    promote_and_confirm()
