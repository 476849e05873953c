"""Where int8 activations pay in ONNX Runtime: which layers its CPU provider runs as integer kernels.

A quantized activation costs a `QuantizeLinear` and a `DequantizeLinear` pass over the tensor; it
pays only when the layer reading it runs as an integer kernel. ONNX Runtime (1.2x-1.3x, CPU,
checked on its optimized graphs) makes one of a QDQ group when:

- `DQ(x) -> MatMul <- DQ(W)`: always (`MatMulIntegerToFloat`; `lower-ort` writes that op itself
  when an `Add` of a constant bias follows, the bias of any shape that broadcasts as a row);
- `DQ(x) -> Conv <- DQ(W)` (a float bias is fine): only when the Conv's output, or the output of a
  `Relu` that alone reads it, goes to a single `QuantizeLinear` (`QLinearConv`). Without it the
  Conv runs in float behind a dequantize: slower than no quantization at all.

`integer_layers` decides it for `quantize` before any node is written (which layer inputs to
quantize: the greatest set of them in which each one makes an integer kernel);
`census` counts what a lowered graph will run (`lower-ort`'s statistics and slowdown warning).
"""

from __future__ import annotations

import onnx_ir as ir

PASS_THROUGH = frozenset({"Relu"})  # ops between a Conv and its output Q that ONNX Runtime folds into QLinearConv


def _is(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def conv_output(graph: ir.Graph, conv: ir.Node) -> ir.Value:
    """The tensor an integer Conv's output Q would read: its output, or that of a `Relu` that alone reads it."""
    out = conv.outputs[0]
    uses = list(out.uses())
    if len(uses) == 1 and uses[0].node.op_type in PASS_THROUGH and uses[0].node.domain in ("", "ai.onnx") and out not in graph.outputs:
        return uses[0].node.outputs[0]
    return out


def integer_layers(graph: ir.Graph, layers: list[ir.Node], static: bool) -> dict[int, str]:
    """For `layers` (MatMul and Conv nodes that would read a quantized activation): the ids of those
    whose activation is better left in float, each with the reason.

    A quantized tensor pays when it makes an integer kernel: a MatMul reads it; or a Conv reads it
    whose own output is quantized too; or it is the output of a Conv whose input is quantized (the
    quantize that makes that Conv a `QLinearConv`), and only quantized layers read it. Starting from
    every layer input, tensors that pay for nothing are dropped until the rest all pay (the greatest
    such set); the layers reading a dropped tensor stay in float. A Conv runs in float with a
    run-time (dynamic) scale, so only MatMuls then pay."""
    readers: dict[int, list[ir.Node]] = {}
    values: dict[int, ir.Value] = {}
    for node in layers:
        readers.setdefault(id(node.inputs[0]), []).append(node)
        values[id(node.inputs[0])] = node.inputs[0]
    layer_ids = {id(n) for n in layers}
    quantized = set(readers)

    def quantizable(value: ir.Value) -> bool:  # every reader reads it through the one QuantizeLinear
        return value not in graph.outputs and all(u.idx == 0 and id(u.node) in layer_ids for u in value.uses())

    def integer_conv(conv: ir.Node) -> bool:
        out = conv_output(graph, conv)
        return static and id(conv.inputs[0]) in quantized and id(out) in quantized and quantizable(out)

    def pays(key: int) -> bool:
        value = values[key]
        if any(_is(n, "MatMul") or (_is(n, "Conv") and integer_conv(n)) for n in readers[key]):
            return True
        producer = value.producer()
        if producer is not None and _is(producer, "Relu") and producer.inputs[0] is not None:
            producer = producer.inputs[0].producer()
        return producer is not None and _is(producer, "Conv") and conv_output(graph, producer) is value and integer_conv(producer)

    changed = True
    while changed:
        changed = False
        for key in sorted(quantized, key=lambda k: values[k].name or ""):
            if not pays(key):
                quantized.discard(key)
                changed = True
    floats: dict[int, str] = {}
    for node in layers:
        if id(node.inputs[0]) in quantized:
            continue
        floats[id(node)] = _float_reason(graph, node, static)
    return floats


def _float_reason(graph: ir.Graph, conv: ir.Node, static: bool) -> str:
    if not static:
        return "a Conv with a run-time (dynamic) activation scale has no integer kernel in ONNX Runtime"
    out = conv_output(graph, conv)
    if out in graph.outputs:
        why = "its output is a graph output"
    else:
        other = next((u.node for u in out.uses() if u.idx != 0 or u.node.op_type not in ("Conv", "MatMul")), None)
        why = (f"its output is read by {other.op_type} '{other.name or other.outputs[0].name}'" if other is not None
               else "its output feeds no layer that runs integer")
    return (f"ONNX Runtime would run this Conv in float ({why}, so no QLinearConv), and its input feeds no other "
            "integer kernel: quantizing it would only add a quantize and a dequantize")


def census(graph: ir.Graph) -> dict[str, object]:
    """What ONNX Runtime will run of a lowered graph: integer kernels, and layers that read a
    dequantized activation but run in float (each a wasted quantize and dequantize)."""
    integer, wasted = 0, []
    for node in graph:
        domain = "" if node.domain == "ai.onnx" else node.domain
        if (domain, node.op_type) == ("com.microsoft", "MatMulIntegerToFloat") or (domain, node.op_type) in (("", "QLinearConv"), ("", "QLinearMatMul")):
            integer += 1
            continue
        if domain or node.op_type not in ("MatMul", "Conv") or not node.inputs or node.inputs[0] is None:
            continue
        x = node.inputs[0].producer()
        if not _is(x, "DequantizeLinear") or x.inputs[0] is None or x.inputs[0].const_value is not None:
            continue
        if node.op_type == "MatMul" or _output_quantized(graph, node):
            integer += 1
        else:
            wasted.append(node.name or node.outputs[0].name)
    return {"integer_kernels": integer, "float_kernels_behind_qdq": len(wasted), "float_kernels_behind_qdq_names": wasted[:8]}


def _output_quantized(graph: ir.Graph, conv: ir.Node) -> bool:
    out = conv_output(graph, conv)
    uses = list(out.uses())
    return out not in graph.outputs and len(uses) == 1 and _is(uses[0].node, "QuantizeLinear")


def predicted_slower(counts: dict) -> bool:
    """Slower than float: quantized activations that feed float kernels at least as many as
    integer kernels (each wasted pair is two passes over a tensor; an integer kernel saves about one)."""
    wasted = counts["float_kernels_behind_qdq"]
    return wasted > 0 and wasted >= counts["integer_kernels"]
