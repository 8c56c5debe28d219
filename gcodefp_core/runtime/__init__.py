"""The serving runtime: numpy + onnxruntime only, never torch or training code.

- bundle.py        ModelBundle (what a model carries besides weights) and the model.json reader/writer
- predictor.py     OnnxPredictor: window arrays -> line, operation, confidences, fingerprint
- decoding.py      greedy / beam / sampling over a decoder step (also used by the PyTorch side)
- program_path.py  snapping a window's last position onto its program's tool path
- program_tracker.py  streaming mode: where in which program a machine is (a forward filter; no row counter)
- tracker_session.py, tracked_stream.py  one machine's filter state; what a followed machine's rows answer
- operation_templates.py, operation_spread.py  the tracker's operation evidence from a window's readings
- clock.py         streaming mode of older models: the row-count program clock and its per-machine tracker
- windows.py       cutting a machine's stream of rows into windows, running them in batches

import-linter holds this by contract (pyproject.toml, [tool.importlinter]).
"""
from .bundle import (
           FORMAT,
           ModelBundle,
           read_model_json,
           resolve_model_json,
           write_model_json,
)
from .predictor import METHODS, OnnxPredictor, session_options

__all__ = ["FORMAT", "METHODS", "ModelBundle", "OnnxPredictor", "read_model_json", "resolve_model_json",
           "session_options", "write_model_json"]
