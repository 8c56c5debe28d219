"""Per-request bookkeeping as a plain ASGI middleware (cheaper than BaseHTTPMiddleware):
request id (X-Request-ID, echoed back), in-flight gauge, request count and latency by endpoint and
status, and one structured access-log line per request.

Load shedding: a worker that already holds GCODEFP_MAX_IN_FLIGHT requests answers the next one at
once with 503 and Retry-After instead of queueing it. Past its capacity a worker otherwise queues
without bound: every waiting request holds its body, its parsed windows and a task, so latency
grows for everyone and memory with it (a 1-worker server following twice the machines it can keep
up with grew from 180 to 340 MB). A fast 503 tells the client to back off or try another replica,
and /stream loses nothing: the refused chunk was not applied, so the machine's monitor resends it.
Probes and scrapes (/health, /ready, /metrics) are never shed: an overloaded worker must still say so.

Client tokens (api/auth.py, when GCODEFP_API_TOKENS_FILE is set) are checked here too, before the body
is read, so that a refused request costs the worker nothing more, routed or direct alike."""
from __future__ import annotations

import logging
import re
import time
import uuid

import orjson

from . import auth, metrics
from .logging_setup import request_id_var
from .settings import SETTINGS

log = logging.getLogger("api.access")
ENDPOINTS = frozenset({"/", "/health", "/ready", "/info", "/predict", "/batch_predict", "/fingerprint", "/metrics",
                       "/admin/reload", "/docs", "/openapi.json"})
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
STREAM = "/stream/{machine_id}"  # one label for every machine
V2_INFER = "/v2/infer"  # every model version's Open Inference Protocol infer
QUIET = frozenset({"/health", "/metrics"})  # probes and scrapes: counted, logged only at debug level
NEVER_SHED = frozenset({"/health", "/ready", "/metrics"})
MAX_IN_FLIGHT = SETTINGS.max_in_flight
SHED_BODY = b'{"error":"server overloaded: this worker already holds its maximum of requests (GCODEFP_MAX_IN_FLIGHT); retry shortly"}'


_in_flight = 0   # this worker's requests being served (the middleware is one object per worker)


def in_flight() -> int:
    return _in_flight


class RequestMiddleware:
    def __init__(self, app, max_in_flight: int = MAX_IN_FLIGHT, direct=None, tokens: auth.TokenTable | None = None):
        self.app = app
        self.max_in_flight = max_in_flight
        self.direct = direct  # scope -> an ASGI callable for the hot endpoints, or None (api/direct_routes.py)
        self.tokens = tokens  # None: no client tokens asked for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        rid = given if REQUEST_ID_RE.match(given) else uuid.uuid4().hex
        token = request_id_var.set(rid)
        path = scope["path"]
        # bounded label set: scanners (and machine ids) cannot blow it up
        endpoint = (path if path in ENDPOINTS else STREAM if path.startswith("/stream/")
                    else V2_INFER if path.startswith("/v2/") and path.endswith("/infer") else "other")
        global _in_flight
        if self.max_in_flight and _in_flight >= self.max_in_flight and path not in NEVER_SHED:
            metrics.SHED.labels(endpoint).inc()
            metrics.REQUESTS.labels(endpoint, scope["method"], "503").inc()
            request_id_var.reset(token)
            return await shed(send, rid)
        holder = None   # the client token's name, for the access log (who posted what)
        if self.tokens is not None and auth.protected(path):
            given_auth = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            verdict = self.tokens.check(given_auth, path)
            if isinstance(verdict, auth.Refusal):
                status = 403 if verdict.reason == "machine" else 401
                metrics.AUTH_REFUSED.labels(endpoint, verdict.reason).inc()
                metrics.REQUESTS.labels(endpoint, scope["method"], str(status)).inc()
                log.info("%s %s %d", scope["method"], path, status, extra={
                    "event": "auth_refused", "reason": verdict.reason, "error": verdict.message, "method": scope["method"],
                    "path": path, "status": status, "client": (scope.get("client") or ("", 0))[0]})
                request_id_var.reset(token)
                return await refuse(send, rid, status, verdict.message)
            holder = verdict.name
        status = 500
        t0 = time.perf_counter()
        _in_flight += 1
        metrics.IN_FLIGHT.inc()

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        handler = (self.direct(scope) if self.direct is not None else None) or self.app
        try:
            await handler(scope, receive, send_with_id)
        finally:
            dt = time.perf_counter() - t0
            _in_flight -= 1
            metrics.IN_FLIGHT.dec()
            metrics.REQUESTS.labels(endpoint, scope["method"], str(status)).inc()
            metrics.REQUEST_LATENCY.labels(endpoint, str(status)).observe(dt)
            level = logging.DEBUG if endpoint in QUIET and status < 400 else logging.INFO
            if log.isEnabledFor(level):
                extra = {"event": "request", "method": scope["method"], "path": path, "status": status,
                         "duration_ms": round(dt * 1000, 3), "client": (scope.get("client") or ("", 0))[0]}
                if holder is not None:
                    extra["token"] = holder
                log.log(level, "%s %s %d", scope["method"], path, status, extra=extra)
            request_id_var.reset(token)


async def answer_unread(send, rid: str, status: int, body: bytes, *headers: tuple[bytes, bytes]) -> None:
    """A JSON answer sent without reading the request's body: a refused request costs nothing more."""
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"x-request-id", rid.encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


async def shed(send, rid: str) -> None:
    """503: an overloaded worker spends nothing more on the request."""
    await answer_unread(send, rid, 503, SHED_BODY, (b"retry-after", b"1"))


async def refuse(send, rid: str, status: int, message: str) -> None:
    """401 (no, unknown or expired token; WWW-Authenticate says which scheme) or 403 (not this machine)."""
    extra = [(b"www-authenticate", b'Bearer realm="gcodefp"')] if status == 401 else []
    await answer_unread(send, rid, status, orjson.dumps({"error": message}), *extra)
