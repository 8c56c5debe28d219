"""`gcodefp serve --tls-cert/--tls-key`: HTTPS from every worker (a socket each), the client verifying
the server against a private CA, and a bad certificate refused in one line at start-up."""
from __future__ import annotations

import ssl
import subprocess
import sys
import time

import httpx
import pytest
from api_fixtures import REPO, Server, free_port, server_env

from api import auth
from api.client import APIAuthError, GCodeAPIClient

pytestmark = pytest.mark.slow


def make_cert(folder, name: str = "server") -> tuple:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def serve_cmd(registry, port: int, *extra) -> list[str]:
    return [sys.executable, "-m", "gcodefp_core.cli", "serve", "--registry", str(registry), "--port", str(port), *extra]


@pytest.fixture(scope="module")
def tls_server(api_registry, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = make_cert(tmp)
    tokens = tmp / "tokens"
    token = auth.add(tokens, "monitor")
    port = free_port()
    server = Server(serve_cmd(api_registry, port, "--workers", "2", "--tls-cert", str(cert), "--tls-key", str(key),
                              "--tokens", str(tokens)), server_env(), tmp / "server.log", port)
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server not ready:\n{server.log_text()[-3000:]}")
            try:
                if httpx.get(f"https://127.0.0.1:{port}/ready", verify=ssl.create_default_context(cafile=cert),
                             timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        server.cert, server.token = cert, token
        yield server
    finally:
        server.stop()


def test_every_worker_serves_https_and_the_client_verifies_it(tls_server, sample_request):
    s = tls_server
    url = f"https://127.0.0.1:{s.port}"
    assert f"Uvicorn running on https://127.0.0.1:{s.port}" in s.log_text()
    window = sample_request["sensor_data"]
    # new connections spread over both workers' sockets: every one of them speaks TLS
    for _ in range(8):
        with GCodeAPIClient(url, verify=str(s.cert), token=s.token) as api:
            assert api.predict(window["continuous"], window["categorical"])["gcode_sequence"]
    with GCodeAPIClient(url, verify=str(s.cert)) as api, pytest.raises(APIAuthError):
        api.predict(window["continuous"], window["categorical"])   # TLS does not replace the token
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{url}/health", timeout=5)   # the system's CAs do not know this certificate
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{s.port}/health", timeout=5)   # no plain HTTP on an https port


def test_a_bad_certificate_or_key_is_refused_in_one_line(api_registry, tmp_path):
    cert, key = make_cert(tmp_path, "a")
    _, other_key = make_cert(tmp_path, "b")

    def run(*extra):
        return subprocess.run(serve_cmd(api_registry, free_port(), *extra), capture_output=True, text=True,
                              cwd=REPO, timeout=120)
    for extra, said in [(("--tls-cert", str(cert)), "go together"),
                        (("--tls-cert", str(cert), "--tls-key", str(other_key)), "not a certificate and its key"),
                        (("--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(key)), "no such file")]:
        done = run(*extra)
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
