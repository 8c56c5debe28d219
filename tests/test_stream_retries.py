"""A /stream chunk sent again after its answer was lost (Idempotency-Key): answered again, applied once.

A monitor whose connection drops after it posted a chunk cannot tell whether the server applied it;
sending it again must not feed the machine's rows to the tracker twice. These tests lose real answers:
a TCP relay in front of the server closes the monitor's connection once the server has answered."""
from __future__ import annotations

import re
import socket
import threading

import pytest
from test_stream_api import N_ROWS, matrix, run_rows, same_prediction  # noqa: F401 (a fixture)

from api.client import APIConnectionError, GCodeAPIClient

pytestmark = pytest.mark.slow
CHUNK = 8


def replays(http, result: str) -> float:
    m = re.search(rf'^gcodefp_stream_replays_total\{{result="{result}"\}} (\S+)', http.get("/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def chunk_doc(cont, cat, lo: int, start: bool) -> dict:
    return {"sensor_data": matrix(cont, cat, lo, lo + CHUNK), "start": start, "every": 1}


def test_a_chunk_sent_again_gets_its_answer_and_its_rows_count_once(http, run_rows):
    cont, cat = run_rows
    before = replays(http, "replayed")
    answers = []
    for k, lo in enumerate(range(0, N_ROWS - CHUNK + 1, CHUNK)):
        doc, key = chunk_doc(cont, cat, lo, start=k == 0), {"idempotency-key": f"mill-retry-{k}"}
        first = http.post("/stream/mill-retry", json=doc, headers=key)
        again = http.post("/stream/mill-retry", json=doc, headers=key)
        assert first.status_code == again.status_code == 200, (first.text, again.text)
        assert "idempotent-replayed" not in first.headers and again.headers["idempotent-replayed"] == "true"
        assert again.content == first.content   # the same answer, byte for byte
        answers.append(first.json())
    n = CHUNK * len(answers)
    assert [a["rows_since_start"] for a in answers] == list(range(CHUNK, n + 1, CHUNK))
    assert http.get("/stream/mill-retry").json()["rows_since_start"] == n
    assert replays(http, "replayed") - before == len(answers)

    # the answers are those of the rows posted once
    whole = http.post("/stream/mill-retry-whole", json={"sensor_data": matrix(cont, cat, 0, n), "start": True,
                                                        "every": 1}).json()
    streamed = [p for a in answers for p in a["predictions"]]
    assert len(streamed) == len(whole["predictions"]) == n
    for a, b in zip(streamed, whole["predictions"]):
        same_prediction(a, b)


def test_a_key_reused_for_other_rows_or_malformed_is_refused_and_applies_nothing(http, run_rows):
    cont, cat = run_rows
    key = {"idempotency-key": "k-1"}
    assert http.post("/stream/mill-reuse", json=chunk_doc(cont, cat, 0, True), headers=key).status_code == 200
    conflicts = replays(http, "conflict")
    r = http.post("/stream/mill-reuse", json=chunk_doc(cont, cat, CHUNK, False), headers=key)
    assert r.status_code == 409 and r.json()["error"].startswith("idempotency-key: 'k-1' was already used")
    assert r.json()["detail"][0]["loc"] == ["header", "idempotency-key"]
    assert replays(http, "conflict") - conflicts == 1
    for bad in ["has space", "x" * 129, "tab\there"]:
        r = http.post("/stream/mill-reuse", json=chunk_doc(cont, cat, CHUNK, False), headers={"idempotency-key": bad})
        assert r.status_code == 422 and r.json()["error"].startswith("idempotency-key: must be"), (bad, r.text)
    assert http.get("/stream/mill-reuse").json()["rows_since_start"] == CHUNK
    # a new key applies the chunk; no key at all keeps the old behaviour (every post applied)
    ok = http.post("/stream/mill-reuse", json=chunk_doc(cont, cat, CHUNK, False), headers={"idempotency-key": "k-2"})
    assert ok.status_code == 200 and ok.json()["rows_since_start"] == 2 * CHUNK
    for _ in range(2):
        assert http.post("/stream/mill-reuse", json=chunk_doc(cont, cat, CHUNK, False)).status_code == 200
    assert http.get("/stream/mill-reuse").json()["rows_since_start"] == 4 * CHUNK


class AnswerDroppingRelay:
    """A TCP relay to `upstream`; while `drop` > 0, a connection whose server answer arrives is closed
    instead (the answer is lost after the server acted on the request), and `drop` counts down."""

    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream, self.drop, self.dropped = (host, int(port)), 0, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src, dst, answers: bool):
        try:
            while data := src.recv(65536):
                if answers:
                    with self.lock:
                        lose, self.drop = self.drop > 0, max(self.drop - 1, 0)
                        self.dropped += lose
                    if lose:
                        break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.listener.close()


def test_the_client_retries_a_lost_answer_with_its_key(api_server, http, run_rows):
    cont, cat = run_rows
    relay = AnswerDroppingRelay(api_server.url)
    try:
        with GCodeAPIClient(relay.url, timeout=30) as api:
            first = api.stream("mill-lossy", cont[:CHUNK], cat[:CHUNK], start=True, every=1)
            before = replays(http, "replayed")
            relay.drop = 1   # the server applies the next chunk, and its answer never reaches the client
            r = api.stream("mill-lossy", cont[CHUNK:2 * CHUNK], cat[CHUNK:2 * CHUNK], every=1)
            assert relay.dropped == 1 and replays(http, "replayed") - before == 1
            assert first["rows_since_start"] == CHUNK and r["rows_since_start"] == 2 * CHUNK
            assert [p["row"] for p in r["predictions"]] == list(range(CHUNK, 2 * CHUNK))
        assert http.get("/stream/mill-lossy").json()["rows_since_start"] == 2 * CHUNK

        # without retries the caller sees the loss, and the rows were applied all the same: sending the
        # chunk again by hand (a new key) would apply them twice, which is what the key prevents
        with GCodeAPIClient(relay.url, timeout=30, stream_retries=0) as api:
            relay.drop = 1
            with pytest.raises(APIConnectionError):
                api.stream("mill-lossy", cont[2 * CHUNK:3 * CHUNK], cat[2 * CHUNK:3 * CHUNK], every=1)
        assert http.get("/stream/mill-lossy").json()["rows_since_start"] == 3 * CHUNK
    finally:
        relay.close()


def test_the_key_is_documented_in_the_contract(http):
    op = http.get("/openapi.json").json()["paths"]["/stream/{machine_id}"]["post"]
    header = next(p for p in op["parameters"] if p["in"] == "header")
    assert header["name"] == "Idempotency-Key" and header["required"] is False
    assert "Idempotent-Replayed" in op["responses"]["200"]["headers"]
