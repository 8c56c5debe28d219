"""Client tokens for the data endpoints (GCODEFP_API_TOKENS_FILE; off without it).

Why: /stream says what a machine is executing from the rows it is sent. On an open port anyone can
post rows under a machine's id, moving that machine's tracker, or read its state: for a monitor that
exists to catch a lying controller, that is the spoof it is meant to catch. With a tokens file, the
endpoints that take sensor data or reveal a machine's state (/predict, /batch_predict, /fingerprint,
/stream/*, /v2/.../infer) need `Authorization: Bearer <token>`, and a token may be limited to some
machines, so one monitor's token cannot feed another line's machines. Probes, scrapes and metadata
(/health, /ready, /info, /metrics, /docs, /openapi.json, the v2 health and metadata) stay open: load
balancers, Prometheus and the redeploy sensor call them without one. POST /admin/reload keeps its own
token (GCODEFP_ADMIN_TOKEN): a client token never reloads the model.

The file, one token per line (`#` starts a comment):

    line3-monitor  sha256:<64 hex digits>  mill-3*,lathe-07  expires=2027-03-01
    analyst        sha256:<64 hex digits>

name, the SHA-256 of the token, and optionally the machine ids it may stream (comma-separated globs;
none: every machine) and the day it stops being accepted (from 00:00 UTC; none: never), so that a
token left on a shop-floor PC does not work forever. The file holds digests, never tokens, so reading it does not let anyone call
the server. `gcodefp token add NAME` appends a line and prints the new token once.

Rotation needs no restart: each worker looks at the file at most once a second and re-reads it when
it changed. A file that no longer parses (or is gone) keeps the last good tokens and logs
`api_tokens_invalid`: a typo must neither lock every monitor out nor open the server.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import date, datetime, timezone
from fnmatch import fnmatchcase
from pathlib import Path

from gcodefp_core.fileio import write_atomic

log = logging.getLogger("api.auth")
NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
GLOB_RE = re.compile(r"^[A-Za-z0-9._:*?\[\]!-]{1,64}$")
DATA_PATHS = frozenset({"/predict", "/batch_predict", "/fingerprint"})
STREAM_PREFIX = "/stream/"
RECHECK_S = 1.0


def protected(path: str) -> bool:
    """Does this path take sensor data or show a machine's state (and so need a token)?"""
    return (path in DATA_PATHS or path.startswith(STREAM_PREFIX)
            or (path.startswith("/v2/") and path.endswith("/infer")))


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Token:
    name: str
    machines: tuple[str, ...] = ()   # globs; empty: every machine
    expires: date | None = None      # refused from this day on (UTC)

    def may_stream(self, machine_id: str) -> bool:
        return not self.machines or any(fnmatchcase(machine_id, g) for g in self.machines)


@dataclass(frozen=True)
class Refusal:
    reason: str    # missing, invalid, expired, or machine (a token whose machines do not include this one)
    message: str


def _day(text: str, where: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{where}: expires={text!r}: expected a day, YYYY-MM-DD") from None


def parse(text: str, source: str) -> dict[str, Token]:
    """The file's text -> {hex digest: Token}; ValueError naming source:line for a bad line."""
    table: dict[str, Token] = {}
    names: set[str] = set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        where = f"{source}:{n}"
        expires = None
        if fields[-1].startswith("expires="):
            expires = _day(fields.pop()[len("expires="):], where)
        if len(fields) not in (2, 3):
            raise ValueError(f"{where}: expected 'NAME sha256:HEX [MACHINE_GLOBS] [expires=YYYY-MM-DD]', "
                             f"got {len(fields)} fields before the expiry")
        name, hashed = fields[0], fields[1]
        if not NAME_RE.match(name):
            raise ValueError(f"{where}: name {name!r}: 1-64 of A-Z a-z 0-9 . _ -")
        if name in names:
            raise ValueError(f"{where}: name {name!r} is already used on an earlier line")
        m = DIGEST_RE.match(hashed)
        if not m:
            raise ValueError(f"{where}: {hashed[:20]!r}...: expected sha256: and 64 lower-case hex digits "
                             "(the file holds the token's digest, not the token: use `gcodefp token add`)")
        if m.group(1) in table:
            raise ValueError(f"{where}: the same token as {table[m.group(1)].name!r}")
        globs = tuple(g for g in fields[2].split(",") if g) if len(fields) == 3 else ()
        for g in globs:
            if not GLOB_RE.match(g):
                raise ValueError(f"{where}: machine glob {g!r}: machine id characters and * ? [ ] only")
        names.add(name)
        table[m.group(1)] = Token(name, globs, expires)
    return table


class TokenTable:
    """The tokens of one file, re-read when the file changes (at most one stat a second)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._stamp = self._stat()
        if self._stamp is None:
            raise ValueError(f"GCODEFP_API_TOKENS_FILE: no such file: {self.path}")
        self.tokens = parse(self.path.read_text(), str(self.path))
        self._checked = time.monotonic()
        if not self.tokens:
            log.warning("GCODEFP_API_TOKENS_FILE %s has no tokens: every data request will be refused", self.path,
                        extra={"event": "api_tokens_empty"})

    def _stat(self):
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < RECHECK_S:
            return
        self._checked = now
        stamp = self._stat()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            if stamp is None:
                raise ValueError(f"{self.path}: the file is gone")
            self.tokens = parse(self.path.read_text(), str(self.path))
        except (OSError, ValueError) as exc:
            log.error("API tokens file not reloaded, the last good tokens stay: %s", exc,
                      extra={"event": "api_tokens_invalid"})
            return
        log.info("API tokens reloaded: %d tokens", len(self.tokens), extra={"event": "api_tokens_reloaded"})

    def check(self, authorization: str | None, path: str) -> Token | Refusal:
        """The token this request may go on with, or why not."""
        self._refresh()
        if not authorization:
            return Refusal("missing", "this endpoint needs a token: send the header 'Authorization: Bearer <token>' "
                                      "(this server reads its tokens from GCODEFP_API_TOKENS_FILE)")
        scheme, _, value = authorization.strip().partition(" ")
        # A dict lookup by digest can leak timing about digests, never about tokens.
        token = self.tokens.get(digest(value.strip())) if scheme.lower() == "bearer" else None
        if token is None:
            return Refusal("invalid", "the Authorization header's bearer token is not one this server accepts")
        if token.expires is not None and datetime.now(timezone.utc).date() >= token.expires:
            return Refusal("expired", f"token {token.name!r} expired on {token.expires.isoformat()}: ask for a new one")
        if path.startswith(STREAM_PREFIX) and not token.may_stream(path[len(STREAM_PREFIX):]):
            return Refusal("machine", f"token {token.name!r} may not stream machine {path[len(STREAM_PREFIX):]!r} "
                                      f"(its machines: {','.join(token.machines)})")
        return token


def from_settings(path: str | None) -> TokenTable | None:
    return TokenTable(path) if path else None


# ---- writing the file (gcodefp token) ------------------------------------------------------------
def _write(path: Path, text: str) -> None:
    """Temp file then rename (a worker never reads half a file), readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text, mode=0o600)


def add(path: Path, name: str, machines: list[str] | None = None, expires: date | None = None) -> str:
    """Append a new token for `name` to the file (created if absent) -> the token, shown only now."""
    if not NAME_RE.match(name):
        raise ValueError(f"token name {name!r}: 1-64 of A-Z a-z 0-9 . _ -")
    for g in machines or ():
        if not GLOB_RE.match(g):
            raise ValueError(f"--machines {g!r}: machine id characters and * ? [ ] only")
    if expires is not None and expires <= datetime.now(timezone.utc).date():
        raise ValueError(f"--expires {expires.isoformat()}: must be a day after today (UTC)")
    text = path.read_text() if path.exists() else ""
    token = secrets.token_urlsafe(32)
    line = (f"{name}  sha256:{digest(token)}" + (f"  {','.join(machines)}" if machines else "")
            + (f"  expires={expires.isoformat()}" if expires else ""))
    new = text + ("" if not text or text.endswith("\n") else "\n") + line + "\n"
    parse(new, str(path))   # refuses a name already there (or a file broken by hand) before writing
    _write(path, new)
    return token


def revoke(path: Path, name: str) -> None:
    """Remove `name`'s line; KeyError when there is none."""
    if not path.exists():
        raise FileNotFoundError(f"no such tokens file: {path}")
    lines = path.read_text().splitlines(keepends=True)
    keep = [ln for ln in lines if ln.split("#", 1)[0].split()[:1] != [name]]
    if len(keep) == len(lines):
        raise KeyError(f"{path}: no token named {name!r}")
    _write(path, "".join(keep))


def listing(path: Path) -> list[Token]:
    if not path.exists():
        raise FileNotFoundError(f"no such tokens file: {path}")
    return list(parse(path.read_text(), str(path)).values())
