"""Fixtures for the API tests: a real tiny package (trained, exported, packaged) and real uvicorn servers.

Loaded for every test module through `pytest_plugins` in tests/conftest.py (tests/ is on sys.path).
The model is the session's tiny one (a few short epochs on the synthetic dataset): its predictions
are rough but real, which is all the server tests need. Servers are subprocesses on 127.0.0.1, stopped
at the end of their scope.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gcodefp_core import package as pkg

ADMIN_TOKEN = "test-admin-token"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_export(exported) -> Path:
    """The folder of the session's fp32 export (model.json + graphs; tests/conftest.py `exported`):
    one tiny model trained and exported once serves the library's and the server's tests alike."""
    return exported["model_json"].parent


@pytest.fixture(scope="session")
def api_registry(tiny_export, tmp_path_factory) -> Path:
    """A registry with v1 (CURRENT), v2 (the same model under another version) and `broken` (a
    package whose decoder graph was corrupted after packaging: its checksum no longer matches)."""
    reg = tmp_path_factory.mktemp("registry")
    pkg.build_package(tiny_export, reg, version="v1", metrics={"test_line_accuracy": 0.123})
    pkg.build_package(tiny_export, reg, version="v2")
    broken = pkg.build_package(tiny_export, reg, version="broken")
    (broken / "model.decoder.onnx").write_bytes(b"corrupted")
    pkg.promote(reg, "v1")
    return reg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A uvicorn subprocess; logs go to a file (a pipe could fill up and block the server)."""

    def __init__(self, cmd: list[str], env: dict, log_path: Path, port: int):
        self.port, self.log_path = port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict]:
        return [json.loads(line) for line in self.log_text().splitlines() if line.startswith("{")]

    def worker_pids(self) -> set[int]:
        """The pids of the server's uvicorn workers: its children that have loaded onnxruntime (not
        uvicorn's resource tracker). A child that exits meanwhile is left out."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True).stdout
        pids = set()
        for p in out.split():
            try:
                if "onnxruntime" in Path(f"/proc/{p}/maps").read_text(errors="ignore"):
                    pids.add(int(p))
            except OSError:   # it ended between ps and here
                pass
        return pids

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


def server_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GCODEFP_", "PROMETHEUS_"))}
    env.update({k: str(v) for k, v in extra.items()})
    env["PYTHONPATH"] = str(REPO)
    return env


def start_uvicorn(tmp: Path, **env) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1", "--port", str(port),
           "--no-access-log"]
    server = Server(cmd, server_env(**env), tmp / f"server-{port}.log", port)
    server.wait_ready()
    return server


@pytest.fixture(scope="session")
def api_server(api_registry, tmp_path_factory):
    """One worker serving a registry, admin token set, small limits so the limit tests stay cheap."""
    tmp = tmp_path_factory.mktemp("server")
    reg = tmp / "registry"
    shutil.copytree(api_registry, reg)  # this server's tests promote and reload: keep them off the shared one
    server = start_uvicorn(tmp, GCODEFP_REGISTRY=reg, GCODEFP_ADMIN_TOKEN=ADMIN_TOKEN, GCODEFP_POLL_SECONDS=0.2,
                           GCODEFP_MAX_BATCH=8, GCODEFP_MAX_BODY_BYTES=1_000_000)
    server.registry = reg
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sample_request(api_registry) -> dict:
    return json.loads((api_registry / "packages" / "v1" / "sample_request.json").read_text())


@pytest.fixture(scope="session")
def package_meta(api_registry) -> dict:
    return json.loads((api_registry / "packages" / "v1" / "model.json").read_text())


@pytest.fixture(scope="session")
def http(api_server):
    """An HTTP client for the shared server."""
    import httpx

    with httpx.Client(base_url=api_server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def predictor(api_registry):
    """The served package (v1) loaded in this process, to compare the server's answers with."""
    from gcodefp_core.runtime import OnnxPredictor

    return OnnxPredictor.load(api_registry / "packages" / "v1")


def tracked_windows(predictor, cont, cat, at_program_start: bool = False, judged=None, session=None):
    """What /stream's tracker mode must give for these received rows, computed in process: each row's
    window (padded with the first row until W rows have arrived) through OnnxPredictor.predict_lines,
    then a fresh tracker session fed the judged rows in order (default: every row), each window weighed
    by its share of real rows, moving the rows since the previous judged one, with the rows among them
    equal to their previous one (normalised) counted as repeated, and each window's operation evidence
    from its readings when the tracker uses some. session: continue this tracker session instead.
    -> (graph outputs of every row, steps of the judged rows, repeated per row)."""
    import numpy as np

    c, k = predictor.features.transform_arrays(cont, cat.astype(object))
    w, tracker = predictor.window, predictor.program_tracker
    pc, pk = np.concatenate([np.repeat(c[:1], w - 1, 0), c]), np.concatenate([np.repeat(k[:1], w - 1, 0), k])
    wc = np.stack([pc[i:i + w] for i in range(len(c))])
    out = predictor.predict_lines(wc, np.stack([pk[i:i + w] for i in range(len(c))]))
    evidence = tracker.operation_evidence(wc)
    session = session or tracker.start(at_program_start=at_program_start)
    repeated = np.concatenate([[False], (c[1:] == c[:-1]).all(axis=1)])
    steps, previous = [], -1
    for j in range(len(c)) if judged is None else judged:
        steps.append(session.update(out["op_logits"][j], out["line_logits"][j], min(j + 1, w) / w,
                                    int(repeated[previous + 1:j + 1].sum()), rows=j - previous,
                                    **{k: v[j] for k, v in evidence.items()}))
        previous = j
    return out, steps, repeated
