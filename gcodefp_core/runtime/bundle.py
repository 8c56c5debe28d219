"""ModelBundle: everything a model carries besides its weights, and the one model.json reader/writer.

A trained model is weights plus the facts needed to use them: how raw readings become inputs (the
feature spec), how tokens become G-code (the tokenizer), the operations, the window length, the
decode limit, and, for models with a line head, the line table, the program path, the program
clock and the program tracker. Checkpoints (gcodefp_core.checkpoints) and exports (model.json) carry the same bundle, so
export, quantize, package and the runtime all read it through here: a field added to the bundle is
added in one place.

model.json = the bundle's fields + the export's description (format, variant, graph files,
signatures, parity, provenance). `read_model_json` is the only reader; `write_model_json` the only
writer (atomic: temp file, then rename).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..features import FeatureSpec
from ..fileio import write_json
from ..programs import LineTable
from ..tokenizer import GCodeTokenizer
from ..variants import VARIANTS
from .clock import ProgramClock
from .program_path import ProgramPath
from .program_tracker import ProgramTracker

FORMAT = "gcodefp-onnx"
FORMAT_VERSION = 1
REQUIRED = ("variant", "files", "features", "tokenizer", "operations", "window", "max_tokens")
ATTACHMENTS = ("line_table", "program_path", "program_clock", "program_tracker")   # optional parts, None when absent


@dataclass
class ModelBundle:
    features: FeatureSpec
    tokenizer: GCodeTokenizer
    operations: list[str]
    window: int
    max_tokens: int                          # decode limit (tokens after BOS)
    line_table: LineTable | None = None      # the line head's classes (the training runs' lines)
    program_path: ProgramPath | None = None  # snapping onto the program's tool path (positions only)
    program_clock: ProgramClock | None = None   # streaming mode, older models: the row-count clock
    program_tracker: ProgramTracker | None = None   # streaming mode: where in which program, inferred

    @classmethod
    def from_dict(cls, d: dict, where: str = "model") -> "ModelBundle":
        """From model.json or a checkpoint's fields (features, tokenizer, operations, window,
        max_tokens, and the optional attachments)."""
        missing = [k for k in ("features", "tokenizer", "operations", "window", "max_tokens") if k not in d]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        tok = {k: v for k, v in d["tokenizer"].items() if k != "vocab_size"}
        bundle = cls(FeatureSpec.from_dict(d["features"]), GCodeTokenizer.from_dict(tok), list(d["operations"]),
                   int(d["window"]), int(d["max_tokens"]),
                   LineTable.from_dict(d["line_table"]) if d.get("line_table") else None,
                   ProgramPath.from_dict(d["program_path"]) if d.get("program_path") else None,
                   ProgramClock.from_dict(d["program_clock"]) if d.get("program_clock") else None,
                   ProgramTracker.from_dict(d["program_tracker"]) if d.get("program_tracker") else None)
        spread = bundle.program_tracker.spread if bundle.program_tracker else None
        if spread is not None and spread.weights.shape[0] != len(bundle.features.continuous):
            raise ValueError(f"{where}: program_tracker.spread reads {spread.weights.shape[0]} features, the model "
                             f"{len(bundle.features.continuous)} continuous inputs")
        return bundle

    def to_dict(self) -> dict:
        tokenizer = self.tokenizer.to_dict() | {"vocab_size": self.tokenizer.vocab_size}
        return {"features": self.features.to_dict(), "tokenizer": tokenizer,
                "operations": list(self.operations), "window": self.window, "max_tokens": self.max_tokens,
                **self.attachments()}

    def attachments(self) -> dict:
        """The optional parts as plain data (None when absent): what a checkpoint and model.json store."""
        return {name: (part.to_dict() if part is not None else None)
                for name, part in ((n, getattr(self, n)) for n in ATTACHMENTS)}

    def replace(self, **changes) -> "ModelBundle":
        return dataclasses.replace(self, **changes)

    @property
    def operation_program(self) -> list[int]:
        return list(self.line_table.operation_program) if self.line_table else []


def resolve_model_json(path: str | Path) -> Path:
    """A model.json, a graph file (`<stem>.<graph>.onnx` -> `<stem>.json`) or a folder holding model.json."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.json"
    elif path.suffix == ".onnx":
        path = path.with_name(path.name.split(".")[0] + ".json")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (not an exported model: it has no model.json)")
    return path


def read_model_json(path: str | Path) -> tuple[dict, ModelBundle, Path]:
    """The one model.json reader -> (the description, its bundle, the file's path). Refuses a file
    that is not a gcodefp export, lacks a field, names an unknown variant or a missing graph file."""
    path = resolve_model_json(path)
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} model description (field 'format')")
    for key in REQUIRED:
        if key not in meta:
            raise ValueError(f"{path}: missing field {key!r}")
    if meta["variant"] not in VARIANTS:
        raise ValueError(f"{path}: field 'variant' is {meta['variant']!r}; expected one of {tuple(VARIANTS)}")
    for name, file in meta["files"].items():
        if "/" in file or "\\" in file or not (path.parent / file).is_file():
            raise FileNotFoundError(f"{path}: graph {name!r}: file {file!r} is missing beside it")
    return meta, ModelBundle.from_dict(meta, str(path)), path


def write_model_json(path: str | Path, meta: dict, bundle: ModelBundle | None = None) -> dict:
    """The one model.json writer: `meta` (the export's description) with the bundle's fields, written
    atomically. Returns what was written."""
    out = {"format": FORMAT, "format_version": FORMAT_VERSION} | dict(meta)
    if bundle is not None:
        out |= bundle.to_dict()
    write_json(path, out)
    return out
