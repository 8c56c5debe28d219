"""GCodeAPIClient against the real test server, and its errors against closed / silent ports."""
from __future__ import annotations

import socket

import numpy as np
import pytest

from api.client import (APIConnectionError, APIError, APITimeoutError, APIValidationError, GCodeAPIClient)
from api_fixtures import ADMIN_TOKEN, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(api_server):
    with GCodeAPIClient(api_server.url, timeout=30, admin_token=ADMIN_TOKEN) as c:
        yield c


def test_client_endpoints(client, sample_request):
    sd = sample_request["sensor_data"]
    assert client.health_check() is True and client.ready() is True
    info = client.info()
    assert info["window"] == len(sd["continuous"])
    r = client.predict(np.asarray(sd["continuous"]), sd["categorical"], return_fingerprint=True)
    assert isinstance(r["gcode_sequence"], str) and r["tokens"] and len(r["fingerprint"]) == info["embedding_dim"]
    binary = client.predict(sd["continuous"], sd["categorical"], return_fingerprint=True, binary=True)
    assert binary["tokens"] == r["tokens"]
    cols = dict(zip(info["features"]["continuous"], np.asarray(sd["continuous"]).T.tolist()))
    cols |= dict(zip(info["features"]["categorical"], np.asarray(sd["categorical"]).T.tolist()))
    assert client.predict(columns=cols)["tokens"] == r["tokens"]
    batch = client.batch_predict([(sd["continuous"], sd["categorical"])] * 3, method="beam", beam_width=2)
    assert len(batch) == 3 and batch[0]["tokens"] == batch[2]["tokens"]
    fp = client.get_fingerprint(sd["continuous"], sd["categorical"])
    assert fp["norm"] == pytest.approx(1.0, abs=1e-3)
    assert client.reload()["version"] == info["version"]


def test_client_validation_error_names_the_field(client, sample_request):
    sd = sample_request["sensor_data"]
    with pytest.raises(APIValidationError, match="sensor_data.continuous") as err:
        client.predict(sd["continuous"][:-1], sd["categorical"])
    assert err.value.status == 422 and err.value.body["detail"][0]["loc"][:2] == ["body", "sensor_data"]
    with pytest.raises(APIValidationError, match="inference_config.method"):
        client.predict(sd["continuous"], sd["categorical"], method="nope")
    with pytest.raises(ValueError, match="continuous"):
        client.predict()
    with GCodeAPIClient(client.base_url, admin_token="wrong") as bad:
        with pytest.raises(APIError, match="HTTP 403") as err:
            bad.reload()
        assert err.value.status == 403


def test_client_connection_and_timeout_errors():
    with GCodeAPIClient(f"http://127.0.0.1:{free_port()}", timeout=2) as c:  # nothing listens there
        with pytest.raises(APIConnectionError, match="cannot reach"):
            c.health_check()
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        with GCodeAPIClient(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.3) as c:
            with pytest.raises(APITimeoutError, match="timed out"):
                c.info()


class BusyServer:
    """A worker that sheds its first `busy` requests (503 + Retry-After: 0), then answers."""

    def __init__(self, busy: int):
        import http.server
        import threading

        outer = self
        self.busy, self.seen = busy, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.seen += 1
                shed = outer.seen <= outer.busy
                body = b'{"error":"server overloaded"}' if shed else b'{"version":"v1"}'
                self.send_response(503 if shed else 200)
                if shed:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_client_resends_what_an_overloaded_worker_refused():
    from api.client import APIUnavailableError

    server = BusyServer(busy=2)
    try:
        with GCodeAPIClient(server.url, timeout=5, busy_retries=2) as c:
            assert c.info() == {"version": "v1"} and server.seen == 3
        server.seen = 0
        with GCodeAPIClient(server.url, timeout=5, busy_retries=1) as c, pytest.raises(APIUnavailableError) as err:
            c.info()
        assert err.value.status == 503 and err.value.retry_after == 0.0 and server.seen == 2
    finally:
        server.close()


def test_stream_retries_back_off_at_random_within_their_interval(monkeypatch):
    # A fleet of monitors cut off together must not retry together: each wait falls at a random point
    # of [0.5, 1.5] x 0.1 s x 2^attempt, and the chunk is sent 1 + stream_retries times in all.
    import api.client as client_module

    waits = []
    monkeypatch.setattr(client_module.time, "sleep", waits.append)
    url = f"http://127.0.0.1:{free_port()}"   # nothing listens there: every try fails to connect
    for _ in range(20):
        with GCodeAPIClient(url, timeout=2, stream_retries=2) as c, pytest.raises(APIConnectionError):
            c.stream("fleet-mill", [[0.0]], [[0.0]])
    firsts, seconds = waits[0::2], waits[1::2]
    assert len(waits) == 40
    assert all(0.05 <= w <= 0.15 for w in firsts) and all(0.1 <= w <= 0.3 for w in seconds)
    assert len(set(firsts)) == 20   # not one fixed delay
