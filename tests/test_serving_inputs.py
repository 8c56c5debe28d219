"""The request path's fast paths give exactly what the reference paths give (api/normalise.py, plain JSON)."""
from __future__ import annotations

import json

import numpy as np
import orjson

from api import inputs, json_windows
from api.normalise import InputTransform
from gcodefp_core import schema


def test_vectorised_transform_equals_the_training_transform(predictor):
    spec = predictor.features
    rng = np.random.default_rng(0)
    n, w = 3, predictor.window
    cont = rng.normal(0, 50, (n, w, len(spec.continuous)))
    cont[0, 3, 5] = np.nan                                   # an absent reading
    cat = rng.integers(-1, 7, (n, w, len(spec.categorical))).astype(np.float64)  # known and unknown codes
    cat[1, 2, 0] = 2.5                                        # a non-integer code
    cat[2, 5, -1] = np.nan                                    # an absent code
    if schema.UNIT_COLUMN in spec.categorical:
        cat[:, :10, spec.categorical.index(schema.UNIT_COLUMN)] = schema.INCHES  # positions converted to mm
    ref_c, ref_k = spec.transform_arrays(cont.reshape(n * w, -1), cat.reshape(n * w, -1).astype(object))
    transform = InputTransform(spec)
    got_c, got_k = transform(cont, cat)
    assert got_c.dtype == np.float32 and got_k.dtype == np.int64
    assert transform.small  # a handful of codes per column: all columns matched in one comparison
    transform.small = False  # the per-column search that large tables take gives the same codes
    assert np.array_equal(transform(cont, cat)[1], got_k)
    assert np.array_equal(got_c.reshape(n * w, -1), ref_c) and np.array_equal(got_k.reshape(n * w, -1), ref_k)
    assert (ref_k > 0).any() and (ref_k == 0).any()           # the case covers hits and misses
    strings = cat.astype(object)
    strings[0, 0, 0] = "3"                                    # string codes: the reference path, same answer
    assert np.array_equal(InputTransform(spec)(cont, strings)[1], inputs.model_inputs(spec, cont, strings)[1])


def test_plain_json_parses_like_the_checked_path(predictor, sample_request):
    sd = sample_request["sensor_data"]
    body = orjson.dumps({"sensor_data": sd, "return_fingerprint": True, "inference_config": {"method": "line"}})
    doc = orjson.loads(body)
    assert inputs.plain_numbers(body, doc)
    fast = inputs.parse_sensor_data(doc["sensor_data"], predictor.features, predictor.window, plain=True)
    exact = inputs.parse_sensor_data(doc["sensor_data"], predictor.features, predictor.window)
    for a, b in zip(fast, exact):
        assert np.array_equal(np.asarray(a, float), np.asarray(b, float), equal_nan=True)
    with_string = json.loads(json.dumps(sd))
    with_string["continuous"][1][2] = "5"
    body = orjson.dumps({"sensor_data": with_string})
    assert not inputs.plain_numbers(body, orjson.loads(body))  # so the string is refused, naming the field
    assert orjson.dumps({"windows": [sd, sd]}) and inputs.plain_numbers(*(lambda b: (b, orjson.loads(b)))(
        orjson.dumps({"windows": [sd, sd]})))


KEYS = {"sensor_data", "return_fingerprint", "inference_config"}


def _exact(body: bytes, predictor):
    doc = orjson.loads(body)
    return inputs.parse_sensor_data(doc["sensor_data"], predictor.features, predictor.window,
                                    plain=inputs.plain_numbers(body, doc))


def test_simdjson_windows_equal_the_exact_path(predictor, sample_request):
    shape = (predictor.window, len(predictor.features.continuous), len(predictor.features.categorical))
    for body in (orjson.dumps(sample_request), json.dumps(sample_request, indent=1).encode()):
        doc, cont, cat = json_windows.read_windows(body, KEYS, *shape)
        ref_c, ref_k = _exact(body, predictor)
        assert cont.shape == (1, *ref_c.shape) and np.array_equal(cont[0], ref_c)
        assert np.array_equal(cat[0], np.asarray(ref_k, np.float64))
        assert doc == {k: v for k, v in orjson.loads(body).items() if k != "sensor_data"}
    sd = sample_request["sensor_data"]
    doc, cont, cat = json_windows.read_windows(orjson.dumps({"windows": [sd, sd, sd]}), {"windows"}, *shape,
                                               batch_key="windows", max_windows=4)
    assert cont.shape == (3, *shape[:2]) and doc == {}
    assert json_windows.read_windows(orjson.dumps({"windows": [sd] * 5}), {"windows"}, *shape, batch_key="windows",
                                     max_windows=4) is None  # too many: the exact path answers 413


def test_simdjson_path_leaves_every_doubtful_body_to_the_exact_path(predictor, sample_request):
    """Anything the fast path cannot fully check goes to the exact path, which names the field."""
    shape = (predictor.window, len(predictor.features.continuous), len(predictor.features.categorical))
    sd = sample_request["sensor_data"]

    def edited(edit):
        doc = json.loads(json.dumps(sample_request))
        edit(doc["sensor_data"])
        return orjson.dumps(doc)

    ragged = edited(lambda s: (s["continuous"][0].append(1.0), s["continuous"][1].pop()))  # same count, wrong rows
    bodies = {
        "null reading": edited(lambda s: s["continuous"][3].__setitem__(2, None)),
        "boolean": edited(lambda s: s["continuous"][3].__setitem__(2, True)),
        "string code": edited(lambda s: s["categorical"][0].__setitem__(0, "3")),
        "ragged rows": ragged,
        "too few rows": edited(lambda s: s["continuous"].pop()),
        "nested value": edited(lambda s: s["continuous"][0].__setitem__(0, [1.0])),
        "columns form": orjson.dumps({"sensor_data": {"columns": {"x": [1.0]}}}),
        "unknown key": orjson.dumps({"sensor_data": sd, "extra": 1}),
        "duplicate key": orjson.dumps({"sensor_data": sd})[:-1] + b', "sensor_data": {}}',
        "not an object": b"[1, 2]",
        "invalid JSON": orjson.dumps({"sensor_data": sd})[:-1],
        "number beyond float range": b'{"sensor_data": {"continuous": [[1e400]]}}',
    }
    for what, body in bodies.items():
        assert json_windows.read_windows(body, KEYS, *shape) is None, what
    doc = orjson.loads(ragged)
    try:
        inputs.parse_sensor_data(doc["sensor_data"], predictor.features, predictor.window)
    except inputs.InputError as exc:
        assert exc.field == "sensor_data.continuous"
    else:
        raise AssertionError("the exact path accepted ragged rows")
