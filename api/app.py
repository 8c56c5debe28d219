"""The G-code fingerprint API: FastAPI over onnxruntime (never torch). `uvicorn api.app:app` or `gcodefp serve`.

Configuration (environment): GCODEFP_REGISTRY (registry folder) or GCODEFP_PACKAGE (one package),
GCODEFP_ADMIN_TOKEN (enables POST /admin/reload), GCODEFP_POLL_SECONDS, GCODEFP_MAX_BATCH,
GCODEFP_MAX_BODY_BYTES, GCODEFP_MAX_STREAMS, GCODEFP_MAX_STREAM_ROWS, GCODEFP_LOG_LEVEL,
PROMETHEUS_MULTIPROC_DIR (several workers; see api/metrics.py).

The handlers are async and run single-window greedy inference inline: the model takes ~1 ms and a
threadpool hop costs as much as the endpoint itself. Batches and beam/sampling (tens of ms) go to
a thread so that they do not stall the event loop. Parsing, the model store, metrics and logging
live in their own modules; this one only wires them together.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import sys
import time
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from . import inputs, metrics, streams
from .logging_setup import setup_logging
from .middleware import RequestMiddleware
from .model_store import LoadedModel, ModelStore
from .schemas import OPENAPI_BATCH, OPENAPI_PREDICT, OPENAPI_STREAM

setup_logging()
log = logging.getLogger("api")
PREDICT_KEYS = {"sensor_data", "return_fingerprint", "inference_config"}
STREAM_KEYS = {"sensor_data", "start"}


def respond(doc: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


def input_error(exc: inputs.InputError) -> Response:
    where = exc.location or ("query" if exc.field.startswith("query.") else "body")
    loc = [where, *exc.field.removeprefix("query.").split(".")]
    return respond({"error": str(exc), "detail": [{"loc": loc, "msg": exc.message, "type": "value_error"}]},
                   exc.status)


@asynccontextmanager
async def lifespan(app: FastAPI):
    store = ModelStore.from_env()
    app.state.store = store
    app.state.admin_token = os.environ.get("GCODEFP_ADMIN_TOKEN") or None
    app.state.streams = streams.StreamRegistry()
    try:
        await store.reload(trigger="startup")
    except Exception:
        pass  # logged and counted; /ready says 503 until a package loads
    watcher = asyncio.create_task(store.watch())
    yield
    watcher.cancel()
    metrics.worker_exit()


app = FastAPI(title="G-code fingerprint API", version="1.0", lifespan=lifespan,
              description="Infer the executing G-code line, the operation and a fingerprint from a window "
                          "of raw CNC sensor readings.")
app.add_middleware(RequestMiddleware)


def current(request: Request) -> LoadedModel:
    model = request.app.state.store.model
    if model is None:
        raise inputs.InputError("model", "no model loaded yet (see GET /ready)", 503)
    return model


@app.exception_handler(inputs.InputError)
async def _input_error(request: Request, exc: inputs.InputError):
    return input_error(exc)


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    log.error("unhandled error", exc_info=exc, extra={"event": "internal_error"})
    return respond({"error": "internal error (see the server log for this request id)"}, 500)


# ---- read-only endpoints ---------------------------------------------------------------------
@app.get("/")
async def welcome():
    return respond({"name": "G-code fingerprint API", "links": {
        "health": "/health", "ready": "/ready", "info": "/info", "predict": "/predict",
        "batch_predict": "/batch_predict", "fingerprint": "/fingerprint", "stream": "/stream/{machine_id}",
        "metrics": "/metrics", "docs": "/docs"}})


@app.get("/health")
async def health():
    return respond({"status": "ok"})


@app.get("/ready")
async def ready(request: Request):
    store: ModelStore = request.app.state.store
    if store.model is None:
        return respond({"ready": False, "error": store.last_error}, 503)
    return respond({"ready": True, "version": store.model.version, "variant": store.model.variant})


@app.get("/info")
async def info(request: Request):
    model = current(request)
    p, spec, meta = model.predictor, model.spec, model.predictor.metadata
    return respond({
        "version": model.version, "variant": model.variant, "loaded_at": model.loaded_at,
        "load_seconds": model.load_seconds, "window": model.window,
        "features": {"feature_set": spec.feature_set, "continuous": spec.continuous, "categorical": spec.categorical,
                     "required_columns": inputs.required_columns(spec)},
        "vocab_size": p.tokenizer.vocab_size, "max_tokens": p.max_tokens, "operations": p.operations,
        "methods": p.methods(), "default_method": p.default_method, "program_lines": len(p.lines),
        "embedding_dim": int(meta.get("model_config", {}).get("fingerprint_dim", 0)) or None,
        "parameter_count": meta.get("parameter_count"), "metrics": meta.get("metrics", {}),
        "limits": {"max_batch": inputs.MAX_BATCH, "max_body_bytes": inputs.MAX_BODY_BYTES,
                   "max_stream_rows": inputs.MAX_STREAM_ROWS, "max_streams": request.app.state.streams.max_streams},
        "binary_body": f"application/octet-stream: float32 LE [N, {model.window}, "
                       f"{len(spec.continuous)} + {len(spec.categorical)}]",
        "runtime": {"pid": os.getpid(), "torch_imported": "torch" in sys.modules,
                    "onnxruntime": sys.modules["onnxruntime"].__version__ if "onnxruntime" in sys.modules else None},
    })


@app.get("/metrics")
async def prometheus_metrics():
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


# ---- inference -------------------------------------------------------------------------------
async def read_windows(request: Request, model: LoadedModel, batch: bool, keys: set[str]):
    """-> (raw continuous [N, W, F], raw categorical [N, W, C], Options) from a JSON or binary body."""
    t0 = time.perf_counter()
    body = await inputs.read_body(request)
    max_windows = inputs.MAX_BATCH if batch else 1
    max_tokens = model.predictor.max_tokens
    if request.headers.get("content-type", "").split(";")[0].strip() in inputs.BINARY_TYPES:
        cont, cat = inputs.parse_binary(body, model.spec, model.window, inputs.MAX_BATCH)
        if not batch and len(cont) != 1:
            raise inputs.InputError("body", f"{len(cont)} windows; /predict takes one (use /batch_predict)")
        opts, fmt = inputs.query_options(request.query_params, max_tokens), "binary"
    else:
        doc = inputs.parse_json_object(body, keys)
        opts, fmt = inputs.parse_options(doc, max_tokens), "json"
        if batch:
            windows = doc.get("windows")
            if not isinstance(windows, list) or not windows:
                raise inputs.InputError("windows", "required: a non-empty list of sensor_data objects")
            if len(windows) > max_windows:
                raise inputs.InputError("windows", f"{len(windows)} windows exceed the limit of {max_windows}", 413)
            parsed = [inputs.parse_sensor_data(w, model.spec, model.window, f"windows[{i}]")
                      for i, w in enumerate(windows)]
            cont, cat = inputs.np.stack([c for c, _ in parsed]), inputs.np.stack([k for _, k in parsed])
        else:
            if "sensor_data" not in doc:
                raise inputs.InputError("sensor_data", "required")
            c, k = inputs.parse_sensor_data(doc["sensor_data"], model.spec, model.window)
            cont, cat = c[None], k[None]
    if opts.method is not None and opts.method not in model.predictor.methods():
        raise inputs.InputError("inference_config.method", f"{opts.method!r} is not offered by this model; "
                                f"choose one of {', '.join(model.predictor.methods())}")
    metrics.PARSE_LATENCY.labels(fmt).observe(time.perf_counter() - t0)
    return cont, cat, opts


async def run_model(model: LoadedModel, endpoint: str, fn, n: int, inline: bool):
    t0 = time.perf_counter()
    out = fn() if inline else await asyncio.to_thread(fn)
    dt = time.perf_counter() - t0
    metrics.INFERENCE_LATENCY.labels(endpoint, model.variant).observe(dt)
    if n:  # a stream chunk that completes no window runs no model
        metrics.BATCH_SIZE.labels(endpoint).observe(n)
    return out, round(dt * 1000, 3)


def prediction(row: dict, with_fp: bool) -> dict:
    out = {"gcode_sequence": row["gcode"], "tokens": row["tokens"], "method": row["method"],
           "operation": {"name": row["operation"], "confidence": round(row["operation_confidence"], 6)}}
    if "line_confidence" in row:
        out["line_confidence"] = round(row["line_confidence"], 6)
        out["line_source"] = row["line_source"]
    if with_fp:
        out["fingerprint"] = row["fingerprint"]
    return out


async def predict_windows(request: Request, endpoint: str, batch: bool, keys: set[str]):
    model = current(request)  # this request uses this model to the end, even if a swap happens meanwhile
    cont, cat, opts = await read_windows(request, model, batch, keys)

    def infer():
        c, k = inputs.model_inputs(model.spec, cont, cat)
        return model.predictor.predict(c, k, method=opts.method, beam_width=opts.beam_width,
                                       temperature=opts.temperature, max_length=opts.max_length, seed=opts.seed)

    rows, ms = await run_model(model, endpoint, infer, len(cont), inline=len(cont) == 1 and opts.method in (None, "line", "greedy"))
    return model, rows, ms, opts


@app.post("/predict", openapi_extra=OPENAPI_PREDICT)
async def predict(request: Request):
    model, rows, ms, opts = await predict_windows(request, "/predict", False, PREDICT_KEYS)
    return respond(prediction(rows[0], opts.return_fingerprint) | {
        "inference_time_ms": ms, "model_version": model.version})


@app.post("/batch_predict", openapi_extra=OPENAPI_BATCH)
async def batch_predict(request: Request):
    model, rows, ms, opts = await predict_windows(request, "/batch_predict", True,
                                                  {"windows", "return_fingerprint", "inference_config"})
    return respond({"predictions": [prediction(r, opts.return_fingerprint) for r in rows], "batch_size": len(rows),
                    "inference_time_ms": ms, "model_version": model.version})


@app.post("/fingerprint", openapi_extra=OPENAPI_PREDICT)
async def fingerprint(request: Request):
    model = current(request)
    cont, cat, _ = await read_windows(request, model, False, {"sensor_data"})

    def infer():
        return model.predictor.fingerprint(*inputs.model_inputs(model.spec, cont, cat))[0]

    fp, ms = await run_model(model, "/fingerprint", infer, 1, inline=True)
    return respond({"fingerprint": fp.tolist(), "embedding_dim": int(fp.shape[0]),
                    "norm": round(float(inputs.np.linalg.norm(fp)), 6), "inference_time_ms": ms,
                    "model_version": model.version})


# ---- streaming: one machine followed from its program start (api/streams.py) -----------------
@app.post("/stream/{machine_id:path}", openapi_extra=OPENAPI_STREAM)
async def stream_post(request: Request, machine_id: str):
    streams.check_machine_id(machine_id)
    streams.require_line_head(current(request))  # before anything else, so that a 409 holds no session
    doc = inputs.parse_json_object(await inputs.read_body(request), STREAM_KEYS)
    start = doc.get("start", False)
    if not isinstance(start, bool):
        raise inputs.InputError("start", "must be true or false")
    if "sensor_data" not in doc:
        raise inputs.InputError("sensor_data", "required")
    registry: streams.StreamRegistry = request.app.state.streams
    session = registry.acquire(machine_id)
    try:
        async with session.lock:  # this machine's requests apply one at a time, in arrival order
            model = current(request)  # taken under the lock: a request queued across a swap uses the new model
            streams.require_line_head(model)
            t0 = time.perf_counter()
            cont, cat = inputs.parse_rows(doc["sensor_data"], model.spec, inputs.MAX_STREAM_ROWS)
            metrics.PARSE_LATENCY.labels("json").observe(time.perf_counter() - t0)

            async def run(fn, n, inline):
                return await run_model(model, "/stream", fn, n, inline)

            return respond(await streams.post_rows(session, model, cont, cat, start, run))
    finally:
        registry.release(session)


def stream_session(request: Request, machine_id: str) -> streams.Session:
    session = request.app.state.streams.get(streams.check_machine_id(machine_id))
    if session is None:
        raise inputs.InputError("machine_id", f"no stream session for {machine_id!r} in this worker (never started, "
                                              "ended, or evicted)", 404, location="path")
    return session


@app.get("/stream/{machine_id:path}")
async def stream_get(request: Request, machine_id: str):
    return respond(streams.state(stream_session(request, machine_id)))


@app.delete("/stream/{machine_id:path}")
async def stream_delete(request: Request, machine_id: str):
    session = stream_session(request, machine_id)
    async with session.lock:  # after the machine's requests already queued, not in the middle of one
        request.app.state.streams.end(session)
    return respond({"machine_id": machine_id, "ended": True, "rows_since_start": session.rows_since_start,
                    "windows": session.tracker.windows})


# ---- admin -----------------------------------------------------------------------------------
@app.post("/admin/reload")
async def admin_reload(request: Request):
    """Load a package now. {"version": v} (registry mode) loads v here first and, once it works,
    promotes it so every other worker follows; no body reloads the source's current package."""
    token = request.app.state.admin_token
    if token is None:
        return respond({"error": "not found (admin endpoints are off: GCODEFP_ADMIN_TOKEN is not set)"}, 404)
    auth = request.headers.get("authorization", "")
    if not auth.startswith("Bearer "):
        return respond({"error": "authorization: a bearer token is required"}, 401)
    if not hmac.compare_digest(auth[7:].encode(), token.encode()):
        return respond({"error": "authorization: invalid token"}, 403)
    body = await inputs.read_body(request, 4096)
    doc = inputs.parse_json_object(body, {"version"}) if body.strip() else {}
    version = doc.get("version")
    if version is not None and not isinstance(version, str):
        raise inputs.InputError("version", "must be a string")
    store: ModelStore = request.app.state.store
    old = store.model.version if store.model else None
    try:
        new = await store.reload(version, trigger="admin", promote=version is not None)
    except inputs.InputError:
        raise
    except Exception as exc:
        return respond({"error": f"package refused: {exc}", "serving": old}, 409)
    return respond({"version": new.version, "previous": old, "variant": new.variant,
                    "load_seconds": new.load_seconds, "pid": os.getpid()})
