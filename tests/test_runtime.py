"""The serving runtime (onnxruntime + numpy): request-level output, decoding methods, input checks,
loading paths, thread safety and that it never imports torch."""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from gcodefp_core.export import sample_windows
from gcodefp_core.runtime import OnnxPredictor


@pytest.fixture(scope="module")
def pred(exported):
    return OnnxPredictor.load(exported["model_json"])


@pytest.fixture(scope="module")
def windows(exported):
    cont, cat, _ = sample_windows(exported["meta"], exported["dataset"], n=12)
    return cont, cat


def test_predict_returns_the_contract_fields(pred, windows):
    cont, cat = windows
    out = pred.predict(cont, cat)
    assert len(out) == len(cont)
    tokens = pred.predict_arrays(cont, cat)[0]
    assert pred.default_method == "line"
    for row, r in zip(tokens, out):
        assert set(r) == {"gcode", "tokens", "token_ids", "operation", "operation_confidence", "fingerprint",
                          "method", "line_confidence", "line_source"}
        assert r["line_source"] in ("path", "model")
        assert r["gcode"] in pred.lines and r["method"] == "line"
        assert r["gcode"] == pred.tokenizer.decode(row.tolist())
        assert r["tokens"] == pred.tokenizer.tokens(r["token_ids"])
        assert 2 not in r["token_ids"] and 0 not in r["token_ids"]  # EOS / PAD stripped
        assert r["operation"] in pred.operations and 1 / 9 <= r["operation_confidence"] <= 1
        assert len(r["fingerprint"]) == pred.metadata["model_config"]["fingerprint_dim"]
        assert abs(np.linalg.norm(r["fingerprint"]) - 1) < 1e-4
    assert isinstance(out[0]["fingerprint"], list) and isinstance(out[0]["token_ids"], list)
    json.dumps(out)  # serialisable as is
    greedy = pred.predict(cont, cat, method="greedy")
    assert all(set(r) == set(out[0]) - {"line_confidence", "line_source"} and r["method"] == "greedy" for r in greedy)


def test_decoding_methods_agree_where_they_must(pred, windows):
    cont, cat = windows
    greedy = pred.predict_arrays(cont, cat, method="greedy")[0]
    np.testing.assert_array_equal(pred.predict_arrays(cont, cat, method="beam", beam_width=1)[0], greedy)
    np.testing.assert_array_equal(pred.predict_arrays(cont, cat, method="sample", temperature=0)[0], greedy)
    a = pred.predict_arrays(cont, cat, method="sample", temperature=1.5, seed=3)[0]
    np.testing.assert_array_equal(a, pred.predict_arrays(cont, cat, method="sample", temperature=1.5, seed=3)[0])
    beam = pred.predict(cont, cat, method="beam", beam_width=4)
    assert len(beam) == len(cont) and all(isinstance(r["gcode"], str) for r in beam)
    short = pred.predict_arrays(cont, cat, method="greedy", max_length=2)[0]
    np.testing.assert_array_equal(short, greedy[:, :2])  # greedy is prefix-consistent


def test_bad_inputs_are_rejected_with_the_field_named(pred, windows):
    cont, cat = windows
    with pytest.raises(ValueError, match="continuous: expected shape"):
        pred.predict(cont[:, :-1], cat[:, :-1])
    with pytest.raises(ValueError, match="categorical: expected shape"):
        pred.predict(cont, cat[:, :, :2])
    with pytest.raises(ValueError, match="method"):
        pred.predict(cont, cat, method="nucleus")
    with pytest.raises(ValueError, match="max_length"):
        pred.predict(cont, cat, max_length=pred.max_tokens + 1)


def test_load_accepts_folder_json_or_graph_and_rejects_bad_metadata(exported, tmp_path):
    folder = exported["model_json"].parent
    for path in (folder, exported["model_json"], folder / "model.greedy.onnx"):
        assert OnnxPredictor.load(path).variant == "fp32"
    with pytest.raises(FileNotFoundError):
        OnnxPredictor.load(tmp_path)
    meta = json.loads(exported["model_json"].read_text())
    (tmp_path / "model.json").write_text(json.dumps(dict(meta, format="other")))
    with pytest.raises(ValueError, match="format"):
        OnnxPredictor.load(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps(meta))  # graph files are not in tmp_path
    with pytest.raises(FileNotFoundError, match="missing"):
        OnnxPredictor.load(tmp_path)


def test_concurrent_callers_get_the_sequential_answers(pred, windows):
    cont, cat = windows
    expected = [pred.predict(cont[i:i + 1], cat[i:i + 1])[0]["gcode"] for i in range(len(cont))]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: pred.predict(cont[i:i + 1], cat[i:i + 1])[0]["gcode"], range(len(cont))))
    assert got == expected


def test_runtime_never_imports_torch(exported):
    code = (
        "import sys, numpy as np\n"
        "from gcodefp_core.runtime import OnnxPredictor\n"
        f"p = OnnxPredictor.load({str(exported['model_json'])!r})\n"
        "w, f, c = p.window, len(p.features.continuous), len(p.features.categorical)\n"
        "p.predict(np.zeros((2, w, f), np.float32), np.zeros((2, w, c), np.int64))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_model_without_categorical_columns(tmp_path, synthetic_dataset):
    """side_channel has C == 0: the graphs keep a [B, W, 0] `categorical` input; callers may pass None."""
    from pathlib import Path

    TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"

    from gcodefp_core.config import load_config
    from gcodefp_core.dataset import DatasetConfig, build_dataset, load_dataset
    from gcodefp_core.export import export_checkpoint
    from gcodefp_core.train import train_model

    ds = build_dataset(DatasetConfig(source=str(synthetic_dataset / "logs"), feature_set="side_channel", window=32),
                       tmp_path / "ds")   # the session's synthetic logs, read as side channels
    cfg = load_config(TINY)
    cfg["train"].update(epochs=1, samples_per_epoch=256)
    cfg["wandb"] = {"mode": "disabled"}
    train_model(cfg, load_dataset(ds), tmp_path / "run", seed=0)
    meta = export_checkpoint(tmp_path / "run" / "checkpoint_best.pt", tmp_path / "m" / "model.onnx", dataset=ds,
                             verify_windows=64)
    assert meta["parity"]["passed"]
    assert meta["graphs"]["encoder"]["inputs"][1] == {"name": "categorical", "dtype": "int64", "shape": ["batch", 32, 0]}
    pred = OnnxPredictor.load(tmp_path / "m")
    cont, cat, _ = sample_windows(meta, ds, n=3)
    assert cat.shape == (3, 32, 0)
    assert [r["gcode"] for r in pred.predict(cont, None)] == [r["gcode"] for r in pred.predict(cont, cat)]


@pytest.mark.parametrize("every", [1, 4])
@pytest.mark.parametrize("chunk", [1, 4, 30, 200])
def test_sliding_a_stream_cuts_the_judged_windows_and_keeps_the_last_rows(every, chunk):
    from gcodefp_core.runtime import windows as runtime_windows

    w = 8
    rows = np.arange(300 * 3, dtype=np.float32).reshape(300, 3)   # row r holds 3r, 3r+1, 3r+2
    codes = np.arange(300, dtype=np.int64)[:, None]
    buf_c = buf_k = None
    seen = 0
    for lo in range(0, 300, chunk):
        c, k = rows[lo:lo + chunk], codes[lo:lo + chunk]
        wc, wk, buf_c, buf_k, m = runtime_windows.slide(buf_c, buf_k, c, k, w, every)
        seen += len(c)
        ends = [r for r in range(seen - m, seen) if (seen - 1 - r) % every == 0]   # last row and every `every`-th before it
        assert m == max(min(len(c), seen - (w - 1)), 0)
        assert (0 if wc is None else len(wc)) == len(ends)
        for i, end in enumerate(ends):
            assert np.array_equal(wc[i], rows[end - w + 1:end + 1]) and np.array_equal(wk[i], codes[end - w + 1:end + 1])
        assert np.array_equal(buf_c, rows[max(seen - (w - 1), 0):seen])    # the last W-1 rows ...
        assert buf_c.base is None or buf_c.base.shape[0] <= w - 1 + runtime_windows.VIEW_EXTRA_ROWS  # ... not a whole chunk
