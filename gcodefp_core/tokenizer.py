"""G-code line canonicalisation and a word-level tokenizer with a character fallback.

A G-code line is a sequence of *words*: one address letter and its number ("G1", "X-0.1254", "F40.").
The tokenizer gives every word seen in training its own token, so a typical line is 2-6 tokens long,
and spells any other word with character tokens, so a held-out line still encodes losslessly:
decode(encode(x)) == canonicalize(x). Two consecutive spelled words are separated by SEP, because
"X1" "Y2" spelled back to back would otherwise read as one run of characters.

numpy only: the API process and the dataset builder both use this module.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

# Every character canonicalize() can emit; each gets a token so no accepted line ever needs UNK.
BASE_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-+"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<sep>")
ACCEPTED = "letters A-Z (any case), digits, '.', '-', '+', spaces/tabs, comments in ( ) or after ;"

_PAREN_COMMENT = re.compile(r"\([^()]*\)")
# One word: address letter, optional blanks, a number with optional sign (digits, '1.', '.5', '1.5').
_WORD = re.compile(r"\s*([A-Z])\s*([+-]?(?:\d+\.?\d*|\.\d+))")
_ALLOWED_CHARS = set(BASE_ALPHABET) | {" ", "\t"}


def canonicalize(line: str) -> str:
    """Upper-case, strip comments and N-words, split glued words, drop leading zeros of integer G/M codes.

    Numbers are otherwise kept exactly as written ("Z0." stays "Z0."), so real program lines, which are
    already in this form, come back unchanged. Blank and comment-only lines give "".
    """
    if not isinstance(line, str):
        raise TypeError(f"G-code line must be a str, got {type(line).__name__}: {line!r}")
    text = line.upper().split(";", 1)[0]
    text = _PAREN_COMMENT.sub(" ", text)
    if "(" in text or ")" in text:
        raise ValueError(f"G-code line {line!r}: unbalanced or nested parenthesis comment")
    if text.strip() == "%":  # program start/end tape marker: no words
        return ""
    bad = sorted({c for c in text if c not in _ALLOWED_CHARS})
    if bad:
        raise ValueError(f"G-code line {line!r}: character(s) {''.join(bad)!r} cannot be part of G-code "
                         f"(accepted: {ACCEPTED})")
    words, pos, end = [], 0, len(text.rstrip())
    while pos < end:
        m = _WORD.match(text, pos)
        if m is None:
            raise ValueError(f"G-code line {line!r}: cannot read a word at {text[pos:].strip()!r} "
                             "(a word is one letter followed by a number, e.g. 'G1' or 'X-0.5')")
        letter, number = m.groups()
        pos = m.end()
        if letter == "N":  # line number: bookkeeping, not part of what the machine does
            continue
        if letter in "GM" and number.isdigit():
            number = number.lstrip("0") or "0"
        words.append(letter + number)
    return " ".join(words)


def _words(line: str) -> list[str]:
    canon = canonicalize(line)
    return canon.split(" ") if canon else []


class GCodeTokenizer:
    """Vocabulary = SPECIAL_TOKENS + known words (sorted) + single characters (sorted).

    Token strings are unambiguous by construction: specials are "<...>", words are >= 2 characters
    starting with a letter, character tokens are exactly 1 character.
    """

    PAD, BOS, EOS, UNK, SEP = 0, 1, 2, 3, 4

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        if tuple(tokens[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"tokenizer vocabulary must start with {list(SPECIAL_TOKENS)}, got {tokens[:5]}")
        if len(set(tokens)) != len(tokens):
            dup = sorted(t for t, n in Counter(tokens).items() if n > 1)
            raise ValueError(f"tokenizer vocabulary has duplicate tokens: {dup[:10]}")
        for t in tokens[len(SPECIAL_TOKENS):]:
            if not isinstance(t, str) or not t or t.startswith("<"):
                raise ValueError(f"tokenizer vocabulary: invalid token {t!r}")
        missing = sorted(set(BASE_ALPHABET) - set(tokens))
        if missing:
            raise ValueError(f"tokenizer vocabulary lacks base-alphabet characters {''.join(missing)!r}")
        self._tokens = tokens
        self._index = {t: i for i, t in enumerate(tokens)}

    # ---- construction / serialisation -------------------------------------------------------------
    @classmethod
    def build(cls, lines: Iterable[str], min_freq: int = 1) -> "GCodeTokenizer":
        """A word token for every word seen at least min_freq times in lines (each line canonicalised)."""
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counts: Counter[str] = Counter()
        for line in lines:
            counts.update(_words(line))
        words = sorted(w for w, n in counts.items() if n >= min_freq)
        chars = sorted(set(BASE_ALPHABET) | {c for w in counts for c in w})
        return cls([*SPECIAL_TOKENS, *words, *chars])

    def to_dict(self) -> dict:
        return {"tokens": list(self._tokens)}

    @classmethod
    def from_dict(cls, d: dict) -> "GCodeTokenizer":
        if "tokens" not in d:
            raise ValueError(f"tokenizer dict needs a 'tokens' list, got keys {sorted(d)}")
        return cls(d["tokens"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GCodeTokenizer) and self._tokens == other._tokens

    def __hash__(self) -> int:
        return hash(tuple(self._tokens))

    def __repr__(self) -> str:
        return f"GCodeTokenizer(vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    # ---- encoding ---------------------------------------------------------------------------------
    def encode(self, line: str, add_special: bool = True) -> list[int]:
        ids = [self.BOS] if add_special else []
        prev_spelled = False
        for word in _words(line):
            tid = self._index.get(word)  # canonical words have >= 2 chars, so never hit a char token
            if tid is not None:
                ids.append(tid)
                prev_spelled = False
                continue
            if prev_spelled:
                ids.append(self.SEP)
            ids.extend(self._index.get(c, self.UNK) for c in word)
            prev_spelled = True
        if add_special:
            ids.append(self.EOS)
        return ids

    def max_encoded_length(self, lines: Iterable[str]) -> int:
        """Longest encoding (BOS and EOS included) over lines; 2 for no lines."""
        return max((len(self.encode(line)) for line in lines), default=2)

    def encode_batch(self, lines: Sequence[str], max_len: int) -> np.ndarray:
        """[N, max_len] int64 of BOS .. EOS PAD ...; a line that does not fit is an error, not a truncation."""
        out = np.full((len(lines), max_len), self.PAD, dtype=np.int64)
        for i, line in enumerate(lines):
            ids = self.encode(line)
            if len(ids) > max_len:
                raise ValueError(f"line {i} {line!r} encodes to {len(ids)} tokens, more than max_len={max_len}")
            out[i, :len(ids)] = ids
        return out

    # ---- decoding ---------------------------------------------------------------------------------
    def decode_token(self, token_id: int) -> str:
        """The token's string ("G1", "X", "<eos>"); raises for an id outside the vocabulary."""
        if not 0 <= int(token_id) < len(self._tokens):
            raise ValueError(f"token id {token_id} outside vocabulary of {len(self._tokens)}")
        return self._tokens[int(token_id)]

    def _content(self, ids: Iterable[int]) -> Iterable[int]:
        """Ids up to the first EOS, without PAD and BOS (a model may emit either anywhere)."""
        for t in ids:
            t = int(t)
            if t == self.EOS:
                return
            if t not in (self.PAD, self.BOS):
                yield t

    def decode(self, ids: Iterable[int]) -> str:
        """Canonical line text: word tokens as words, runs of char tokens glued into one word, SEP splits runs."""
        words: list[str] = []
        spelled: list[str] = []
        for t in self._content(ids):
            tok = self.decode_token(t)
            if len(tok) == 1:  # a character token
                spelled.append(tok)
                continue
            if spelled:
                words.append("".join(spelled))
                spelled = []
            if t != self.SEP:
                words.append(tok)  # a word token, or "<unk>" kept visible
        if spelled:
            words.append("".join(spelled))
        return " ".join(words)

    def tokens(self, ids: Iterable[int]) -> list[str]:
        """Readable token strings for an API response: PAD/BOS/SEP dropped, cut at EOS, "<unk>" kept."""
        return [self.decode_token(t) for t in self._content(ids) if t != self.SEP]
