"""Shared file helpers: atomic JSON writes and JSON reads whose errors name the file and line."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from gcodefp_core.fileio import read_json, sha256_file, write_json


def test_write_json_is_atomic_and_handles_numpy(tmp_path):
    p = tmp_path / "m.json"
    write_json(p, {"a": np.arange(3), "b": np.float32(0.5)})
    write_json(p, {"a": [1], "b": 2})  # replaces the old content in one rename
    assert read_json(p) == {"a": [1], "b": 2}
    assert [f.name for f in tmp_path.iterdir()] == ["m.json"]  # no temp file left behind
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        write_json(p, {"x": object()})
    assert read_json(p) == {"a": [1], "b": 2} and len(list(tmp_path.iterdir())) == 1


def test_read_json_errors_name_file_and_line(tmp_path):
    p = tmp_path / "cfg.json"
    p.write_text('{\n "a": 1,\n "b": \n}\n')
    with pytest.raises(ValueError, match=r"cfg.json: invalid JSON at line 4"):
        read_json(p)
    with pytest.raises(FileNotFoundError, match="config not found"):
        read_json(tmp_path / "nope.json", "config")


def test_sha256_file(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"gcode" * 1000)
    assert sha256_file(p) == hashlib.sha256(b"gcode" * 1000).hexdigest()
