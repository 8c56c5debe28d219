"""Decoding over numpy step functions: greedy, beam search, sampling, ensembles (no torch needed)."""
from __future__ import annotations

import numpy as np
import pytest

from gcodefp_core.runtime import decoding

PAD, BOS, EOS, A, B = 0, 1, 2, 3, 4
V = 5


def markov_step(table: np.ndarray):
    """A step whose next-token distribution depends on the previous token (table[prev]) plus a
    per-row bias carried in the state, so beam search must keep the state aligned with its beams."""
    log_table = np.log(table + 1e-12)

    def step(tokens, state):
        return log_table[tokens] + state["bias"], {"bias": state["bias"], "steps": state["steps"] + 1}

    return step


def trap_table() -> np.ndarray:
    """Greedy takes A (0.6) then ends with 0.34: 0.204; the best line is B EOS: 0.4 * 0.9 = 0.36."""
    t = np.full((V, V), 1e-9)
    t[BOS, [A, B]] = [0.6, 0.4]
    t[A, [EOS, A, B]] = [0.34, 0.33, 0.33]
    t[B, [EOS, A]] = [0.9, 0.1]
    t[EOS, EOS] = 1.0
    t[PAD, PAD] = 1.0
    return t / t.sum(1, keepdims=True)


def state(batch: int, bias=None) -> dict:
    return {"bias": np.zeros((batch, V)) if bias is None else bias, "steps": np.zeros((batch, 1))}


def test_greedy_falls_into_the_trap_and_beam_escapes():
    step = markov_step(trap_table())
    g = decoding.greedy(step, state(1), 1, 4)
    assert g.tolist() == [[A, EOS, PAD, PAD]]
    seq, score = decoding.beam_search(step, state(1), 1, 4, beam_width=2)
    assert seq.tolist() == [[B, EOS, PAD, PAD]]
    assert score[0] == pytest.approx(np.log(0.36), abs=1e-6)


def test_beam_width_one_equals_greedy():
    rng = np.random.default_rng(0)
    table = rng.dirichlet(np.ones(V), size=V)
    bias = rng.normal(size=(6, V))
    step = markov_step(table)
    g = decoding.greedy(step, state(6, bias), 6, 7)
    b, _ = decoding.beam_search(step, state(6, bias), 6, 7, beam_width=1)
    np.testing.assert_array_equal(g, b)


def test_batched_beam_equals_row_by_row():
    rng = np.random.default_rng(1)
    table = rng.dirichlet(np.ones(V) * 0.5, size=V)
    bias = rng.normal(size=(4, V)) * 2
    step = markov_step(table)
    seqs, scores = decoding.beam_search(step, state(4, bias), 4, 6, beam_width=3, return_all=True)
    assert seqs.shape == (4, 3, 6) and scores.shape == (4, 3)
    assert (np.diff(scores, axis=1) <= 1e-12).all(), "beams are best first"
    for i in range(4):
        s_i, sc_i = decoding.beam_search(step, state(1, bias[i:i + 1]), 1, 6, beam_width=3, return_all=True)
        np.testing.assert_array_equal(seqs[i], s_i[0])
        np.testing.assert_allclose(scores[i], sc_i[0])


def test_beam_score_is_the_sequence_log_probability():
    step = markov_step(trap_table())
    seqs, scores = decoding.beam_search(step, state(1), 1, 4, beam_width=3, return_all=True)
    table = trap_table()
    for seq, score in zip(seqs[0], scores[0]):
        prev, logp = BOS, 0.0
        for tok in seq:
            if prev == EOS:
                break
            logp += np.log(table[prev, tok] / table[prev].sum())
            prev = tok
        assert score == pytest.approx(logp, abs=1e-6)


def test_sampling_is_seeded_and_follows_the_distribution():
    step = markov_step(trap_table())
    a = decoding.sample(step, state(2000), 2000, 4, temperature=1.0, seed=7)
    b = decoding.sample(step, state(2000), 2000, 4, temperature=1.0, seed=7)
    c = decoding.sample(step, state(2000), 2000, 4, temperature=1.0, seed=8)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert abs((a[:, 0] == A).mean() - 0.6) < 0.05
    assert ((a == EOS).sum(1) <= 1).all(), "a sample ends at most once (max_len may cut it)"
    np.testing.assert_array_equal(decoding.strip_after_eos(a), a)  # only PAD after EOS
    cold = decoding.sample(step, state(50), 50, 4, temperature=0.001, seed=3)
    np.testing.assert_array_equal(cold, decoding.greedy(step, state(50), 50, 4))
    with pytest.raises(ValueError, match="temperature"):
        decoding.sample(step, state(1), 1, 4, temperature=-1)


def test_ensemble_of_identical_members_equals_the_member_and_averages_probabilities():
    t1, t2 = trap_table(), np.roll(trap_table(), 1, axis=1)
    s1, s2 = markov_step(t1), markov_step(t2)
    same = decoding.ensemble_step([s1, s1])
    st = decoding.merge_states([state(3), state(3)])
    np.testing.assert_array_equal(decoding.greedy(same, st, 3, 4), decoding.greedy(s1, state(3), 3, 4))
    mixed = decoding.ensemble_step([s1, s2])
    logits, new = mixed(np.array([BOS]), decoding.merge_states([state(1), state(1)]))
    np.testing.assert_allclose(np.exp(logits[0]), (t1[BOS] + t2[BOS]) / 2, atol=1e-9)
    assert set(new) == {"m0.bias", "m0.steps", "m1.bias", "m1.steps"}
    assert new["m1.steps"][0, 0] == 1


def test_state_helpers_and_strip_after_eos():
    st = {"h": np.arange(6).reshape(3, 2)}
    ex = decoding.expand_state(st, 2)
    assert ex["h"][:, 0].tolist() == [0, 0, 2, 2, 4, 4]
    assert decoding.reorder_state(ex, np.array([5, 0]))["h"][:, 0].tolist() == [4, 0]
    out = decoding.strip_after_eos(np.array([[3, 2, 4, 4], [2, 3, 3, 3], [3, 4, 4, 4]]))
    assert out.tolist() == [[3, 2, 0, 0], [2, 0, 0, 0], [3, 4, 4, 4]]
    with pytest.raises(ValueError, match="beam_width"):
        decoding.beam_search(markov_step(trap_table()), state(1), 1, 3, beam_width=0)
