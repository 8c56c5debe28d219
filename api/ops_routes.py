"""Operational endpoints: /, /health, /ready, /info, /metrics and POST /admin/reload."""
from __future__ import annotations

import hmac
import os
import sys

from fastapi import APIRouter, Request
from fastapi.responses import Response

from . import inputs, metrics, monitoring
from .common import current, respond
from .model_store import ModelStore
from .schemas import OPS_RESPONSES as R
from .settings import SETTINGS

router = APIRouter()


@router.get("/", responses=R["welcome"])
async def welcome():
    return respond({"name": "G-code fingerprint API", "links": {
        "health": "/health", "ready": "/ready", "info": "/info", "predict": "/predict",
        "batch_predict": "/batch_predict", "fingerprint": "/fingerprint", "stream": "/stream/MACHINE_ID", "v2": "/v2", "v2_model": "/v2/models/gcodefp",
        "metrics": "/metrics", "docs": "/docs"}})


@router.get("/health", responses=R["health"])
async def health():
    return respond({"status": "ok"})


@router.get("/ready", responses=R["ready"])
async def ready(request: Request):
    store: ModelStore = request.app.state.store
    if store.model is None:
        return respond({"ready": False, "error": store.last_error}, 503)
    return respond({"ready": True, "version": store.model.version, "variant": store.model.variant})


@router.get("/info", responses=R["info"])
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
        "client_tokens": SETTINGS.api_tokens_file is not None,   # do /predict, /stream... want a bearer token
        "binary_body": f"application/octet-stream: float32 LE [N, {model.window}, "
                       f"{len(spec.continuous)} + {len(spec.categorical)}]",
        "runtime": {"pid": os.getpid(), "torch_imported": "torch" in sys.modules,
                    "onnxruntime": sys.modules["onnxruntime"].__version__ if "onnxruntime" in sys.modules else None},
    })


@router.get("/metrics", responses=R["metrics"])
async def prometheus_metrics():
    monitoring.flush_all()  # this worker's input tallies since the last flush
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


@router.post("/admin/reload", responses=R["reload"])
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
