"""`lower-ort`'s rewrite of gated activations of a quantized tensor into the one op ONNX Runtime runs.

Swish (SiLU), `Mul(x, Sigmoid(x))`, is what EfficientNet-style conv nets compute after almost every
Conv. In a float graph ONNX Runtime fuses it into one `com.microsoft.QuickGelu` (alpha 1); in a
quantized graph it cannot: `x` is then a dequantized activation, and each of the two readers gets
its own `DequantizeLinear` (as `lower-ort` writes QDQ, and as ONNX Runtime itself requires of a
QDQ node unit), so the pattern no longer reads one tensor. The Sigmoid and the Mul then run apart,
each behind its own dequantize: measured on a Hugging Face EfficientNet-B0 (`w8a8`, 224 x 224, 2
threads), 1.34x float32's latency with them apart, 1.05x with the one op. So a Swish whose `x` is
quantized is written as `QuickGelu(x, alpha=1)` before the QDQ lowering: one dequantize, one kernel.
`Mul(x, HardSigmoid(x))` with alpha 1/6 and beta 0.5 (hard swish as some exporters write it) becomes
the standard `HardSwish` the same way.
"""

from __future__ import annotations

import onnx_ir as ir

from qcompiler.ir.meta import CREATED_BY

HARD_SWISH_ALPHA, HARD_SWISH_BETA = 1.0 / 6.0, 0.5


def gated_activations_as_one_op(graph: ir.Graph) -> dict[str, int]:
    """Each `Mul(x, Sigmoid(x))` and `Mul(x, HardSigmoid(x))` (hard swish's constants) whose `x` is a
    static `qc.QuantizeActivation`'s output -> `com.microsoft.QuickGelu(x, alpha=1)` or `HardSwish(x)`,
    the gate dropped when nothing else reads it. Returns the count of each op written."""
    counts: dict[str, int] = {}
    for mul in list(graph):
        if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.inputs) != 2:
            continue
        for x, gate in (mul.inputs, tuple(reversed(mul.inputs))):
            written = _one_op(x, gate)
            if written is None:
                continue
            op = ir.node(written[0], [x], written[1], domain=written[2], name=mul.name, metadata_props={CREATED_BY: "lower-ort"})
            ir.convenience.replace_nodes_and_values(graph, mul, [mul], [op], [mul.outputs[0]], [op.outputs[0]])
            producer = gate.producer()
            if not gate.uses() and not gate.is_graph_output():
                graph.remove(producer, safe=True)
            counts[written[0]] = counts.get(written[0], 0) + 1
            break
    return counts


def _one_op(x: ir.Value | None, gate: ir.Value | None) -> tuple[str, dict, str] | None:
    """(op type, attributes, domain) of the one op computing `x * gate`, or None."""
    if x is None or gate is None or not _quantized(x):
        return None
    producer = gate.producer()
    if producer is None or producer.domain not in ("", "ai.onnx") or list(producer.inputs) != [x]:
        return None
    if producer.op_type == "Sigmoid":
        return "QuickGelu", {"alpha": 1.0}, "com.microsoft"
    if producer.op_type == "HardSigmoid" and _close(producer.attributes.get_float("alpha", 0.2), HARD_SWISH_ALPHA) \
            and _close(producer.attributes.get_float("beta", 0.5), HARD_SWISH_BETA):
        return "HardSwish", {}, ""
    return None


def _quantized(x: ir.Value) -> bool:
    producer = x.producer()
    return producer is not None and producer.domain == "qc" and producer.op_type == "QuantizeActivation" \
        and producer.attributes.get_string("mode", "static") == "static"


def _close(a: float, b: float) -> bool:
    return abs(float(a) - b) <= 1e-6
