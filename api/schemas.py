"""The OpenAPI contract: request schemas as strict as the server, and every response it really gives.

Bodies are parsed by api/inputs.py with orjson + numpy (pydantic `list[list[float]]` cost 4-5 ms per
window, four times the model); these JSON schemas document the same rules. The shapes depend on the
served package (window, feature counts, max_tokens), so `contract` fills them in from the
current model each time /openapi.json is asked for; before a model loads, the generic shapes stand.
The binary bodies (application/octet-stream, float32 [N, W, F + C]) are described in the operations'
text, not as a request content: random bytes cannot be schema-valid windows.
"""
from __future__ import annotations

import copy

from . import auth
from .settings import SETTINGS

_CONFIG = {"type": ["object", "null"], "additionalProperties": False, "properties": {
    "method": {"type": ["string", "null"], "enum": ["line", "greedy", "beam", "sample", None], "description": (
        "line: the line head's lookup in the operation's program (one call; the default when the model "
        "has one); greedy / beam / sample: the token decoder. GET /info lists a model's methods.")},
    "temperature": {"type": "number", "minimum": 0, "maximum": 10, "default": 1.0},
    "beam_width": {"type": "integer", "minimum": 1, "maximum": 16, "default": 4},
    "max_length": {"type": ["integer", "null"], "minimum": 1, "description": "decode limit (default: the model's)"},
    "seed": {"type": ["integer", "null"], "minimum": 0, "maximum": 2**53 - 1, "description": "sampling seed"}}}
# null in method / max_length / seed means the default, as when the key is left out.
_MATRIX = {"type": "array", "items": {"type": "array", "items": {"type": ["number", "null"]}}}
SENSOR_DATA = {"type": "object", "description": (
    "Raw log readings of one window: continuous (window x F) + categorical (window x C) in the feature order "
    "of GET /info (null = reading absent). The alternative form {\"columns\": {log column name: [window "
    "values]}} is accepted too (GET /info lists the required columns)."),
    "additionalProperties": False, "required": ["continuous"],
    "properties": {"continuous": _MATRIX, "categorical": _MATRIX}}
_BINARY_NOTE = ("\n\nBinary body: Content-Type application/octet-stream, float32 little-endian [N, window, F + C] "
                "(all finite), options as query parameters (method, temperature, beam_width, max_length, seed, "
                "return_fingerprint).")


def _body(properties: dict, required: list[str], description: str = "") -> dict:
    schema = {"type": "object", "additionalProperties": False, "properties": properties, "required": required}
    return {"description": description + _BINARY_NOTE,
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


OPENAPI_PREDICT = _body({"sensor_data": SENSOR_DATA, "return_fingerprint": {"type": "boolean", "default": False},
                         "inference_config": _CONFIG}, ["sensor_data"], "One window -> the executing line.")
OPENAPI_FINGERPRINT = _body({"sensor_data": SENSOR_DATA}, ["sensor_data"], "One window -> its fingerprint.")
OPENAPI_BATCH = _body({"windows": {"type": "array", "minItems": 1, "maxItems": SETTINGS.max_batch,
                                   "items": SENSOR_DATA},
                       "return_fingerprint": {"type": "boolean", "default": False},
                       "inference_config": _CONFIG}, ["windows"], "Several windows in one call.")
IDEMPOTENCY_KEY = {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {
    "type": "string", "pattern": "^[!-~]{1,128}$", "minLength": 1, "maxLength": 128}, "description": (
        "optional: a new key for each chunk (a UUID, or the monitor's chunk count). A chunk sent again with the "
        "key of the last chunk applied (a retry after a lost answer) gets that answer again, with the header "
        "Idempotent-Replayed: true, and its rows are not applied twice; the key with another body is refused (409)")}
OPENAPI_STREAM = {"parameters": [IDEMPOTENCY_KEY], "requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["sensor_data"], "additionalProperties": False, "properties": {
        "sensor_data": {**SENSOR_DATA, "description": (
            "The machine's next rows (1..GCODEFP_MAX_STREAM_ROWS, in order), in either sensor_data form: "
            "continuous (n x F) + categorical (n x C), or columns {name: [n values]}. With a program tracker "
            "(mode \"tracker\") the rows may start anywhere in a program and rows may be lost; with the "
            "row-count clock (older packages, mode \"clock\") post every row from the program's start.")},
        "start": {"type": "boolean", "default": False,
                  "description": "optional: a new program run begins with these rows (rows_since_start = 0; "
                                 "the tracker starts at the program's first row instead of anywhere)"},
        "every": {"type": "integer", "minimum": 1, "maximum": SETTINGS.max_stream_rows,
                  "default": SETTINGS.stream_every, "description": (
                      "optional, tracker mode: judge and answer the chunk's last row and every Nth row before it "
                      "(default GCODEFP_STREAM_EVERY; 1 = every row). The tracker moves over the rows between and "
                      "weighs each judged window as the skipped overlapping windows would have; a clock session "
                      "answers every row")}}}}}}}

# ---- responses ---------------------------------------------------------------------------------
_ERROR = {"type": "object", "required": ["error"], "properties": {
    "error": {"type": "string"}, "detail": {"type": "array", "items": {"type": "object"}}}}
_NUM, _STR, _INT = {"type": "number"}, {"type": "string"}, {"type": "integer"}
_NUMS = {"type": "array", "items": _NUM}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    why = {400: "malformed request (the message names the field)", 401: "no bearer token",
           403: "wrong token", 404: "not found (the message says what)", 409: "the package was refused",
           413: "body, batch or rows over the limit", 422: "invalid input (the message names the field)",
           503: "no model loaded yet, or the worker is overloaded (Retry-After says when to retry)"}
    return {c: _json(_ERROR, why[c]) for c in codes}


def _obj(required: list[str], **props) -> dict:
    return {"type": "object", "required": required, "properties": props}


_OPERATION = _obj(["name", "confidence"], name=_STR, confidence=_NUM)
_PREDICTION = _obj(["gcode_sequence", "tokens", "method", "operation"], gcode_sequence=_STR,
                   tokens={"type": "array", "items": _STR}, method=_STR, operation=_OPERATION,
                   line_confidence=_NUM, line_source=_STR, fingerprint=_NUMS)
_TIMED = {"inference_time_ms": _NUM, "model_version": _STR}
_MODE = {"type": "string", "enum": ["tracker", "clock"], "description": (
    "tracker: where in which program, inferred from the windows (no row counter); clock: rows counted from "
    "the program's start (older packages)")}
_STREAM_STATE = _obj(["machine_id", "rows_since_start", "windows"], machine_id=_STR, rows_since_start=_INT,
                     windows=_INT, model_version={"type": ["string", "null"]}, mode=_MODE)
_STREAM_PREDICTION = _obj(
    ["row", "gcode_sequence", "operation", "line_confidence", "line_source", "window"],
    row={**_INT, "description": "the row (counted from the session's start) whose window this answers; a tracker "
                                "session answers the chunk's last row and every `every`-th row before it"},
    gcode_sequence=_STR, operation={**_OPERATION, "description": "the streamed operation and its posterior"},
    line_confidence=_NUM, line_source={"type": "string", "enum": ["tracker", "path", "clock", "window"]},
    paused={**_NUM, "description": "tracker: probability that the machine stands still"},
    program_offset={**_INT, "description": "tracker: most probable row offset since the program started"},
    entropy={**_NUM, "description": "tracker: of its posterior over program positions, nats (0 = certain)"},
    evidence_weight={**_NUM, "description": "tracker: the window's share of real rows (padded until W rows)"},
    window=_obj(["operation", "gcode_sequence"], operation=_OPERATION, gcode_sequence=_STR))
_ANY = {"type": "object"}

PREDICT_RESPONSES = {200: _json({**_PREDICTION, "required": _PREDICTION["required"] + list(_TIMED),
                                 "properties": {**_PREDICTION["properties"], **_TIMED}}, "the prediction"),
                     **_errors(413, 422, 503)}
BATCH_RESPONSES = {200: _json(_obj(["predictions", "batch_size", *_TIMED], predictions={
    "type": "array", "items": _PREDICTION}, batch_size=_INT, **_TIMED), "one prediction per window"),
    **_errors(413, 422, 503)}
FINGERPRINT_RESPONSES = {200: _json(_obj(["fingerprint", "embedding_dim", "norm", *_TIMED], fingerprint=_NUMS,
                                         embedding_dim=_INT, norm=_NUM, **_TIMED), "the fingerprint"),
                         **_errors(413, 422, 503)}
STREAM_POST_RESPONSES = {200: _json(_obj(["machine_id", "rows_since_start", "windows", "predictions", "model_version"],
                                         machine_id=_STR, rows_since_start=_INT, windows=_INT, model_version=_STR,
                                         mode=_MODE, started={"type": "boolean"}, model_changed={"type": "boolean"},
                                         predictions={"type": "array", "items": _STREAM_PREDICTION}),
                                    "predictions of the windows these rows complete"), **_errors(409, 413, 422, 503),
                         409: _json(_ERROR, "the served model has no line head, or the Idempotency-Key was used "
                                            "for another chunk")}
STREAM_POST_RESPONSES[200]["headers"] = {"Idempotent-Replayed": {
    "description": "true when this is the answer already given to the chunk with this Idempotency-Key (its rows "
                   "were not applied again)", "schema": {"type": "string", "enum": ["true"]}}}
STREAM_STATE_RESPONSES = {200: _json(_STREAM_STATE, "the session"), **_errors(404, 422)}
STREAM_END_RESPONSES = {200: _json(_obj(["machine_id", "ended"], machine_id=_STR, ended={"type": "boolean"}),
                                   "the session ended"), **_errors(404, 422)}
OPS_RESPONSES = {
    "welcome": {200: _json(_obj(["name", "links"], name=_STR, links=_ANY), "links to the endpoints")},
    "health": {200: _json(_obj(["status"], status=_STR), "the process is up")},
    "ready": {200: _json(_obj(["ready"], ready={"type": "boolean"}, version=_STR, variant=_STR), "a model is loaded"),
              503: _json(_obj(["ready"], ready={"type": "boolean"}, error={"type": ["string", "null"]}),
                         "no model loaded yet")},
    "info": {200: _json(_obj(["version", "variant", "window", "features"], version=_STR, variant=_STR, window=_INT,
                             features=_ANY), "the served model"), **_errors(503)},
    "metrics": {200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": _STR}}}},
    "reload": {200: _json(_obj(["version", "variant"], version=_STR, variant=_STR, previous={"type": ["string", "null"]}),
                          "loaded (and promoted when a version was given)"), **_errors(401, 403, 404, 409, 413, 422)},
}

# ---- Open Inference Protocol (v2) --------------------------------------------------------------
_TENSOR_META = {"type": "array", "items": _obj(["name", "datatype", "shape"], name=_STR, datatype=_STR,
                                               shape={"type": "array", "items": _INT})}
_V2_ERRORS = {c: _json(_ERROR, d) for c, d in ((400, "malformed inference request"),
                                               (404, "unknown model or version (the message lists the loaded ones)"),
                                               (413, "over the batch or body limit"), (503, "no model loaded yet"))}
V2_RESPONSES = {
    "server": {200: _json(_obj(["name", "version", "extensions"], name=_STR, version=_STR,
                               extensions={"type": "array", "items": _STR}), "server metadata")},
    "live": {200: _json(_obj(["live"], live={"type": "boolean"}), "the process is up")},
    "ready": {200: _json(_obj(["ready"], ready={"type": "boolean"}), "a model is loaded"),
              503: _json(_obj(["ready"], ready={"type": "boolean"}), "no model loaded yet")},
    "model": {200: _json(_obj(["name", "versions", "platform", "inputs", "outputs"], name=_STR,
                              versions={"type": "array", "items": _STR}, platform=_STR, inputs=_TENSOR_META,
                              outputs=_TENSOR_META), "model metadata"), **{c: _V2_ERRORS[c] for c in (404, 503)}},
    "model_ready": {200: _json(_obj(["name", "ready"], name=_STR, version=_STR, ready={"type": "boolean"}),
                               "the model (version) is loaded"), **{c: _V2_ERRORS[c] for c in (404, 503)}},
    "infer": {200: {"description": "the outputs (JSON; application/octet-stream with Inference-Header-Content-Length "
                                   "when binary outputs were asked for)",
                    "content": {"application/json": {"schema": _obj(["model_name", "model_version", "outputs"],
                                                                    model_name=_STR, model_version=_STR, id=_STR,
                                                                    outputs=_TENSOR_META)},
                                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
              **_V2_ERRORS},
}
_V2_TENSOR = {"type": "object", "required": ["name", "datatype", "shape", "data"], "additionalProperties": False,
              "properties": {"name": {"type": "string", "enum": ["continuous", "categorical"]},
                             "datatype": {"type": "string", "enum": ["FP32", "FP64"]},
                             "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}},
                             "data": {"type": "array", "items": {"type": "number"}}}}
V2_INFER_SCHEMA = {"type": "object", "required": ["inputs"], "additionalProperties": False, "properties": {
    "id": {"type": "string"},
    "inputs": {"type": "array", "items": _V2_TENSOR},
    "outputs": {"type": ["array", "null"], "items": {"type": "object", "required": ["name"], "additionalProperties": False,
                                           "properties": {"name": _STR, "parameters": {
                                               "type": ["object", "null"], "additionalProperties": False,
                                               "properties": {"binary_data": {"type": "boolean"}}}}}},
    "parameters": {"type": ["object", "null"], "additionalProperties": False, "properties": {
        **_CONFIG["properties"], "binary_data_output": {"type": "boolean"}}}}}


FLOAT32_MAX = 3.4028234663852886e38


def _v2_tensor(name: str, window: int, width: int) -> dict:
    one = {"type": "integer", "minimum": 1, "maximum": 1}
    return {"type": "object", "required": ["name", "datatype", "shape", "data"], "additionalProperties": False,
            "properties": {"name": {"type": "string", "enum": [name]}, "datatype": {"type": "string", "enum": ["FP32"]},
                           "shape": {"type": "array", "prefixItems": [one, {**one, "minimum": window, "maximum": window},
                                                                      {**one, "minimum": width, "maximum": width}],
                                     "items": False, "minItems": 3, "maxItems": 3},
                           "data": {"type": "array", "minItems": window * width, "maxItems": window * width,
                                    "items": {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}}}}


def openapi_v2_infer() -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": V2_INFER_SCHEMA}}},
            "description": ("Inputs: continuous [N, W, F] and categorical [N, W, C] (GET /v2/models/{name} lists "
                            "the shapes and feature order), flattened row-major in `data`. Binary tensor data "
                            "extension: a JSON header of Inference-Header-Content-Length bytes, then the raw "
                            "tensors (inputs with parameters.binary_data_size).")}


# ---- the served model's shapes -------------------------------------------------------------------
def _window_schema(spec, rows: dict) -> dict:
    """A sensor_data object for this model: `rows` ({minItems, maxItems}) rows of F readings (null =
    absent) + C categorical codes (numbers or strings; unseen codes map to "unknown")."""
    cont = {"type": "array", **rows, "items": {"type": "array", "minItems": len(spec.continuous),
                                              "maxItems": len(spec.continuous),
                                              "items": {"type": ["number", "null"]}}}
    props, required = {"continuous": cont}, ["continuous"]
    if spec.categorical:
        props["categorical"] = {"type": "array", **rows, "items": {
            "type": "array", "minItems": len(spec.categorical), "maxItems": len(spec.categorical),
            "items": {"type": ["number", "string", "null"]}}}
        required.append("categorical")
    return {**SENSOR_DATA, "properties": props, "required": required}


MACHINE_ID = {"type": "string", "pattern": r"^[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,63}$", "description": (
    "1-64 characters of A-Z a-z 0-9 . _ : - (documented without a leading dot: /stream/.. is a path, not an id)")}


def _require_tokens(doc: dict, paths: dict) -> None:
    doc.setdefault("components", {}).setdefault("securitySchemes", {})["clientToken"] = {
        "type": "http", "scheme": "bearer",
        "description": "a client token (`gcodefp token add`); a token may be limited to some machines"}
    refused = {"401": {"description": "no token, or one this server does not accept", "content": {
                   "application/json": {"schema": _obj(["error"], error=_STR)}}},
               "403": {"description": "the token may not stream this machine", "content": {
                   "application/json": {"schema": _obj(["error"], error=_STR)}}}}
    for path, item in paths.items():
        if auth.protected(path):
            for op in item.values():
                op["security"] = [{"clientToken": []}]
                op.setdefault("responses", {}).update(refused)


def contract(doc: dict, model, max_batch: int, max_stream_rows: int, tokens: bool = False) -> dict:
    """/openapi.json: the generic document, path parameters pinned down, the client token where this
    server asks for one (api/auth.py), and (once a model is loaded) its window, feature counts, methods
    and token limit filled in."""
    doc = copy.deepcopy(doc)
    paths = doc.get("paths", {})
    if tokens:
        _require_tokens(doc, paths)
    for path, item in paths.items():
        for op in item.values():
            for param in op.get("parameters", []):
                if param["name"] == "machine_id":
                    param["schema"] = MACHINE_ID
                elif path.startswith("/v2/models/") and param["name"] == "name":
                    param["schema"] = {"type": "string", "minLength": 1}
                elif path.startswith("/v2/models/") and param["name"] == "version":
                    param["schema"] = {"type": "string", "minLength": 1, "pattern": r"^[^/.][^/]*$"}
    if model is None:
        return doc
    spec, w = model.spec, model.window
    fixed = {"minItems": w, "maxItems": w}

    def body(path: str, method: str = "post") -> dict:
        return paths[path][method]["requestBody"]["content"]["application/json"]["schema"]["properties"]

    for path in ("/predict", "/fingerprint"):
        body(path)["sensor_data"] = _window_schema(spec, fixed)
    batch = body("/batch_predict")
    batch["windows"] = {**batch["windows"], "maxItems": max_batch, "items": _window_schema(spec, fixed)}
    for path in ("/predict", "/batch_predict"):
        cfg = body(path)["inference_config"]
        cfg["properties"]["max_length"]["maximum"] = model.predictor.max_tokens
        cfg["properties"]["method"]["enum"] = [*model.predictor.methods(), None]
    for path in [p for p in paths if p.startswith("/stream/")]:
        if "post" in paths[path]:
            body(path)["sensor_data"] = {**_window_schema(spec, {"minItems": 1, "maxItems": 1}), "description": (
                "The machine's next rows, in order (documented here as one row per "
                f"request; the server takes 1..{max_stream_rows} rows, continuous and categorical of equal length).")}
    outputs = [n for n in ("gcode", "operation", "operation_confidence", "line_confidence", "line_source",
                           "fingerprint") if model.predictor.default_method == "line" or not n.startswith("line_")]
    tensors = [_v2_tensor("continuous", w, len(spec.continuous))]
    if spec.categorical:
        tensors.append(_v2_tensor("categorical", w, len(spec.categorical)))
    for path in [p for p in paths if p.endswith("/infer")]:
        schema = body(path)
        schema["inputs"] = {"type": "array", "prefixItems": tensors, "items": False, "minItems": len(tensors),
                            "maxItems": len(tensors), "description": (
                                "documented as one window per request, continuous first; the server takes "
                                f"N = 1..{max_batch} windows and the inputs in any order")}
        schema["parameters"]["properties"]["max_length"]["maximum"] = model.predictor.max_tokens
        schema["parameters"]["properties"]["method"]["enum"] = [*model.predictor.methods(), None]
        schema["outputs"]["items"]["properties"]["name"] = {"type": "string", "enum": outputs}
    return doc
