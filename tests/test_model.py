"""The model's encode/decode_step contract, its agreement across call paths, and ONNX export."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gcodefp_core.model import ModelConfig, TorchStep, build_model, count_parameters
from gcodefp_core.runtime import decoding

torch.set_num_threads(1)


def tiny(cardinalities=(4, 3), fourier_inputs=(0, 2), **kw):
    cfg = ModelConfig(fourier_inputs=list(fourier_inputs), fourier_features=6, n_continuous=7, cardinalities=list(cardinalities), n_operations=9, vocab_size=23, window=16,
                      max_decode_len=6, d_model=16, last_rows=4, token_dim=8, fingerprint_dim=12, dropout=0.0, **kw)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # a sharper random decoder, so argmax ties cannot hide disagreements
        model.token_embed.weight.mul_(5)
    return model


def inputs(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    cont = torch.randn(batch, cfg.window, cfg.n_continuous, generator=g)
    cat = torch.stack([torch.randint(0, c, (batch, cfg.window), generator=g) for c in cfg.cardinalities], dim=2) \
        if cfg.cardinalities else torch.zeros(batch, cfg.window, 0, dtype=torch.long)
    return cont, cat


def test_encode_shapes_and_unit_fingerprint():
    model = tiny()
    cont, cat = inputs(model)
    memory, op_logits, fp, h0 = model.encode(cont, cat)
    assert memory.shape == (3, 16 // 4 + 1, 16)     # conv steps + the summary slot
    assert op_logits.shape == (3, 9) and h0.shape == (3, 16)
    assert fp.shape == (3, 12)
    torch.testing.assert_close(fp.norm(dim=1), torch.ones(3))
    logits, h = model.decode_step(torch.tensor([1, 5, 7]), h0, memory)
    assert logits.shape == (3, 23) and h.shape == (3, 16)


def test_categorical_features_matter_and_none_is_allowed():
    model = tiny()
    cont, cat = inputs(model)
    a = model.encode(cont, cat)[1]
    b = model.encode(cont, (cat + 1) % 3)[1]
    assert not torch.allclose(a, b)
    no_cat = tiny(cardinalities=())
    cont, cat = inputs(no_cat)
    assert cat.shape[2] == 0
    assert no_cat.encode(cont, cat)[1].shape == (3, 9)


def test_last_rows_path_sees_the_last_row():
    model = tiny()
    cont, cat = inputs(model)
    base = model.encode(cont, cat)[1]
    changed = cont.clone()
    changed[:, -1] += 3
    assert not torch.allclose(model.encode(changed, cat)[1], base)
    # A small move of a Fourier input (a position) changes the output more than of another input.
    moved = {}
    for col in (0, 1):
        nudged = cont.clone()
        nudged[:, -1, col] += 0.05
        moved[col] = (model.encode(nudged, cat)[1] - base).abs().sum()
    assert moved[0] > moved[1]


def test_teacher_forcing_equals_step_by_step():
    model = tiny()
    cont, cat = inputs(model)
    tokens = torch.tensor([[1, 5, 6, 2, 0, 0, 0], [1, 9, 2, 0, 0, 0, 0], [1, 3, 4, 5, 6, 7, 2]])
    logits, op_logits, fp, line_logits = model(cont, cat, tokens)
    assert line_logits is None  # no line head configured
    memory, op2, fp2, h = model.encode(cont, cat)
    for t in range(tokens.shape[1] - 1):
        step_logits, h = model.decode_step(tokens[:, t], h, memory)
        torch.testing.assert_close(logits[:, t], step_logits)
    torch.testing.assert_close(op_logits, op2)


def test_greedy_equals_beam_width_one():
    model = tiny()
    cont, cat = inputs(model, batch=5)
    step = TorchStep(model)
    state, op_logits, fp = step.initial_state(cont.numpy(), cat.numpy())
    greedy = decoding.greedy(step, state, 5, model.cfg.max_decode_len)
    beam1, _ = decoding.beam_search(step, state, 5, model.cfg.max_decode_len, beam_width=1)
    np.testing.assert_array_equal(greedy, beam1)
    beam3, _ = decoding.beam_search(step, state, 5, model.cfg.max_decode_len, beam_width=3)
    assert beam3.shape == greedy.shape


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="unknown field.*'width'"):
        ModelConfig.from_dict({"n_continuous": 3, "cardinalities": [], "n_operations": 9, "vocab_size": 5,
                               "window": 16, "max_decode_len": 6, "width": 3})
    with pytest.raises(ValueError, match="window"):
        ModelConfig.from_dict({"n_continuous": 3, "cardinalities": [], "n_operations": 9, "vocab_size": 5,
                               "window": 18, "max_decode_len": 6})
    assert count_parameters(tiny()) > 0


def test_encode_and_decode_step_export_to_onnx(tmp_path):
    """The contract the exporter relies on: each method exports (dynamo exporter, one file, dynamic
    batch) and onnxruntime reproduces PyTorch at another batch size."""
    ort = pytest.importorskip("onnxruntime")
    model = tiny()

    class Encode(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, continuous, categorical):
            return self.m.encode(continuous, categorical)

    class DecodeStep(Encode):
        def forward(self, tokens, h, memory):
            return self.m.decode_step(tokens, h, memory)

    cont, cat = inputs(model, batch=2)
    memory, _, _, h0 = model.encode(cont, cat)
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(Encode(model).eval(), (cont, cat), tmp_path / "enc.onnx", dynamo=True, external_data=False,
                      input_names=["continuous", "categorical"], dynamic_shapes=({0: batch}, {0: batch}))
    torch.onnx.export(DecodeStep(model).eval(), (torch.tensor([1, 1]), h0, memory), tmp_path / "dec.onnx",
                      dynamo=True, external_data=False, input_names=["tokens", "h", "memory"],
                      dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    enc = ort.InferenceSession(str(tmp_path / "enc.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(tmp_path / "dec.onnx"), providers=["CPUExecutionProvider"])
    cont5, cat5 = inputs(model, batch=5, seed=1)
    mem_o, op_o, fp_o, h_o = enc.run(None, {"continuous": cont5.numpy(), "categorical": cat5.numpy()})
    mem_t, op_t, fp_t, h_t = model.encode(cont5, cat5)
    np.testing.assert_allclose(op_o, op_t.detach().numpy(), atol=1e-4)
    np.testing.assert_allclose(fp_o, fp_t.detach().numpy(), atol=1e-4)

    def ort_step(tokens, state):
        logits, h = dec.run(None, {"tokens": tokens, "h": state["h"], "memory": state["memory"]})
        return logits, {"h": h, "memory": state["memory"]}

    got = decoding.greedy(ort_step, {"h": h_o, "memory": mem_o}, 5, model.cfg.max_decode_len)
    step = TorchStep(model)
    want = decoding.greedy(step, step.initial_state(cont5.numpy(), cat5.numpy())[0], 5, model.cfg.max_decode_len)
    np.testing.assert_array_equal(got, want)


PROGRAMS = [0, 1, 2, 3, 4, 5, 1, 3, 5]   # the real schema: damage* (last three) reuse the *150025 programs
VARIANTS = [0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_factorised_operations_are_a_distribution_over_program_and_variant():
    model = tiny(operation_program=PROGRAMS, operation_variant=VARIANTS, factorise_operations=True)
    cont, cat = inputs(model, batch=5)
    with torch.no_grad():
        op_logits = model.encode(cont, cat)[1]
        program = torch.softmax(model.program_head(model.summarise(cont, cat).summary), -1)  # no line head: the program head alone
    probs = op_logits.exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    # Programs without a damaged variant keep all their mass; the others split it between normal and damaged.
    torch.testing.assert_close(probs[:, 0], program[:, 0])
    torch.testing.assert_close(probs[:, 1] + probs[:, 6], program[:, 1])
    assert not torch.allclose(probs[:, 1], program[:, 1])


def test_exported_operation_scores_stay_finite_when_the_variant_logit_is_far_off(tmp_path):
    """A window far outside the training range (a sensor stuck at its limit) drives the variant logit
    to hundreds: the exported LogSigmoid then gives -inf, and without the floor -inf x 0 made the
    scores of every operation without a variant NaN (a served confidence of null)."""
    ort = pytest.importorskip("onnxruntime")
    model = tiny(operation_program=PROGRAMS, operation_variant=VARIANTS, factorise_operations=True)
    with torch.no_grad():
        model.variant_head.bias.fill_(500.0)

    class Encode(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, continuous, categorical):
            return self.m.encode(continuous, categorical)[1]

    cont, cat = inputs(model, batch=2)
    torch.onnx.export(Encode(model).eval(), (cont, cat), tmp_path / "enc.onnx", dynamo=True, external_data=False,
                      input_names=["continuous", "categorical"])
    session = ort.InferenceSession(str(tmp_path / "enc.onnx"), providers=["CPUExecutionProvider"])
    [op_logits] = session.run(None, {"continuous": cont.numpy(), "categorical": cat.numpy()})
    assert np.isfinite(op_logits).all(), op_logits
    assert (op_logits[:, [1, 3, 5]] < -1000).all()   # "surely damaged": the undamaged runs of those programs all but impossible
    np.testing.assert_allclose(np.exp(op_logits).sum(-1), 1.0, rtol=1e-5)   # still a distribution


def test_predict_line_only_picks_lines_of_the_predicted_program():
    model = tiny(operation_program=PROGRAMS, operation_variant=VARIANTS, factorise_operations=True, n_lines=12)
    mask = np.zeros((6, 12), dtype=bool)
    for p in range(6):
        mask[p, 2 * p:2 * p + 2] = True          # program p owns lines 2p and 2p+1
    model.set_line_mask(mask)
    cont, cat = inputs(model, batch=16, seed=3)
    with torch.no_grad():
        line, confidence, op_logits, fp, raw = model.predict_line(cont, cat)
        _, op_ref, fp_ref, line_logits = model(cont, cat, torch.ones(16, 2, dtype=torch.long))
    program = torch.as_tensor(PROGRAMS)[op_logits.argmax(-1)]
    assert torch.equal(line // 2, program)
    torch.testing.assert_close(op_logits, op_ref)
    torch.testing.assert_close(fp, fp_ref)
    torch.testing.assert_close(raw, line_logits)  # the unrestricted scores, as training sees them
    # Within the program, the better scored of its two lines wins, with its softmax share as confidence.
    pair = line_logits.gather(1, torch.stack([2 * program, 2 * program + 1], 1))
    torch.testing.assert_close(line, 2 * program + pair.argmax(1))
    torch.testing.assert_close(confidence, torch.softmax(pair, 1).max(1).values)


def test_line_head_needs_operation_programs():
    cfg = tiny().cfg.to_dict() | {"n_lines": 5}
    with pytest.raises(ValueError, match="operation_program"):
        ModelConfig.from_dict(cfg)


@pytest.mark.parametrize("fourier_features", [0, 6])
def test_controller_line_head_with_and_without_fourier_features(fourier_features):
    """The controller-only line head (positions, their steps, categorical state) builds and runs
    with or without Fourier features; its answers stay among the predicted program's lines."""
    model = tiny(operation_program=PROGRAMS, operation_variant=VARIANTS, factorise_operations=True, n_lines=12,
                 line_source="controller", delta_scale=10.0, variant_stats=True, line_hidden=24)
    cfg = model.cfg.to_dict() | {"fourier_features": fourier_features}
    model = build_model(ModelConfig.from_dict(cfg)).eval()
    model.set_line_mask(np.repeat(np.eye(6, dtype=bool), 2, axis=1))
    cont, cat = inputs(model, batch=5)
    with torch.no_grad():
        line, confidence, op_logits, _, _ = model.predict_line(cont, cat)
    assert torch.equal(line // 2, torch.as_tensor(PROGRAMS)[op_logits.argmax(-1)])
    cont2 = cont.clone()
    cont2[:, :-9, 1] += 3.0  # a non-controller column, outside the last rows: the line scores ignore it
    with torch.no_grad():
        a = model(cont, cat, torch.ones(5, 2, dtype=torch.long))[3]
        b = model(cont2, cat, torch.ones(5, 2, dtype=torch.long))[3]
    torch.testing.assert_close(a, b)


def test_controller_line_head_reads_only_its_newest_rows():
    """line_rows=2: the line scores depend on the last two rows' controller state and not on the
    controller state of older rows (which the summary path still reads)."""
    model = tiny(operation_program=PROGRAMS, operation_variant=VARIANTS, factorise_operations=True, n_lines=12,
                 line_source="controller", delta_scale=10.0, line_hidden=24, line_rows=2)
    model.set_line_mask(np.repeat(np.eye(6, dtype=bool), 2, axis=1))
    cont, cat = inputs(model, batch=5)
    tokens = torch.ones(5, 2, dtype=torch.long)
    older, newest = cont.clone(), cont.clone()
    older[:, :-3, 0] += 3.0     # positions before the step into the second-newest row
    newest[:, -1, 0] += 3.0
    with torch.no_grad():
        base, a, b = (model(c, cat, tokens)[3] for c in (cont, older, newest))
    torch.testing.assert_close(base, a)
    assert not torch.allclose(base, b)
    with pytest.raises(ValueError, match="line_rows"):
        ModelConfig.from_dict(model.cfg.to_dict() | {"line_rows": 5})
