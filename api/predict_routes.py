"""The guide's inference endpoints: POST /predict, /batch_predict, /fingerprint (JSON or binary bodies).

Line-head and greedy answers go through the micro-batcher (api/batcher.py; on by default): windows of
requests received together run as one graph call, on the event loop. With GCODEFP_BATCHING=0 each
request runs its own call inline (a thread hop would cost as much as the model; more than 8 windows
go to a thread).
Beam search and sampling (tens of ms) run alone in a thread.
"""
from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request

from . import inputs, json_windows, metrics, monitoring, options
from .common import current, respond, run_model, run_windows
from .model_store import LoadedModel
from .schemas import (BATCH_RESPONSES, FINGERPRINT_RESPONSES, OPENAPI_BATCH, OPENAPI_FINGERPRINT, OPENAPI_PREDICT,
                      PREDICT_RESPONSES)

router = APIRouter()
PREDICT_KEYS = {"sensor_data", "return_fingerprint", "inference_config"}


def prediction(row: dict, with_fp: bool) -> dict:
    out = {"gcode_sequence": row["gcode"], "tokens": row["tokens"], "method": row["method"],
           "operation": {"name": row["operation"], "confidence": round(row["operation_confidence"], 6)}}
    if "line_confidence" in row:
        out["line_confidence"] = round(row["line_confidence"], 6)
        out["line_source"] = row["line_source"]
    if with_fp:
        out["fingerprint"] = row["fingerprint"]
    return out


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
        opts, fmt = options.query_options(request.query_params, max_tokens), "binary"
    elif (fast := json_windows.read_windows(body, keys, model.window, len(model.spec.continuous),
                                            len(model.spec.categorical), "windows" if batch else None,
                                            max_windows)) is not None:
        doc, cont, cat = fast
        opts, fmt = options.parse_options(doc, max_tokens), "json"
    else:  # the exact path: anything the fast path does not take, and every error message
        doc = inputs.parse_json_object(body, keys)
        opts, fmt, plain = options.parse_options(doc, max_tokens), "json", inputs.plain_numbers(body, doc)
        if batch:
            windows = doc.get("windows")
            if not isinstance(windows, list) or not windows:
                raise inputs.InputError("windows", "required: a non-empty list of sensor_data objects")
            if len(windows) > max_windows:
                raise inputs.InputError("windows", f"{len(windows)} windows exceed the limit of {max_windows}", 413)
            parsed = [inputs.parse_sensor_data(w, model.spec, model.window, f"windows[{i}]", plain)
                      for i, w in enumerate(windows)]
            cont, cat = inputs.np.stack([c for c, _ in parsed]), inputs.np.stack([k for _, k in parsed])
        else:
            if "sensor_data" not in doc:
                raise inputs.InputError("sensor_data", "required")
            c, k = inputs.parse_sensor_data(doc["sensor_data"], model.spec, model.window, plain=plain)
            cont, cat = c[None], k[None]
    if opts.method is not None and opts.method not in model.predictor.methods():
        raise inputs.InputError("inference_config.method", f"{opts.method!r} is not offered by this model; "
                                f"choose one of {', '.join(model.predictor.methods())}")
    metrics.PARSE_LATENCY.labels(fmt).observe(time.perf_counter() - t0)
    return cont, cat, opts


def normalise(model, cont, cat):
    return inputs.model_inputs(model.spec, cont, cat)


def _batchable(opts: options.Options) -> bool:
    """Deterministic one-pass methods share graph calls; beam search and sampling run alone."""
    return opts.method in (None, "line", "greedy")


async def predict_windows(request: Request, endpoint: str, batch: bool, keys: set[str]):
    model = current(request)  # this request uses this model to the end, even if a swap happens meanwhile
    batcher = request.app.state.batcher
    if batcher is None:
        cont, cat, opts = await read_windows(request, model, batch, keys)
    else:
        with batcher.arriving():  # the batcher may wait (briefly) for this request to join a call
            cont, cat, opts = await read_windows(request, model, batch, keys)
            # A body that has fully arrived is read without suspending, so requests run one after the other
            # and each would find the batcher idle. One turn of the loop lets the requests already received
            # parse up to here too: then this one, finding them arriving, queues, and they share its call.
            await asyncio.sleep(0)
    if _batchable(opts):
        method, max_length = opts.method, opts.max_length

        def infer(m, c, k):  # normalised windows (the batch's, as one block) -> one row each
            return m.predictor.predict(c, k, method=method, max_length=max_length)

        rows, ms = await run_windows(request, model, endpoint, ("predict", method, max_length), infer, cont, cat,
                                     prepare=normalise)
        monitoring.observe_windows(model, endpoint, cont, rows)
        return model, rows, ms, opts

    def infer_alone():
        c, k = inputs.model_inputs(model.spec, cont, cat)
        return model.predictor.predict(c, k, method=opts.method, beam_width=opts.beam_width,
                                       temperature=opts.temperature, max_length=opts.max_length, seed=opts.seed)

    rows, ms = await run_model(model, endpoint, infer_alone, len(cont), inline=False)
    monitoring.observe_windows(model, endpoint, cont, rows)
    return model, rows, ms, opts


@router.post("/predict", openapi_extra=OPENAPI_PREDICT, responses=PREDICT_RESPONSES)
async def predict(request: Request):
    model, rows, ms, opts = await predict_windows(request, "/predict", False, PREDICT_KEYS)
    return respond(prediction(rows[0], opts.return_fingerprint) | {
        "inference_time_ms": ms, "model_version": model.version})


@router.post("/batch_predict", openapi_extra=OPENAPI_BATCH, responses=BATCH_RESPONSES)
async def batch_predict(request: Request):
    model, rows, ms, opts = await predict_windows(request, "/batch_predict", True,
                                                  {"windows", "return_fingerprint", "inference_config"})
    return respond({"predictions": [prediction(r, opts.return_fingerprint) for r in rows], "batch_size": len(rows),
                    "inference_time_ms": ms, "model_version": model.version})


@router.post("/fingerprint", openapi_extra=OPENAPI_FINGERPRINT, responses=FINGERPRINT_RESPONSES)
async def fingerprint(request: Request):
    model = current(request)
    cont, cat, _ = await read_windows(request, model, False, {"sensor_data"})

    def infer():
        return model.predictor.fingerprint(*inputs.model_inputs(model.spec, cont, cat))[0]

    fp, ms = await run_model(model, "/fingerprint", infer, 1, inline=True)
    monitoring.observe_windows(model, "/fingerprint", cont)
    return respond({"fingerprint": fp.tolist(), "embedding_dim": int(fp.shape[0]),
                    "norm": round(float(inputs.np.linalg.norm(fp)), 6), "inference_time_ms": ms,
                    "model_version": model.version})
