"""Request body schemas for the OpenAPI docs (/docs) only.

Bodies are parsed by api/inputs.py with orjson + numpy (pydantic `list[list[float]]` cost 4-5 ms per
window, four times the model); these JSON schemas just document the same shapes.
"""
from __future__ import annotations

_CONFIG = {"type": "object", "properties": {
    "method": {"type": "string", "enum": ["line", "greedy", "beam", "sample"], "description": (
        "line: the line head's lookup in the operation's program (one call; the default when the model "
        "has one); greedy / beam / sample: the token decoder. GET /info lists a model's methods.")},
    "temperature": {"type": "number", "minimum": 0, "maximum": 10, "default": 1.0},
    "beam_width": {"type": "integer", "minimum": 1, "maximum": 16, "default": 4},
    "max_length": {"type": "integer", "minimum": 1, "description": "decode limit (default: the model's)"},
    "seed": {"type": "integer", "minimum": 0, "description": "sampling seed"}}}
_MATRIX = {"type": "array", "items": {"type": "array", "items": {"type": ["number", "null"]}}}
SENSOR_DATA = {"type": "object", "description": (
    "Raw log readings of one window: either continuous (window x F) + categorical (window x C) in the "
    "feature order of GET /info, or columns {log column name: [window values]}. null = reading absent."),
    "properties": {"continuous": _MATRIX, "categorical": _MATRIX,
                   "columns": {"type": "object", "additionalProperties": {"type": "array"}}}}
_BINARY = {"schema": {"type": "string", "format": "binary"},
           "description": "float32 little-endian [N, window, F + C]; options as query parameters"}


def _body(properties: dict, required: list[str]) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "properties": properties, "required": required}},
        "application/octet-stream": _BINARY}}}


OPENAPI_PREDICT = _body({"sensor_data": SENSOR_DATA, "return_fingerprint": {"type": "boolean", "default": False},
                         "inference_config": _CONFIG}, ["sensor_data"])
OPENAPI_BATCH = _body({"windows": {"type": "array", "items": SENSOR_DATA},
                       "return_fingerprint": {"type": "boolean", "default": False},
                       "inference_config": _CONFIG}, ["windows"])
OPENAPI_STREAM = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["sensor_data"], "properties": {
        "sensor_data": {**SENSOR_DATA, "description": (
            "The machine's next rows (1..GCODEFP_MAX_STREAM_ROWS, in order from its program's start), in either "
            "sensor_data form: continuous (n x F) + categorical (n x C), or columns {name: [n values]}.")},
        "start": {"type": "boolean", "default": False,
                  "description": "a new program run begins with these rows (rows_since_start = 0)"}}}}}}}
