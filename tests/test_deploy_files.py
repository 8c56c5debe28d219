"""The container stack without a Docker engine: docker-compose.yml parses, and every file, port, volume,
environment variable, command and metric name it (and the Dockerfiles, Prometheus and Grafana files)
names exists and agrees with the code. tests/test_native_stack.py runs the same commands for real."""
from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DASHBOARD = json.loads((REPO / "deploy/grafana/dashboards/gcodefp.json").read_text())
INTERP = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with an empty environment (the defaults; `:?` ones keep their name)."""
    return INTERP.sub(lambda m: m.group(2) if m.group(0).find(":-") > 0 else f"<{m.group(1)}>", value)


def env_of(service: str) -> dict[str, str]:
    return {k: interpolate(str(v)) for k, v in (SERVICES[service].get("environment") or {}).items()}


def mounts(service: str) -> dict[str, str]:
    """container path -> source (named volume or host path, interpolated)."""
    out = {}
    for spec in SERVICES[service].get("volumes", []):
        src, dst = interpolate(spec).split(":")[:2]
        out[dst] = src
    return out


def dockerfile(name: str) -> dict[str, list[str]]:
    """Instruction -> its arguments (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", (REPO / name).read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.setdefault(word.upper(), []).append(rest.strip())
    return out


def code_env_reads(*folders: str) -> set[str]:
    """Environment variables the code reads (os.environ.get / [] / getenv, api/settings.py's _get)."""
    pat = re.compile(r"""(?:os\.environ\.get|os\.getenv|os\.environ\[|env_flag|\b_get)\(?\s*["'](\w+)["']""")
    return {m for f in folders for p in (REPO / f).rglob("*.py") for m in pat.findall(p.read_text())}


def stack_command(service: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GCODEFP_", "DAGSTER_", "PROMETHEUS_"))}
    out = subprocess.run(["bash", str(REPO / "deploy/stack.sh"), "command", service], capture_output=True, text=True,
                         env=env, timeout=30, check=True)
    return out.stdout.splitlines()


def test_compose_has_the_stack_and_every_named_file_exists():
    assert set(SERVICES) == {"api", "postgres", "code-server", "dagster-webserver", "dagster-daemon", "prometheus",
                             "grafana"}
    for name, svc in SERVICES.items():
        if "build" in svc:
            assert (REPO / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name
        for dst, src in mounts(name).items():
            if src.startswith(("./", "../", "/")):
                if "shared/data" in src and not (REPO / src).exists():
                    continue  # the real data is optional (quickstart uses synthetic logs)
                assert (REPO / src).exists(), f"{name}: volume source {src} does not exist"
            else:
                assert src in COMPOSE["volumes"], f"{name}: named volume {src} is not declared"
    # the three Dagster services run one image
    assert {SERVICES[s]["image"] for s in ("code-server", "dagster-webserver", "dagster-daemon")} == {"gcodefp-dagster:latest"}


def test_dockerfile_copies_exist_and_are_not_dockerignored():
    ignored = {l.strip() for l in (REPO / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")}
    for name in ("Dockerfile.inference", "Dockerfile.dagster"):
        for args in dockerfile(name).get("COPY", []):
            if args.startswith("--from"):
                continue
            for src in args.split()[:-1]:
                assert (REPO / src).exists(), f"{name}: COPY {src}: no such file"
                assert src.split("/")[0] not in ignored, f"{name}: COPY {src} is excluded by .dockerignore"
    for path in ("README.md", "pyproject.toml", "configs", "workspace.yaml", "deploy/dagster/dagster.postgres.yaml"):
        assert path not in ignored


def test_inference_image_is_slim_non_root_and_has_no_torch():
    df = dockerfile("Dockerfile.inference")
    runs = " ".join(df["RUN"])
    assert "torch" not in runs and "requirements-inference.txt" in runs and "--no-deps ." in runs
    assert df["FROM"][-1].startswith("python:3.11-slim")
    assert df["USER"][-1].split(":")[0] not in ("root", "0")
    assert "HEALTHCHECK" in df and "/health" in df["HEALTHCHECK"][0]
    reqs = [l.split("#")[0].strip() for l in (REPO / "deploy/requirements-inference.txt").read_text().splitlines()]
    reqs = [r for r in reqs if r]
    names = {re.split(r"[\[=<>]", r)[0].lower() for r in reqs}
    assert not names & {"torch", "pandas", "onnx", "dagster", "wandb", "onnxscript"}, names
    # pins agree with pyproject.toml (one resolver result for both images)
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert set(reqs) <= set(deps), set(reqs) - set(deps)


def image_env(name: str) -> dict[str, str]:
    """The ENV of a Dockerfile's last stage (KEY=VALUE words, as Docker reads them)."""
    text = re.sub(r"\\\n", " ", (REPO / name).read_text()).split("\nFROM ")[-1]
    words = [w for line in text.splitlines() if line.startswith("ENV ") for w in shlex.split(line[4:])]
    return dict(w.split("=", 1) for w in words)


def test_inference_image_runs_gcodefp_serve(monkeypatch):
    """The image's CMD is `gcodefp serve` (a socket per worker, stream handoff, a fresh metrics folder),
    its workers from WEB_CONCURRENCY, on the port that EXPOSE, HEALTHCHECK and compose use; compose's
    command is the same server. deploy/images/smoke.py runs both for real inside the built image."""
    from api.cli import default_workers
    from gcodefp_core.cli import build_parser

    cmd = json.loads(dockerfile("Dockerfile.inference")["CMD"][-1])
    args = build_parser(cmd[1:]).parse_args(cmd[1:])
    assert cmd[0] == "gcodefp" and (args.command, args.host) == ("serve", "0.0.0.0"), cmd
    env = image_env("Dockerfile.inference")
    monkeypatch.setenv("WEB_CONCURRENCY", env["WEB_CONCURRENCY"])
    assert default_workers() == int(env["WEB_CONCURRENCY"]) >= 1
    assert env["GCODEFP_REGISTRY"] == "/srv/gcodefp/registry"
    port = args.port
    assert dockerfile("Dockerfile.inference")["EXPOSE"] == [str(port)]
    assert SERVICES["api"]["ports"] == [f"{port}:{port}"]
    healthcheck = json.loads(dockerfile("Dockerfile.inference")["HEALTHCHECK"][0].split("CMD", 1)[1])
    assert SERVICES["api"]["healthcheck"]["test"] == ["CMD", *healthcheck]
    assert f"127.0.0.1:{port}/health" in healthcheck[-1]
    if "command" in SERVICES["api"]:   # compose may override the command: the same server, on the same port
        compose = build_parser(SERVICES["api"]["command"][1:]).parse_args(SERVICES["api"]["command"][1:])
        assert (compose.command, compose.host, compose.port) == ("serve", args.host, port)


def test_dagster_image_command_is_the_compose_code_server_command():
    assert json.loads(dockerfile("Dockerfile.dagster")["CMD"][-1]) == SERVICES["code-server"]["command"]


@pytest.mark.parametrize("service", ["api", "code-server", "dagster-webserver", "dagster-daemon"])
def test_native_stack_runs_the_container_commands(service):
    """deploy/stack.sh's command = the container's, but on 127.0.0.1 and with the venv's executables."""
    native = stack_command(service)
    container = SERVICES[service]["command"]
    assert [Path(native[0]).name, *[w.replace("127.0.0.1", "0.0.0.0") for w in native[1:]]] == container
    assert Path(native[0]).is_file(), native[0]


@pytest.mark.parametrize("service", ["code-server", "dagster-webserver", "dagster-daemon"])
def test_dagster_commands_parse(service):
    """The Dagster CLIs accept the compose commands (click parses them without running anything)."""
    import click
    from importlib.metadata import entry_points

    cmd = SERVICES[service]["command"]
    entry = next(e for e in entry_points(group="console_scripts") if e.name == cmd[0])
    args, command = cmd[1:], getattr(importlib.import_module(entry.module), "cli")  # main() wraps this click object
    while isinstance(command, click.Group):
        command, args = command.commands[args[0]], args[1:]
    ctx = command.make_context(cmd[0], list(args))
    port = ctx.params.get("port")
    if service == "dagster-webserver":
        assert SERVICES[service]["ports"] == [f"{port}:{port}"]
    if service == "code-server":
        assert str(port) == env_of(service)["DAGSTER_CODE_SERVER_PORT"] and ctx.params["location_name"] == "gcodefp"
    if "workspace" in ctx.params and ctx.params["workspace"]:
        for ws in ctx.params["workspace"]:
            assert (REPO / ws).is_file()


def test_dagster_environment_matches_instance_and_workspace():
    def env_refs(node) -> set[str]:
        if isinstance(node, dict):
            return {node["env"]} if set(node) == {"env"} else set().union(*map(env_refs, node.values()), set())
        return set().union(*map(env_refs, node), set()) if isinstance(node, list) else set()

    instance = env_refs(yaml.safe_load((REPO / "deploy/dagster/dagster.postgres.yaml").read_text()))
    workspace = env_refs(yaml.safe_load((REPO / "deploy/dagster/workspace.grpc.yaml").read_text()))
    assert instance and workspace
    pg = env_of("postgres")
    for svc in ("code-server", "dagster-webserver", "dagster-daemon"):
        env = env_of(svc)
        assert instance | workspace <= set(env), (svc, (instance | workspace) - set(env))
        assert env["DAGSTER_PG_HOST"] == "postgres" and env["DAGSTER_PG_DB"] == pg["POSTGRES_DB"]
        assert env["DAGSTER_PG_USERNAME"] == pg["POSTGRES_USER"] and env["DAGSTER_PG_PASSWORD"] == pg["POSTGRES_PASSWORD"]
        assert env["DAGSTER_CODE_SERVER_HOST"] in SERVICES
        home = env["DAGSTER_HOME"]
        assert set(mounts(svc)) >= {f"{home}/storage", f"{home}/compute_logs"}  # compute logs shown by the UI
    postgres_yaml = (REPO / "deploy/dagster/dagster.postgres.yaml").read_text()
    assert f"base_dir: {env_of('code-server')['DAGSTER_HOME']}/storage" in postgres_yaml


def test_environment_variables_are_the_ones_the_code_reads():
    api_reads = code_env_reads("api")
    dagster_reads = code_env_reads("gcodefp_dagster", "gcodefp_core")
    api, code = env_of("api"), env_of("code-server")
    assert {k for k in api if k.startswith("GCODEFP_")} <= api_reads, set(api) - api_reads
    assert {k for k in code if k.startswith(("GCODEFP_", "WANDB_"))} <= dagster_reads | {"WANDB_MODE"}
    assert {"GCODEFP_REGISTRY", "GCODEFP_ADMIN_TOKEN"} <= set(api)
    assert {"GCODEFP_REGISTRY", "GCODEFP_API_URL", "GCODEFP_ADMIN_TOKEN", "GCODEFP_PIPELINE_ARTIFACTS",
            "GCODEFP_CONFIG"} <= set(code)
    # the redeploy job reaches the API service with the API's own admin token
    assert code["GCODEFP_API_URL"] == f"http://api:{SERVICES['api']['command'][5]}"
    assert SERVICES["code-server"]["environment"]["GCODEFP_ADMIN_TOKEN"] == SERVICES["api"]["environment"]["GCODEFP_ADMIN_TOKEN"]
    assert (REPO / code["GCODEFP_CONFIG"]).is_file()


def test_registry_and_artifact_volumes_are_shared_where_the_code_looks():
    api, code = mounts("api"), mounts("code-server")
    reg_api, reg_code = env_of("api")["GCODEFP_REGISTRY"], env_of("code-server")["GCODEFP_REGISTRY"]
    assert api[reg_api] == code[reg_code] == "registry"  # one named volume: promotions reach the API
    artifacts = env_of("code-server")["GCODEFP_ARTIFACTS"]
    assert code[artifacts] == "artifacts"
    assert env_of("code-server")["GCODEFP_PIPELINE_ARTIFACTS"].startswith(artifacts + "/")
    # the production config's relative data path, resolved against the image's working directory
    data = json.loads((REPO / "configs/production.json").read_text())["data"]["source"]
    assert os.path.normpath(f"/opt/gcodefp/{data}") in code
    for name in ("Dockerfile.inference", "Dockerfile.dagster"):
        assert reg_api in " ".join(dockerfile(name)["RUN"]), f"{name} must create {reg_api} owned by its user"


def test_prometheus_configs_scrape_the_api():
    compose_cfg = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    native_cfg = yaml.safe_load((REPO / "deploy/prometheus/prometheus.native.yml").read_text())
    jobs = {j["job_name"]: j for j in compose_cfg["scrape_configs"]}
    native_jobs = {j["job_name"]: j for j in native_cfg["scrape_configs"]}
    assert set(jobs) == set(native_jobs)
    api_port = SERVICES["api"]["command"][5]
    assert jobs["gcodefp-api"]["static_configs"][0]["targets"] == [f"api:{api_port}"]
    assert native_jobs["gcodefp-api"]["static_configs"][0]["targets"] == [f"127.0.0.1:{api_port}"]
    assert jobs["gcodefp-api"]["metrics_path"] == "/metrics"
    mount = mounts("prometheus")
    assert mount["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in SERVICES["prometheus"]["command"]
    assert "--web.listen-address=0.0.0.0:9090" in SERVICES["prometheus"]["command"]
    assert SERVICES["prometheus"]["ports"] == ["9090:9090"]
    promtool = shutil.which("promtool")
    if promtool:
        for cfg in ("prometheus.yml", "prometheus.native.yml"):
            out = subprocess.run([promtool, "check", "config", str(REPO / "deploy/prometheus" / cfg)],
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stdout + out.stderr


def test_grafana_is_provisioned_from_the_repo():
    ds = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    providers = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/gcodefp.yml").read_text())["providers"]
    mount = mounts("grafana")
    assert mount["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    assert mount[providers[0]["options"]["path"]] == "./deploy/grafana/dashboards"
    assert ds[0]["url"] == "http://prometheus:9090"
    uids = {p["datasource"]["uid"] for p in DASHBOARD["panels"]}
    assert uids == {ds[0]["uid"]}
    assert len({p["id"] for p in DASHBOARD["panels"]}) == len(DASHBOARD["panels"])
    titles = " | ".join(p["title"].lower() for p in DASHBOARD["panels"])
    for needed in ("request rate", "p50 / p95 / p99", "error", "model version", "reloads"):
        assert needed in titles, needed


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in DASHBOARD["panels"] for t in p["targets"]]


def test_dashboard_queries_use_metrics_that_the_api_defines():
    from prometheus_client import Counter, Gauge, Histogram

    import api.metrics as m
    import api.monitoring as mon

    names = set()
    for obj in [*vars(m).values(), *vars(mon).values()]:
        if isinstance(obj, Counter):
            names.add(obj._name + "_total")
        elif isinstance(obj, Histogram):
            names |= {obj._name + s for s in ("_bucket", "_count", "_sum")}
        elif isinstance(obj, Gauge):
            names.add(obj._name)
    assert "gcodefp_http_request_duration_seconds_bucket" in names
    used = {n for e in dashboard_exprs() for n in re.findall(r"\bgcodefp_\w+", e)}
    assert used and used <= names, used - names
    labels = {"le", "job", "instance"} | {label for obj in [*vars(m).values(), *vars(mon).values()]
                                           if isinstance(obj, (Counter, Gauge, Histogram)) for label in obj._labelnames}
    for e in dashboard_exprs():
        for label in re.findall(r"(\w+)\s*(?:=~|!=|=)\s*\"", e) + re.findall(r"by \(([^)]*)\)", e):
            for name in label.split(","):
                assert name.strip() in labels, (name, e)


def test_stack_script_is_valid_bash_and_rejects_unknown_services(tmp_path):
    assert os.access(REPO / "deploy/stack.sh", os.X_OK)
    subprocess.run(["bash", "-n", str(REPO / "deploy/stack.sh")], check=True, timeout=10)
    out = subprocess.run(["bash", str(REPO / "deploy/stack.sh"), "status", "nginx"], capture_output=True, text=True,
                         timeout=30, env=os.environ | {"GCODEFP_STACK_DIR": str(tmp_path)})
    assert out.returncode != 0 and "unknown service 'nginx'" in out.stderr


def test_image_scripts_parse_and_the_smoke_test_rebinds_commands_to_loopback(monkeypatch):
    """.ci/images and deploy/images/ build and smoke-test the images for real (root, buildah); here:
    they parse, and the smoke test's rewrite of a command to 127.0.0.1 changes nothing else."""
    scripts = [REPO / ".ci/images", *sorted((REPO / "deploy/images").glob("*.sh"))]
    for script in scripts:
        assert os.access(script, os.X_OK), script
        subprocess.run(["bash", "-n", str(script)], check=True, timeout=10)
    monkeypatch.syspath_prepend(str(REPO / "deploy/images"))
    smoke = importlib.import_module("smoke")
    for cmd in (json.loads(dockerfile("Dockerfile.dagster")["CMD"][-1]), SERVICES["api"].get("command")):
        if cmd is None:
            continue
        bound = smoke.on_loopback(cmd, 5555)
        changed = {i for i, (a, b) in enumerate(zip(cmd, bound)) if a != b}
        assert len(bound) == len(cmd) and "0.0.0.0" not in bound and "5555" in bound, bound
        assert {cmd[i] for i in changed} == {"0.0.0.0", str(cmd[bound.index("5555")])}, (cmd, bound)
