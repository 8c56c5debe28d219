"""Inference options: `return_fingerprint` and `inference_config` of a JSON body, or the query
parameters of a binary one, checked field by field (errors name the field)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .inputs import METHODS, InputError, _is_number

MAX_BEAM = 16
MAX_SEED = 2**53 - 1  # exact as a JSON number in every parser (a float64 integer)
CONFIG_KEYS = {"method", "temperature", "beam_width", "max_length", "seed"}


@dataclass(frozen=True)
class Options:
    method: str | None = None          # None: the model's default ("line" when it has a line head)
    temperature: float = 1.0
    beam_width: int = 4
    max_length: int | None = None
    seed: int | None = None
    return_fingerprint: bool = False


def _is_int(v) -> bool:
    """An integer, also as JSON writes some (3.0): JSON Schema's "integer" admits both."""
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def parse_options(doc: dict, max_tokens: int) -> Options:
    """`return_fingerprint` and `inference_config` of a JSON body (or the query parameters of a binary one)."""
    rf = doc.get("return_fingerprint", False)
    if not isinstance(rf, bool):
        raise InputError("return_fingerprint", "must be true or false")
    cfg = doc.get("inference_config")
    cfg = {} if cfg is None else cfg  # null = defaults; false, 0 or [] are refused below
    if not isinstance(cfg, dict):
        raise InputError("inference_config", "must be an object")
    unknown = sorted(set(cfg) - CONFIG_KEYS)
    if unknown:
        raise InputError(f"inference_config.{unknown[0]}", f"unknown field; allowed: {', '.join(sorted(CONFIG_KEYS))}")
    method = cfg.get("method")
    if method is not None and method not in METHODS:
        raise InputError("inference_config.method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    temperature = cfg.get("temperature", 1.0)
    if not _is_number(temperature) or not 0 <= temperature <= 10:
        raise InputError("inference_config.temperature", f"must be a number in [0, 10], got {temperature!r}")
    beam_width = cfg.get("beam_width", 4)
    if not _is_int(beam_width) or not 1 <= beam_width <= MAX_BEAM:
        raise InputError("inference_config.beam_width", f"must be an integer in 1..{MAX_BEAM}, got {beam_width!r}")
    max_length = cfg.get("max_length")
    if max_length is not None and (not _is_int(max_length) or not 1 <= max_length <= max_tokens):
        raise InputError("inference_config.max_length", f"must be an integer in 1..{max_tokens}, got {max_length!r}")
    seed = cfg.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise InputError("inference_config.seed", f"must be an integer in 0..{MAX_SEED}, got {seed!r}")
    return Options(method, float(temperature), int(beam_width), None if max_length is None else int(max_length),
                   None if seed is None else int(seed), rf)


def query_options(params, max_tokens: int) -> Options:
    """Options of a binary body from query parameters (strings -> typed, then the JSON rules)."""
    known = CONFIG_KEYS | {"return_fingerprint"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise InputError(f"query.{unknown[0]}", f"unknown parameter; allowed: {', '.join(sorted(known))}")
    cfg: dict = {}
    for key, cast in (("method", str), ("temperature", float), ("beam_width", int), ("max_length", int),
                      ("seed", int)):
        if key in params:
            try:
                cfg[key] = cast(params[key])
            except ValueError:
                raise InputError(f"query.{key}", f"cannot read {params[key]!r} as {cast.__name__}") from None
    rf = params.get("return_fingerprint", "false").lower()
    if rf not in ("true", "false", "1", "0"):
        raise InputError("query.return_fingerprint", f"must be true or false, got {rf!r}")
    if isinstance(cfg.get("temperature"), float) and not math.isfinite(cfg["temperature"]):
        raise InputError("query.temperature", "must be finite")
    return parse_options({"inference_config": cfg, "return_fingerprint": rf in ("true", "1")}, max_tokens)
