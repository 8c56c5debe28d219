"""Small fake artifacts shared by tests that only move, checksum or promote them."""
from __future__ import annotations

import json

from gcodefp_core.tokenizer import GCodeTokenizer


def fake_export(folder, variant="int8_dynamic"):
    """An exported-model folder as package.py sees it: model.json naming its graph files (package.py
    only copies and checksums them, so the graph bytes need not be real ONNX here)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"encoder": "m.encoder.onnx", "decoder": "m.decoder.onnx", "encoder_only": "m.encoder_only.onnx"}
    for i, name in enumerate(files.values()):
        (folder / name).write_bytes(bytes([i]) * (100 + i))
    (folder / "unrelated.onnx").write_bytes(b"not referenced")
    meta = {"format": "gcodefp-onnx", "variant": variant, "files": files, "window": 4, "max_tokens": 7,
            "features": {"feature_set": "full", "continuous": ["posx", "spindle"], "categorical": ["stat", "unit"],
                         "mean": [1.5, 2.0], "std": [1.0, 1.0],
                         "categorical_maps": {"stat": {"5": 1, "4": 2}, "unit": {"0": 1, "1": 2}}, "clip": 8.0},
            "tokenizer": GCodeTokenizer.build(["G1 X1"]).to_dict(), "operations": ["face", "pocket"],
            "metrics": {"test_line_accuracy": 0.5}}
    (folder / "model.json").write_text(json.dumps(meta))
    return folder
