"""Load shedding (api/middleware.py): past GCODEFP_MAX_IN_FLIGHT requests a worker answers 503 with
Retry-After at once instead of queueing without bound; probes and scrapes always get through."""
from __future__ import annotations

import asyncio
import json

from api import metrics
from api.middleware import RequestMiddleware


class HeldApp:
    """An ASGI app whose /predict and /stream answers wait until released (requests piling up on a busy worker)."""

    def __init__(self):
        self.release = asyncio.Event()
        self.served: list[str] = []

    async def __call__(self, scope, receive, send):
        if scope["path"] not in ("/health", "/ready", "/metrics"):
            await self.release.wait()
        self.served.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


async def call(app, path: str, method: str = "POST") -> dict:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app({"type": "http", "method": method, "path": path, "headers": []}, receive, send)
    head = sent[0]
    return {"status": head["status"], "headers": dict(head["headers"]), "body": sent[-1].get("body", b"")}


def shed_count(endpoint: str) -> float:
    return metrics.SHED.labels(endpoint)._value.get()


def test_a_full_worker_refuses_at_once_and_keeps_answering_probes():
    async def scenario():
        inner = HeldApp()
        app = RequestMiddleware(inner, max_in_flight=2)
        shed_before = shed_count("/predict")
        held = [asyncio.create_task(call(app, path)) for path in ("/predict", "/stream/m1")]
        await asyncio.sleep(0.05)  # both are in the app now, waiting
        refused = await asyncio.wait_for(call(app, "/predict"), 1.0)  # answered without waiting for them
        probes = [await asyncio.wait_for(call(app, path, "GET"), 1.0) for path in ("/health", "/ready", "/metrics")]
        inner.release.set()
        answered = await asyncio.gather(*held)
        after = await call(app, "/predict")  # room again
        return refused, probes, answered, after, shed_count("/predict") - shed_before, inner.served

    refused, probes, answered, after, shed, served = asyncio.run(scenario())
    assert refused["status"] == 503 and refused["headers"][b"retry-after"] == b"1"
    assert "GCODEFP_MAX_IN_FLIGHT" in json.loads(refused["body"])["error"]
    assert b"x-request-id" in refused["headers"]
    assert [p["status"] for p in probes] == [200, 200, 200]
    assert [a["status"] for a in answered] == [200, 200] and after["status"] == 200
    assert shed == 1 and served.count("/predict") == 2  # the refused request never reached the app


def test_no_limit_queues_everything():
    async def scenario():
        inner = HeldApp()
        app = RequestMiddleware(inner, max_in_flight=0)
        held = [asyncio.create_task(call(app, "/predict")) for _ in range(50)]
        await asyncio.sleep(0.05)
        inner.release.set()
        return await asyncio.gather(*held)

    assert all(r["status"] == 200 for r in asyncio.run(scenario()))
