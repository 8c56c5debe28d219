"""G-code canonicalisation and tokenizer: unit cases, plus lossless round trips over the real programs."""
from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from gcodefp_core.tokenizer import BASE_ALPHABET, SPECIAL_TOKENS, GCodeTokenizer, canonicalize

REAL_DATA = Path(__file__).resolve().parents[2] / "shared/data/cnc-sensor-logs"
LINES = ["G1 Z0.025 F40.", "X0.0258 Y3.2965", "G0 X-0.0258 Y-0.2861", "G53 G0 Z0.", "M30", "G3 X0. Y-0.1257 R0.6382",
         "X0.0258 Y3.2965"]


# ---- canonicalize ---------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, canon", [
    ("G1 Z0.025 F40.", "G1 Z0.025 F40."),
    ("g01 x1.0 y-2", "G1 X1.0 Y-2"),
    ("G1X1.0Y2", "G1 X1.0 Y2"),
    ("N0010 G00 Z0.", "G0 Z0."),
    ("G38.2 Z-1. F10", "G38.2 Z-1. F10"),
    ("M03 S12000", "M3 S12000"),
    ("M05", "M5"),
    ("G00", "G0"),
    ("X007", "X007"),                        # only G/M codes lose leading zeros
    ("G1 X.5 Y+1", "G1 X.5 Y+1"),
    ("G1 (move) X1 ; to the corner", "G1 X1"),
    ("  G1   X1\t Y2  ", "G1 X1 Y2"),
    ("G 1 X -0.5", "G1 X-0.5"),
    ("(only a comment)", ""),
    ("; only a comment", ""),
    ("", ""),
    ("   ", ""),
    ("%", ""),
])
def test_canonicalize_cases(raw, canon):
    assert canonicalize(raw) == canon
    assert canonicalize(canon) == canon      # idempotent


@pytest.mark.parametrize("raw, needle", [
    ("G1 X1$", "'$'"),
    ("G1 X1 #5", "'#'"),
    ("G1 X1 (unclosed", "parenthesis"),
    ("G1 X", "'X'"),
    ("1.5 X2", "'1.5 X2'"),
    ("G1 X1..2", "'.2'"),
])
def test_canonicalize_rejects_bad_text_with_its_name(raw, needle):
    with pytest.raises(ValueError) as e:
        canonicalize(raw)
    assert needle in str(e.value) and repr(raw) in str(e.value)


def test_canonicalize_error_says_what_is_accepted():
    with pytest.raises(ValueError, match="accepted: letters A-Z"):
        canonicalize("G1 X1 @")
    with pytest.raises(TypeError, match="str"):
        canonicalize(None)


# ---- tokenizer ------------------------------------------------------------------------------------
def test_vocabulary_layout_and_known_words():
    tok = GCodeTokenizer.build(LINES)
    assert (tok.PAD, tok.BOS, tok.EOS, tok.UNK, tok.SEP) == (0, 1, 2, 3, 4)
    words = {w for line in LINES for w in line.split()}
    assert tok.vocab_size == len(SPECIAL_TOKENS) + len(words) + len(BASE_ALPHABET)
    ids = tok.encode("G53 G0 Z0.")
    assert len(ids) == 5 and ids[0] == tok.BOS and ids[-1] == tok.EOS  # one token per known word
    assert tok.tokens(ids) == ["G53", "G0", "Z0."]
    assert tok.encode("G53 G0 Z0.", add_special=False) == ids[1:-1]
    assert GCodeTokenizer.build(reversed(LINES)) == tok                 # order of lines does not matter


def test_unknown_words_are_spelled_with_sep_between_spelled_words():
    tok = GCodeTokenizer.build(LINES)
    ids = tok.encode("G1 X9.5 Y-7 Z0.")
    assert tok.UNK not in ids
    assert tok.tokens(ids) == ["G1", "X", "9", ".", "5", "Y", "-", "7", "Z0."]
    char_5, char_y = tok.encode("X5", add_special=False)[1], tok.encode("Y1", add_special=False)[0]
    assert ids[5] == char_5 and ids[6] == tok.SEP and ids[7] == char_y   # SEP sits between "X9.5" and "Y-7"
    assert ids.count(tok.SEP) == 1
    assert tok.decode(ids) == "G1 X9.5 Y-7 Z0."
    # spelled words around a known one need no SEP
    ids = tok.encode("X9 G1 Y8")
    assert tok.SEP not in ids and tok.decode(ids) == "X9 G1 Y8"


@pytest.mark.parametrize("line", ["g01x9.5y-7", "N5 G00 Z0. (retract)", "G38.2 Z-1. F10", "M30", "", "X1 Y2 Z3 A4 B5"])
def test_round_trip_equals_canonical_form(line):
    tok = GCodeTokenizer.build(LINES)
    assert tok.decode(tok.encode(line)) == canonicalize(line)


def test_min_freq_drops_rare_words_but_keeps_lossless():
    tok = GCodeTokenizer.build(LINES, min_freq=2)
    assert tok.vocab_size == len(SPECIAL_TOKENS) + 3 + len(BASE_ALPHABET)  # X0.0258, Y3.2965, G0 occur twice
    assert tok.tokens(tok.encode("G0 X0.0258 Z0.")) == ["G0", "X0.0258", "Z", "0", "."]
    assert tok.decode(tok.encode("G1 Z0.025 F40.")) == "G1 Z0.025 F40."
    with pytest.raises(ValueError, match="min_freq"):
        GCodeTokenizer.build(LINES, min_freq=0)


def test_decode_tolerates_model_output():
    tok = GCodeTokenizer.build(LINES)
    body = tok.encode("G53 G0 Z0.", add_special=False)
    assert tok.decode(body) == "G53 G0 Z0."                                    # no BOS, no EOS
    assert tok.decode([tok.BOS, *body, tok.EOS, *body, tok.PAD]) == "G53 G0 Z0."  # stops at first EOS
    assert tok.decode([tok.PAD, tok.BOS, *body, tok.PAD]) == "G53 G0 Z0."
    assert tok.decode(np.array([tok.BOS, tok.EOS])) == ""
    assert tok.decode([tok.UNK]) == "<unk>" and tok.tokens([tok.BOS, tok.UNK, tok.EOS]) == ["<unk>"]
    with pytest.raises(ValueError, match="outside vocabulary"):
        tok.decode([tok.vocab_size])


def test_serialisation_round_trip_and_validation():
    tok = GCodeTokenizer.build(LINES)
    again = GCodeTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again == tok and hash(again) == hash(tok) and again.vocab_size == tok.vocab_size
    assert again.encode("G1 X9.5 Y-7") == tok.encode("G1 X9.5 Y-7")
    assert tok != GCodeTokenizer.build(LINES[:2])
    with pytest.raises(ValueError, match="'tokens'"):
        GCodeTokenizer.from_dict({"vocab": []})
    with pytest.raises(ValueError, match="must start with"):
        GCodeTokenizer.from_dict({"tokens": ["G1", *tok.to_dict()["tokens"]]})
    with pytest.raises(ValueError, match="duplicate"):
        GCodeTokenizer.from_dict({"tokens": [*tok.to_dict()["tokens"], "G1"]})
    with pytest.raises(ValueError, match="base-alphabet"):
        GCodeTokenizer.from_dict({"tokens": [t for t in tok.to_dict()["tokens"] if t != "7"]})


def test_encode_batch_pads_and_rejects_overlong_lines():
    tok = GCodeTokenizer.build(LINES)
    lines = ["M30", "G53 G0 Z0.", "G1 X9.5"]
    n = tok.max_encoded_length(lines)
    assert n == len(tok.encode("G1 X9.5")) == 2 + 1 + 4
    batch = tok.encode_batch(lines, n + 2)
    assert batch.dtype == np.int64 and batch.shape == (3, n + 2)
    assert (batch[:, 0] == tok.BOS).all() and batch[0, 2] == tok.EOS and (batch[0, 3:] == tok.PAD).all()
    assert [tok.decode(row) for row in batch] == lines
    assert tok.max_encoded_length([]) == 2 and tok.encode_batch([], 4).shape == (0, 4)
    with pytest.raises(ValueError, match=r"line 2 'G1 X9.5' encodes to 7 tokens"):
        tok.encode_batch(lines, n - 1)


# ---- real programs --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_lines_by_run() -> dict[str, set[str]]:
    files = sorted(REAL_DATA.glob("*_aligned.csv.gz"))
    if not files:
        pytest.skip(f"real data absent: {REAL_DATA}")
    runs = {}
    for f in files:
        with gzip.open(f, "rt", newline="") as fh:
            runs[f.name.removesuffix("_aligned.csv.gz")] = {row["gcode_string"] for row in csv.DictReader(fh)}
    return runs


def test_every_real_line_is_canonical_and_round_trips(real_lines_by_run):
    lines = sorted(set().union(*real_lines_by_run.values()))
    assert len(lines) > 2000
    assert [ln for ln in lines if canonicalize(ln) != ln] == []
    tok = GCodeTokenizer.build(lines)
    assert all(tok.decode(tok.encode(ln)) == ln for ln in lines)
    n_words = len({w for ln in lines for w in ln.split()})
    assert tok.vocab_size == len(SPECIAL_TOKENS) + n_words + len(BASE_ALPHABET)
    assert tok.max_encoded_length(lines) == 2 + max(len(ln.split()) for ln in lines)  # no spelling needed
    print(f"\nreal data: {len(lines)} distinct lines, vocab_size {tok.vocab_size}, "
          f"max encoded length {tok.max_encoded_length(lines)}")


def test_held_out_programs_never_hit_unk_and_round_trip(real_lines_by_run):
    # damage* runs reuse the *150025 programs, so holding out those families leaves truly unseen programs.
    held_out = ("face150025", "pocket150025", "damageface", "damagepocket")
    train = [ln for run, ls in real_lines_by_run.items() if not run.startswith(held_out) for ln in ls]
    test = sorted({ln for run, ls in real_lines_by_run.items() if run.startswith(held_out) for ln in ls} - set(train))
    assert len(test) > 100
    tok = GCodeTokenizer.build(train)
    encoded = [tok.encode(ln) for ln in test]
    assert all(tok.UNK not in ids for ids in encoded)
    assert [tok.decode(ids) for ids in encoded] == test
    assert any(tok.SEP in ids for ids in encoded)  # the split really exercises spelled words
