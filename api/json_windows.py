"""The fast path for JSON windows: simdjson reads the numeric arrays straight into float64 buffers.

A /predict body of 64 x 168 readings is ~160 KB of JSON text. Parsing it with orjson into Python
floats and converting those to numpy took ~0.9 ms on this machine, more than the model (~0.7 ms).
simdjson (pysimdjson) parses the document into its own tape and copies a numeric array out as one
flat float64 buffer (`as_buffer`) without making a Python object per value: ~0.2 ms for the body.

This path only accepts what it can check completely; anything else (null readings, codes given as
strings, booleans, wrong shapes, unknown or duplicate keys, columns form, invalid JSON) returns None
and the request takes the exact path in api/inputs.py, which names the offending field. So both
paths accept the same bodies and give the same arrays, and every error comes from one place.
"""
from __future__ import annotations

import numpy as np
import simdjson

WINDOW_KEYS = ("continuous", "categorical")


def _matrix(value, rows: int, cols: int) -> np.ndarray | None:
    """A JSON array of `rows` arrays of `cols` numbers -> float64 [rows, cols], or None."""
    if not isinstance(value, simdjson.Array) or len(value) != rows:
        return None
    # as_buffer flattens any nesting, so the shape is checked row by row first ([[1, 2], [3]] is 3 values);
    # an array nested among the values ([[1], 2]) is caught by read_windows' count of "[".
    for row in value:
        if not isinstance(row, simdjson.Array) or len(row) != cols:
            return None
    try:
        flat = np.frombuffer(value.as_buffer(of_type="d"), dtype=np.float64)
    except (TypeError, ValueError):  # a null, boolean, string or nested array among the values
        return None
    return flat.reshape(rows, cols) if flat.size == rows * cols else None


def _window(sensor_data, window: int, n_cont: int, n_cat: int) -> tuple[np.ndarray, np.ndarray, int] | None:
    """-> (continuous, categorical, how many JSON arrays they were read from) or None."""
    if not isinstance(sensor_data, simdjson.Object):
        return None
    keys = list(sensor_data.keys())
    if len(keys) != len(set(keys)) or not set(keys) <= set(WINDOW_KEYS) or "continuous" not in keys:
        return None
    cont = _matrix(sensor_data["continuous"], window, n_cont)
    if cont is None:
        return None
    if "categorical" not in keys:
        return (cont, np.zeros((window, 0)), window + 1) if n_cat == 0 else None
    cat = _matrix(sensor_data["categorical"], window, n_cat)
    return None if cat is None else (cont, cat, 2 * (window + 1))


def _plain(value):
    """A small simdjson value (the options) -> the Python value orjson would give."""
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def read_windows(body: bytes, allowed: set[str], window: int, n_cont: int, n_cat: int,
                 batch_key: str | None = None, max_windows: int = 1):
    """-> (doc without its windows, continuous [N, W, F], categorical [N, W, C]) or None (take the exact path).
    The windows are doc["sensor_data"], or with batch_key the list doc[batch_key] of at most max_windows."""
    parser = simdjson.Parser()  # one per call (~0.1 us): its values must not outlive it, nor be shared
    try:
        doc = parser.parse(body)
    except ValueError:  # invalid JSON (or a number beyond float range): the exact path words the error
        return None
    if not isinstance(doc, simdjson.Object):
        return None
    keys = list(doc.keys())
    if len(keys) != len(set(keys)) or not set(keys) <= allowed:
        return None
    if batch_key is None:
        if "sensor_data" not in keys:
            return None
        one = _window(doc["sensor_data"], window, n_cont, n_cat)
        if one is None:
            return None
        cont, cat, arrays = one[0][None], one[1][None], one[2]
    else:
        items = doc[batch_key] if batch_key in keys else None
        if not isinstance(items, simdjson.Array) or not 0 < len(items) <= max_windows:
            return None
        parsed = [_window(sd, window, n_cont, n_cat) for sd in items]
        if any(p is None for p in parsed):
            return None
        cont, cat = np.stack([p[0] for p in parsed]), np.stack([p[1] for p in parsed])
        arrays = 1 + sum(p[2] for p in parsed)
    # Every "[" of the body must open one of the arrays checked above. One more is an array nested among
    # the values, which as_buffer would have flattened into the count (or a "[" inside a string: harmless).
    if body.count(b"[") != arrays:
        return None
    rest = {k: _plain(doc[k]) for k in keys if k not in ("sensor_data", batch_key)}
    return rest, cont, cat
