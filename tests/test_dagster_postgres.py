"""Dagster on a real PostgreSQL (dagster-postgres): the instance of deploy/dagster/dagster.postgres.yaml,
a pipeline run launched on it (its steps in their own processes, writing events to the server),
and its events read back, through Dagster and straight from the database.

The server: the one CI provides (DAGSTER_PG_HOST/PORT set, e.g. by `deploy/postgres.sh start`),
else one this module starts with deploy/postgres.sh on a free loopback port and stops after.
Skips cleanly when the PostgreSQL binaries are absent."""
from __future__ import annotations

import os
import shutil
import socket
import sys
import subprocess
import tempfile
from pathlib import Path

import dagster as dg
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "postgres.sh"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """-> the DAGSTER_PG_* settings of a running server."""
    if os.environ.get("DAGSTER_PG_HOST"):
        yield {k: os.environ[k] for k in ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_DB",
                                          "DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD")}
        return
    if subprocess.run([str(SCRIPT), "check"]).returncode != 0:
        pytest.skip("PostgreSQL binaries are not installed (postgresql-15)")
    folder = tempfile.mkdtemp(prefix="gcodefp-pg-", dir="/tmp")  # the server's user must reach it
    env = os.environ | {"GCODEFP_PG_DIR": folder, "GCODEFP_PG_PORT": str(free_port())}
    try:
        subprocess.run([str(SCRIPT), "start"], env=env, check=True, timeout=120)
        yield {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": env["GCODEFP_PG_PORT"], "DAGSTER_PG_DB": "dagster",
               "DAGSTER_PG_USERNAME": "dagster", "DAGSTER_PG_PASSWORD": "dagster"}
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=env, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def postgres_home(home: Path) -> Path:
    """A DAGSTER_HOME whose dagster.yaml is the deployment's Postgres instance, paths moved here."""
    home.mkdir(parents=True, exist_ok=True)
    text = (REPO / "deploy" / "dagster" / "dagster.postgres.yaml").read_text()
    (home / "dagster.yaml").write_text(text.replace("/opt/dagster/dagster_home", str(home)))
    return home


def test_a_pipeline_run_on_postgres_and_its_events_read_back(postgres, tmp_path, monkeypatch):
    from gcodefp_dagster.cli import prepare_data_job

    for k, v in postgres.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("GCODEFP_CONFIG", str(REPO / "configs" / "tiny.json"))
    monkeypatch.setenv("GCODEFP_PIPELINE_ARTIFACTS", str(tmp_path / "store"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    home = postgres_home(tmp_path / "home")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        result = dg.execute_job(dg.reconstructable(prepare_data_job), instance,
                                tags={"gcodefp/test": "postgres"}, raise_on_error=False)
        assert result.success
        run = instance.get_run_by_id(result.run_id)
        assert run.status == dg.DagsterRunStatus.SUCCESS and run.job_name == "prepare_data"
        kinds = [e.dagster_event.event_type_value for e in instance.all_logs(result.run_id) if e.dagster_event]
        assert kinds.count("STEP_SUCCESS") == 2 and kinds.count("ASSET_MATERIALIZATION") == 2
        assert dg.DagsterEventType.RUN_SUCCESS.value in kinds
        [record] = instance.fetch_materializations(dg.AssetKey("training_dataset"), limit=1).records
        assert record.run_id == result.run_id and record.asset_materialization.metadata["runs"].value == 27

    import psycopg2  # the same events, straight from the server

    with psycopg2.connect(host=postgres["DAGSTER_PG_HOST"], port=int(postgres["DAGSTER_PG_PORT"]),
                          dbname=postgres["DAGSTER_PG_DB"], user=postgres["DAGSTER_PG_USERNAME"],
                          password=postgres["DAGSTER_PG_PASSWORD"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_id = %s", (result.run_id,))
        assert cur.fetchone() == ("SUCCESS",)
        cur.execute("SELECT count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = 'ASSET_MATERIALIZATION'",
                    (result.run_id,))
        assert cur.fetchone() == (2,)


def test_native_stack_runs_dagster_on_its_postgres(tmp_path):
    """`deploy/stack.sh start postgres code-server dagster-webserver`: the webserver's instance is the
    Postgres one (its GraphQL API says so) and the code location loads; `stop` takes it all down."""
    import httpx

    if subprocess.run([str(SCRIPT), "check"]).returncode != 0:
        pytest.skip("PostgreSQL binaries are not installed (postgresql-15)")
    stack_dir = Path(tempfile.mkdtemp(prefix="gcodefp-stack-", dir="/tmp"))
    stack_dir.chmod(0o711)  # the server's user (postgres, under root) must reach its folder inside
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GCODEFP_", "DAGSTER_"))}
    env |= {"GCODEFP_STACK_DIR": str(stack_dir), "POSTGRES_PORT": str(free_port()), "DAGSTER_PORT": str(free_port()),
            "DAGSTER_CODE_SERVER_PORT": str(free_port()), "GCODEFP_BIN": str(Path(sys.executable).parent),
            "GCODEFP_ADMIN_TOKEN": "stack-test-token", "GCODEFP_CONFIG": str(REPO / "configs" / "tiny.json")}
    services = ("postgres", "code-server", "dagster-webserver")

    def stack(*args):
        return subprocess.run(["bash", str(REPO / "deploy" / "stack.sh"), *args, *services], env=env, text=True,
                              capture_output=True, timeout=300, start_new_session=True)
    try:
        started = stack("start")
        assert started.returncode == 0, started.stdout + started.stderr
        query = "{ instance { info } workspaceOrError { ... on Workspace { locationEntries { name " \
                "locationOrLoadError { __typename } } } } }"
        r = httpx.post(f"http://127.0.0.1:{env['DAGSTER_PORT']}/graphql", json={"query": query}, timeout=60)
        data = r.json()["data"]
        assert "PostgresRunStorage" in data["instance"]["info"]
        [location] = data["workspaceOrError"]["locationEntries"]
        assert location["name"] == "gcodefp" and location["locationOrLoadError"]["__typename"] == "RepositoryLocation"
        assert (stack_dir / "dagster_home" / "dagster.yaml").read_text().count(str(stack_dir / "dagster_home")) == 2
    finally:
        stopped = stack("stop")
        shutil.rmtree(stack_dir, ignore_errors=True)
    assert stopped.returncode == 0 and "postgres: stopped" in stopped.stdout, stopped.stdout + stopped.stderr
