"""Feature normalisation: unit conversion, documented fills, categorical maps with an unknown index."""
from __future__ import annotations

import numpy as np
import pandas as pd

from gcodefp_core.features import FeatureSpec, category_key
from gcodefp_core.schema import feature_columns


def frame(**cols):
    return pd.DataFrame(cols)


def spec_for(feature_set="full"):
    return FeatureSpec.for_columns(feature_set, feature_columns(feature_set))


def test_category_key_never_casts_nan():
    assert category_key(5) == category_key(5.0) == category_key(" 5 ") == "5"
    assert category_key(float("nan")) == category_key(None) == category_key("") == ""
    assert category_key("abc") == "abc"


def test_positions_in_inches_are_converted_to_mm():
    spec = spec_for()
    raw, _ = spec.raw_matrix(frame(posx=[1.0, 25.4], unit=[0, 1]))
    j = spec.continuous.index("posx")
    assert np.allclose(raw[:, j], [25.4, 25.4])


def test_fit_on_train_and_fill_missing_boards_with_mean():
    spec = spec_for("side_channel")
    train = frame(spindle=[1.0, 3.0], x_motor=[0.0, 0.0], y_motor=[1.0, 1.0], z_motor=[2.0, 4.0],
                  **{"spindle2.Ax": [10.0, 20.0]})
    spec.fit([train])
    j = spec.continuous.index("spindle2.Ax")
    assert spec.mean[j] == 15.0 and spec.std[j] > 0
    assert spec.std[spec.continuous.index("x_motor")] == 1.0  # constant channel: unit std, not 0
    other = frame(spindle=[2.0], x_motor=[0.0], y_motor=[1.0], z_motor=[3.0])  # spindle2 board absent
    cont, cat = spec.transform(other)
    assert cont.shape == (1, len(spec.continuous)) and cat.shape == (1, 0)
    assert cont[0, j] == 0.0  # documented fill: the training mean
    assert cont[0, spec.continuous.index("spindle")] == 0.0  # (2 - 2) / std


def test_categorical_unknown_and_nan_map_to_zero():
    spec = spec_for()
    base = {c: [0.0, 0.0] for c in spec.continuous if "." not in c}
    spec.fit([frame(**base, stat=["5", "3"], unit=["0", "0"], dist=["0", "0"], coor=["2", "2"], momo=["1", "0"])])
    assert spec.categorical_maps["stat"] == {"3": 1, "5": 2}
    _, cat = spec.transform(frame(**base, stat=[5, 9], unit=[0, None], dist=[0, 0], coor=[2, 2], momo=[1, 1]))
    assert cat[:, 0].tolist() == [2, 0]  # 9 was never seen: unknown
    assert cat[:, 1].tolist() == [1, 0]  # NaN: unknown, not a cast
    assert spec.cardinalities == [3, 2, 2, 2, 3]


def test_clip_and_roundtrip():
    spec = spec_for("side_channel")
    spec.fit([frame(spindle=[0.0, 1.0, 0.0, 1.0], x_motor=[0.0] * 4, y_motor=[0.0] * 4, z_motor=[0.0] * 4)])
    cont, _ = spec.transform(frame(spindle=[1e6], x_motor=[0.0], y_motor=[0.0], z_motor=[0.0]))
    assert cont.max() == spec.clip
    again = FeatureSpec.from_dict(spec.to_dict())
    posted = np.full((1, len(spec.continuous)), np.nan)  # boards absent -> NaN -> training mean
    posted[0, :4] = [1e6, 0.0, 0.0, 0.0]
    assert np.array_equal(again.transform_arrays(posted, None)[0], cont)
