"""ONNX graph rewrites around onnxruntime's quantizers (used by gcodefp_core.quantize).

Each function takes an onnx ModelProto and edits it in place (or returns it); each docstring says
which quantizer behaviour it works around and what it saves. They key on op types and graph
structure, never on node names, so they apply to every exported graph.
"""
from __future__ import annotations

import numpy as np

QUANTIZABLE_OP_TYPES = ("MatMul", "Gemm", "Conv")

def isolate_outputs(model):
    """Give every graph output its own Identity node. The fp16 converter's keep_io_types mis-types a
    graph output that other nodes also read (the decoder's h_next feeds the attention), and its
    stale value_info types trip onnxruntime's type check, so both are cleared up front."""
    import onnx

    outs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name in outs:
                    names[i] = f"{name}__inner"
    model.graph.node.extend(onnx.helper.make_node("Identity", [f"{o}__inner"], [o]) for o in sorted(outs))
    del model.graph.value_info[:]
    return model


def prepare_for_quantization(model):
    """Store every constant Gemm weight read with transB=1 pre-transposed (transB=0). The quantizer
    otherwise transposes such an initializer itself, which breaks when it is shared: by the greedy
    graph's unrolled steps (transposed once per step) or by the tied token embedding's Gather (which
    then reads the wrong rows). Also drops the exporter's value_info, whose stale shapes the
    quantizer's shape inference rejects."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    transposed: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        trans_b = next((a for a in node.attribute if a.name == "transB"), None)
        if trans_b is None or trans_b.i != 1:
            continue
        name = node.input[1]
        if name not in transposed:
            weight = numpy_helper.to_array(inits[name])
            transposed[name] = f"{name}__T"
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), transposed[name]))
        node.input[1] = transposed[name]
        trans_b.i = 0
    # A Gather of a weight that now also exists transposed (the tied token embedding) reads the
    # transposed copy along axis 1 and transposes back: one int8 table instead of two (for QDQ once
    # _dequantize_gathered_rows has made the Gather read the int8 table itself).
    for node in [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in transposed
                 and not any(a.name == "axis" and a.i for a in n.attribute)]:
        out, name = node.output[0], node.name or node.output[0]
        gather = onnx.helper.make_node("Gather", [transposed[node.input[0]], node.input[1]], [f"{out}__DxB"], axis=1,
                                       name=name)
        replace_node(model, node, [gather, onnx.helper.make_node("Transpose", [f"{out}__DxB"], [out], perm=[1, 0],
                                                                  name=f"{name}_T")])
    prune(model)
    del model.graph.value_info[:]
    return model


def prune(model) -> None:
    """Drop nodes whose outputs nobody reads (repeatedly), then unread initializers."""
    graph = model.graph
    while True:
        read = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not read & set(n.output)]
        for node in dead:
            graph.node.remove(node)
        if not dead:
            break
    keep = [i for i in graph.initializer if i.name in read]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def replace_node(model, node, new: list) -> None:
    """Put the `new` nodes in `node`'s place: the node list stays topologically sorted."""
    i = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    for k, n in enumerate(new):
        model.graph.node.insert(i + k, n)


def split_gemm_bias(model) -> None:
    """Gemm(A, W, b) -> MatMul(A, W) + b. Quantized, a Gemm's bias becomes int32 (at scale input x
    weight scale) plus per-channel scales and zero points: three vocabulary-sized arrays per call
    site, six sites in the unrolled greedy graph. The Add keeps one float bias; ORT runs QLinearMatMul."""
    from onnx import helper

    for node in [n for n in model.graph.node if n.op_type == "Gemm" and len(n.input) == 3]:
        if any(a.name in ("transA", "transB") and a.i or a.name in ("alpha", "beta") and a.f != 1
               for a in node.attribute):
            continue  # _prepare_for_quantization has stored constant weights untransposed
        out, name = node.output[0], node.name or node.output[0]
        replace_node(model, node, [helper.make_node("MatMul", node.input[:2], [f"{out}__mm"], name=name),
                                    helper.make_node("Add", [f"{out}__mm", node.input[2]], [out], name=f"{name}_bias")])


def periodic_nodes(model) -> set[str]:
    """Quantizable nodes whose output reaches Sin/Cos through constant scalings/shifts only (Fourier
    features of positions): sin(2*pi*f*x) turns the rounding of x*f into phase noise. Quantized, the
    one such MatMul cost 1.9 (static) and 0.8 (dynamic) points of greedy token accuracy; its weight
    is tiny, it stays float in both int8 variants."""
    inits, readers = {i.name for i in model.graph.initializer}, {}
    for node in model.graph.node:
        for x in node.input:
            readers.setdefault(x, []).append(node)

    def periodic(t):
        return any(r.op_type in ("Sin", "Cos") or r.op_type in ("Mul", "Div", "Add", "Sub")
                   and all(x == t or x in inits for x in r.input) and periodic(r.output[0]) for r in readers.get(t, []))
    return {n.name for n in model.graph.node if n.op_type in QUANTIZABLE_OP_TYPES and periodic(n.output[0])}


def int8_weights_only(model, names: set[str]) -> None:
    """The named nodes, kept float by the static quantizer, get their weight stored as int8 per output
    channel + DequantizeLinear: 4x smaller, activations untouched; ORT fuses it into MatMulNBits. (The
    input projection: 148 kB saved over three graphs, 1.8% of fp32, no accuracy change measured.)"""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in [n for n in model.graph.node if n.name in names and n.input[1:] and n.input[1] in inits]:
        w, name = numpy_helper.to_array(inits[node.input[1]]), f"{node.input[1]}__int8"
        if w.dtype == np.float32 and w.ndim >= 2 and name not in inits:
            axis = 0 if node.op_type == "Conv" else w.ndim - 1
            rest = tuple(i for i in range(w.ndim) if i != axis)
            scale = np.maximum(np.abs(w).max(axis=rest) / 127, 1e-30).astype(np.float32)
            inits[name] = numpy_helper.from_array(np.round(w / np.expand_dims(scale, rest)).astype(np.int8), name)
            model.graph.initializer.extend([inits[name], numpy_helper.from_array(scale, f"{name}_scale")])
            model.graph.node.insert(0, helper.make_node("DequantizeLinear", [name, f"{name}_scale"], [f"{name}_dq"],
                                                        axis=axis, name=f"{name}_dq"))
        if name in inits:
            node.input[1] = f"{name}_dq"


def dequantize_gathered_rows(model) -> None:
    """Gather(DequantizeLinear(int8 table)) -> dequantize the gathered slices only. The tied token
    embedding's Gather then reads the output projection's int8 table instead of a float copy (half of
    the former int8 static size), and a decoder step does not dequantize the whole table (10x slower
    steps). Handles symmetric per-channel scales along the gathered axis when it is the last one (the
    transposed table's layout); other Gathers keep reading the dequantized table."""
    from onnx import helper, numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in [n for n in model.graph.node if n.op_type == "Gather"]:
        dq = producer.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or not all(x in inits for x in dq.input):
            continue
        q, scale, zero = inits[dq.input[0]], inits[dq.input[1]], inits[dq.input[2]] if dq.input[2:] else 0
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % q.ndim
        dq_axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % q.ndim
        rows, out = f"{node.output[0]}__int8", node.output[0]
        if dq_axis == axis == q.ndim - 1 and scale.ndim == 1 and not np.any(zero):  # scales broadcast over the rows
            replace_node(model, node, [
                helper.make_node("Gather", [dq.input[0], node.input[1]], [rows], axis=axis, name=rows),
                helper.make_node("Gather", [dq.input[1], node.input[1]], [f"{rows}_scale"], name=f"{rows}_scale"),
                helper.make_node("Cast", [rows], [f"{rows}_float"], to=helper.np_dtype_to_tensor_dtype(scale.dtype),
                                 name=f"{rows}_float"),
                helper.make_node("Mul", [f"{rows}_float", f"{rows}_scale"], [out], name=f"{rows}_mul")])
