"""What every route shares: JSON responses, input errors, the served model, timed model calls."""
from __future__ import annotations

import asyncio
import logging
import time

import orjson
from fastapi import Request
from fastapi.responses import Response

from . import inputs, metrics
from .model_store import LoadedModel


def respond(doc: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


def internal_error(exc: Exception) -> Response:
    """A 500 that names no internals: the traceback goes to the log, under the request's id."""
    logging.getLogger("api").error("unhandled error", exc_info=exc, extra={"event": "internal_error"})
    return respond({"error": "internal error (see the server log for this request id)"}, 500)


def input_error(exc: inputs.InputError) -> Response:
    where = exc.location or ("query" if exc.field.startswith("query.") else "body")
    loc = [where, *exc.field.removeprefix("query.").split(".")]
    return respond({"error": str(exc), "detail": [{"loc": loc, "msg": exc.message, "type": "value_error"}]},
                   exc.status)


def current(request: Request) -> LoadedModel:
    model = request.app.state.store.model
    if model is None:
        raise inputs.InputError("model", "no model loaded yet (see GET /ready)", 503)
    return model


async def run_model(model: LoadedModel, endpoint: str, fn, n: int, inline: bool):
    t0 = time.perf_counter()
    out = fn() if inline else await asyncio.to_thread(fn)
    dt = time.perf_counter() - t0
    metrics.INFERENCE_LATENCY.labels(endpoint, model.variant).observe(dt)
    if n:  # a stream chunk that completes no window runs no model
        metrics.BATCH_SIZE.labels(endpoint).observe(n)
        metrics.graph_call(dt, n)
    return out, round(dt * 1000, 3)


async def run_windows(request: Request, model: LoadedModel, endpoint: str, key: tuple, fn, cont, cat, prepare=None,
                      hold: float = 0.0):
    """fn(model, *prepare(model, cont, cat)) over windows [n, W, .], micro-batched with concurrent requests'
    windows of the same model and key (api/batcher.py), or alone when batching is off. prepare
    (normalisation) and fn (the model) are timed apart. hold: seconds the windows may wait for later
    requests of their key on a congested worker (Batcher.run_now). -> (result, fn's call in ms)."""
    batcher = request.app.state.batcher
    if batcher is None:
        if prepare is not None:
            t0 = time.perf_counter()
            cont, cat = prepare(model, cont, cat)
            metrics.NORMALISE_LATENCY.labels(endpoint).observe(time.perf_counter() - t0)
        # a few windows inline (a thread hop costs as much), more in a thread
        return await run_model(model, endpoint, lambda: fn(model, cont, cat), len(cont), inline=len(cont) <= 8)
    answer = (batcher.run_now(model, key, fn, cont, cat, prepare, hold)
              or await batcher.submit(model, key, fn, cont, cat, prepare, hold))
    metrics.QUEUE_LATENCY.labels(endpoint).observe(answer.queue_ms / 1000)
    if prepare is not None:
        metrics.NORMALISE_LATENCY.labels(endpoint).observe(answer.prepare_ms / 1000)
    metrics.INFERENCE_LATENCY.labels(endpoint, model.variant).observe(answer.inference_ms / 1000)
    if len(cont):
        metrics.BATCH_SIZE.labels(endpoint).observe(len(cont))
    return answer.result, answer.inference_ms
