"""Sensors, declarative automation and the redeploy job, evaluated against a real Dagster instance.
Packages here are small fake ones (a dummy graph file): promotion only verifies checksums, and the
"server" is a stub that serves the registry's CURRENT version on /info like the real one does."""
from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
from fakes import fake_export

from gcodefp_core import package as pkg
from gcodefp_dagster.automation import RETRAIN_CRON
from gcodefp_dagster.definitions import build_definitions
from gcodefp_dagster.defs.release import alerts as alert_sensors
from gcodefp_dagster.defs.release.redeploy import redeploy, redeploy_on_new_package
from gcodefp_dagster.defs.training.assets import register_seeds, seed_partitions
from gcodefp_dagster.resources import Alerter, ApiServer, ArtifactStore


def fake_package(registry: Path, version: str) -> Path:
    model = fake_export(registry.parent / f"model-{version}")
    (model / "m.encoder.onnx").write_bytes(b"not really a graph " + version.encode())  # each version its own bytes
    return pkg.build_package(model, registry, version=version)


class StubServer:
    """/health and /info; /info reports the registry's CURRENT (follow=True) or a fixed version."""

    def __init__(self, registry: Path, follow: bool = True, fixed: str | None = None):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                version = pkg.current_version(registry) if follow else fixed
                body = json.dumps({"status": "ok"} if self.path == "/health" else {"version": version}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def run_redeploy(version: str, registry: Path, api: ApiServer, alerts: Path, rollback: bool = False):
    return redeploy.execute_in_process(
        run_config={"ops": {"promote_and_confirm": {"config": {"version": version, "rollback": rollback}}}},
        resources={"artifacts": ArtifactStore(registry_root=str(registry)), "api_server": api,
                   "alerter": Alerter(log_path=str(alerts))},
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)


def output_metadata(result) -> dict:
    return next(e for e in result.all_events if e.event_type_value == "STEP_OUTPUT").event_specific_data.metadata


def read_alerts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_redeploy_promotes_and_confirms_the_served_version(tmp_path):
    reg = tmp_path / "registry"
    fake_package(reg, "v1")
    fake_package(reg, "v2")
    pkg.promote(reg, "v1")
    server = StubServer(reg)
    try:
        result = run_redeploy("v2", reg, ApiServer(url=server.url, timeout_s=5), tmp_path / "alerts.jsonl")
    finally:
        server.close()
    assert result.success
    assert pkg.current_version(reg) == "v2" and pkg.previous_version(reg) == "v1"  # v1 kept for rollback
    meta = output_metadata(result)
    assert meta["result"].value == "served" and meta["served"].value == "v2"


def test_redeploy_fails_and_rolls_back_when_the_server_keeps_the_old_version(tmp_path):
    reg, alerts = tmp_path / "registry", tmp_path / "alerts.jsonl"
    fake_package(reg, "v1")
    fake_package(reg, "v2")
    pkg.promote(reg, "v1")
    server = StubServer(reg, follow=False, fixed="v1")
    try:
        result = run_redeploy("v2", reg, ApiServer(url=server.url, timeout_s=1.5), alerts)
    finally:
        server.close()
    assert not result.success
    assert pkg.current_version(reg) == "v1"
    [alert] = read_alerts(alerts)
    assert alert["kind"] == "redeploy_failed" and alert["served"] == "v1" and alert["rolled_back_to"] == "v1"


def test_redeploy_without_a_server(tmp_path):
    reg = tmp_path / "registry"
    fake_package(reg, "v1")
    nowhere = "http://127.0.0.1:9"  # discard port: nothing listens
    strict = run_redeploy("v1", reg, ApiServer(url=nowhere, timeout_s=1), tmp_path / "a.jsonl")
    assert not strict.success and read_alerts(tmp_path / "a.jsonl")[0]["kind"] == "redeploy_failed"
    relaxed = run_redeploy("v1", reg, ApiServer(url=nowhere, require_server=False, timeout_s=1), tmp_path / "b.jsonl")
    assert relaxed.success and pkg.current_version(reg) == "v1"
    meta = output_metadata(relaxed)
    assert "no server reachable" in meta["result"].value


def package_run(instance: dg.DagsterInstance, version: str, integrity_passes: bool):
    """A run that materializes an asset named deployment_package and evaluates its package_integrity check."""
    @dg.asset(name="deployment_package")
    def fake():
        return dg.MaterializeResult(metadata={"version": version, "path": f"/nowhere/{version}"})

    @dg.asset_check(asset=fake, name="package_integrity")
    def integrity():
        return dg.AssetCheckResult(passed=integrity_passes)

    return dg.materialize([fake, integrity], instance=instance)


def test_redeploy_sensor_requests_each_new_sound_package_once():
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance)
        assert isinstance(redeploy_on_new_package(ctx), dg.SkipReason)
        package_run(instance, "v7", integrity_passes=True)
        package_run(instance, "v8", integrity_passes=False)
        req = redeploy_on_new_package(ctx)
        assert req.run_key == "redeploy-v7"
        assert req.run_config["ops"]["promote_and_confirm"]["config"]["version"] == "v7"
        ctx = dg.build_sensor_context(instance=instance, cursor=ctx.cursor)
        assert isinstance(redeploy_on_new_package(ctx), dg.SkipReason)


def test_a_backlog_of_three_unseen_packages_is_one_redeploy_of_the_newest(capfd):
    """After downtime: three sound packages the sensor has not seen -> one run, for the newest; the
    two it supersedes are named in the tick's log and the run's tags and config."""
    with dg.instance_for_test() as instance:
        for version in ("v1-synthetic", "v2-full", "v3-side-channel"):
            package_run(instance, version, integrity_passes=True)
        package_run(instance, "v4-broken", integrity_passes=False)
        ctx = dg.build_sensor_context(instance=instance)
        capfd.readouterr()
        req = redeploy_on_new_package(ctx)
        tick_log = capfd.readouterr().err
        assert isinstance(req, dg.RunRequest)  # one request, not a list
        assert req.run_key == "redeploy-v3-side-channel"
        assert req.tags["gcodefp/superseded"] == "v1-synthetic,v2-full"
        assert req.run_config["ops"]["promote_and_confirm"]["config"]["superseded"] == ["v1-synthetic", "v2-full"]
        assert "superseded, not deployed: v1-synthetic, v2-full" in tick_log
        assert "v4-broken (package_integrity failed)" in tick_log
        assert isinstance(redeploy_on_new_package(dg.build_sensor_context(instance=instance, cursor=ctx.cursor)),
                          dg.SkipReason)


def test_redeploy_refuses_an_older_package_unless_it_is_a_rollback(tmp_path):
    reg = tmp_path / "registry"
    fake_package(reg, "v1")
    fake_package(reg, "v2")
    pkg.promote(reg, "v2")
    nowhere = ApiServer(url="http://127.0.0.1:9", require_server=False, timeout_s=1)
    refused = run_redeploy("v1", reg, nowhere, tmp_path / "alerts.jsonl")
    assert not refused.success and pkg.current_version(reg) == "v2"
    [alert] = read_alerts(tmp_path / "alerts.jsonl")
    assert alert["result"] == "refused" and "older than the served v2" in alert["summary"]
    rolled = run_redeploy("v1", reg, nowhere, tmp_path / "alerts.jsonl", rollback=True)
    assert rolled.success and pkg.current_version(reg) == "v1" and pkg.previous_version(reg) == "v2"


def test_failed_check_alert_after_a_green_run(tmp_path):
    @dg.asset
    def thing():
        return 1

    @dg.asset_check(asset=thing)
    def always_fails():
        return dg.AssetCheckResult(passed=False, metadata={"figure": 3.5})

    alerts = tmp_path / "alerts.jsonl"
    with dg.instance_for_test() as instance:
        result = dg.materialize([thing, always_fails], instance=instance)
        assert result.success  # a non-blocking failure leaves the run green
        run = instance.get_run_by_id(result.run_id)
        success = instance.all_logs(result.run_id, of_type=dg.DagsterEventType.RUN_SUCCESS)[0].dagster_event
        ctx = dg.build_run_status_sensor_context(sensor_name="failed_check_alerts", dagster_event=success,
                                                 dagster_instance=instance, dagster_run=run,
                                                 resources={"alerter": Alerter(log_path=str(alerts))})
        alert_sensors.failed_check_alerts(ctx)
    [alert] = read_alerts(alerts)
    assert alert["kind"] == "check_failed" and alert["run_id"] == result.run_id
    assert alert["checks"] == [{"asset": "thing", "check": "always_fails", "severity": "ERROR",
                                "metadata": {"figure": 3.5}}]


def test_run_failure_alert_posts_to_the_webhook_and_logs(tmp_path):
    received = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()

    @dg.op
    def explode():
        raise RuntimeError("boom in the op")

    @dg.job
    def doomed():
        explode()

    alerts = tmp_path / "alerts.jsonl"
    try:
        with dg.instance_for_test() as instance:
            result = doomed.execute_in_process(instance=instance, raise_on_error=False)
            run = instance.get_run_by_id(result.run_id)
            failure = instance.all_logs(result.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)[0].dagster_event
            alerter = Alerter(log_path=str(alerts), webhook_url=f"http://127.0.0.1:{hook.server_address[1]}/hook")
            ctx = dg.build_run_status_sensor_context(sensor_name="run_failure_alerts", dagster_event=failure,
                                                     dagster_instance=instance, dagster_run=run,
                                                     resources={"alerter": alerter}).for_run_failure()
            alert_sensors.run_failure_alerts(ctx)
    finally:
        hook.shutdown()
    [alert] = read_alerts(alerts)
    assert alert["kind"] == "run_failed" and alert["failed_steps"] == ["explode"] and alert["webhook_status"] == 204
    assert received and received[0]["run_id"] == result.run_id


def test_definitions_wire_automation_running_by_default():
    defs = build_definitions()
    with dg.instance_for_test():  # resolving the repository wants a current instance
        repo = defs.get_repository_def()
    for name in ("redeploy_on_new_package", "failed_check_alerts", "run_failure_alerts", "seed_partitions",
                 "retraining_automation"):
        assert repo.get_sensor_def(name).default_status == dg.DefaultSensorStatus.RUNNING
    assert repo.get_sensor_def("redeploy_on_new_package").job_name == "redeploy"
    assert "on_cron" in defs.resolve_assets_def("sensor_logs").automation_conditions_by_key[
        dg.AssetKey("sensor_logs")].get_label()
    assert defs.resolve_assets_def("checkpoint").partitions_def.name == "seed"
    assert not repo.schedule_defs  # retraining is declared on the assets, not a hand-built schedule


def test_seed_sensor_registers_the_configured_seeds(monkeypatch):
    monkeypatch.setenv("GCODEFP_SEEDS", "7,8")
    with dg.instance_for_test() as instance:
        result = seed_partitions(dg.build_sensor_context(instance=instance))
        [request] = result.dynamic_partitions_requests
        assert request.partitions_def_name == "seed" and list(request.partition_keys) == ["7", "8"]


def report(instance: dg.DagsterInstance, *assets: str, partitions=(None,)) -> None:
    for asset in assets:
        for partition in partitions:
            instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=asset, partition=partition))


def report_check(instance: dg.DagsterInstance, asset: str, check: str, passed: bool) -> None:
    instance.report_runless_asset_event(dg.AssetCheckEvaluation(asset_key=dg.AssetKey(asset), check_name=check,
                                                                passed=passed))


def test_declarative_automation_retrains_on_cron_and_a_failed_blocking_check_stops_the_package():
    """The real definitions' automation conditions, evaluated tick by tick on a real instance: the
    cron starts a retraining at the raw logs, every seed partition follows the new dataset, and the
    package waits while a blocking check of its parents has failed."""
    defs = build_definitions()
    monday = datetime(2026, 11, 23, 3, 0, tzinfo=timezone.utc)
    assert RETRAIN_CRON == "0 3 * * 1"
    with dg.instance_for_test() as instance:
        register_seeds(instance, ["42", "43", "44"])
        tick = dg.evaluate_automation_conditions(defs, instance, evaluation_time=monday.replace(hour=2))
        assert tick.total_requested == 0  # nothing exists, the cron has not ticked: nothing to do
        tick = dg.evaluate_automation_conditions(defs, instance, evaluation_time=monday.replace(minute=1),
                                                 cursor=tick.cursor)
        assert tick.get_requested_partitions(dg.AssetKey("sensor_logs")) == {None}  # the retraining starts

        report(instance, "sensor_logs", "training_dataset")
        tick = dg.evaluate_automation_conditions(defs, instance, evaluation_time=monday.replace(minute=5),
                                                 cursor=tick.cursor)
        assert tick.get_requested_partitions(dg.AssetKey("checkpoint")) == {"42", "43", "44"}

        report(instance, "checkpoint", partitions=("42", "43", "44"))
        report(instance, "ensemble_config", "onnx_model", "encoder_onnx", "model_fp16", "model_int8_dynamic",
               "model_int8_static", "benchmark_report")
        report_check(instance, "onnx_model", "onnx_parity", True)
        report_check(instance, "benchmark_report", "latency_sla", False)
        tick = dg.evaluate_automation_conditions(defs, instance, evaluation_time=monday.replace(minute=10),
                                                 cursor=tick.cursor)
        assert tick.get_num_requested(dg.AssetKey("deployment_package")) == 0  # blocked by latency_sla

        report_check(instance, "benchmark_report", "latency_sla", True)
        tick = dg.evaluate_automation_conditions(defs, instance, evaluation_time=monday.replace(minute=15),
                                                 cursor=tick.cursor)
        assert tick.get_num_requested(dg.AssetKey("deployment_package")) == 1
