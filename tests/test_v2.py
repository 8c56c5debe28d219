"""Open Inference Protocol (v2) against a real uvicorn, called with an unmodified tritonclient[http]."""
from __future__ import annotations

import shutil

import httpx
import numpy as np
import pytest

from api_fixtures import ADMIN_TOKEN, start_uvicorn

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.slow
NAME = "gcodefp"


@pytest.fixture(scope="module")
def v2_server(api_registry, tmp_path_factory):
    """Its own server: the pinning test promotes v2, which the shared server's tests must not see."""
    tmp = tmp_path_factory.mktemp("v2_server")
    shutil.copytree(api_registry, tmp / "registry")
    server = start_uvicorn(tmp, GCODEFP_REGISTRY=tmp / "registry", GCODEFP_ADMIN_TOKEN=ADMIN_TOKEN,
                           GCODEFP_POLL_SECONDS=0.2, GCODEFP_MAX_BATCH=8)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def triton(v2_server):
    client = tritonclient_http.InferenceServerClient(url=v2_server.url.removeprefix("http://"))
    yield client
    client.close()


def raw_windows(meta: dict, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n plausible raw windows: training mean + noise, categorical codes the model has seen."""
    f, w = meta["features"], meta["window"]
    rng = np.random.default_rng(seed)
    cont = np.asarray(f["mean"]) + rng.normal(0, 1, (n, w, len(f["mean"]))) * np.asarray(f["std"])
    codes = [float(sorted(f["categorical_maps"][c], key=f["categorical_maps"][c].get)[0]) for c in f["categorical"]]
    cat = np.tile(np.asarray(codes, dtype=np.float32), (n, w, 1))
    return cont.astype(np.float32), cat


def triton_infer(client, cont, cat, binary: bool, version: str = "", **params):
    ins = [tritonclient_http.InferInput("continuous", list(cont.shape), "FP32"),
           tritonclient_http.InferInput("categorical", list(cat.shape), "FP32")]
    ins[0].set_data_from_numpy(cont, binary_data=binary)
    ins[1].set_data_from_numpy(cat, binary_data=binary)
    outs = [tritonclient_http.InferRequestedOutput(n, binary_data=binary)
            for n in ("gcode", "operation", "operation_confidence", "line_source", "fingerprint")]
    return client.infer(NAME, ins, outputs=outs, model_version=version, parameters=params or None)


def text(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def test_server_and_model_metadata(triton, package_meta):
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == NAME and "binary_tensor_data" in meta["extensions"]
    model = triton.get_model_metadata(NAME)
    w, f = package_meta["window"], package_meta["features"]
    shapes = {t["name"]: t["shape"] for t in model["inputs"]}
    assert shapes == {"continuous": [-1, w, len(f["continuous"])], "categorical": [-1, w, len(f["categorical"])]}
    assert {"gcode", "operation", "fingerprint"} <= {t["name"] for t in model["outputs"]}
    assert model["parameters"]["feature_order"]["continuous"] == f["continuous"]
    assert triton.is_model_ready(NAME) and not triton.is_model_ready("no-such-model")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_answers_equal_predict(triton, v2_server, package_meta, binary):
    cont, cat = raw_windows(package_meta, 3, seed=1)
    result = triton_infer(triton, cont, cat, binary)
    gcode, ops = text(result.as_numpy("gcode")), text(result.as_numpy("operation"))
    conf, fps = result.as_numpy("operation_confidence"), result.as_numpy("fingerprint")
    assert fps.shape == (3, package_meta["model_config"]["fingerprint_dim"])
    with httpx.Client(base_url=v2_server.url, timeout=60) as http:
        for i in range(3):
            r = http.post("/predict", json={"sensor_data": {"continuous": cont[i].tolist(),
                                                            "categorical": cat[i].tolist()},
                                            "return_fingerprint": True}).json()
            assert gcode[i] == r["gcode_sequence"] and ops[i] == r["operation"]["name"]
            assert abs(float(conf[i]) - r["operation"]["confidence"]) < 1e-5
            np.testing.assert_allclose(fps[i], r["fingerprint"], rtol=1e-5, atol=1e-6)
    assert result.get_response()["model_version"] == "v1"


def test_infer_errors_follow_the_protocol(triton, v2_server, package_meta):
    cont, cat = raw_windows(package_meta, 1)
    with pytest.raises(InferenceServerException) as err:
        triton_infer(triton, cont[:, :-1], cat, binary=False)  # one row short
    assert "shape" in err.value.message()
    with httpx.Client(base_url=v2_server.url, timeout=60) as http:
        bad = http.post(f"/v2/models/{NAME}/infer", json={"inputs": [{"name": "continuous", "datatype": "FP32",
                                                                       "shape": [1, 2, 3], "data": [1, 2, 3]}]})
        assert bad.status_code == 400 and set(bad.json()) == {"error"}
        assert http.post("/v2/models/other/infer", json={"inputs": []}).status_code == 404
        typed = http.post(f"/v2/models/{NAME}/infer", json={"inputs": [
            {"name": "continuous", "datatype": "FP32", "shape": list(cont.shape), "data": ["x"] * cont.size},
            {"name": "categorical", "datatype": "FP32", "shape": list(cat.shape), "data": cat.ravel().tolist()}]})
        assert typed.status_code == 400 and "inputs.continuous.data" in typed.json()["error"]
        params = http.post(f"/v2/models/{NAME}/infer", json={"inputs": [], "parameters": {"beam_width": 99}})
        assert params.status_code == 400 and "beam_width" in params.json()["error"]
        # found by schemathesis: a flag next to outputs that are not a list was a 500
        odd = http.post(f"/v2/models/{NAME}/infer", json={"inputs": [], "outputs": 5.0,
                                                          "parameters": {"binary_data_output": True, "x": [True]}})
        assert odd.status_code == 400 and set(odd.json()) == {"error"}
        mixed = http.post(f"/v2/models/{NAME}/infer", json={"inputs": [
            {"name": "continuous", "datatype": "FP32", "shape": list(cont.shape),
             "data": [True] + cont.ravel().tolist()[1:]},
            {"name": "categorical", "datatype": "FP32", "shape": list(cat.shape), "data": cat.ravel().tolist()}]})
        assert mixed.status_code == 400 and "true/false" in mixed.json()["error"]


def test_version_pinning_during_a_rollout(triton, v2_server, package_meta):
    cont, cat = raw_windows(package_meta, 1, seed=2)
    with httpx.Client(base_url=v2_server.url, timeout=60) as http:
        r = http.post("/admin/reload", json={"version": "v2"}, headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert r.status_code == 200 and r.json()["version"] == "v2"
        assert triton.get_model_metadata(NAME)["versions"] == ["v2", "v1"]  # current first, previous kept
        assert triton.is_model_ready(NAME, model_version="v1")
        pinned = triton_infer(triton, cont, cat, binary=True, version="v1")
        assert pinned.get_response()["model_version"] == "v1"
        assert triton_infer(triton, cont, cat, binary=True).get_response()["model_version"] == "v2"
        assert text(pinned.as_numpy("gcode")) == text(triton_infer(triton, cont, cat, True).as_numpy("gcode"))
        gone = http.post(f"/v2/models/{NAME}/versions/v0/infer", json={"inputs": []})
        assert gone.status_code == 404 and "loaded: v2, v1" in gone.json()["error"]
        assert http.get(f"/v2/models/{NAME}/versions/v0/ready").status_code == 404


def test_client_v2_calls(v2_server, package_meta):
    from api.client import APINotFoundError, GCodeAPIClient

    cont, cat = raw_windows(package_meta, 2, seed=3)
    with GCodeAPIClient(v2_server.url) as api:
        assert api.v2_ready() and NAME == api.v2_model_metadata()["name"]
        out = api.v2_infer(cont, cat, binary=True)
        ref = api.v2_infer(cont, cat)
        assert out["gcode"] == ref["gcode"] and len(out["gcode"]) == 2
        np.testing.assert_allclose(out["fingerprint"], ref["fingerprint"], rtol=1e-6)
        with pytest.raises(APINotFoundError, match="not loaded"):
            api.v2_infer(cont, cat, version="v0")


def test_previous_version_is_kept_only_while_memory_allows():
    from api.model_store import memory_allows_previous

    assert memory_allows_previous(0)
    assert not memory_allows_previous(10**9)  # a petabyte is never available
