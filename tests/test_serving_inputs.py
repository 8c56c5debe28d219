"""The request path's fast paths give exactly what the reference paths give (api/normalise.py, plain JSON)."""
from __future__ import annotations

import json

import numpy as np
import orjson

from api import inputs
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
    got_c, got_k = InputTransform(spec)(cont, cat)
    assert got_c.dtype == np.float32 and got_k.dtype == np.int64
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
