"""The model variants: the one place that names them.

A variant is a set of ONNX graphs plus its own model.json ("variant": NAME). Everything that lists
variants reads this registry: the CLI's --method choices, quantization, the runtime's session
options, the benchmark's columns, the Dagster variant assets and their accuracy checks, and the
package builder's choice of what ships.

Adding a quantization method: one `Variant` entry here, plus its graph function in
gcodefp_core.quantize (named by `builder`). Plain data, no imports beyond the standard library, so
the serving runtime and the orchestrator can read it without onnx, torch or Dagster.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str                 # model.json "variant", folder and asset suffix (model_<name>)
    method: str | None        # `gcodefp quantize --method` choice; None: the export itself
    label: str                # benchmark column
    builder: str | None       # function in gcodefp_core.quantize that writes one graph; None: exported
    max_drop_points: float | None   # served-answer accuracy it may lose against fp32 (points); None: reference
    calibrated: bool = False        # needs calibration windows from the training split
    max_size_ratio: float | None = None   # its graphs' size against fp32's, at most
    full_graph_optimization: bool = True   # ORT_ENABLE_ALL; False: EXTENDED (the NCHWc layout pass
    #                                        has crashed fp16 graphs at session creation)
    description: str = ""


REFERENCE = "fp32"

VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant(REFERENCE, None, "onnx_fp32", None, None,
            description="the exported graphs, float32: the reference every other variant is judged against"),
    Variant("fp16", "fp16", "onnx_fp16", "fp16_graph", 0.1, full_graph_optimization=False,
            description="float16 weights and activations, float32 inputs/outputs; a size artifact on CPUs"),
    Variant("int8_dynamic", "int8", "int8_dynamic", "int8_dynamic_graph", 0.5, max_size_ratio=0.30,
            description="int8 weights, activations quantized per call: the smallest, slower at batch 1"),
    Variant("int8_static", "int8-static", "int8_static", "int8_static_graph", 0.5, calibrated=True, max_size_ratio=0.30,
            description="int8 QDQ with calibrated activation ranges: about fp32's latency at 28% of its size"),
)}

QUANTIZED = tuple(name for name in VARIANTS if VARIANTS[name].builder)   # what quantization builds
METHODS = {v.method: v.name for v in VARIANTS.values() if v.method}     # CLI choice -> variant
LABELS = {v.name: v.label for v in VARIANTS.values()}


def get(name: str) -> Variant:
    """A variant by its name or its CLI method (`int8-static` -> int8_static); a clear error otherwise."""
    name = METHODS.get(name, name)
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)} "
                         f"(or methods {', '.join(METHODS)})")
    return VARIANTS[name]
