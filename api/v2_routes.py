"""Open Inference Protocol (KServe / Triton "v2", REST) over the same model store and hot swap.

    GET  /v2                                   server metadata (extensions: binary_tensor_data)
    GET  /v2/health/live, /v2/health/ready
    GET  /v2/models/{name}[/versions/{v}]      model metadata: the loaded versions, input and output tensors
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer

Inputs (raw log readings, as /predict takes them): "continuous" [N, W, F] FP32/FP64 (NaN = absent
reading) and "categorical" [N, W, C] codes (any numeric type), in the feature order of the metadata.
Outputs, one row per window: gcode (BYTES), operation (BYTES), operation_confidence (FP32),
line_confidence (FP32) and line_source (BYTES) for the line head, fingerprint (FP32 [N, E]).
Request "parameters" carry /predict's inference_config (method, beam_width, temperature,
max_length, seed) and binary_data_output. The binary tensor data extension works both ways: a JSON
header of Inference-Header-Content-Length bytes followed by the tensors' raw bytes (inputs with
parameters.binary_data_size; outputs asked with parameters.binary_data, BYTES as 4-byte LE
length + bytes). Without a version the current model answers; a pinned version must be loaded
(current or the one before it, GCODEFP_KEEP_PREVIOUS). Errors: {"error": message} with a 4xx.
"""
from __future__ import annotations

import struct

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from . import inputs, monitoring, options
from .common import respond, run_model
from .model_store import LoadedModel, ModelStore
from .schemas import V2_RESPONSES as R
from .schemas import FLOAT32_MAX, openapi_v2_infer

MODEL_NAME = "gcodefp"
HEADER_LENGTH = "inference-header-content-length"
DTYPES = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "INT8": "i1", "INT16": "<i2", "INT32": "<i4",
          "INT64": "<i8", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8"}
OUTPUT_TYPES = {"gcode": "BYTES", "operation": "BYTES", "operation_confidence": "FP32",
                "line_confidence": "FP32", "line_source": "BYTES", "fingerprint": "FP32"}
PARAMETER_KEYS = options.CONFIG_KEYS | {"binary_data_output"}

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"])


class V2Error(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status


def v2_error(exc: V2Error | inputs.InputError) -> Response:
    """The protocol's error body; a request that is merely malformed is a 400 (not /predict's 422)."""
    status = exc.status if exc.status != 422 else 400
    return respond({"error": exc.message if isinstance(exc, V2Error) else str(exc)}, status)


def _model(request: Request, name: str, version: str | None) -> LoadedModel:
    store: ModelStore = request.app.state.store
    if name != MODEL_NAME:
        raise V2Error(f"unknown model {name!r}; this server serves {MODEL_NAME!r}", 404)
    model = store.get(version)
    if model is None:
        if version is None:
            raise V2Error("no model loaded yet (see /v2/health/ready)", 503)
        loaded = [m.version for m in store.loaded()]
        raise V2Error(f"version {version!r} of {MODEL_NAME!r} is not loaded; loaded: {', '.join(loaded) or 'none'}",
                      404)
    return model


def _tensor_meta(model: LoadedModel) -> tuple[list[dict], list[dict]]:
    spec, w, p = model.spec, model.window, model.predictor
    ins = [{"name": "continuous", "datatype": "FP32", "shape": [-1, w, len(spec.continuous)]}]
    if spec.categorical:
        ins.append({"name": "categorical", "datatype": "FP32", "shape": [-1, w, len(spec.categorical)]})
    dim = int(p.metadata.get("model_config", {}).get("fingerprint_dim", 0)) or -1
    outs = [{"name": n, "datatype": t, "shape": [-1, dim] if n == "fingerprint" else [-1]}
            for n, t in OUTPUT_TYPES.items() if p.default_method == "line" or not n.startswith("line_")]
    return ins, outs


# ---- server and model metadata --------------------------------------------------------------
@router.get("", responses=R["server"])
async def server_metadata(request: Request):
    return respond({"name": "gcodefp", "version": request.app.version, "extensions": ["binary_tensor_data"]})


@router.get("/health/live", responses=R["live"])
async def live():
    return respond({"live": True})


@router.get("/health/ready", responses=R["ready"])
async def server_ready(request: Request):
    ready = request.app.state.store.model is not None
    return respond({"ready": ready}, 200 if ready else 503)


async def _metadata(request: Request, name: str, version: str | None):
    try:
        model = _model(request, name, version)
    except V2Error as exc:
        return v2_error(exc)
    ins, outs = _tensor_meta(model)
    return respond({"name": MODEL_NAME, "versions": [m.version for m in request.app.state.store.loaded()],
                    "platform": "onnxruntime_onnx", "inputs": ins, "outputs": outs,
                    "parameters": {"version": model.version, "variant": model.variant,
                                   "feature_order": {"continuous": model.spec.continuous,
                                                     "categorical": model.spec.categorical},
                                   "methods": model.predictor.methods()}})


@router.get("/models/{name}", responses=R["model"])
async def model_metadata(request: Request, name: str):
    return await _metadata(request, name, None)


@router.get("/models/{name}/versions/{version}", responses=R["model"])
async def model_version_metadata(request: Request, name: str, version: str):
    return await _metadata(request, name, version)


async def _ready(request: Request, name: str, version: str | None):
    try:
        model = _model(request, name, version)
    except V2Error as exc:
        return v2_error(exc)
    return respond({"name": MODEL_NAME, "version": model.version, "ready": True})


@router.get("/models/{name}/ready", responses=R["model_ready"])
async def model_ready(request: Request, name: str):
    return await _ready(request, name, None)


@router.get("/models/{name}/versions/{version}/ready", responses=R["model_ready"])
async def model_version_ready(request: Request, name: str, version: str):
    return await _ready(request, name, version)


# ---- inference ------------------------------------------------------------------------------
def _split_body(request: Request, body: bytes) -> tuple[dict, bytes]:
    raw_len = request.headers.get(HEADER_LENGTH)
    if raw_len is None:
        header, rest = body, b""
    else:
        if not raw_len.isdigit() or int(raw_len) > len(body):
            raise V2Error(f"Inference-Header-Content-Length: {raw_len!r} is not a length within the "
                          f"{len(body)}-byte body")
        header, rest = body[:int(raw_len)], body[int(raw_len):]
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise V2Error(f"body: invalid JSON inference header: {exc}") from None
    if not isinstance(doc, dict):
        raise V2Error("body: the inference header must be a JSON object")
    # numpy reads [true, 1.5] as [1.0, 1.5]: walk the tensors' data only when the header has more true/false
    # tokens than the flags it may carry (a byte count; the walk is the rare path).
    params, outs = doc.get("parameters"), doc.get("outputs")
    flags = list(params.values()) if isinstance(params, dict) else []
    for o in outs if isinstance(outs, list) else ():
        if isinstance(o, dict) and isinstance(o.get("parameters"), dict):
            flags.extend(o["parameters"].values())
    if header.count(b"true") + header.count(b"false") > sum(isinstance(f, bool) for f in flags):
        tensors = doc.get("inputs") if isinstance(doc.get("inputs"), list) else []
        where = inputs._first_bool_in_lists([t.get("data") for t in tensors if isinstance(t, dict)])
        if where:
            raise V2Error(f"inputs{where}: true/false is not a number")
    return doc, rest


def _read_input(spec: dict, binary: memoryview, offset: int, shape_want: tuple) -> tuple[np.ndarray, int]:
    name = spec.get("name")
    dtype, shape = spec.get("datatype"), spec.get("shape")
    if dtype not in DTYPES:
        raise V2Error(f"inputs.{name}.datatype: {dtype!r} is not a numeric type ({', '.join(DTYPES)})")
    if (not isinstance(shape, list) or len(shape) != 3 or not all(isinstance(d, int) and d >= 0 for d in shape)
            or tuple(shape[1:]) != shape_want or shape[0] < 1):
        raise V2Error(f"inputs.{name}.shape: must be [N >= 1, {shape_want[0]}, {shape_want[1]}], got {shape!r}")
    if shape[0] > inputs.MAX_BATCH:
        raise V2Error(f"inputs.{name}.shape: {shape[0]} windows exceed the limit of {inputs.MAX_BATCH}", 413)
    count = shape[0] * shape_want[0] * shape_want[1]
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        want = count * np.dtype(DTYPES[dtype]).itemsize
        if size != want or offset + size > len(binary):
            raise V2Error(f"inputs.{name}.parameters.binary_data_size: {size!r}; shape {shape} of {dtype} is "
                          f"{want} bytes and {len(binary) - offset} binary bytes remain")
        arr = np.frombuffer(binary[offset:offset + size], dtype=DTYPES[dtype])
        offset += size
    else:
        data = spec.get("data")
        if not isinstance(data, list):
            raise V2Error(f"inputs.{name}.data: required (a flat list of {count} numbers), or binary_data_size")
        try:
            arr = np.asarray(data)
        except (ValueError, TypeError):
            arr = np.asarray([None])
        if arr.dtype.kind not in "iuf":  # booleans, strings, nulls and ragged nesting are refused
            raise V2Error(f"inputs.{name}.data: must be a flat list of numbers")
        if arr.size != count:
            raise V2Error(f"inputs.{name}.data: {arr.size} values for shape {shape} ({count} expected)")
    arr = arr.astype(np.float64).reshape(shape)
    if dtype == "FP32" and size is None and (np.abs(arr) > FLOAT32_MAX).any():
        raise V2Error(f"inputs.{name}.data: a value beyond the FP32 range")
    if np.isinf(arr).any():
        raise V2Error(f"inputs.{name}.data: infinity (NaN marks an absent reading; infinity is refused)")
    return arr, offset


def _parse(doc: dict, binary: bytes, model: LoadedModel):
    unknown = sorted(set(doc) - {"id", "inputs", "outputs", "parameters"})
    if unknown:
        raise V2Error(f"{unknown[0]}: unknown field; allowed: id, inputs, outputs, parameters")
    if not isinstance(doc.get("id", ""), str):
        raise V2Error("id: must be a string")
    params = doc.get("parameters")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise V2Error("parameters: must be an object")
    extra = sorted(set(params) - PARAMETER_KEYS)
    if extra:
        raise V2Error(f"parameters.{extra[0]}: unknown parameter; allowed: {', '.join(sorted(PARAMETER_KEYS))}")
    opts = options.parse_options({"inference_config": {k: v for k, v in params.items() if k in options.CONFIG_KEYS}},
                                model.predictor.max_tokens)
    if opts.method is not None and opts.method not in model.predictor.methods():
        raise V2Error(f"parameters.method: {opts.method!r} is not offered by this model; "
                      f"choose one of {', '.join(model.predictor.methods())}")
    tensors = doc.get("inputs")
    if not isinstance(tensors, list) or not all(isinstance(t, dict) for t in tensors):
        raise V2Error("inputs: required, a list of tensors")
    want = {"continuous": (model.window, len(model.spec.continuous)),
            "categorical": (model.window, len(model.spec.categorical))}
    names = [t.get("name") for t in tensors]
    if sorted(names) != sorted(n for n in want if n == "continuous" or want[n][1]):
        raise V2Error(f"inputs: expected {', '.join(n for n in want if want[n][1])} once each, got {names}")
    arrays, offset, view = {}, 0, memoryview(binary)
    for t in tensors:
        arrays[t["name"]], offset = _read_input(t, view, offset, want[t["name"]])
    if offset != len(binary):
        raise V2Error(f"body: {len(binary) - offset} binary bytes beyond the inputs' binary_data_size")
    cont = arrays["continuous"]
    cat = arrays.get("categorical", np.zeros((len(cont), model.window, 0)))
    if len(cat) != len(cont):
        raise V2Error(f"inputs: continuous has {len(cont)} windows, categorical {len(cat)}")
    binary_out = params.get("binary_data_output", False)
    if not isinstance(binary_out, bool):
        raise V2Error("parameters.binary_data_output: must be true or false")
    return cont, cat, opts, binary_out, doc.get("outputs")


def _outputs(rows: list[dict], requested, all_binary: bool, available: list[str]):
    if requested is None:
        requested = [{"name": n} for n in available]
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        raise V2Error("outputs: must be a list of {name, parameters}")
    columns = {"gcode": [r["gcode"] for r in rows], "operation": [r["operation"] for r in rows],
               "operation_confidence": [r["operation_confidence"] for r in rows],
               "line_confidence": [r.get("line_confidence") for r in rows],
               "line_source": [r.get("line_source") for r in rows],
               "fingerprint": [r["fingerprint"] for r in rows]}
    outs, chunks = [], []
    for o in requested:
        name, oparams = o.get("name"), o.get("parameters")
        oparams = {} if oparams is None else oparams
        if name not in available:
            raise V2Error(f"outputs: unknown output {name!r}; available: {', '.join(available)}")
        if set(o) - {"name", "parameters"} or not isinstance(oparams, dict) or set(oparams) - {"binary_data"} \
                or not isinstance(oparams.get("binary_data", False), bool):
            raise V2Error(f"outputs.{name}: only name and parameters.binary_data (true/false) are understood")
        dtype = OUTPUT_TYPES[name]
        if dtype == "BYTES":
            values = [str(v) for v in columns[name]]
            shape = [len(values)]
        else:
            arr = np.asarray(columns[name], dtype=np.float32)
            values, shape = arr, list(arr.shape)
        entry = {"name": name, "datatype": dtype, "shape": shape}
        binary = oparams.get("binary_data", all_binary)
        if binary:
            raw = (b"".join(struct.pack("<I", len(b)) + b for b in (v.encode() for v in values))
                   if dtype == "BYTES" else values.astype("<f4").tobytes())
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = values if dtype == "BYTES" else values.reshape(-1).tolist()
        outs.append(entry)
    return outs, b"".join(chunks), bool(chunks)


async def _infer(request: Request, name: str, version: str | None):
    try:
        model = _model(request, name, version)  # this request uses this model to the end
        doc, binary = _split_body(request, await inputs.read_body(request))
        cont, cat, opts, all_binary, requested = _parse(doc, binary, model)

        def infer():
            c, k = inputs.model_inputs(model.spec, cont, cat)
            return model.predictor.predict(c, k, method=opts.method, beam_width=opts.beam_width,
                                           temperature=opts.temperature, max_length=opts.max_length, seed=opts.seed)

        inline = len(cont) == 1 and opts.method in (None, "line", "greedy")
        rows, _ = await run_model(model, "/v2/infer", infer, len(cont), inline)
        monitoring.observe_windows(model, "/v2/infer", cont, rows)
        available = [o["name"] for o in _tensor_meta(model)[1]]
        outs, raw, any_binary = _outputs(rows, requested, bool(all_binary), available)
    except (V2Error, inputs.InputError) as exc:
        return v2_error(exc)
    result = {"model_name": MODEL_NAME, "model_version": model.version, "outputs": outs}
    if isinstance(doc.get("id"), str):
        result["id"] = doc["id"]
    header = orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY)
    if not any_binary:
        return Response(header, media_type="application/json")
    return Response(header + raw, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


@router.post("/models/{name}/infer", responses=R["infer"], openapi_extra=openapi_v2_infer())
async def infer(request: Request, name: str):
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", responses=R["infer"], openapi_extra=openapi_v2_infer())
async def infer_version(request: Request, name: str, version: str):
    return await _infer(request, name, version)
