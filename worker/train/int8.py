"""Static int8 in the operator form onnxruntime runs fastest: each weight matrix product becomes
one `QuantizeLinear` with a fixed (calibrated) scale and one `MatMulIntegerToFloat` (int8 GEMM,
dequantization and bias in one kernel), and the embedding tables are gathered as int8 and
dequantized after the lookup.

Why not onnxruntime's `quantize_static`: its QDQ graph runs as `QuantizeLinear -> QLinearMatMul ->
DequantizeLinear -> Add` (four kernels, each a pass over the activations), which on short queries
cost what the dynamic export's per-call range pass cost, and more (bench/NOTES.md §9). Here every
activation has one quantization pass, shared by the products that read it (Q, K and V read the
same tensor), and the GEMM's epilogue does the rest; the dynamic export's `DynamicQuantizeMatMul`
spends a range pass on top of that.

Why it is batch-independent: the scales are constants, the GEMM accumulates in int32 (exact, in
any order), and the epilogue multiplies each element by the same two scales and adds the same
bias; a text's row does not see its neighbours. The products of two activations (attention
scores and context) stay in fp32: they are small for queries, and quantizing a softmax output to
1/255 steps loses decisions for nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class WeightProduct:
    """A MatMul whose second input is a weight matrix, with the bias Add that follows it (if any)."""

    node: str
    activation: str
    weight: str
    bias: str | None
    #: The tensor downstream nodes read: the Add's output when the bias is folded in.
    output: str


def weight_products(model: onnx.ModelProto) -> list[WeightProduct]:
    """Every activation-by-weight MatMul of the graph, in graph order."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    found = []
    for n in graph.node:
        if n.op_type != "MatMul" or n.input[1] not in inits or len(inits[n.input[1]].dims) != 2:
            continue
        columns = inits[n.input[1]].dims[1]
        bias, output = None, n.output[0]
        users = consumers[n.output[0]]
        if len(users) == 1 and users[0].op_type == "Add":
            other = [i for i in users[0].input if i != n.output[0]]
            if len(other) == 1 and other[0] in inits and list(inits[other[0]].dims) == [columns]:
                bias, output = other[0], users[0].output[0]
        found.append(WeightProduct(n.name, n.input[0], n.input[1], bias, output))
    return found


def uint8_scale(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """Scale and zero point that map [lo, hi] (stretched to include 0) onto 0..255."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((hi - lo) / 255.0 if hi > lo else 1.0)
    zero = np.uint8(np.clip(round(-lo / float(scale)), 0, 255))
    return scale, zero


def int8_weight(w: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weights (zero point 0), one scale per output column or one in all."""
    peak = np.abs(w).max(axis=0) if per_channel else np.array(np.abs(w).max())
    scale = (np.maximum(peak, 1e-12) / 127.0).astype(np.float32)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return q, scale


def rewrite(
    model: onnx.ModelProto,
    ranges: Mapping[str, tuple[float, float]],
    *,
    keep_fp32: Iterable[str] = (),
    per_channel: bool = True,
    embeddings: bool = True,
) -> onnx.ModelProto:
    """A copy of `model` with its weight products (all but `keep_fp32`, by node name) in int8,
    the activations quantized with the calibrated `ranges` (tensor name -> (min, max))."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    keep = set(keep_fp32)
    products = {p.node: p for p in weight_products(out) if p.node not in keep}
    folded_adds = {p.output for p in products.values() if p.bias}
    quantized: dict[str, str] = {}  # activation -> its uint8 tensor, one QuantizeLinear each
    new_inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    for n in graph.node:
        if n.name in products:
            p = products[n.name]
            if p.activation not in quantized:
                scale, zero = uint8_scale(*ranges[p.activation])
                quantized[p.activation] = f"{p.activation}_u8"
                new_inits += [
                    numpy_helper.from_array(np.array(scale), f"{p.activation}_scale"),
                    numpy_helper.from_array(np.array(zero), f"{p.activation}_zero"),
                ]
                nodes.append(
                    helper.make_node(
                        "QuantizeLinear",
                        [p.activation, f"{p.activation}_scale", f"{p.activation}_zero"],
                        [quantized[p.activation]],
                        name=f"{p.node}_quantize_input",
                    )
                )
            w_q, w_scale = int8_weight(numpy_helper.to_array(inits[p.weight]), per_channel)
            zero_w = np.zeros(w_scale.shape, dtype=np.int8)
            new_inits += [
                numpy_helper.from_array(w_q, f"{p.weight}_int8"),
                numpy_helper.from_array(w_scale, f"{p.weight}_scale"),
                numpy_helper.from_array(zero_w, f"{p.weight}_zero"),
            ]
            inputs = [
                quantized[p.activation],
                f"{p.weight}_int8",
                f"{p.activation}_scale",
                f"{p.weight}_scale",
                f"{p.activation}_zero",
                f"{p.weight}_zero",
            ] + ([p.bias] if p.bias else [])
            nodes.append(helper.make_node("MatMulIntegerToFloat", inputs, [p.output], name=p.node, domain=MS_DOMAIN))
        elif n.op_type == "Add" and n.output[0] in folded_adds:
            continue
        elif embeddings and n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2:
            nodes += _int8_gather(n, numpy_helper.to_array(inits[n.input[0]]), new_inits)
        else:
            nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept_inits = [i for i in graph.initializer if i.name in used] + [i for i in new_inits if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    if not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return out


def _int8_gather(n: onnx.NodeProto, table: np.ndarray, new_inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """Look rows up in an int8 copy of the table, then dequantize just those rows: the tables are
    most of the model's bytes, and dequantizing the whole table per call would cost more than the
    lookup. One scale per table (rows of an embedding table share a range)."""
    q, scale = int8_weight(table.reshape(-1, 1), per_channel=False)
    name = n.input[0]
    new_inits += [
        numpy_helper.from_array(q.reshape(table.shape), f"{name}_int8"),
        numpy_helper.from_array(scale.reshape(()), f"{name}_scale"),
        numpy_helper.from_array(np.array(np.int8(0)), f"{name}_zero"),
    ]
    looked_up = f"{n.output[0]}_int8"
    return [
        helper.make_node("Gather", [f"{name}_int8", n.input[1]], [looked_up], name=n.name, axis=_axis(n)),
        helper.make_node(
            "DequantizeLinear",
            [looked_up, f"{name}_scale", f"{name}_zero"],
            [n.output[0]],
            name=f"{n.name}_dequantize",
        ),
    ]


def _axis(n: onnx.NodeProto) -> int:
    return next((a.i for a in n.attribute if a.name == "axis"), 0)


def calibrate(model: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]]) -> dict[str, tuple[float, float]]:
    """Min and max of every weight product's input over `batches` of training texts (fp32 graph)."""
    import onnxruntime as ort

    watched = sorted({p.activation for p in weight_products(model)})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in watched if t not in known
    )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    lo = dict.fromkeys(watched, np.inf)
    hi = dict.fromkeys(watched, -np.inf)
    for feeds in batches:
        for name, value in zip(watched, session.run(watched, feeds), strict=True):
            lo[name] = min(lo[name], float(value.min()))
            hi[name] = max(hi[name], float(value.max()))
    return {t: (lo[t], hi[t]) for t in watched}
