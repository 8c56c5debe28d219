"""Resources: where things go (artifact store, package registry), what drives the run (the JSON
config), what a run talks to (the API server, the alert channel) and the quality gates the checks
apply. Defaults come from the environment when the code location loads, so `dagster dev`, the
`gcodefp pipeline` command and docker-compose all configure the same way:

    GCODEFP_CONFIG        JSON config (data/model/train sections)     default configs/production.json
    GCODEFP_DATA          folder of *_aligned.csv[.gz] logs           default: the config's data.source
    GCODEFP_SEEDS         seeds = checkpoint partitions (e.g. 42,43)  default 42,43,44
    GCODEFP_PIPELINE_ARTIFACTS  artifact store                        default artifacts/pipeline
    GCODEFP_REGISTRY      package registry (the API server reads it)  default artifacts/registry
    GCODEFP_API_URL, GCODEFP_ADMIN_TOKEN, GCODEFP_REQUIRE_SERVER      the server redeploy confirms
    GCODEFP_ALERT_WEBHOOK, GCODEFP_ALERT_LOG                          alerts
    GCODEFP_RETRAIN_CRON                                              retraining schedule
"""

import json
import logging
import os
import time
from pathlib import Path

import dagster as dg

from gcodefp_core.paths import artifacts_dir, resolve

log = logging.getLogger(__name__)
DEFAULT_SEEDS = (42, 43, 44)
DEFAULT_CONFIG = "configs/production.json"
DEFAULT_CRON = "0 3 * * 1"  # Mondays 03:00 UTC


def env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r}: expected true/false")


def seeds_from_env() -> list[int]:
    """The checkpoint partitions. Fixed when the code location loads (partitions are static)."""
    raw = os.environ.get("GCODEFP_SEEDS", "").replace(",", " ").split()
    try:
        seeds = [int(s) for s in raw] or list(DEFAULT_SEEDS)
    except ValueError:
        raise ValueError(f"GCODEFP_SEEDS={os.environ['GCODEFP_SEEDS']!r}: expected integers, e.g. 42,43,44") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"GCODEFP_SEEDS: duplicate seeds in {seeds}")
    return seeds


class PipelineConfig(dg.ConfigurableResource):
    """The JSON config file (sections data/model/train/wandb) whose values the assets' launchpad
    config overrides field by field; `data_dir` (if set) replaces data.source."""
    config_path: str = DEFAULT_CONFIG
    data_dir: str = ""

    def load(self) -> dict:
        from gcodefp_core.config import load_config

        return load_config(resolve(self.config_path))


class ArtifactStore(dg.ConfigurableResource):
    """A local folder for every large file (datasets, checkpoints, graphs, reports). Assets return
    paths in their metadata; nothing big is pickled through an IO manager."""
    root: str = "artifacts/pipeline"

    def path(self, *parts: str) -> Path:
        return resolve(self.root).joinpath(*parts)


class PackageRegistry(dg.ConfigurableResource):
    """The registry of deployment packages (gcodefp_core.package layout) that the API server serves."""
    root: str = "artifacts/registry"

    @property
    def path(self) -> Path:
        return resolve(self.root)


class ApiServer(dg.ConfigurableResource):
    """The running API server that a redeploy must reach. require_server=False: an unreachable
    server is recorded in the run's metadata instead of failing it (local use without a server);
    a reachable server that does not serve the promoted version fails the run either way."""
    url: str = "http://127.0.0.1:8000"
    admin_token: str = ""
    require_server: bool = True
    timeout_s: float = 60.0

    def info(self) -> dict | None:
        """GET /info, or None when the server is unreachable or has no model loaded yet."""
        import httpx

        try:
            r = httpx.get(f"{self.url.rstrip('/')}/info", timeout=5.0)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def reachable(self) -> bool:
        import httpx

        try:
            httpx.get(f"{self.url.rstrip('/')}/health", timeout=5.0)
            return True
        except httpx.HTTPError:
            return False

    def request_reload(self) -> str:
        """Ask the server to reload its registry now (needs the admin token); it also polls by itself."""
        import httpx

        if not self.admin_token:
            return "no admin token: waiting for the server's own registry poll"
        try:
            r = httpx.post(f"{self.url.rstrip('/')}/admin/reload", timeout=30.0,
                           headers={"Authorization": f"Bearer {self.admin_token}"})
            return f"POST /admin/reload -> {r.status_code}"
        except httpx.HTTPError as exc:
            return f"POST /admin/reload failed: {exc}"

    def wait_for_version(self, version: str, poll_s: float = 0.5) -> dict | None:
        """Poll /info until it reports `version` (-> the /info document) or timeout_s passes (-> None)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            info = self.info()
            if info and info.get("version") == version:
                return info
            if time.monotonic() > deadline:
                return None
            time.sleep(poll_s)


class Alerter(dg.ConfigurableResource):
    """Sends alerts: always appends one JSON line to `log_path`; also POSTs the JSON to `webhook_url`
    when one is set. Delivery problems are logged and written into the line, never raised: an alert
    must not break the sensor that sends it."""
    webhook_url: str = ""
    log_path: str = "artifacts/alerts.jsonl"

    def send(self, kind: str, summary: str, **details) -> dict:
        alert = {"source": "gcodefp-dagster", "kind": kind, "summary": summary,
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **details}
        if self.webhook_url:
            import httpx

            try:
                r = httpx.post(self.webhook_url, json=alert, timeout=10.0)
                alert["webhook_status"] = r.status_code
            except httpx.HTTPError as exc:
                alert["webhook_error"] = str(exc)
                log.warning("alert webhook %s failed: %s", self.webhook_url, exc)
        path = resolve(self.log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:  # one write per line: appends do not interleave
            f.write(json.dumps(alert, default=str) + "\n")
        return alert


class QualityGates(dg.ConfigurableResource):
    """The bars the asset checks apply (issue 5)."""
    latency_p95_ms: float = 20.0           # shipped variant, batch 1, full prediction
    latency_p99_ms: float = 50.0
    max_drop_points_int8: float = 0.5      # token and operation accuracy lost vs fp32
    max_drop_points_fp16: float = 0.1
    max_package_mb: float = 100.0          # graphs of the shipped package
    parity_windows: int = 256              # windows compared by onnx_parity

    def max_drop(self, variant: str) -> float:
        return self.max_drop_points_fp16 if variant == "fp16" else self.max_drop_points_int8


def default_resources() -> dict:
    """Resources configured from the environment (see the module docstring)."""
    return {
        "pipeline_config": PipelineConfig(config_path=os.environ.get("GCODEFP_CONFIG", DEFAULT_CONFIG),
                                          data_dir=os.environ.get("GCODEFP_DATA", "")),
        "artifacts": ArtifactStore(root=os.environ.get("GCODEFP_PIPELINE_ARTIFACTS", str(artifacts_dir() / "pipeline"))),
        "registry": PackageRegistry(root=os.environ.get("GCODEFP_REGISTRY", str(artifacts_dir() / "registry"))),
        "api_server": ApiServer(url=os.environ.get("GCODEFP_API_URL", "http://127.0.0.1:8000"),
                                admin_token=os.environ.get("GCODEFP_ADMIN_TOKEN", ""),
                                require_server=env_flag("GCODEFP_REQUIRE_SERVER", True),
                                timeout_s=float(os.environ.get("GCODEFP_REDEPLOY_TIMEOUT_S", "60"))),
        "alerter": Alerter(webhook_url=os.environ.get("GCODEFP_ALERT_WEBHOOK", ""),
                           log_path=os.environ.get("GCODEFP_ALERT_LOG", str(artifacts_dir() / "alerts.jsonl"))),
        "gates": QualityGates(),
    }

