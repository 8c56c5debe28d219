"""Per-request bookkeeping as a plain ASGI middleware (cheaper than BaseHTTPMiddleware):
request id (X-Request-ID, echoed back), in-flight gauge, request count and latency by endpoint and
status, and one structured access-log line per request."""
from __future__ import annotations

import logging
import re
import time
import uuid

from . import metrics
from .logging_setup import request_id_var

log = logging.getLogger("api.access")
ENDPOINTS = frozenset({"/", "/health", "/ready", "/info", "/predict", "/batch_predict", "/fingerprint", "/metrics",
                       "/admin/reload", "/docs", "/openapi.json"})
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
STREAM = "/stream/{machine_id}"  # one label for every machine
V2_INFER = "/v2/infer"  # every model version's Open Inference Protocol infer
QUIET = frozenset({"/health", "/metrics"})  # probes and scrapes: counted, logged only at debug level


class RequestMiddleware:
    def __init__(self, app):
        self.app = app

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
        status = 500
        t0 = time.perf_counter()
        metrics.IN_FLIGHT.inc()

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            dt = time.perf_counter() - t0
            metrics.IN_FLIGHT.dec()
            metrics.REQUESTS.labels(endpoint, scope["method"], str(status)).inc()
            metrics.REQUEST_LATENCY.labels(endpoint, str(status)).observe(dt)
            level = logging.DEBUG if endpoint in QUIET and status < 400 else logging.INFO
            if log.isEnabledFor(level):
                log.log(level, "%s %s %d", scope["method"], path, status, extra={
                    "event": "request", "method": scope["method"], "path": path, "status": status,
                    "duration_ms": round(dt * 1000, 3), "client": (scope.get("client") or ("", 0))[0]})
            request_id_var.reset(token)
