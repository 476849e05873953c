"""`lower-ort`'s rewrites of QDQ linears into the integer kernels ONNX Runtime runs fastest:
`MatMulIntegerToFloat` with the bias (or the per-token row scale) inside, uint8 weights where
u8 x s8 kernels saturate."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.ir.layers import drop_unread, new_initializer
from qcompiler.ir.meta import CREATED_BY


def fuse_integer_bias(graph: ir.Graph) -> int:
    """`Add(MatMul(DQ(x_q: u8), DQ(W_q: int8, per column)), b)` -> `MatMulIntegerToFloat`; x_q
    static (constant scale and zero point) or dynamic (both from `DynamicQuantizeLinear`)."""
    count = 0
    rows: dict[int, ir.Value] = {}  # id(bias of shape [1, .., 1, N]) -> the same numbers as [N]
    for add in list(graph):
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
            continue
        for index in (0, 1):
            matmul, bias = add.inputs[index].producer(), add.inputs[1 - index]
            parts = _integer_linear(graph, matmul, bias)
            if parts is not None:
                break
        else:
            continue
        if len(bias.const_value.shape) != 1:
            if id(bias) not in rows:
                rows[id(bias)] = new_initializer(graph, f"{bias.name}.row", bias.const_value.numpy().reshape(-1))
            bias = rows[id(bias)]
        fused = ir.node("MatMulIntegerToFloat", [*parts, bias], domain="com.microsoft", name=matmul.name,
                        metadata_props={CREATED_BY: "lower-ort"})
        dqs = [v.producer() for v in matmul.inputs]
        ir.convenience.replace_nodes_and_values(graph, add, [matmul, add], [fused], [add.outputs[0]], [fused.outputs[0]])
        graph.remove([dq for dq in dqs if not any(o.uses() for o in dq.outputs)], safe=True)
        count += 1
    return count


def _integer_linear(graph: ir.Graph, matmul: ir.Node | None, bias: ir.Value | None) -> list | None:
    """[x_q, W_q, x_scale, W_scale, x_zero_point, None] when `matmul` multiplies a u8 QDQ activation by
    a symmetric int8 weight dequantized per column, read only by the Add of a constant bias that
    broadcasts as one row (`[N]`, `[1, 1, N]`, no more dims than the product has)."""
    if matmul is None or matmul.op_type != "MatMul" or len(matmul.outputs[0].uses()) != 1 or matmul.outputs[0] in graph.outputs:
        return None
    b = bias.const_value if bias is not None else None
    if b is None or len(b.shape) < 1 or any(int(d) != 1 for d in b.shape[:-1]) or b.dtype != ir.DataType.FLOAT:
        return None
    shape = next((v.shape for v in (matmul.outputs[0], matmul.inputs[0]) if v.shape is not None), None)
    product_rank = len(shape) if shape is not None else None
    if len(b.shape) > 1 and (product_rank is None or len(b.shape) > product_rank):
        return None  # the Add would broadcast the product to a higher rank
    x_dq = matmul.inputs[0].producer()
    weight = _int8_weight_per_column(matmul.inputs[1])
    if x_dq is None or x_dq.op_type != "DequantizeLinear" or weight is None or b.shape[-1] != weight[0].const_value.shape[1]:
        return None
    x_q, x_scale, x_zero = (list(x_dq.inputs) + [None])[:3]
    if not _is_u8_zero_point(x_zero):
        return None
    return [x_q, weight[0], x_scale, weight[1], x_zero, None]


def _is_u8_zero_point(zero: ir.Value | None) -> bool:
    """A uint8 zero point: a constant (static activations) or computed by `DynamicQuantizeLinear`."""
    if zero is None:
        return False
    if zero.const_value is not None:
        return zero.const_value.dtype == ir.DataType.UINT8
    producer = zero.producer()
    return producer is not None and producer.op_type == "DynamicQuantizeLinear" and producer.domain in ("", "ai.onnx")


def unsigned_integer_weights(graph: ir.Graph) -> int:
    """Store every constant int8 weight of a `DequantizeLinear` or `MatMulIntegerToFloat` as uint8
    (+128) with zero point 128: the same values. On x86 without VNNI, ONNX Runtime multiplies uint8
    activations by int8 weights with VPMADDUBSW, whose 16-bit sums of two products saturate
    (2 * 255 * 127 > 32767) and give wrong results; its uint8 x uint8 kernels widen to 16 bits
    first and are exact. Returns the number of ops changed."""
    from onnx_ir.convenience import replace_nodes_and_values

    unsigned: dict[str, tuple[ir.Value, ir.Value]] = {}  # int8 weight's name -> (uint8 codes, zero point)
    changed = 0
    for node in list(graph):
        if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and "block_size" not in node.attributes:
            w_index, scale_index, zero_index = 0, 1, 2
        elif node.op_type == "MatMulIntegerToFloat" and node.domain == "com.microsoft":
            w_index, scale_index, zero_index = 1, 3, 5
        else:
            continue
        inputs = list(node.inputs) + [None] * (zero_index + 1 - len(node.inputs))
        w, scale, zero = inputs[w_index], inputs[scale_index], inputs[zero_index]
        if w is None or w.const_value is None or w.const_value.dtype != ir.DataType.INT8 or scale.const_value is None:
            continue
        if zero is not None and (zero.const_value is None or zero.const_value.numpy().any()):
            continue
        if not _multiplies_uint8(node):  # ONNX Runtime has no int8 x uint8 kernels
            continue
        if w.name not in unsigned:
            codes = (w.const_value.numpy().astype(np.int16) + 128).astype(np.uint8)
            unsigned[w.name] = (new_initializer(graph, f"{w.name}.u8", codes),
                               new_initializer(graph, f"{w.name}.u8.zero_point", np.full(scale.const_value.shape, 128, np.uint8)))
        inputs[w_index], inputs[zero_index] = unsigned[w.name]
        replacement = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
                              name=node.name, metadata_props=dict(node.metadata_props))
        replace_nodes_and_values(graph, node, [node], [replacement], list(node.outputs), list(replacement.outputs))
        drop_unread(graph, [w, zero] if zero is not None else [w])  # the int8 copy, once nothing reads it
        changed += 1
    return changed


def _is_uint8(value: ir.Value | None) -> bool:
    """Whether `value` is uint8: by its type, or where that is not inferred, by what produces it."""
    if value is None:
        return False
    if value.dtype is not None:
        return value.dtype == ir.DataType.UINT8
    producer = value.producer()
    if producer is None:
        return False
    if producer.op_type == "DynamicQuantizeLinear":
        return True
    if producer.op_type == "QuantizeLinear":  # uint8 when its zero point is, or when it has none
        return len(producer.inputs) < 3 or producer.inputs[2] is None or _is_u8_zero_point(producer.inputs[2])
    return False


def _multiplies_uint8(node: ir.Node) -> bool:
    """Whether the weight of `node` (a MatMulIntegerToFloat, or a DequantizeLinear whose output the
    linears read) meets uint8 activations in every kernel: then a uint8 weight keeps it a u8 x u8 kernel."""
    if node.op_type == "MatMulIntegerToFloat":
        return _is_uint8(node.inputs[0])
    for use in node.outputs[0].uses():
        reader = use.node
        if reader.op_type not in ("MatMul", "Gemm", "Conv") or use.idx > 1:
            return False
        x = reader.inputs[1 - use.idx]
        producer = x.producer() if x is not None else None
        if producer is None or producer.op_type != "DequantizeLinear" or not _is_uint8(producer.inputs[0]):
            return False
    return True


def _int8_weight_per_column(w: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """(W_q, W_scale) when `w` is `DequantizeLinear` of a constant 2-D int8 weight with one scale per
    column and no (or a zero) zero point."""
    w_dq = w.producer()
    if w_dq is None or w_dq.op_type != "DequantizeLinear" or w_dq.domain not in ("", "ai.onnx"):
        return None
    w_q, w_scale, w_zero = (list(w_dq.inputs) + [None])[:3]
    if w_q.const_value is None or w_q.const_value.dtype != ir.DataType.INT8:
        return None
    w_shape = w_q.const_value.shape
    axis = w_dq.attributes["axis"].value if "axis" in w_dq.attributes else 1
    scales = w_scale.const_value
    if len(w_shape) != 2 or axis not in (1, -1) or scales is None or tuple(scales.shape) != (w_shape[1],):
        return None
    if w_zero is not None and (w_zero.const_value is None or w_zero.const_value.numpy().any()):
        return None
    return w_q, w_scale


def fuse_per_token_integer(graph: ir.Graph) -> int:
    """`MatMul(DequantizeLinear(codes, 1, zp) * s, DQ(W_q: int8, per column))`, the per-token form
    of `_lower_per_token`, -> `MatMulIntegerToFloat(codes, W_q, 1, W_scale, zp) * s`: the integer
    GEMM with the row scale applied to its [rows, N] output (exact: s is constant along a row)."""
    count = 0
    for matmul in list(graph):
        if matmul.op_type != "MatMul" or matmul.domain not in ("", "ai.onnx"):
            continue
        mul = matmul.inputs[0].producer()
        if mul is None or mul.op_type != "Mul" or len(mul.outputs[0].uses()) != 1:
            continue
        dq, scale = mul.inputs[0].producer(), mul.inputs[1]
        weight = _int8_weight_per_column(matmul.inputs[1])
        if dq is None or dq.op_type != "DequantizeLinear" or weight is None or len(dq.inputs) != 3 or not _is_row_scale(scale):
            continue
        codes, one, zero = dq.inputs
        if one.const_value is None or one.const_value.numpy().tolist() != 1.0 or zero.const_value is None:
            continue
        base = matmul.name or matmul.outputs[0].name
        kernel = ir.node("MatMulIntegerToFloat", [codes, weight[0], one, weight[1], zero], domain="com.microsoft",
                         name=base, metadata_props={CREATED_BY: "lower-ort"})
        kernel.outputs[0].name = f"{matmul.outputs[0].name}.unscaled"
        rescale = ir.node("Mul", [kernel.outputs[0], scale], name=f"{base}.rescale", metadata_props={CREATED_BY: "lower-ort"})
        weight_dq = matmul.inputs[1].producer()
        ir.convenience.replace_nodes_and_values(graph, matmul, [matmul], [kernel, rescale], [matmul.outputs[0]], [rescale.outputs[0]])
        for dead in (mul, dq, weight_dq):
            if not any(o.uses() for o in dead.outputs):
                graph.remove(dead, safe=True)
        count += 1
    return count


def _is_row_scale(scale: ir.Value) -> bool:
    """Whether `scale` is the per-token scale of `_lower_per_token`: Where(., ., Div(ReduceMax(.,
    axes [-1], keepdims), qmax)), one value per row, so that it commutes with a MatMul."""
    where = scale.producer()
    div = where.inputs[2].producer() if where is not None and where.op_type == "Where" and len(where.inputs) == 3 else None
    reduce = div.inputs[0].producer() if div is not None and div.op_type == "Div" else None
    if reduce is None or reduce.op_type != "ReduceMax" or len(reduce.inputs) != 2 or reduce.inputs[1].const_value is None:
        return False
    keepdims = reduce.attributes["keepdims"].value if "keepdims" in reduce.attributes else 1
    return keepdims == 1 and reduce.inputs[1].const_value.numpy().tolist() == [-1]


NBITS_BLOCKS = (128, 64, 32, 16)  # MatMulNBits' block sizes, the largest dividing K preferred


def per_token_linears_as_nbits(graph: ir.Graph, accuracy_level: int) -> int:
    """`MatMul(DequantizeLinear(codes, 1, zp) * s, DQ(W_q: int8, per column))`, the per-token form
    of `_lower_per_token` whose codes are `QuantizeLinear(Div(x, s), 1, zp)`, ->
    `com.microsoft.MatMulNBits(x, W_q as 8-bit blocks)`: the weight's codes +128 (the kernel's
    default zero point for 8 bits, so none is stored) with its column scale in every block (stored
    once per column, expanded when the session starts), and at
    `accuracy_level` 4 the kernel quantizes x to int8 itself, symmetric per block of K (a finer grid
    than one scale per row: the numbers are not the per-token reference's, but closer to float's).
    One kernel replaces the row scale's ops, the quantization and the integer product with its
    rescale. Returns the linears rewritten."""
    count = 0
    for matmul in list(graph):
        if matmul.op_type != "MatMul" or matmul.domain not in ("", "ai.onnx"):
            continue
        x = _per_token_source(matmul.inputs[0])
        weight = _int8_weight_per_column(matmul.inputs[1])
        if x is None or weight is None or x.dtype not in (None, ir.DataType.FLOAT):  # the scales are float32
            continue
        w_q, w_scale = (v.const_value.numpy() for v in weight)
        k, n = w_q.shape
        block = next((b for b in NBITS_BLOCKS if k % b == 0), 64)
        blocks = -(-k // block)
        codes = np.full((n, blocks * block), 128, np.uint8)  # the padding: code 128, the value 0
        codes[:, :k] = (w_q.T.astype(np.int16) + 128).astype(np.uint8)
        base = matmul.name or matmul.outputs[0].name
        # the column scales stored once, repeated into every block by an Expand ONNX Runtime folds at load
        scales = ir.node("Expand", [new_initializer(graph, f"{base}.nbits8.scale", w_scale.astype(np.float32).reshape(n, 1)),
                                    new_initializer(graph, f"{base}.nbits8.blocks", np.array([n, blocks], np.int64))],
                         name=f"{base}.nbits8.scales", metadata_props={CREATED_BY: "lower-ort"})
        kernel = ir.node("MatMulNBits", [x, new_initializer(graph, f"{base}.nbits8", codes.reshape(n, blocks, block)),
                                         scales.outputs[0]],
                         {"K": k, "N": n, "bits": 8, "block_size": block, "accuracy_level": accuracy_level},
                         domain="com.microsoft", name=base, metadata_props={CREATED_BY: "lower-ort"})
        ir.convenience.replace_nodes_and_values(graph, matmul, [matmul], [scales, kernel], [matmul.outputs[0]], [kernel.outputs[0]])
        count += 1
    return count


def _per_token_source(value: ir.Value) -> ir.Value | None:
    """x, when `value` is `_lower_per_token`'s dequantized form of it, `DequantizeLinear(codes, 1,
    zp) * s` with codes `QuantizeLinear(Div(x, s), 1, zp)` and s its row scale; else None."""
    mul = value.producer()
    if mul is None or mul.op_type != "Mul" or len(mul.inputs) != 2 or not _is_row_scale(mul.inputs[1]):
        return None
    dq = mul.inputs[0].producer()
    quantize = dq.inputs[0].producer() if dq is not None and dq.op_type == "DequantizeLinear" else None
    div = quantize.inputs[0].producer() if quantize is not None and quantize.op_type == "QuantizeLinear" else None
    if div is None or div.op_type != "Div" or div.inputs[1] is not mul.inputs[1]:
        return None
    return div.inputs[0]
