"""`dagster dev` for real: webserver + daemon on 127.0.0.1, the full job launched through the GraphQL
API (tiny synthetic data, one seed), the redeploy sensor promoting the new package, and a backfill
of three seed partitions becoming three runs under the daemon's run queue."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from test_dagster_assets import RUN_CONFIG

REPO = Path(__file__).resolve().parents[1]
DAGSTER = Path(sys.executable).with_name("dagster")
pytestmark = pytest.mark.slow

LAUNCH = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
  ... on RunConfigValidationInvalid { errors { message } } ... on InvalidSubsetError { message } } }"""
STATUS = """query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }"""
RUNS = """query { runsOrError(filter: {pipelineName: "redeploy"}) { ... on Runs { results { runId status } } } }"""
ADD_SEED = """mutation($key: String!) { addDynamicPartition(repositorySelector: {repositoryLocationName: "gcodefp",
  repositoryName: "__repository__"}, partitionsDefName: "seed", partitionKey: $key) { __typename } }"""
BACKFILL = """mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
BACKFILL_RUNS = """query($tag: String!) { runsOrError(filter: {tags: [{key: "dagster/backfill", value: $tag}]}) {
  ... on Runs { results { runId status tags { key value } } } } }"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, interval: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"dagster dev exited ({proc.returncode}) while waiting for {what}")
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory):
    root = tmp_path_factory.mktemp("dagster_dev")
    home = root / "home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    port = free_port()
    env = os.environ | {
        "DAGSTER_HOME": str(home), "GCODEFP_CONFIG": str(REPO / "configs" / "tiny.json"), "GCODEFP_SEEDS": "42",
        "GCODEFP_PIPELINE_ARTIFACTS": str(root / "store"), "GCODEFP_REGISTRY": str(root / "registry"),
        "GCODEFP_ALERT_LOG": str(root / "alerts.jsonl"), "GCODEFP_API_URL": "http://127.0.0.1:9",
        "GCODEFP_REQUIRE_SERVER": "false", "WANDB_MODE": "disabled", "DAGSTER_DISABLE_TELEMETRY": "1"}
    log = open(root / "dagster_dev.log", "wb")
    # Its own process group: dagster dev's children (webserver, daemon, code server, runs) die with it.
    proc = subprocess.Popen([str(DAGSTER), "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return httpx.get(f"{url}/server_info", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    try:
        wait_for(up, 120, "the webserver", proc)
        yield url, root, proc
    finally:
        for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(grace)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        log.close()


def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    r = httpx.post(f"{url}/graphql", json={"query": query, "variables": variables or {}}, timeout=30)
    r.raise_for_status()
    doc = r.json()
    assert "errors" not in doc, doc["errors"]
    return doc["data"]


def test_full_job_through_graphql_then_redeploy_sensor(dagster_dev):
    url, root, proc = dagster_dev
    added = graphql(url, ADD_SEED, {"key": "42"})["addDynamicPartition"]["__typename"]
    assert added in ("AddDynamicPartitionSuccess", "DuplicateDynamicPartitionError")  # the seed sensor may be first
    params = {"selector": {"repositoryLocationName": "gcodefp", "repositoryName": "__repository__",
                           "jobName": "full_pipeline"},
              # in process: a step process per asset costs ~8 s of imports each here, ~2 minutes of the
              # suite; `gcodefp pipeline` and the backfill below run steps in their own processes
              "runConfigData": RUN_CONFIG | {"execution": {"config": {"in_process": {}}}},
              "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "42"}]}}
    launched = graphql(url, LAUNCH, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]

    def finished():
        status = graphql(url, STATUS, {"id": run_id})["runOrError"]["status"]
        return status if status in ("SUCCESS", "FAILURE", "CANCELED") else None
    status = wait_for(finished, 420, f"run {run_id}", proc, interval=3)
    assert status == "SUCCESS", (root / "dagster_dev.log").read_text()[-5000:]
    [version] = [p.name for p in (root / "registry" / "packages").iterdir()]

    # The daemon's redeploy sensor picks the package up and promotes it (no server: require_server=false).
    def promoted():
        runs = graphql(url, RUNS)["runsOrError"]["results"]
        done = [r for r in runs if r["status"] in ("SUCCESS", "FAILURE")]
        return done[0] if done else None
    redeploy_run = wait_for(promoted, 150, "the redeploy run", proc, interval=3)
    assert redeploy_run["status"] == "SUCCESS"
    assert (root / "registry" / "CURRENT").read_text().strip() == version


def test_a_three_seed_backfill_is_three_runs(dagster_dev):
    """Materializing checkpoint for three seeds from the UI's backfill: the daemon makes one run per
    seed partition (queued under the instance's run queue and `training` pool), not one run for all."""
    url, root, proc = dagster_dev
    for key in ("101", "102", "103"):
        graphql(url, ADD_SEED, {"key": key})
    params = {"assetSelection": [{"path": ["checkpoint"]}], "partitionNames": ["101", "102", "103"]}
    launched = graphql(url, BACKFILL, {"params": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched

    def three_runs():
        runs = graphql(url, BACKFILL_RUNS, {"tag": launched["backfillId"]})["runsOrError"]["results"]
        return runs if len(runs) >= 3 else None
    runs = wait_for(three_runs, 180, "the backfill's runs", proc, interval=3)
    partitions = sorted(next(t["value"] for t in r["tags"] if t["key"] == "dagster/partition") for r in runs)
    assert partitions == ["101", "102", "103"]
