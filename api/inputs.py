"""Request bodies -> raw numpy windows + options, validated without per-element pydantic models.

Measured on this machine: a 64 x 135 window parsed into pydantic `list[list[float]]` took 4-5 ms
(four times the model); orjson + one numpy conversion takes ~1.5 ms and raw float32 bytes ~0.7 ms.
So bodies are read as bytes, parsed with orjson and checked with numpy; every error names its field.

Body formats
- JSON (`/predict`, `/fingerprint`): {"sensor_data": {...}, "return_fingerprint": bool,
  "inference_config": {"method", "temperature", "beam_width", "max_length", "seed"}}; `/batch_predict`
  takes "windows": [sensor_data, ...] instead; `/stream/{machine_id}` takes {"sensor_data", "start"}
  with any number of rows (parse_rows) instead of exactly W. sensor_data is either
    {"continuous": [[W x F]], "categorical": [[W x C]]}  in the feature order of GET /info, or
    {"columns": {"<log column>": [W values], ...}}       raw log columns by name, any order.
  Values are raw log readings (the server normalises them). null = reading absent: it is filled like
  a sensor board a run did not record (the training mean); an absent board column is filled the same way.
- Binary (Content-Type: application/octet-stream): N windows of float32 little-endian, row-major
  [N, W, F + C] (each row: the F continuous values, then the C categorical codes); options as query
  parameters (method, temperature, beam_width, max_length, seed, return_fingerprint). All values must be finite.
"""
from __future__ import annotations

import math

import numpy as np
import orjson

from gcodefp_core import schema

from .normalise import InputTransform
from .settings import SETTINGS

MAX_BODY_BYTES = SETTINGS.max_body_bytes
MAX_BATCH = SETTINGS.max_batch
MAX_STREAM_ROWS = SETTINGS.max_stream_rows  # rows per POST /stream/{machine_id}
METHODS = ("line", "greedy", "beam", "sample")  # which a model offers: GET /info
BINARY_TYPES = ("application/octet-stream",)
# Columns of a raw log that are not model inputs: accepted (so raw rows can be posted) and ignored.
LOG_COLUMNS = frozenset(schema.board_columns(()) + list(schema.CURRENTS) + [f"{c}_A" for c in schema.CURRENTS]
                        + list(schema.CONTROLLER_NUMERIC) + list(schema.CATEGORICAL_CONTROLLER)
                        + list(schema.LABEL_COLUMNS) + ["t_console", "vel", "plane", "raw_json"])


class InputError(ValueError):
    """Bad request input; `field` is a dotted path such as sensor_data.continuous. `location`: where
    the field is ("body", "query" or "path"); default: "query" for query.* fields, else "body"."""

    def __init__(self, field: str, message: str, status: int = 422, location: str | None = None):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status, self.location = field, message, status, location


def _first_bool_in_lists(obj, path: str = "") -> str | None:
    """The path of the first true/false inside a list (no list of this API holds booleans), or None."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _first_bool_in_lists(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            if isinstance(v, bool):
                return f"{path}[{i}]"
            if isinstance(v, (list, dict)):
                found = _first_bool_in_lists(v, f"{path}[{i}]")
                if found:
                    return found
    return None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---- bodies ---------------------------------------------------------------------------------
async def read_body(request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused with 413 as soon as it exceeds `limit` (header or actual bytes)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InputError("body", f"{declared} bytes exceeds the limit of {limit} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError("body", f"more than the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(body: bytes, allowed: set[str]) -> dict:
    if not body:
        raise InputError("body", "empty; expected a JSON object")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:  # also NaN / Infinity literals and numbers beyond float range
        raise InputError("body", f"invalid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InputError("body", f"expected a JSON object, got {type(doc).__name__}")
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise InputError(unknown[0], f"unknown field; allowed: {', '.join(sorted(allowed))}")
    # numpy would read [true, 1.5] as [1.0, 1.5]: look for booleans inside the arrays, but only when the body
    # has more true/false tokens than its top-level flags (a C-speed byte count; the walk is the rare path).
    tokens = body.count(b"true") + body.count(b"false")
    if tokens > sum(isinstance(v, bool) for v in doc.values()):
        where = _first_bool_in_lists(doc)
        if where:
            raise InputError(where, "true/false is not a reading (use numbers, or null for an absent reading)")
    return doc


def plain_numbers(body: bytes, doc) -> bool:
    """Whether no string sits inside the body's arrays: every quote of the body belongs to a key or a
    string value of an object (walked here; arrays of objects included). Then a numeric array converts
    straight to float64 (null -> NaN) without a type check per value (~100 us less per 64-row window).
    A miscount (an escaped quote) only answers False: the exact path runs."""
    strings = 0
    stack = [doc]
    while stack:
        obj = stack.pop()
        strings += len(obj)
        for v in obj.values():
            if isinstance(v, str):
                strings += 1
            elif isinstance(v, dict):
                stack.append(v)
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                stack.extend(x for x in v if isinstance(x, dict))
    return body.count(b'"') == 2 * strings


# ---- windows --------------------------------------------------------------------------------
def _numeric(values, field: str, shape: tuple[int, ...], what: str, allow_str: bool = False,
             plain: bool = False) -> np.ndarray:
    """A nested list -> float64 array of `shape` (null -> NaN), or an array of category keys (allow_str).
    plain: the JSON body holds only numbers and nulls in its arrays (plain_numbers), so a direct float64
    conversion is exact; whatever it cannot convert takes the checking path below, for its error."""
    first = values
    while isinstance(first, list) and first:
        first = first[0]
    if plain and not isinstance(first, bool):  # an array of booleans is refused below (mixed ones read as 1/0)
        try:
            arr = np.array(values, dtype=np.float64)
        except (ValueError, TypeError):
            arr = None
        if arr is not None and arr.shape == shape:
            return arr
    try:
        arr = np.array(values)
    except (ValueError, TypeError):
        raise InputError(field, f"must be {what}: rows of unequal length or mixed nesting") from None
    if arr.shape != shape and not (arr.size == 0 and math.prod(shape) == 0):
        got = " x ".join(map(str, arr.shape)) or "a scalar"
        raise InputError(field, f"must be {what}; got {got}")
    if arr.dtype.kind in "iuf":
        arr = arr.astype(np.float64).reshape(shape)
        if not np.isfinite(arr).all():  # only possible for binary bodies; JSON has no NaN/inf literals
            raise InputError(field, "contains NaN or infinity (use null for an absent reading)")
        return arr
    if arr.dtype.kind == "U" and allow_str:
        return arr.astype(object).reshape(shape)
    if arr.dtype.kind == "O":
        flat = arr.reshape(-1)
        for i, v in enumerate(flat):
            if v is None or _is_number(v) or (allow_str and isinstance(v, str)):
                continue
            idx = np.unravel_index(i, shape)
            raise InputError(f"{field}[{']['.join(map(str, idx))}]",
                             f"must be a number{' or string' if allow_str else ''} or null, got {type(v).__name__}")
        if allow_str:
            return arr.reshape(shape)
        return np.array([np.nan if v is None else v for v in flat], dtype=np.float64).reshape(shape)
    kind = {"b": "booleans", "U": "strings"}.get(arr.dtype.kind, arr.dtype.name)
    raise InputError(field, f"must be {what} of numbers, got {kind}")


def parse_sensor_data(sd, spec, window: int, field: str = "sensor_data",
                      plain: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One JSON window -> (continuous float64 [W, F] raw, NaN = absent; categorical object/float [W, C] raw)."""
    if not isinstance(sd, dict):
        raise InputError(field, "must be an object with continuous/categorical or columns")
    F, C = len(spec.continuous), len(spec.categorical)
    if "columns" in sd:
        extra = sorted(set(sd) - {"columns"})
        if extra:
            raise InputError(f"{field}.{extra[0]}", "cannot be combined with columns")
        return _from_columns(sd["columns"], spec, window, f"{field}.columns", plain)
    unknown = sorted(set(sd) - {"continuous", "categorical"})
    if unknown:
        raise InputError(f"{field}.{unknown[0]}", "unknown field; use continuous + categorical, or columns")
    if "continuous" not in sd:
        raise InputError(f"{field}.continuous", f"required: {window} rows x {F} values (or give columns)")
    cont = _numeric(sd["continuous"], f"{field}.continuous", (window, F), f"{window} rows x {F} continuous values",
                    plain=plain)
    if C == 0 and not sd.get("categorical"):
        return cont, np.zeros((window, 0), dtype=np.float64)
    if sd.get("categorical") is None:
        raise InputError(f"{field}.categorical", f"required: {window} rows x {C} codes ({', '.join(spec.categorical)})")
    cat = _numeric(sd["categorical"], f"{field}.categorical", (window, C), f"{window} rows x {C} categorical codes",
                   allow_str=True, plain=plain)
    return cont, cat


def parse_rows(sd, spec, max_rows: int = MAX_STREAM_ROWS, field: str = "sensor_data",
               plain: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Any number of rows (1..max_rows; /stream) in either sensor_data form -> parse_sensor_data's arrays.
    The row count is read from the payload (continuous: its rows; columns: the most common list length,
    so that the column of another length is the one named), then every check of a window applies."""
    if not isinstance(sd, dict):
        raise InputError(field, "must be an object with continuous/categorical or columns")
    if "columns" in sd:
        columns = sd["columns"]
        if not isinstance(columns, dict) or not columns:
            raise InputError(f"{field}.columns", "must be a non-empty object {column name: [values]}")
        lengths = [len(v) for v in columns.values() if isinstance(v, list)]
        if not lengths:
            raise InputError(f"{field}.columns.{next(iter(columns))}", "must be a list of values, one per row")
        n, where = max(set(lengths), key=lengths.count), f"{field}.columns"
    else:
        rows = sd.get("continuous")
        if not isinstance(rows, list):
            raise InputError(f"{field}.continuous", f"required: a list of rows of {len(spec.continuous)} values "
                                                    "(or give columns)")
        n, where = len(rows), f"{field}.continuous"
    if n == 0:
        raise InputError(where, "no rows; post at least one")
    if n > max_rows:
        raise InputError(where, f"{n} rows exceed the limit of {max_rows} per request", 413)
    return parse_sensor_data(sd, spec, n, field, plain)


def required_columns(spec) -> list[str]:
    """Columns a posted log must have: the non-board inputs (boards may be missing, as in training)."""
    req = [c for c in spec.continuous if "." not in c] + list(spec.categorical)
    if any(c in schema.POSITIONS for c in spec.continuous) and schema.UNIT_COLUMN not in req:
        req.append(schema.UNIT_COLUMN)
    return req


def _from_columns(columns, spec, window: int, field: str, plain: bool = False) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(columns, dict) or not columns:
        raise InputError(field, "must be a non-empty object {column name: [values]}")
    cont_idx = {c: j for j, c in enumerate(spec.continuous)}
    cat_idx = {c: j for j, c in enumerate(spec.categorical)}
    for name in columns:
        if name not in cont_idx and name not in cat_idx and name not in LOG_COLUMNS:
            raise InputError(f"{field}.{name}", "unknown column (see GET /info for the model's inputs)")
    missing = [c for c in required_columns(spec) if c not in columns]
    if missing:
        raise InputError(f"{field}.{missing[0]}", f"required column missing (required: {', '.join(missing)})")
    cont = np.full((window, len(spec.continuous)), np.nan)
    cat = np.full((window, len(spec.categorical)), None, dtype=object)
    for name, values in columns.items():
        if name in cont_idx:
            cont[:, cont_idx[name]] = _numeric(values, f"{field}.{name}", (window,), f"a list of {window} numbers",
                                               plain=plain)
        elif name in cat_idx:
            cat[:, cat_idx[name]] = _numeric(values, f"{field}.{name}", (window,), f"a list of {window} codes",
                                             allow_str=True)
    return cont, cat


def parse_binary(body: bytes, spec, window: int, max_windows: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 LE [N, W, F + C] -> (continuous float64 [N, W, F], categorical float64 [N, W, C])."""
    F, C = len(spec.continuous), len(spec.categorical)
    per_window = window * (F + C) * 4
    if not body or len(body) % per_window:
        raise InputError("body", f"{len(body)} bytes is not a whole number of windows: one window is "
                                 f"{window} rows x ({F} + {C}) float32 = {per_window} bytes")
    n = len(body) // per_window
    if n > max_windows:
        raise InputError("body", f"{n} windows exceed the limit of {max_windows}", 413)
    arr = np.frombuffer(body, dtype="<f4").reshape(n, window, F + C)
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise InputError(f"body[{bad[0]}][{bad[1]}][{bad[2]}]", "NaN or infinity (binary bodies must be finite)")
    arr = arr.astype(np.float64)
    return arr[..., :F], arr[..., F:]


_TRANSFORMS: dict[int, InputTransform] = {}  # by id(spec); a few models at most (the served one, a swap's)


def model_inputs(spec, cont: np.ndarray, cat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw [N, W, F] / [N, W, C] -> normalised float32 / int64 model inputs (the training transform;
    rows are independent, so N windows are transformed as one [N*W] block). The tables it needs are
    built once per spec (api/normalise.py)."""
    transform = _TRANSFORMS.get(id(spec))
    if transform is None or transform.spec is not spec:
        if len(_TRANSFORMS) >= 4:
            _TRANSFORMS.clear()
        transform = _TRANSFORMS[id(spec)] = InputTransform(spec)
    return transform(cont, cat)
