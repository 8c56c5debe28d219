"""Retried /stream chunks (the Idempotency-Key header): answered again, applied once.

A monitor whose connection drops after it sent a chunk cannot tell whether the server applied it.
Sent again, the rows would count twice: the tracker would see the machine go back and repeat them.
With an Idempotency-Key header (the IETF httpapi draft's name) a session remembers its last keyed
chunk: the same key with the same body gets the same answer again, byte for byte, without the rows
being applied; the same key with another body is refused. One chunk is remembered: a monitor posts a
machine's chunks one after another, so a retry is of the last one. The handoff between workers and
the restart state carry it (api/stream_state.py), so the retry may reach any worker.
"""
from __future__ import annotations

import hashlib
import re

from . import inputs, metrics

KEY_RE = re.compile(r"^[\x21-\x7e]{1,128}$")   # visible ASCII, no spaces
REPLAYED_HEADERS = {"idempotent-replayed": "true"}


def check_key(key: str) -> str:
    if not KEY_RE.match(key):
        raise inputs.InputError("idempotency-key", "must be 1-128 visible ASCII characters (no spaces)",
                                location="header")
    return key


def _digest(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=16).digest()


def replayed(session, key: str, body: bytes) -> bytes | None:
    """The answer already given to this chunk (same key, same body), or None when the key is new; a key
    reused for another body is refused (409: the request is valid, the session's state conflicts with
    it), since which rows to apply would be a guess."""
    if session.version is None or session.replay_key != key:
        return None
    if session.replay_digest != _digest(body):
        metrics.STREAM_REPLAYS.labels("conflict").inc()
        raise inputs.InputError("idempotency-key", f"{key!r} was already used for a chunk with other rows; "
                                                   "use a new key for each new chunk", 409, location="header")
    metrics.STREAM_REPLAYS.labels("replayed").inc()
    return session.replay_answer


def remember(session, key: str, body: bytes, answer: bytes) -> None:
    """The chunk just applied under `key` and its answer (the session's lock held)."""
    session.replay_key, session.replay_digest, session.replay_answer = key, _digest(body), answer
