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
