"""`lower-ort`'s rewrites of `qc` ops as standard ONNX and ONNX Runtime contrib ops (QDQ), one
function per op in `LOWERINGS`, and `unfuse`, which expands `fuse`'s ops back first."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.dialect import ops
from qcompiler.ir import op_key
from qcompiler.ir.layers import new_initializer
from qcompiler.ir.meta import CREATED_BY
from qcompiler.passes.lower_ort.mixed import pack_nbits, unpack_nbits


def unfuse(graph: ir.Graph) -> int:
    """Expand the fused ops of `fuse` back into the ops they were made of (ONNX Runtime fuses the
    QDQ form itself): QLinear -> [QuantizeActivation] + DequantizeWeight or MixedMatMul + MatMul
    [+ Add] [+ activation] [+ Split]; NormQuantize -> LayerNormalization + QuantizeActivation."""
    count = 0
    grids: dict = {}  # one rounding of a tensor per grid, shared by the linears reading it
    for node in list(graph):
        if node.domain != "qc" or node.op_type not in ("QLinear", "NormQuantize"):
            continue
        a = ops.attributes_of(node)
        base = node.name or node.outputs[0].name
        chain: list[ir.Node] = []

        def add(op, inputs, attrs=None, domain="", n=1, name=""):
            new = ir.node(op, inputs, attrs or {}, domain=domain, num_outputs=n, name=f"{base}.{name or op.lower()}")
            new.metadata_props[CREATED_BY] = "lower-ort:unfuse"
            for i, out in enumerate(new.outputs):  # names: the lowerings below derive initializer names from them
                out.name = f"{base}.{name or op.lower()}{len(chain)}" + (f".{i}" if n > 1 else "")
            chain.append(new)
            return new.outputs if n > 1 else new.outputs[0]

        if node.op_type == "NormQuantize":
            normed = add("LayerNormalization", list(node.inputs), {"axis": a["axis"], "epsilon": a["epsilon"]})
            y = add("QuantizeActivation", [normed], {"mode": a["mode"], "scale": a["act_scale"],
                                                      "zero_point": a["act_zero_point"], "bits": a["bits"]}, "qc")
            outs = [y]
        else:
            rest = list(node.inputs[1:])
            bias = rest.pop() if a["has_bias"] else None
            x = node.inputs[0]
            if a["act_mode"] != "none":
                key = (id(x), a["act_mode"], a["act_scale"], a["act_zero_point"], a["act_bits"])
                producer = x.producer()
                if producer is not None and producer.domain == "qc" and producer.op_type == "QuantizeActivation":
                    p = ops.attributes_of(producer)  # X already on this grid (a NormQuantize): no second rounding
                    if (p["mode"], p["scale"], p["zero_point"], p["bits"]) == key[1:] and p["mode"] == "static":
                        grids[key] = x
                if key not in grids:
                    grids[key] = add("QuantizeActivation", [x], {"mode": a["act_mode"], "scale": a["act_scale"],
                                                                 "zero_point": a["act_zero_point"], "bits": a["act_bits"]}, "qc")
                x = grids[key]
            if a["weight"] == "mixed":
                y = add("MixedMatMul", [x, *rest], {"kinds": ir.AttrStrings("kinds", list(a["kinds"])),
                                                      "bits": ir.AttrInt64s("bits", list(a["bits"])),
                                                      "sizes": ir.AttrInt64s("sizes", list(a["sizes"])),
                                                      "group_size": a["group_size"], "sparse": a["sparse"]}, "qc")
            else:
                w = add("DequantizeWeight", rest, {"axis": a["w_axis"], "bits": a["w_bits"]}, "qc")
                y = add("MatMul", [x, w])
            if bias is not None:
                y = add("Add", [y, bias])
            act = a["epilogue"]
            if act == "relu":
                y = add("Relu", [y])
            elif act in ("gelu", "gelu_tanh"):
                y = add("Gelu", [y], {"approximate": "tanh" if act == "gelu_tanh" else "none"})
            elif act == "silu":
                y = add("Mul", [y, add("Sigmoid", [y])])
            splits = list(a["splits"])
            if len(splits) > 1:
                sizes = new_initializer(graph, f"{base}.splits", np.array(splits, np.int64))
                outs = list(add("Split", [y, sizes], {"axis": -1}, n=len(splits)))
            else:
                outs = [y]
        for old, new in zip(node.outputs, outs):
            new.shape, new.type = old.shape, old.type
        ir.convenience.replace_nodes_and_values(graph, node, [node], chain, list(node.outputs), outs)
        count += 1
    return count


def _replace(graph: ir.Graph, old: ir.Node, new_nodes: list[ir.Node], output: ir.Value) -> None:
    for node in new_nodes:
        node.metadata_props[CREATED_BY] = "lower-ort"
    ir.convenience.replace_nodes_and_values(graph, old, [old], new_nodes, [old.outputs[0]], [output])


def _lower_dequantize_weight(graph: ir.Graph, node: ir.Node, signed: bool) -> str:
    attrs = ops.attributes_of(node)
    inputs = [v for v in node.inputs if v is not None]
    dq = ir.node("DequantizeLinear", inputs, {"axis": attrs["axis"]}, name=node.name)
    _replace(graph, node, [dq], dq.outputs[0])
    return "DequantizeLinear(weight)"


def _lower_quantize_activation(graph: ir.Graph, node: ir.Node, signed: bool) -> str:
    attrs = ops.attributes_of(node)
    mode = attrs["mode"]
    x = node.inputs[0]
    base = node.outputs[0].name
    if mode == "per-token":
        return _lower_per_token(graph, node, signed)
    if mode == "dynamic":
        quant = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=f"{base}")
        q, scale, zero = quant.outputs
        q.name, scale.name, zero.name = f"{base}.u8", f"{base}.scale", f"{base}.zero_point"
        route = "DynamicQuantizeLinear"
    else:
        zero_point = attrs["zero_point"] + (0 if signed else 128)
        dtype = np.int8 if signed else np.uint8
        scale = new_initializer(graph, f"{base}.scale", np.array(attrs["scale"], np.float32))
        zero = new_initializer(graph, f"{base}.zero_point", np.array(zero_point, dtype))
        quant = ir.node("QuantizeLinear", [x, scale, zero], name=base)
        q = quant.outputs[0]
        q.name = f"{base}.{'s8' if signed else 'u8'}"
        route = f"QuantizeLinear({'s8' if signed else 'u8'})"
    graph.insert_before(node, quant)

    def dequantize(suffix: str) -> tuple[list[ir.Node], ir.Value]:
        dq = ir.node("DequantizeLinear", [q, scale, zero], name=f"{base}.dequantize.{suffix}")
        if suffix != "out":
            dq.metadata_props[CREATED_BY] = "lower-ort"
            dq.outputs[0].name = f"{node.outputs[0].name}.{suffix}"
        return [dq], dq.outputs[0]

    _dequantize_per_reader(graph, node, quant, dequantize)
    quant.metadata_props[CREATED_BY] = "lower-ort"
    graph.remove(node, safe=True)
    return route


def _dequantize_per_reader(graph: ir.Graph, node: ir.Node, after: ir.Node, dequantize) -> None:
    """Give every reader of `node`'s output its own copy of the nodes `dequantize(suffix)` returns
    (nodes, value), so that each reader can fuse with its copy; a graph output gets one more copy,
    inserted after `after`, to stay alive."""
    for i, use in enumerate(list(node.outputs[0].uses())):
        nodes, value = dequantize(str(i))
        graph.insert_before(use.node, nodes)
        use.node.replace_input_with(use.idx, value)
    if node.outputs[0] in graph.outputs:
        nodes, value = dequantize("out")
        graph.insert_after(after, nodes)
        ir.convenience.replace_all_uses_with(node.outputs[0], value, replace_graph_outputs=True)


def _lower_per_token(graph: ir.Graph, node: ir.Node, signed: bool) -> str:
    """One symmetric scale per row, s = max|x| / qmax (1 where the row is zero). 8 bits: the codes
    `QuantizeLinear(x / s, 1, zp)` (zp 0 for s8, 128 for u8: |x / s| <= 127 rounds inside either
    range, as the reference's clip) and, per reader, `DequantizeLinear(codes, 1, zp) * s`, which
    `fuse_per_token_integer` turns into an integer kernel where a reader is an int8 linear. Other
    widths: `Round`, `Clip`, `Mul` in float."""
    bits = ops.attributes_of(node)["bits"]
    x = node.inputs[0]
    base = node.outputs[0].name
    qmax = float((1 << (bits - 1)) - 1)
    c_qmax = new_initializer(graph, f"{base}.qmax", np.array(qmax, np.float32))
    c_zero = new_initializer(graph, f"{base}.zero", np.array(0.0, np.float32))
    c_one = new_initializer(graph, f"{base}.one", np.array(1.0, np.float32))
    axes = new_initializer(graph, f"{base}.axes", np.array([-1], np.int64))
    chain = []

    def add(op, inputs, name, attrs=None):
        new = ir.node(op, inputs, attrs or {}, name=f"{base}.{name}")
        new.outputs[0].name = new.name
        chain.append(new)
        return new.outputs[0]

    absmax = add("ReduceMax", [add("Abs", [x], "abs"), axes], "absmax", {"keepdims": 1})
    raw = add("Div", [absmax, c_qmax], "raw_scale")
    scale = add("Where", [add("Equal", [raw, c_zero], "is_zero"), c_one, raw], "scale")
    div = add("Div", [x, scale], "div")
    if bits != 8:
        c_lo = new_initializer(graph, f"{base}.qmin", np.array(-qmax, np.float32))
        out = add("Mul", [add("Clip", [add("Round", [div], "round"), c_lo, c_qmax], "clip"), scale], "dequantize")
        _replace(graph, node, chain, out)
        return "per-token(float ops)"
    zero = new_initializer(graph, f"{base}.zero_point", np.array(0 if signed else 128, np.int8 if signed else np.uint8))
    codes = add("QuantizeLinear", [div, c_one, zero], "codes")
    codes.name = f"{base}.{'s8' if signed else 'u8'}"
    for n in chain:
        n.metadata_props[CREATED_BY] = "lower-ort"
        graph.insert_before(node, n)

    def rescaled(suffix: str) -> tuple[list[ir.Node], ir.Value]:
        dq = ir.node("DequantizeLinear", [codes, c_one, zero], name=f"{base}.dequantize.{suffix}", metadata_props={CREATED_BY: "lower-ort"})
        mul = ir.node("Mul", [dq.outputs[0], scale], name=f"{base}.rescale.{suffix}", metadata_props={CREATED_BY: "lower-ort"})
        if suffix != "out":
            dq.outputs[0].name, mul.outputs[0].name = dq.name, f"{node.outputs[0].name}.{suffix}"
        return [dq, mul], mul.outputs[0]

    _dequantize_per_reader(graph, node, chain[-1], rescaled)
    graph.remove(node, safe=True)
    return f"per-token({'s8' if signed else 'u8'})"


def _lower_channel_scale(graph: ir.Graph, node: ir.Node, signed: bool) -> str:
    """Y = X * scale along `axis`: a Mul with the scale reshaped to broadcast (axis -1 or 1)."""
    axis = ops.attributes_of(node)["axis"]
    scale = node.inputs[1].const_value.numpy()
    if axis == 1:  # NCHW channels: [C, 1, 1] broadcasts over the spatial axes of any rank-4 input
        scale = scale.reshape(-1, 1, 1)
    elif axis != -1:
        raise ValueError(f"ChannelScale over axis {axis} has no ORT lowering; use axis -1 or 1")
    constant = new_initializer(graph, f"{node.name}.scale", scale.astype(np.float32))
    mul = ir.node("Mul", [node.inputs[0], constant], name=node.name)
    _replace(graph, node, [mul], mul.outputs[0])
    return "Mul(channel scale)"


def _lower_gather_quantized(graph: ir.Graph, node: ir.Node, signed: bool) -> str:
    """`com.microsoft.GatherBlockQuantized` on uint8 data: 4-bit codes and zero points packed two
    per byte, 8-bit ones as they are; float32 scales; the table stays packed in the session."""
    attrs = ops.attributes_of(node)
    bits = attrs["bits"]
    codes, indices, scale, zero = node.inputs
    base = node.name or node.outputs[0].name
    # rows packed along the columns, the first code in the low bits: MatMulNBits' layout, per row
    data = new_initializer(graph, f"{base}.codes", pack_nbits(codes.const_value.numpy().T, bits))
    zeros = new_initializer(graph, f"{base}.zero_points", pack_nbits(zero.const_value.numpy().T, bits))
    scales = new_initializer(graph, f"{base}.scales", scale.const_value.numpy())
    gather = ir.node("GatherBlockQuantized", [data, indices, scales, zeros],
                     {"gather_axis": 0, "quantize_axis": 1, "block_size": attrs["block_size"], "bits": bits},
                     domain="com.microsoft", name=node.name)
    _replace(graph, node, [gather], gather.outputs[0])
    for value in (codes, scale, zero):  # re-stored above in the kernel's layout
        if not value.uses():
            graph.initializers.pop(value.name)
    return f"GatherBlockQuantized({bits}-bit)"


def share_tied_codes(graph: ir.Graph) -> int:
    """A 4-bit `GatherBlockQuantized` whose packed codes [V, D / 2] are, byte for byte, a 4-bit
    `MatMulNBits` weight [V, D / g, g / 2] of block size g (a table that reads the codes of the head
    tied to it: `quantize-embedding{tied=share}`) reads that weight instead, blocks on its last
    axis (scales and zero points [V, D / g, 1]), and its rows [..., D / g, g] are reshaped to
    [..., D]: the codes are stored, and resident, once. Returns the lookups rewritten."""
    weights: dict[tuple, list[ir.Value]] = {}
    for node in graph:
        if op_key(node) == ("com.microsoft", "MatMulNBits") and node.attributes.get_int("bits") == 4 and node.inputs[1].const_value is not None:
            weights.setdefault(tuple(node.inputs[1].const_value.shape), []).append(node.inputs[1])
    shared = 0
    for gather in list(graph):
        if (op_key(gather) != ("com.microsoft", "GatherBlockQuantized") or gather.attributes.get_int("bits") != 4
                or gather.attributes.get_int("quantize_axis") != 1 or len(gather.inputs) != 4
                or any(v is None or v.const_value is None for v in (gather.inputs[0], *gather.inputs[2:]))):
            continue
        data, indices, scales, zeros = gather.inputs
        rows, half = data.const_value.shape
        block = gather.attributes.get_int("block_size")
        blocks = 2 * half // block
        codes = data.const_value.numpy()
        weight = next((w for w in weights.get((rows, blocks, block // 2), [])
                       if np.array_equal(w.const_value.numpy().reshape(rows, half), codes)), None)
        if weight is None:
            continue
        zero = unpack_nbits(zeros.const_value.numpy(), blocks, 4).T  # [V, D / g]
        base = gather.name or gather.outputs[0].name
        lookup = ir.node("GatherBlockQuantized", [weight, indices, new_initializer(graph, f"{base}.block_scales", scales.const_value.numpy().reshape(rows, blocks, 1)),
                                                  new_initializer(graph, f"{base}.block_zero_points", zero.reshape(rows, blocks, 1).astype(np.uint8))],
                         {"gather_axis": 0, "quantize_axis": 2, "block_size": block, "bits": 4}, domain="com.microsoft", name=gather.name)
        shape = ir.node("Shape", [indices])
        width = new_initializer(graph, f"{base}.width", np.array([2 * half], np.int64))
        target = ir.node("Concat", [shape.outputs[0], width], {"axis": 0})
        rows_out = ir.node("Reshape", [lookup.outputs[0], target.outputs[0]])
        rows_out.outputs[0].type = gather.outputs[0].type
        _replace(graph, gather, [lookup, shape, target, rows_out], rows_out.outputs[0])
        for value in (data, scales, zeros):
            if not value.uses():
                graph.initializers.pop(value.name)
        shared += 1
    return shared


LOWERINGS = {
    "ChannelScale": _lower_channel_scale,
    "DequantizeWeight": _lower_dequantize_weight,
    "GatherQuantized": _lower_gather_quantized,
    "QuantizeActivation": _lower_quantize_activation,
}
