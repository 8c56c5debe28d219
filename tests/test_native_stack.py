"""The native loopback stack for real: `deploy/stack.sh start api prometheus` (the container commands on
127.0.0.1) with a real Prometheus (Debian's package) and the repository's scrape config, serving a
tiny package; predictions must show up in Prometheus and every Grafana dashboard query must evaluate.
Also: the inference image's requirements are enough to serve (every other distribution blocked)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement

from api_fixtures import free_port

REPO = Path(__file__).resolve().parents[1]
STACK = REPO / "deploy" / "stack.sh"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
pytestmark = pytest.mark.slow


def wait_until(fn, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def stack(api_registry, tmp_path_factory):
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.skip("prometheus is not installed (apt-get install -y prometheus); the native stack test needs it")
    root = tmp_path_factory.mktemp("stack")
    shutil.copytree(api_registry, root / "registry")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GCODEFP_", "PROMETHEUS_", "DAGSTER_"))}
    env |= {"GCODEFP_STACK_DIR": str(root / "stack"), "GCODEFP_REGISTRY": str(root / "registry"),
            "GCODEFP_API_PORT": str(free_port()), "PROMETHEUS_PORT": str(free_port()), "PROMETHEUS_BIN": PROMETHEUS,
            "GCODEFP_BIN": str(Path(sys.executable).parent), "GCODEFP_STACK_TIMEOUT": "60",
            "GCODEFP_ADMIN_TOKEN": "stack-test-token"}

    def run(*args, timeout=90):
        # its own session: the services' process groups never share pytest's
        return subprocess.run(["bash", str(STACK), *args], env=env, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)

    started = run("start", "api", "prometheus")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"api": f"http://127.0.0.1:{env['GCODEFP_API_PORT']}",
               "prometheus": f"http://127.0.0.1:{env['PROMETHEUS_PORT']}", "port": env["GCODEFP_API_PORT"],
               "dir": root / "stack", "run": run}
    finally:
        stopped = run("stop", timeout=60)
        for pidfile in (root / "stack" / "pids").glob("*"):  # stop failed: do not leave servers behind
            try:
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def promql(stack, expr: str) -> list[dict]:
    r = httpx.get(f"{stack['prometheus']}/api/v1/query", params={"query": expr}, timeout=10)
    doc = r.json()
    assert r.status_code == 200 and doc["status"] == "success", (expr, doc)
    return doc["data"]["result"]


def predict(stack, sample_request, n: int) -> None:
    for _ in range(n):
        r = httpx.post(f"{stack['api']}/predict", json=sample_request, timeout=10)
        assert r.status_code == 200, r.text


def test_stack_status_and_container_healthcheck(stack):
    status = stack["run"]("status", "api", "prometheus")
    assert status.returncode == 0 and status.stdout.count("running") == 2, status.stdout
    assert httpx.get(f"{stack['api']}/ready", timeout=5).json()["version"] == "v1"
    # Dockerfile.inference's HEALTHCHECK, run as is against this server
    line = next(l for l in (REPO / "Dockerfile.inference").read_text().split("HEALTHCHECK", 1)[1].splitlines()
                if "CMD" in l)
    cmd = json.loads(line.split("CMD", 1)[1].replace(":8000/", f":{stack['port']}/"))
    assert subprocess.run([sys.executable, *cmd[1:]], timeout=10).returncode == 0
    dead = cmd[-1].replace(f":{stack['port']}/", f":{free_port()}/")
    assert subprocess.run([sys.executable, "-c", dead], timeout=10, capture_output=True).returncode != 0


def test_prometheus_scrapes_the_api_and_has_latency_histograms(stack, sample_request):
    predict(stack, sample_request, 10)
    assert httpx.post(f"{stack['api']}/predict", json={"sensor_data": {}}, timeout=10).status_code in (400, 422)
    count = 'sum(gcodefp_http_request_duration_seconds_count{endpoint="/predict", status="200"})'
    wait_until(lambda: (r := promql(stack, count)) and float(r[0]["value"][1]) >= 10, 30, "the first scrape")
    predict(stack, sample_request, 10)  # a second burst: rate() over two scrapes is not zero
    wait_until(lambda: float(promql(stack, count)[0]["value"][1]) >= 20, 30, "the second scrape")
    targets = httpx.get(f"{stack['prometheus']}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    api_target = next(t for t in targets if t["labels"]["job"] == "gcodefp-api")
    assert api_target["health"] == "up" and api_target["scrapeUrl"] == f"{stack['api']}/metrics"
    p99 = promql(stack, 'histogram_quantile(0.99, sum by (le) '
                        '(rate(gcodefp_http_request_duration_seconds_bucket{endpoint="/predict"}[1m])))')
    assert p99 and 0 < float(p99[0]["value"][1]) < 2.5


def test_every_dashboard_query_evaluates(stack, sample_request):
    """After the previous test's predictions: all Grafana expressions are valid PromQL against the real
    scrape, and the dashboard's panels (rate, p50/p95/p99, errors, version, reloads) have data."""
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/gcodefp.json").read_text())
    results = {}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$__range", "5m")
            results[(panel["title"], target["legendFormat"])] = promql(stack, expr)
    by_title = {}
    for (title, legend), res in results.items():
        by_title.setdefault(title, []).append(res)
    for needed in ("Request rate by endpoint", "Request latency p50 / p95 / p99", "Error ratio", "Model version",
                   "Model reloads", "Model time p50"):
        title = next(t for t in by_title if t.startswith(needed))
        assert all(by_title[title]), f"panel {title!r} has no data"
    version = next(v for (t, _), v in results.items() if t.startswith("Model version"))
    assert {s["metric"]["version"] for s in version} == {"v1"}
    latency = [float(s["value"][1]) for (t, _), v in results.items() if t.startswith("Request latency") for s in v]
    assert all(math.isfinite(x) and x > 0 for x in latency), latency
    errors = next(v for (t, leg), v in results.items() if t.startswith("Error ratio") and leg == "5xx")
    assert float(errors[0]["value"][1]) == 0.0


# ---- the inference image's requirements ---------------------------------------------------------
BLOCKER = r"""
import importlib.abc, json, sys
allowed = set(json.loads(sys.argv[1]))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in allowed or top in sys.stdlib_module_names or top.startswith("_sysconfigdata"):
            return None
        raise ModuleNotFoundError(f"{name}: not installed in the inference image", name=name)
sys.meta_path.insert(0, Block())
from gcodefp_core.cli import main
sys.exit(main(sys.argv[2:]))
"""


def inference_modules() -> set[str]:
    """Top-level modules of deploy/requirements-inference.txt's distributions and their dependencies."""
    todo = [Requirement(l.split("#")[0]) for l in (REPO / "deploy/requirements-inference.txt").read_text().splitlines()
            if l.split("#")[0].strip()]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        for dep in metadata.requires(req.name) or []:
            dep = Requirement(dep)
            extras = req.extras or {""}
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras):
                todo.append(dep)
    dists = {k.split("[")[0] for k in seen}
    modules = {m for m, ds in metadata.packages_distributions().items()
               if any(d.lower().replace("_", "-") in dists for d in ds)}
    return modules | {"gcodefp_core", "api"}


def test_inference_requirements_are_enough_to_serve(api_registry, sample_request, tmp_path):
    allowed = inference_modules()
    assert not allowed & {"torch", "pandas", "dagster", "onnx", "wandb"}
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GCODEFP_", "PROMETHEUS_"))}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", BLOCKER, json.dumps(sorted(allowed)), "serve", "--package",
                             str(api_registry / "packages" / "v1"), "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def ready():
            if proc.poll() is not None:
                pytest.fail(f"server exited: {(tmp_path / 'serve.log').read_text()[-3000:]}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200
            except httpx.TransportError:
                return False
        wait_until(ready, 60, "the server with only the inference requirements")
        r = httpx.post(f"http://127.0.0.1:{port}/predict", json=sample_request, timeout=10)
        assert r.status_code == 200 and isinstance(r.json()["gcode_sequence"], str)
        assert httpx.get(f"http://127.0.0.1:{port}/info", timeout=5).json()["runtime"]["torch_imported"] is False
        assert b"gcodefp_http_requests_total" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).content
    finally:
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(grace)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()
