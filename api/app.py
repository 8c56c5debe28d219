"""The G-code fingerprint API: FastAPI over onnxruntime (never torch). `uvicorn api.app:app` or `gcodefp serve`.

Configuration: environment variables, listed in api/settings.py. This module wires the parts
together: the model store (hot swap), the stream sessions, the middleware (request ids, metrics,
logs) and the routers: ops_routes (health, readiness, info, metrics, admin), predict_routes (the
guide's inference endpoints) and stream_routes (one machine followed over time).
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from . import batcher, inputs, metrics, ops_routes, predict_routes, stream_routes, streams
from .common import input_error, respond
from .logging_setup import setup_logging
from .middleware import RequestMiddleware
from .model_store import ModelStore
from .settings import SETTINGS

setup_logging()
log = logging.getLogger("api")


@asynccontextmanager
async def lifespan(app: FastAPI):
    store = ModelStore.from_env()
    app.state.store = store
    app.state.admin_token = SETTINGS.admin_token
    app.state.streams = streams.StreamRegistry()
    try:
        await store.reload(trigger="startup")
    except Exception:
        pass  # logged and counted; /ready says 503 until a package loads
    app.state.batcher = (batcher.Batcher(SETTINGS.batch_max_windows, SETTINGS.batch_max_delay_ms)
                         if SETTINGS.batching else None)
    if app.state.batcher is not None:
        app.state.batcher.start()
    watcher = asyncio.create_task(store.watch())
    yield
    watcher.cancel()
    if app.state.batcher is not None:
        await app.state.batcher.stop()
    metrics.worker_exit()


app = FastAPI(title="G-code fingerprint API", version="1.0", lifespan=lifespan,
              description="Infer the executing G-code line, the operation and a fingerprint from a window "
                          "of raw CNC sensor readings.")
app.add_middleware(RequestMiddleware)


@app.exception_handler(inputs.InputError)
async def _input_error(request: Request, exc: inputs.InputError):
    return input_error(exc)


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    log.error("unhandled error", exc_info=exc, extra={"event": "internal_error"})
    return respond({"error": "internal error (see the server log for this request id)"}, 500)


app.include_router(ops_routes.router)
app.include_router(predict_routes.router)
app.include_router(stream_routes.router)
