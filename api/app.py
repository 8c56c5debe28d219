"""The G-code fingerprint API: FastAPI over onnxruntime (never torch). `uvicorn api.app:app` or `gcodefp serve`.

Configuration: environment variables, listed in api/settings.py. This module wires the parts
together: the model store (hot swap), the stream sessions, the middleware (request ids, metrics,
logs) and the routers: ops_routes (health, readiness, info, metrics, admin), predict_routes (the
guide's inference endpoints) and stream_routes (one machine followed over time).
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import (auth, batcher, direct_routes, docs_routes, inputs, metrics, middleware, ops_routes, predict_routes, schemas, stream_routes,
               stream_handoff, stream_state, streams, v2_routes, watchdog)
from .common import input_error, internal_error
from .logging_setup import setup_logging
from .middleware import RequestMiddleware
from .model_store import ModelStore
from .settings import SETTINGS

setup_logging()
log = logging.getLogger("api")


def _return_large_blocks_to_the_os() -> None:
    """glibc raises its mmap threshold each time a large block is freed, after which large temporaries
    (a batch of windows: ~2.7 MB per 64) come from the heap and freed memory stays resident: under a
    burst of stream sessions a worker's RSS grew by ~250 MB and kept it. A fixed threshold keeps
    blocks of 1 MB and more in their own mappings, unmapped when freed. No-op outside glibc.

    Fixing it also freezes the heap's trim threshold at glibc's 128 KB default (it would follow the
    mmap threshold, at twice it), so the ~600 KB a JSON request frees (its body, its parsed windows)
    went back to the OS after every request and was faulted in again by the next: ~150 page faults a
    request at 100-200 req/s. The trim threshold is set where glibc would put it, 2 MB
    (GCODEFP_HEAP_TRIM_KB): 0.2 faults a request, 18-19% less server CPU per JSON request at 200-400
    req/s (within this VM's noise at 100), the same RSS (benchmarks/heap_trim.py)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, SETTINGS.heap_trim_kb << 10)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


_return_large_blocks_to_the_os()


BUSY_IN_FLIGHT = 4   # a worker serving this many requests at once is falling behind: stream chunks then wait
                     # a few ms for company (GCODEFP_STREAM_BATCH_DELAY_MS) and share graph calls


def congested() -> bool:
    return middleware.in_flight() >= BUSY_IN_FLIGHT


@asynccontextmanager
async def lifespan(app: FastAPI):
    dog = watchdog.LoopWatchdog(SETTINGS.loop_timeout_s) if SETTINGS.loop_timeout_s else None
    if dog is not None:   # from the start: the model loads in a thread, the loop keeps turning meanwhile
        dog.start()
    metrics.watch_gc()
    dropped = metrics.forget_dead_workers()
    if dropped:
        log.warning("dropped the live metrics of ended workers %s", dropped,
                    extra={"event": "dead_workers_forgotten", "pids": dropped})
    store = ModelStore.from_env()
    app.state.store = store
    app.state.admin_token = SETTINGS.admin_token
    app.state.streams = streams.StreamRegistry()
    handoff = app.state.handoff = None
    if SETTINGS.stream_handoff_dir:  # several workers: a machine follows its monitor's connection between them
        handoff = app.state.handoff = stream_handoff.Handoff(
            Path(SETTINGS.stream_handoff_dir), app.state.streams, SETTINGS.stream_handoff_timeout_ms / 1000,
            SETTINGS.stream_state_max_age_s)
        app.state.streams.on_forget = handoff.release
    try:
        await store.reload(trigger="startup")
    except Exception:
        pass  # logged and counted; /ready says 503 until a package loads
    app.state.batcher = (batcher.Batcher(SETTINGS.batch_max_windows, SETTINGS.batch_max_delay_ms, busy=congested)
                         if SETTINGS.batching else None)
    if app.state.batcher is not None:
        app.state.batcher.start()
    watcher = asyncio.create_task(store.watch())
    gc_pauses = asyncio.create_task(metrics.publish_gc_pauses())
    handing = asyncio.create_task(handoff.serve()) if handoff is not None else None
    yield
    if dog is not None:
        dog.stop()
    watcher.cancel()
    gc_pauses.cancel()
    if handing is not None:
        handing.cancel()
    if SETTINGS.stream_state_dir:  # followed machines pick up where they were after the restart
        saved = stream_state.save(Path(SETTINGS.stream_state_dir), app.state.streams.sessions())
        log.info("saved %d stream sessions", saved, extra={"event": "stream_state_saved", "sessions": saved})
    if handoff is not None:
        handoff.close(app.state.streams.sessions())
    if app.state.batcher is not None:
        await app.state.batcher.stop()
    metrics.worker_exit()


app = FastAPI(title="G-code fingerprint API", version="1.0", lifespan=lifespan,
              docs_url=None, redoc_url=None,  # api/docs_routes.py serves /docs from local assets
              description="Infer the executing G-code line, the operation and a fingerprint from a window "
                          "of raw CNC sensor readings.")
app.add_middleware(RequestMiddleware, direct=direct_routes.route if SETTINGS.direct_routes else None,
                   tokens=auth.from_settings(SETTINGS.api_tokens_file))


@app.exception_handler(inputs.InputError)
async def _input_error(request: Request, exc: inputs.InputError):
    return input_error(exc)


@app.exception_handler(v2_routes.V2Error)
async def _v2_error(request: Request, exc: v2_routes.V2Error):
    return v2_routes.v2_error(exc)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    """404 / 405 from routing, as {"error": ...}; a 405 names every method the path takes (the routes of
    one path are separate, and Starlette would list only the first one's)."""
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        path = request.url.path
        allowed = sorted({m for r in app.router.routes if getattr(r, "path_regex", None) is not None
                          and r.path_regex.match(path) for m in (getattr(r, "methods", None) or ())})
        headers["Allow"] = ", ".join(allowed)
    return Response(orjson.dumps({"error": str(exc.detail)}), status_code=exc.status_code, headers=headers,
                    media_type="application/json")


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    return internal_error(exc)


app.include_router(ops_routes.router)
app.include_router(predict_routes.router)
app.include_router(stream_routes.router)
app.include_router(v2_routes.router)
docs_routes.mount(app)
_generic_openapi = app.openapi


def _contract() -> dict:
    """/openapi.json: the generic document with the served model's shapes filled in (api/schemas.py)."""
    store = getattr(app.state, "store", None)
    return schemas.contract(_generic_openapi(), store.model if store is not None else None, inputs.MAX_BATCH,
                            inputs.MAX_STREAM_ROWS, tokens=SETTINGS.api_tokens_file is not None)


app.openapi = _contract
