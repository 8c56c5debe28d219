"""Backend-agnostic decoding over a numpy step function (PyTorch, ONNX Runtime or an ensemble).

A `StepFn` maps (previous tokens [B] int64, state) to (logits [B,V], new state). The state is a dict
of arrays whose axis 0 is the batch (the encoder memory may be part of it), which lets beam search
expand and reorder it without knowing what is inside. Outputs are token arrays [B, max_len] holding
the tokens after BOS: w1 .. wk EOS PAD ... (the layout of a dataset's tokens[:, 1:]).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

State = dict[str, np.ndarray]
StepFn = Callable[[np.ndarray, State], tuple[np.ndarray, State]]
PAD, BOS, EOS = 0, 1, 2


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def expand_state(state: State, k: int) -> State:
    """Repeat every batch row k times: row b becomes rows b*k .. b*k+k-1."""
    return {name: np.repeat(a, k, axis=0) for name, a in state.items()}


def reorder_state(state: State, index: np.ndarray) -> State:
    return {name: a[index] for name, a in state.items()}


def _run(step: StepFn, state: State, batch_size: int, max_len: int, pick, eos: int, pad: int, bos: int) -> np.ndarray:
    out = np.full((batch_size, max_len), pad, dtype=np.int64)
    prev = np.full(batch_size, bos, dtype=np.int64)
    done = np.zeros(batch_size, dtype=bool)
    for t in range(max_len):
        logits, state = step(prev, state)
        tok = pick(logits)
        tok = np.where(done, pad, tok)
        out[:, t] = tok
        done |= tok == eos
        if done.all():
            break
        prev = np.where(done, eos, tok)
    return out


def greedy(step: StepFn, state: State, batch_size: int, max_len: int, *, bos: int = BOS, eos: int = EOS,
           pad: int = PAD) -> np.ndarray:
    return _run(step, state, batch_size, max_len, lambda lg: lg.argmax(axis=-1), eos, pad, bos)


def sample(step: StepFn, state: State, batch_size: int, max_len: int, *, temperature: float = 1.0, seed: int = 0,
           bos: int = BOS, eos: int = EOS, pad: int = PAD) -> np.ndarray:
    """Temperature sampling, reproducible for a given seed (temperature 0 = greedy)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return greedy(step, state, batch_size, max_len, bos=bos, eos=eos, pad=pad)
    rng = np.random.default_rng(seed)

    def pick(logits: np.ndarray) -> np.ndarray:
        p = np.exp(log_softmax(logits.astype(np.float64) / temperature))
        u = rng.random((p.shape[0], 1))
        return np.minimum((p.cumsum(axis=-1) < u).sum(axis=-1), p.shape[1] - 1)

    return _run(step, state, batch_size, max_len, pick, eos, pad, bos)


def beam_search(step: StepFn, state: State, batch_size: int, max_len: int, *, beam_width: int = 4,
                length_penalty: float = 0.0, bos: int = BOS, eos: int = EOS, pad: int = PAD,
                return_all: bool = False):
    """Beam search. Returns (tokens [B, max_len], log-prob scores [B]) of the best beam, or with
    return_all the K beams per row, best first: ([B, K, max_len], [B, K]).
    Scores are summed log-probabilities divided by length**length_penalty (0 = no normalisation)."""
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    k, b = beam_width, batch_size
    state = expand_state(state, k)
    seqs = np.full((b, k, max_len), pad, dtype=np.int64)
    # Only beam 0 is live at the start, so the first expansion does not pick k copies of one token.
    scores = np.tile(np.r_[0.0, np.full(k - 1, -np.inf)], (b, 1))
    lengths = np.zeros((b, k), dtype=np.int64)
    done = np.zeros((b, k), dtype=bool)
    prev = np.full(b * k, bos, dtype=np.int64)
    for t in range(max_len):
        logits, state = step(prev, state)
        logp = log_softmax(logits.astype(np.float64)).reshape(b, k, -1)
        v = logp.shape[-1]
        # A finished beam extends only with PAD at no cost, so it competes with its final score.
        frozen = np.full(v, -np.inf)
        frozen[pad] = 0.0
        logp = np.where(done[:, :, None], frozen, logp)
        total = (scores[:, :, None] + logp).reshape(b, k * v)
        top = np.argsort(-total, axis=1, kind="stable")[:, :k]
        src, tok = top // v, top % v
        scores = np.take_along_axis(total, top, axis=1)
        seqs = np.take_along_axis(seqs, src[:, :, None], axis=1)
        seqs[:, :, t] = tok
        was_done = np.take_along_axis(done, src, axis=1)
        lengths = np.take_along_axis(lengths, src, axis=1) + ~was_done
        done = was_done | (tok == eos)
        flat = (np.arange(b)[:, None] * k + src).reshape(-1)
        state = reorder_state(state, flat)
        if done.all():
            break
        prev = np.where(done, eos, tok).reshape(-1)
    final = scores / np.maximum(lengths, 1) ** length_penalty if length_penalty else scores
    order = np.argsort(-final, axis=1, kind="stable")
    seqs = np.take_along_axis(seqs, order[:, :, None], axis=1)
    final = np.take_along_axis(final, order, axis=1)
    return (seqs, final) if return_all else (seqs[:, 0], final[:, 0])


def ensemble_step(steps: list[StepFn]) -> StepFn:
    """Average the members' probabilities. The state holds every member's state, keys prefixed
    `m{i}.`; the returned logits are log(mean p), so argmax/beam/sampling work unchanged."""

    def step(tokens: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        probs, new_state = 0.0, {}
        for i, member in enumerate(steps):
            prefix = f"m{i}."
            sub = {name[len(prefix):]: a for name, a in state.items() if name.startswith(prefix)}
            logits, sub = member(tokens, sub)
            probs = probs + np.exp(log_softmax(logits.astype(np.float64)))
            new_state.update({prefix + name: a for name, a in sub.items()})
        return np.log(probs / len(steps) + 1e-30), new_state

    return step


def merge_states(states: list[State]) -> State:
    """Member states -> one ensemble state (see ensemble_step)."""
    return {f"m{i}.{name}": a for i, s in enumerate(states) for name, a in s.items()}


def strip_after_eos(tokens: np.ndarray, eos: int = EOS, pad: int = PAD) -> np.ndarray:
    """Set everything after the first EOS to PAD (e.g. for teacher-forced argmax rows)."""
    tokens = np.array(tokens, copy=True)
    after = np.cumsum(tokens == eos, axis=-1) - (tokens == eos) > 0
    tokens[after] = pad
    return tokens
