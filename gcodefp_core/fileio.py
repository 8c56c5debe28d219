"""Small file helpers shared by every stage: atomic JSON writes, JSON reads with clear errors, sha256.

Atomic = write a temporary file beside the target, then rename over it: a crash never leaves a
half-written manifest, model.json or metrics file behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np


def write_atomic(path: Path | str, data: str | bytes, mode: int | None = None) -> None:
    """mode: the file's permissions (e.g. 0o600), set before it takes the name (default: the umask's)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.time_ns()}")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: Path | str, obj) -> None:
    """Write `obj` as indented JSON, atomically (numpy arrays and scalars become lists and numbers)."""
    write_atomic(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def read_json(path: Path | str, what: str = "file"):
    """Read a JSON file; a missing file or invalid JSON raises an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_known_fields(d: dict, cls, section: str) -> None:
    """A config section may only name fields of the dataclass `cls` (typos fail, naming the field)."""
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{section} config: unknown field(s) {unknown}; known: {sorted(known)}")
