"""ONNX export and its verification, on the session's tiny exported model (conftest `exported`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gcodefp_core.checkpoints import load_checkpoint
from gcodefp_core.export import (
    VerificationError,
    export_checkpoint,
    sample_windows,
    verify,
)
from gcodefp_core.model import TorchStep
from gcodefp_core.runtime import OnnxPredictor, decoding

torch.set_num_threads(1)
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"
def test_export_writes_every_graph_and_a_complete_model_json(exported):
    meta = json.loads(exported["model_json"].read_text())
    folder = exported["model_json"].parent
    assert meta["format"] == "gcodefp-onnx" and meta["variant"] == "fp32" and meta["kind"] == "full"
    assert set(meta["files"]) == {"encoder", "decoder", "encoder_only", "predict"}
    for name, file in meta["files"].items():
        assert (folder / file).stat().st_size == meta["file_sizes"][name]
    enc = meta["graphs"]["encoder"]
    assert [i["name"] for i in enc["inputs"]] == ["continuous", "categorical"]
    assert [o["name"] for o in enc["outputs"]] == ["memory", "op_logits", "fingerprint", "h0"]
    assert enc["inputs"][0]["shape"] == ["batch", meta["window"], len(meta["features"]["continuous"])]
    dec = meta["graphs"]["decoder"]
    assert [i["name"] for i in dec["inputs"]] == ["tokens", "h", "memory"]
    assert [o["name"] for o in dec["outputs"]] == ["logits", "h_next"]
    assert dec["outputs"][0]["shape"] == ["batch", meta["model_config"]["vocab_size"]]
    assert meta["opset"] == 20 and meta["dynamic_batch"] is True
    assert meta["parameter_count"] > 1000 and len(meta["source_checkpoint"]["sha256"]) == 64
    assert meta["max_tokens"] == meta["model_config"]["max_decode_len"]
    assert "tokens" in meta["tokenizer"] and len(meta["operations"]) == 9
    par = meta["parity"]
    assert par["passed"] and par["windows"] == 512 and "dataset" in par["data"]
    assert max(par["max_abs_diff"].values()) < 1e-4
    assert par["greedy_identical"] == {"greedy_stepwise": 1.0, "line": 1.0}
    pr = meta["graphs"]["predict"]
    assert [o["name"] for o in pr["outputs"]] == ["line", "line_confidence", "op_logits", "fingerprint", "line_logits"]
    table = meta["line_table"]
    assert len(table["lines"]) == meta["model_config"]["n_lines"] > 10
    assert pr["outputs"][-1]["shape"] == ["batch", len(table["lines"])] and "line_probabilities" in par["max_abs_diff"]
    # The program tracker fitted after training travels with the export, over the same line classes.
    assert len(meta["program_tracker"]["line_log_prior"]) == len(table["lines"])
    assert len(table["programs"]) == 6 and table["operation_program"][6:] == [1, 3, 5]  # damage* -> *150025
    assert not (folder / "model.failed.json").exists()


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_matches_pytorch_at_dynamic_batch_sizes(exported, batch):
    model, bundle, _ = load_checkpoint(exported["checkpoint"])
    pred = OnnxPredictor.load(exported["model_json"])
    cont, cat, _ = sample_windows(exported["meta"], exported["dataset"], n=batch)
    assert len(cont) == batch
    state, op_ref, fp_ref = TorchStep(model).initial_state(cont, cat)
    got = pred.encode(cont, cat)
    np.testing.assert_allclose(got["op_logits"], op_ref, atol=1e-4)
    np.testing.assert_allclose(got["fingerprint"], fp_ref, atol=1e-4)
    np.testing.assert_allclose(got["memory"], state["memory"], atol=1e-4)
    ref = decoding.greedy(TorchStep(model), state, batch, exported["meta"]["max_tokens"])
    np.testing.assert_array_equal(pred.predict_arrays(cont, cat, method="greedy")[0], ref)
    # The default answer is the line head's: one graph call, the same line as PyTorch's.
    line_ref, conf_ref, op_logits, _, logits_ref = (t.detach().numpy() for t in model.predict_line(torch.as_tensor(cont), torch.as_tensor(cat)))
    # ... snapped onto the program path where the position lies on it, as evaluate.predict does.
    assert bundle.program_path is not None and pred.program_path is not None
    program = model.op_program.numpy()[op_logits.argmax(1)]
    line_ref, _, _ = bundle.program_path.snap(program, cont[:, -1], line_ref, conf_ref)
    rows = pred.predict(cont, cat)
    assert [r["gcode"] for r in rows] == [bundle.line_table.lines[i] for i in line_ref]
    # The line head's unrestricted scores (the program tracker's evidence) come out of the same call.
    np.testing.assert_allclose(pred.predict_lines(cont, cat)["line_logits"], logits_ref, atol=1e-4)
    assert all(r["method"] == "line" and 0 < r["line_confidence"] <= 1 for r in rows)


def test_verification_fails_for_a_different_model(exported):
    model = load_checkpoint(exported["checkpoint"]).model
    with torch.no_grad():
        model.program_head.bias[0] += 0.5  # a mismatched reference: the operation logits move
        model.token_embed.weight.mul_(-1)  # and the decoder changes its mind
    report = verify(exported["model_json"], model=model, dataset=exported["dataset"], windows=64)
    assert not report["passed"]
    assert any(f.startswith("op_logits") for f in report["failures"])
    assert any("greedy_stepwise identical" in f for f in report["failures"])
    assert verify(exported["model_json"], dataset=exported["dataset"], windows=64)["passed"]  # recorded checkpoint


def test_a_broken_graph_fails_export_and_leaves_no_model_json(exported, tmp_path, monkeypatch):
    import onnx
    from onnx import numpy_helper

    from gcodefp_core import export as export_mod
    from gcodefp_core.cli import main

    real = export_mod.export_graph

    def broken(module, name, example, path, dynamic_batch, opset):
        real(module, name, example, path, dynamic_batch, opset)
        if name.startswith("encoder"):  # scale the largest weight: still a valid graph, but wrong numbers
            m = onnx.load(str(path))
            init = max(m.graph.initializer, key=lambda i: np.prod(i.dims))
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
            onnx.save(m, str(path))

    monkeypatch.setattr(export_mod, "export_graph", broken)
    with pytest.raises(VerificationError, match="op_logits max"):  # encoder-only: one graph to export
        export_checkpoint(exported["checkpoint"], tmp_path / "bad" / "model.onnx", encoder_only=True,
                          verify_windows=64)
    assert not (tmp_path / "bad" / "model.json").exists()
    failed = json.loads((tmp_path / "bad" / "model.failed.json").read_text())
    assert failed["parity"]["passed"] is False
    with pytest.raises(FileNotFoundError):
        OnnxPredictor.load(tmp_path / "bad")
    rc = main(["export", "--checkpoint", str(exported["checkpoint"]), "--output", str(tmp_path / "cli" / "m.onnx"),
               "--verify-windows", "64", "--encoder-only"])
    assert rc != 0


def test_encoder_only_export_with_a_fixed_batch_through_the_cli(exported, tmp_path, capsys):
    from gcodefp_core.cli import main

    rc = main(["export", "--checkpoint", str(exported["checkpoint"]), "--output", str(tmp_path / "enc.onnx"),
               "--encoder-only", "--batch-size", "3", "--verify-windows", "64"])
    assert rc == 0 and "PASSED" in capsys.readouterr().out
    meta = json.loads((tmp_path / "enc.json").read_text())
    assert meta["kind"] == "encoder_only" and list(meta["files"]) == ["encoder_only"]
    assert meta["graphs"]["encoder_only"]["inputs"][0]["shape"][0] == 3
    assert [o["name"] for o in meta["graphs"]["encoder_only"]["outputs"]] == ["op_logits", "fingerprint"]
    assert (tmp_path / "enc.json").is_file() and meta["parity"]["passed"]
    pred = OnnxPredictor.load(tmp_path / "enc.json")
    cont, cat, _ = sample_windows(meta, None, n=3)
    assert pred.fingerprint(cont, cat).shape == (3, meta["model_config"]["fingerprint_dim"])
    assert not pred.can_decode
    with pytest.raises(ValueError, match="encoder-only"):
        pred.predict(cont, cat)


def test_bad_requests_fail_clearly(exported, tmp_path):
    window = exported["meta"]["window"]
    with pytest.raises(ValueError, match="seq-len"):
        export_checkpoint(exported["checkpoint"], tmp_path / "m.onnx", seq_len=window + 4)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        export_checkpoint(tmp_path / "missing.pt", tmp_path / "m.onnx")
    foreign = dict(exported["meta"], window=window * 2)
    with pytest.raises(ValueError, match="differ from the model"):
        sample_windows(foreign, exported["dataset"], n=4)
