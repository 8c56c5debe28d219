"""Resources: the artifact store (the one owner of every path the pipeline writes, the package
registry included), the JSON config that drives a run, the API server a redeploy confirms, the
alert channel and the quality gates. Defaults come from the environment when the code location
loads (settings only; the asset graph itself never depends on the environment):

    GCODEFP_CONFIG              JSON config (data/model/train sections)   default configs/production.json
    GCODEFP_DATA                folder of *_aligned.csv[.gz] logs         default: the config's data.source
    GCODEFP_PIPELINE_ARTIFACTS  artifact store                            default artifacts/pipeline
    GCODEFP_REGISTRY            package registry (the API server reads it) default artifacts/registry
    GCODEFP_API_URL, GCODEFP_ADMIN_TOKEN, GCODEFP_REQUIRE_SERVER, GCODEFP_REDEPLOY_TIMEOUT_S
    GCODEFP_ALERT_WEBHOOK, GCODEFP_ALERT_LOG                          alerts
"""

import json
import logging
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from gcodefp_core.paths import artifacts_dir, resolve

log = logging.getLogger(__name__)
DEFAULT_CONFIG = "configs/production.json"


def env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r}: expected true/false")


class PipelineConfig(dg.ConfigurableResource):
    """The JSON config file (sections data/model/train/wandb) whose values the assets' launchpad
    config overrides field by field; `data_dir` (if set) replaces data.source."""
    config_path: str = DEFAULT_CONFIG
    data_dir: str = ""

    def load(self) -> dict:
        from gcodefp_core.config import load_config

        return load_config(resolve(self.config_path))


class ArtifactStore(dg.ConfigurableResource):
    """Every path the pipeline writes. Assets publish a folder only when it is complete: they write
    into a staging folder beside it and swap it in at the end (`publish`), so a run killed half way
    leaves the last complete version in place and a re-run starts clean. Nothing big is pickled
    through an IO manager; assets return paths in their metadata."""
    root: str = "artifacts/pipeline"
    registry_root: str = "artifacts/registry"

    def path(self, *parts: str) -> Path:
        return resolve(self.root).joinpath(*parts)

    @property
    def registry(self) -> Path:
        return resolve(self.registry_root)

    def logs(self) -> Path:
        return self.path("logs")

    def dataset(self) -> Path:
        return self.path("dataset")

    def checkpoint_dir(self, seed: int | str) -> Path:
        return self.path("checkpoints", f"seed{seed}")

    def ensemble_config(self) -> Path:
        return self.path("ensemble", "ensemble_config.json")

    def model_dir(self, variant: str) -> Path:
        return self.path("onnx", variant)

    def served_answers(self, variant: str) -> Path:
        """Per-window correctness of the variant's served answer on the evaluation windows."""
        return self.model_dir(variant) / "served_answers.json"

    def accuracy(self, variant: str) -> Path:
        return self.model_dir(variant) / "accuracy.json"

    def benchmark_report(self) -> Path:
        return self.path("benchmark", "benchmark.json")

    def read(self, path: Path, asset: str) -> dict:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; materialize {asset} in this artifact store first")
        return json.loads(path.read_text())

    @contextmanager
    def publish(self, target: Path):
        """Yield a staging folder; on success it replaces `target` (rename; the old version is moved
        aside first and deleted after). On failure, or a kill, `target` keeps its last complete
        version; leftover staging folders are removed by the next publish of the same target."""
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".staging-{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = target.parent / f".staging-{target.name}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        retired = target.parent / f".staging-{target.name}-retired-{uuid.uuid4().hex[:8]}"
        if target.exists():
            target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)


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
    """The bars the asset checks apply. The accuracy bar of each variant is the variant registry's
    (gcodefp_core.variants); `max_drop_points` overrides it per variant (forced passes and fails)."""
    latency_p95_ms: float = 20.0           # shipped variant, batch 1, full prediction
    latency_p99_ms: float = 50.0
    max_drop_points: dict[str, float] = {}
    confidence: float = 0.99               # of each one-sided bound of the paired accuracy drop
    max_package_mb: float = 100.0          # graphs of the shipped package
    parity_windows: int = 256              # windows compared by onnx_parity

    def bar(self, variant: str) -> float:
        from gcodefp_core.release import max_drop_points

        return max_drop_points(variant, self.max_drop_points)


def default_resources() -> dict:
    """Resources configured from the environment (see the module docstring)."""
    return {
        "pipeline_config": PipelineConfig(config_path=os.environ.get("GCODEFP_CONFIG", DEFAULT_CONFIG),
                                          data_dir=os.environ.get("GCODEFP_DATA", "")),
        "artifacts": ArtifactStore(root=os.environ.get("GCODEFP_PIPELINE_ARTIFACTS", str(artifacts_dir() / "pipeline")),
                                   registry_root=os.environ.get("GCODEFP_REGISTRY", str(artifacts_dir() / "registry"))),
        "api_server": ApiServer(url=os.environ.get("GCODEFP_API_URL", "http://127.0.0.1:8000"),
                                admin_token=os.environ.get("GCODEFP_ADMIN_TOKEN", ""),
                                require_server=env_flag("GCODEFP_REQUIRE_SERVER", True),
                                timeout_s=float(os.environ.get("GCODEFP_REDEPLOY_TIMEOUT_S", "60"))),
        "alerter": Alerter(webhook_url=os.environ.get("GCODEFP_ALERT_WEBHOOK", ""),
                           log_path=os.environ.get("GCODEFP_ALERT_LOG", str(artifacts_dir() / "alerts.jsonl"))),
        "gates": QualityGates(),
    }
