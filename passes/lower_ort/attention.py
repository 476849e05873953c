"""`lower-ort{attention=fused}`: a decoder layer's attention, as torch exports a Llama-style layer with a
KV cache, rewritten as ONNX Runtime's `com.microsoft.GroupQueryAttention` (the kernel ONNX Runtime
GenAI's own decoders use). One node replaces the 30 to 40 small ops of each layer's attention: the
head reshapes and transposes, rotary embedding of Q and K, the cache concatenation, the K/V head
repeat, the scaled, masked softmax product and the output transpose.

What is matched, from each `Softmax` back (every other form is left as it is):

    q = Transpose(Reshape(q_lin), [0, 2, 1, 3])             k, v likewise, v without rotary
    (or Transpose(RMSNorm(Reshape(q_lin))) for q and k both, each head normalized over its last axis:
     Qwen3's query and key norms; the kernel then reads the normalized heads flattened)
    (or RMSNorm(rope(q)) for q and k both, each head normalized after its rotation: HunYuan's; the kernel
     then reads the rotated, normalized heads flattened and rotates nothing, do_rotary 0)
    rope(x) = x * cos + Concat(-x[..., D/2:], x[..., :D/2]) * sin
    (or x * cos + Reshape(Concat(Unsqueeze(-x[..., 1::2]), Unsqueeze(x[..., 0::2]), -1)) * sin with the
     angles e interleaved, each beside itself: neighbours rotated as pairs, ERNIE 4.5's and Helium's,
     the kernel's rotary_interleaved 1)
    (or Concat(rope(x[..., :R]), x[..., R:]): a partial rotation, Phi-4-mini's; R a multiple of 16;
     or x itself for q and k both: a layer without rotation, SmolLM3's, the kernel's do_rotary 0)
    cos, sin = Cos(e), Sin(e) (or each times one constant c: a scaled embedding's);  e = Unsqueeze(Concat(f, f, -1), 1)
    (interleaved: Unsqueeze(Reshape(Concat(Unsqueeze(f, -1), Unsqueeze(f, -1), -1)), 1));  f = Unsqueeze(Cast(position_ids)) * inv_freq
    (inv_freq constant, or Where(ReduceMax(position_ids) >= P, long, short): a `longrope` embedding's
     long factors for a run that reaches position P, its short ones below)
    present_k = Concat(past_k, rope(k), axis=2)              a graph output; past_k a graph input
    k_rep = Reshape(Expand(Unsqueeze(present_k, 2)))        (or present_k itself)
    out = Reshape(Transpose(Softmax(MatMul(rope(q), Transpose(k_rep, [0, 1, 3, 2])) * scale + mask)
                            @ v_rep, [0, 2, 1, 3]))
    (a scale of 1 is no Mul at all: GPT-Neo's unscaled scores)
    (the scaled scores s may be soft-capped, Tanh(s / c) * c: Gemma 2's, the kernel's `softcap` c; or
     (s + bias) + mask with a bias [heads, 1, keys], ALiBi's (BLOOM, Falcon-RW, MPT): the kernel's
     `attention_bias`, cut to the mask's length and broadcast over the step's queries)

The fused node reads `q_lin`, `k_lin`, `v_lin`, the past cache and `position_ids`, and computes the
causal mask from `attention_mask`'s length per row (`seqlens_k`, the number of ones minus one, and
`total_sequence_length`), so it assumes what ONNX Runtime GenAI feeds: a mask of ones, padded at the
end if at all, and causal attention over all earlier positions, or over the last W where the mask the
layer adds is a sliding layer's (`mask + Cast(keys <= queries - W) * c`, as the decoders of
models/smollm2.py write it: the kernel's `local_window_size` W). The mask is not inspected further:
a graph that folds a bias into it (ALiBi in the mask, as transformers' own Falcon does) would be fused
without it; the decoders of models/smollm2.py add such a bias to the scores, where it is matched. Its cos/sin tables are computed once a run from `inv_freq` up to the largest position
id (`Range`, `Cos`, `Sin`: the same float32 products as the exported graph). ONNX Runtime's CPU kernel
needs a head size that is a multiple of 16; other models keep their attention.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import onnx_ir as ir

from qcompiler.ir import op_key, producer_of
from qcompiler.ir.layers import new_initializer, take_over
from qcompiler.ir.meta import CREATED_BY
from qcompiler.passes.lower_ort.norms import mean_axes, rms_denominator


class _Frequencies(NamedTuple):
    """A layer's rotary inverse frequencies [D/2]: `short` for every run, or (a `longrope`
    embedding) for a run whose largest position id is below `long_from`, `long` from it on."""
    short: np.ndarray
    long: np.ndarray | None = None
    long_from: int = 0

    def key(self) -> bytes:
        return b"".join((self.short.tobytes(), b"" if self.long is None else self.long.tobytes(),
                         np.int64(self.long_from).tobytes()))


@dataclasses.dataclass
class _Attention:
    q_lin: ir.Value
    k_lin: ir.Value
    v_lin: ir.Value
    past_k: ir.Value
    past_v: ir.Value
    present_k: ir.Value
    present_v: ir.Value
    out: ir.Value
    out_node: ir.Node
    frequencies: _Frequencies | None  # None: the layer does not rotate its queries and keys
    interleaved: bool  # neighbouring values rotated as pairs (the kernel's rotary_interleaved), not the two halves
    table_factor: float  # on the cos and sin tables (1 but for a scaled rotary embedding)
    position_ids: ir.Value | None
    scale: float
    softcap: float  # the scaled scores soft-capped by c * tanh(s / c) (Gemma 2); 0: not
    heads: int
    kv_heads: int
    window: int  # a sliding layer's: each query sees the keys of its last `window` positions; 0: all earlier ones
    # Qwen3's query and key heads normalized [batch, seq, heads, head], read flattened by the kernel
    # (q_lin and k_lin are then the projections the norms' heads come from)
    q_normed: ir.Value | None = None
    k_normed: ir.Value | None = None
    # HunYuan's query and key heads rotated, then normalized [batch, heads, seq, head]: q_normed and k_normed,
    # read transposed and flattened by a kernel that rotates nothing (`frequencies` None)
    normed_after_rotation: bool = False
    # ALiBi's bias [heads, 1, keys] added to the scaled scores before the mask (BLOOM, Falcon-RW, MPT), the kernel's
    # `attention_bias` once broadcast over the step's queries; None: none
    bias: ir.Value | None = None


def fuse_attention(graph: ir.Graph) -> int:
    """Rewrite every matched attention as one `GroupQueryAttention`; returns how many."""
    mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
    if mask is None:
        return 0
    found = [a for softmax in list(graph) if op_key(softmax) == ("", "Softmax") and (a := _match(softmax, graph)) is not None]
    if not found:
        return 0
    seqlens, total = _lengths(graph, mask)
    tables: dict[bytes, tuple[ir.Value, ir.Value]] = {}
    bias_shapes: tuple[ir.Value, ir.Value] | None = None  # the keys and the expansion every layer's bias takes
    for a in found:
        rotary: list[ir.Value] = []  # cos, sin and position_ids where the layer rotates its queries and keys
        if a.frequencies is not None:
            key = a.frequencies.key() + np.float64(a.table_factor).tobytes() + a.position_ids.name.encode()
            if key not in tables:
                tables[key] = _rotary_tables(graph, a.frequencies, a.table_factor, a.position_ids, len(tables))
            rotary = [*tables[key], a.position_ids]
        q_in = a.q_lin if a.q_normed is None else _flattened(graph, a.q_normed, a.normed_after_rotation)
        k_in = a.k_lin if a.k_normed is None else _flattened(graph, a.k_normed, a.normed_after_rotation)
        bias = []
        if a.bias is not None:  # cos, sin and position_ids left empty where the layer rotates nothing, then the bias
            bias_shapes = bias_shapes or _bias_shapes(graph, mask, q_in, a.out_node)
            bias = [None] * (3 - len(rotary)) + [_broadcast_bias(graph, a.bias, *bias_shapes, a.out_node)]
        node = ir.node(
            "GroupQueryAttention", [q_in, k_in, a.v_lin, a.past_k, a.past_v, seqlens, total, *rotary, *bias],
            attributes={"num_heads": a.heads, "kv_num_heads": a.kv_heads, "scale": a.scale, "do_rotary": int(bool(rotary)),
                        "rotary_interleaved": int(a.interleaved), **({"local_window_size": a.window} if a.window else {}),
                        **({"softcap": a.softcap} if a.softcap else {})},
            domain="com.microsoft", num_outputs=3, name=f"{a.out_node.name}.attention", metadata_props={CREATED_BY: "lower-ort"})
        graph.insert_before(a.out_node, node)
        take_over(a.out, node.outputs[0])
        take_over(a.present_k, node.outputs[1])
        take_over(a.present_v, node.outputs[2])
    return len(found)


def _bias_shapes(graph: ir.Graph, mask: ir.Value, q_in: ir.Value, before: ir.Node) -> tuple[ir.Value, ir.Value]:
    """([total], [1, 1, queries, 1]): the mask's length, which a bias's keys are cut to (the exported bias spans
    the past as fed, which a cache bound in place makes the whole buffer), and the shape that broadcasts it over
    the step's queries (the query projection's sequence length); computed once, before the first fused layer."""
    ones = new_initializer(graph, "attention.bias.ones", np.array([1, 1], np.int64))
    last = new_initializer(graph, "attention.bias.one", np.array([1], np.int64))
    nodes = [ir.node("Shape", [mask], attributes={"start": 1, "end": 2}, name="attention.bias.total"),
             ir.node("Shape", [q_in], attributes={"start": 1, "end": 2}, name="attention.bias.queries")]
    nodes.append(ir.node("Concat", [ones, nodes[-1].outputs[0], last], attributes={"axis": 0}, name="attention.bias.shape"))
    for node in nodes:
        node.metadata_props[CREATED_BY] = "lower-ort"
    graph.insert_before(before, nodes)
    return nodes[0].outputs[0], nodes[-1].outputs[0]


def _broadcast_bias(graph: ir.Graph, bias: ir.Value, total: ir.Value, shape: ir.Value, before: ir.Node) -> ir.Value:
    """A [heads, 1, keys] bias as the kernel's `attention_bias` [1, heads, queries, total] (`_bias_shapes`)."""
    tag = f"{before.name}.bias"
    zero = new_initializer(graph, f"{tag}.zero", np.array([0], np.int64))
    axis = new_initializer(graph, f"{tag}.axis", np.array([0], np.int64))
    key_axis = new_initializer(graph, f"{tag}.key_axis", np.array([2], np.int64))
    nodes = [ir.node("Slice", [bias, zero, total, key_axis], name=f"{tag}.keys")]
    nodes.append(ir.node("Unsqueeze", [nodes[-1].outputs[0], axis], name=f"{tag}.batched"))
    nodes.append(ir.node("Expand", [nodes[-1].outputs[0], shape], name=f"{tag}.expanded"))
    for node in nodes:
        node.metadata_props[CREATED_BY] = "lower-ort"
    graph.insert_before(before, nodes)
    return nodes[-1].outputs[0]


def _lengths(graph: ir.Graph, mask: ir.Value) -> tuple[ir.Value, ir.Value]:
    """seqlens_k = ones in each mask row - 1 (int32 [batch]) and the mask's length (int32 scalar)."""
    one = new_initializer(graph, "attention.one", np.array(1, np.int64))
    axis = new_initializer(graph, "attention.axis1", np.array([1], np.int64))
    nodes = [
        ir.node("ReduceSum", [mask, axis], attributes={"keepdims": 0}, name="attention.ones"),
    ]
    nodes.append(ir.node("Sub", [nodes[-1].outputs[0], one], name="attention.last"))
    nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], attributes={"to": ir.DataType.INT32}, name="attention.seqlens_k"))
    seqlens = nodes[-1].outputs[0]
    nodes.append(ir.node("Shape", [mask], attributes={"start": 1, "end": 2}, name="attention.length"))
    nodes.append(ir.node("Squeeze", [nodes[-1].outputs[0]], name="attention.length_scalar"))
    nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], attributes={"to": ir.DataType.INT32}, name="attention.total_sequence_length"))
    total = nodes[-1].outputs[0]
    _prepend(graph, nodes)
    return seqlens, total


def _rotary_tables(graph: ir.Graph, frequencies: _Frequencies, factor: float, position_ids: ir.Value,
                   index: int) -> tuple[ir.Value, ir.Value]:
    """cos and sin [largest position + 1, D/2] of position x inv_freq (times `factor` unless 1),
    computed at run time; inv_freq the long frequencies where the largest position reaches their
    start, else the short ones."""
    tag = f"attention.rotary{index or ''}"
    freq = new_initializer(graph, f"{tag}.inv_freq", frequencies.short.astype(np.float32))
    zero = new_initializer(graph, f"{tag}.zero", np.array(0, np.int64))
    one = new_initializer(graph, f"{tag}.one", np.array(1, np.int64))
    axis = new_initializer(graph, f"{tag}.axis1", np.array([1], np.int64))
    nodes = [ir.node("ReduceMax", [position_ids], attributes={"keepdims": 0}, name=f"{tag}.largest")]
    largest = nodes[-1].outputs[0]
    if frequencies.long is not None:
        long = new_initializer(graph, f"{tag}.long_inv_freq", frequencies.long.astype(np.float32))
        start = new_initializer(graph, f"{tag}.long_from", np.array(frequencies.long_from, np.int64))
        nodes.append(ir.node("GreaterOrEqual", [largest, start], name=f"{tag}.is_long"))
        nodes.append(ir.node("Where", [nodes[-1].outputs[0], long, freq], name=f"{tag}.inv_freq_of_run"))
        freq = nodes[-1].outputs[0]
    nodes.append(ir.node("Add", [largest, one], name=f"{tag}.count"))
    nodes.append(ir.node("Range", [zero, nodes[-1].outputs[0], one], name=f"{tag}.positions"))
    nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{tag}.positions_f"))
    nodes.append(ir.node("Unsqueeze", [nodes[-1].outputs[0], axis], name=f"{tag}.column"))
    nodes.append(ir.node("Mul", [nodes[-1].outputs[0], freq], name=f"{tag}.angles"))
    angles = nodes[-1].outputs[0]
    nodes.append(ir.node("Cos", [angles], name=f"{tag}.cos"))
    nodes.append(ir.node("Sin", [angles], name=f"{tag}.sin"))
    if factor != 1.0:
        scalar = new_initializer(graph, f"{tag}.factor", np.array(factor, np.float32))
        nodes.append(ir.node("Mul", [nodes[-2].outputs[0], scalar], name=f"{tag}.cos_scaled"))
        nodes.append(ir.node("Mul", [nodes[-2].outputs[0], scalar], name=f"{tag}.sin_scaled"))
    _prepend(graph, nodes)
    return nodes[-2].outputs[0], nodes[-1].outputs[0]


def _prepend(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    for node in nodes:
        node.metadata_props[CREATED_BY] = "lower-ort"
    graph.insert_before(next(iter(graph)), nodes)


# ----------------------------------------------------------------------------------------------
# matching


def _match(softmax: ir.Node, graph: ir.Graph) -> _Attention | None:
    axis = softmax.attributes.get("axis")
    if axis is not None and axis.as_int() not in (-1, 3):
        return None
    weighted = _only_reader(softmax.outputs[0], "MatMul", 0)
    add = producer_of(softmax.inputs[0], "Add")
    if weighted is None or add is None:
        return None
    capped = next(((found, other) for found, other in zip(map(_capped_scale_of, add.inputs), reversed(add.inputs))
                   if found is not None), None)
    bias = None
    if capped is None:  # (scores + ALiBi's bias) + mask
        capped, bias = _with_head_bias(add)
    if capped is None:
        return None
    (softcap, (scale, scores)), mask = capped
    q_rot, k_t = scores.inputs
    present_k = _repeated_cache(_transposed(k_t, (0, 1, 3, 2)))
    present_v = _repeated_cache(weighted.inputs[1])
    out_t = _only_reader(weighted.outputs[0], "Transpose", 0)
    if present_k is None or present_v is None or out_t is None or _perm(out_t) != (0, 2, 1, 3):
        return None
    out_node = _only_reader(out_t.outputs[0], "Reshape", 0)
    keys, values = _cache_concat(present_k, graph), _cache_concat(present_v, graph)
    if out_node is None or keys is None or values is None:
        return None
    (past_k, k_rot), (past_v, v_t) = keys, values
    q_inner, k_inner = _head_norm_input(q_rot), _head_norm_input(k_rot)
    after = q_inner is not None and k_inner is not None and _rotary(q_inner) is not None
    rotary = _rotary_of(q_inner, k_inner, graph) if after else _rotary_of(q_rot, k_rot, graph)
    if rotary is None:
        return None
    (q_heads, k_heads), frequencies, interleaved, cos_factor, position_ids = rotary
    (q_lin, q_normed), (k_lin, k_normed) = _heads_or_normed(q_heads), _heads_or_normed(k_heads)
    if after:  # rotated in the graph, then normalized: the kernel reads the result as it is
        if q_normed is not None or k_normed is not None:
            return None
        (q_normed, k_normed), frequencies, interleaved, cos_factor, position_ids = (q_rot, k_rot), None, False, 1.0, None
    v_lin = _heads(v_t)
    if (q_normed is None) != (k_normed is None):
        return None
    if any(x is None for x in (q_lin, k_lin, v_lin)) or past_k.shape is None or len(past_k.shape) != 4:
        return None
    kv_heads, head = past_k.shape[1], past_k.shape[3]
    width = q_lin.shape[-1] if q_lin.shape is not None and len(q_lin.shape) == 3 else None
    if not all(isinstance(d, int) for d in (kv_heads, head, width)) or head % 16 or width % head:
        return None
    # the kernel rotates the leading 2 x (its tables' width) values of each head, a width of 8k
    half = frequencies.short.size if frequencies is not None else 0
    if half % 8 or 2 * half > head:
        return None
    return _Attention(q_lin, k_lin, v_lin, past_k, past_v, present_k, present_v, out_node.outputs[0], out_node,
                      frequencies, interleaved, cos_factor, position_ids, scale, softcap, width // head, kv_heads,
                      _sliding_window(mask), q_normed, k_normed, after, bias)


def _with_head_bias(add: ir.Node):
    """(((softcap, (scale, scores)), mask), bias) where `add` = (scaled scores + bias) + mask and the bias is
    [heads, 1, keys] (ALiBi's, as the decoders of models/smollm2.py add it); (None, None) otherwise."""
    for inner, mask in zip(add.inputs, reversed(add.inputs)):
        biased = producer_of(inner, "Add")
        if biased is None:
            continue
        for scores, bias in zip(biased.inputs, reversed(biased.inputs)):
            found = _capped_scale_of(scores)
            shape = bias.shape
            if found is not None and shape is not None and len(shape) == 3 and shape[1] == 1 and isinstance(shape[0], int):
                return (found, mask), bias
    return None, None


def _rotary_of(q_rot: ir.Value, k_rot: ir.Value, graph: ir.Graph) \
        -> tuple[tuple[ir.Value, ir.Value], _Frequencies | None, bool, float, ir.Value | None] | None:
    """((q heads, k heads), frequencies, interleaved, table factor, position_ids) of a layer's rotated
    queries and keys, both rotated by the same tables, halves or pairs as the angles are laid out;
    ((q, k), None, False, 1.0, None) where neither is rotated (SmolLM3's unrotated layers); None otherwise."""
    q, k = _rotary(q_rot), _rotary(k_rot)
    if q is None and k is None:
        return (q_rot, k_rot), None, False, 1.0, None
    if q is None or k is None or q[1:] != k[1:]:
        return None
    (cos, cos_factor), (sin, sin_factor) = _table(q[1], "Cos"), _table(q[2], "Sin")
    if cos.inputs[0] is not sin.inputs[0] or cos_factor != sin_factor:
        return None
    frequencies, interleaved, position_ids = _angles(cos, graph)
    if frequencies is None or interleaved != q[3]:
        return None
    return (q[0], k[0]), frequencies, interleaved, cos_factor, position_ids


def _sliding_window(mask: ir.Value) -> int:
    """W when `mask` = causal + Cast(keys <= queries - W) * c, c < 0 (a sliding layer's mask: keys W or
    more positions before their query masked, as the decoders of models/smollm2.py add it); 0 otherwise."""
    add = producer_of(mask, "Add")
    for band in add.inputs if add is not None else ():
        mul = producer_of(band, "Mul")
        for flag, c in (mul.inputs, tuple(reversed(mul.inputs))) if mul is not None else ():
            cast, value = producer_of(flag, "Cast"), _constant(c)
            less = producer_of(cast.inputs[0], "LessOrEqual") if cast is not None else None
            sub = producer_of(less.inputs[1], "Sub") if less is not None else None
            window = _constant(sub.inputs[1]) if sub is not None else None
            if window is not None and window.size == 1 and value is not None and value.size == 1 and float(value.reshape(())) < 0:
                return int(window.reshape(()))
    return 0


def _only_reader(value: ir.Value, op_type: str, index: int) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    node, at = uses[0].node, uses[0].idx
    return node if op_key(node) == ("", op_type) and at == index else None


def _constant(value: ir.Value | None) -> np.ndarray | None:
    return value.const_value.numpy() if value is not None and value.const_value is not None else None


def _capped_scale_of(value: ir.Value) -> tuple[float, tuple[float, ir.Node]] | None:
    """(c, _scale_of(s)) when `value` = Tanh(s / c) * c for a scalar constant c (soft-capped scores);
    (0.0, _scale_of(value)) when `value` is the scaled scores themselves; None otherwise."""
    plain = _scale_of(value)
    if plain is not None:
        return 0.0, plain
    outer = producer_of(value, "Mul")
    for squashed, c in (outer.inputs, tuple(reversed(outer.inputs))) if outer is not None else ():
        tanh, cap = producer_of(squashed, "Tanh"), _constant(c)
        divide = producer_of(tanh.inputs[0], "Div") if tanh is not None else None
        inner = _constant(divide.inputs[1]) if divide is not None else None
        if cap is not None and inner is not None and cap.size == 1 and inner.size == 1 \
                and float(cap.reshape(())) == float(inner.reshape(())) > 0:
            scaled = _scale_of(divide.inputs[0])
            return (float(cap.reshape(())), scaled) if scaled is not None else None
    return None


def _scale_of(value: ir.Value) -> tuple[float, ir.Node] | None:
    """(scale, the QK^T MatMul) when `value` is MatMul(q, k^T) * c or / c for a scalar constant c, or the
    MatMul itself (scale 1: GPT-Neo's unscaled scores, whose factor the export drops)."""
    unscaled = producer_of(value, "MatMul")
    if unscaled is not None:
        return 1.0, unscaled
    for op, invert in (("Mul", False), ("Div", True)):
        node = producer_of(value, op)
        if node is None:
            continue
        for product, c in (node.inputs, tuple(reversed(node.inputs))) if op == "Mul" else (node.inputs,):
            factor = _constant(c)
            matmul = producer_of(product, "MatMul")
            if matmul is not None and factor is not None and factor.size == 1 and float(factor.reshape(())) != 0:
                f = float(factor.reshape(()))
                return (1.0 / f if invert else f), matmul
    return None


def _perm(node: ir.Node) -> tuple[int, ...] | None:
    perm = node.attributes.get("perm")
    return tuple(perm.as_ints()) if perm is not None else None


def _transposed(value: ir.Value, perm: tuple[int, ...]) -> ir.Value | None:
    node = producer_of(value, "Transpose")
    return node.inputs[0] if node is not None and _perm(node) == perm else None


def _repeated_cache(value: ir.Value | None) -> ir.Value | None:
    """The cache `value` repeats over query heads (Reshape(Expand(Unsqueeze(cache, 2)))), or `value`."""
    reshape = producer_of(value, "Reshape")
    expand = producer_of(reshape.inputs[0], "Expand") if reshape else None
    unsqueeze = producer_of(expand.inputs[0], "Unsqueeze") if expand else None
    if unsqueeze is not None:
        axes = _constant(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
        return unsqueeze.inputs[0] if axes is not None and axes.reshape(-1).tolist() == [2] else None
    return value if producer_of(value, "Concat") is not None else None


def _cache_concat(present: ir.Value, graph: ir.Graph) -> tuple[ir.Value, ir.Value] | None:
    """(past, new) when `present` = Concat(past, new, axis=2), a graph output with past a graph input."""
    concat = producer_of(present, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.attributes["axis"].as_int() not in (2, -2):
        return None
    past, new = concat.inputs
    return (past, new) if present.is_graph_output() and past in graph.inputs else None


def _heads(value: ir.Value | None) -> ir.Value | None:
    """x_lin when `value` = Transpose(Reshape(x_lin), [0, 2, 1, 3])."""
    reshape = producer_of(_transposed(value, (0, 2, 1, 3)), "Reshape")
    return reshape.inputs[0] if reshape is not None else None


def _heads_or_normed(value: ir.Value) -> tuple[ir.Value | None, ir.Value | None]:
    """(x_lin, None) when `value` = Transpose(Reshape(x_lin), [0, 2, 1, 3]); (x_lin, the normalized
    heads) when `value` = Transpose(RMSNorm(Reshape(x_lin)), [0, 2, 1, 3]), each head normalized over
    its last axis (Qwen3's query and key norms); (None, None) otherwise."""
    plain = _heads(value)
    if plain is not None:
        return plain, None
    normed = _transposed(value, (0, 2, 1, 3))
    reshape = producer_of(_head_norm_input(normed), "Reshape") if normed is not None else None
    return (reshape.inputs[0], normed) if reshape is not None else (None, None)


def _head_norm_input(value: ir.Value) -> ir.Value | None:
    """x when `value` = Mul(Mul(x, Reciprocal(Sqrt(ReduceMean(x^2, last axis) + eps))), gamma), gamma a
    constant vector: an RMSNorm over the last axis of a 4-D x; None otherwise."""
    scaled = producer_of(value, "Mul")
    for normalized, gamma in (scaled.inputs, tuple(reversed(scaled.inputs))) if scaled is not None else ():
        mul, g = producer_of(normalized, "Mul"), _constant(gamma)
        if mul is None or g is None or g.ndim != 1:
            continue
        for x, inverse in (mul.inputs, tuple(reversed(mul.inputs))):
            root = rms_denominator(x, inverse)
            if root is not None and mean_axes(root) in ([-1], [3]):
                return x
    return None


def _flattened(graph: ir.Graph, heads: ir.Value, heads_first: bool = False) -> ir.Value:
    """[batch, seq, heads, head] (or, `heads_first`, [batch, heads, seq, head], transposed first) ->
    [batch, seq, heads x head], placed after `heads`' producer: the kernel's query or key input."""
    shape = new_initializer(graph, f"{heads.name}.flat_shape", np.array([0, 0, -1], np.int64))
    nodes = [ir.node("Transpose", [heads], {"perm": [0, 2, 1, 3]}, name=f"{heads.name}.seq_first",
                     metadata_props={CREATED_BY: "lower-ort"})] if heads_first else []
    nodes.append(ir.node("Reshape", [nodes[0].outputs[0] if nodes else heads, shape], name=f"{heads.name}.flat",
                         metadata_props={CREATED_BY: "lower-ort"}))
    graph.insert_after(heads.producer(), nodes)
    return nodes[-1].outputs[0]


def _rotary(value: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value, bool] | None:
    """(x, cos, sin, interleaved) when `value` is rope(x), or Concat(rope(x[..., :R]), x[..., R:], -1) (a partial
    rotation, of the R leading values of each head)."""
    whole = _rope(value)
    if whole is not None:
        return whole
    concat = producer_of(value, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.attributes["axis"].as_int() not in (-1, 3):
        return None
    rotated, passed = _rope(concat.inputs[0]), producer_of(concat.inputs[1], "Slice")
    lead = producer_of(rotated[0], "Slice") if rotated is not None else None
    if lead is None or passed is None or lead.inputs[0] is not passed.inputs[0] or _slice_start(lead) != 0 \
            or _slice_end(lead) is None or _slice_end(lead) != _slice_start(passed):
        return None
    return lead.inputs[0], rotated[1], rotated[2], rotated[3]


def _rope(value: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value, bool] | None:
    """(x, cos, sin, False) when `value` = x * cos + Concat(-x[..., D/2:], x[..., :D/2], -1) * sin;
    (x, cos, sin, True) when the second term rotates neighbouring pairs instead (`_rotated_pairs`)."""
    add = producer_of(value, "Add")
    if add is None:
        return None
    for first, second in (add.inputs, tuple(reversed(add.inputs))):
        direct, turned = producer_of(first, "Mul"), producer_of(second, "Mul")
        if direct is None or turned is None:
            continue
        for x, cos in (direct.inputs, tuple(reversed(direct.inputs))):
            for half, sin in (turned.inputs, tuple(reversed(turned.inputs))):
                if not (_table(cos, "Cos") and _table(sin, "Sin")):
                    continue
                if _rotated_half(half, x):
                    return x, cos, sin, False
                if _rotated_pairs(half, x):
                    return x, cos, sin, True
    return None


def _table(value: ir.Value, op: str) -> tuple[ir.Node, float] | None:
    """(the `op` node, c) when `value` = op(e) * c for a scalar constant c, (the node, 1.0) when
    `value` = op(e); None otherwise."""
    node = producer_of(value, op)
    if node is not None:
        return node, 1.0
    scaled = producer_of(value, "Mul")
    for table, c in (scaled.inputs, tuple(reversed(scaled.inputs))) if scaled is not None else ():
        node, factor = producer_of(table, op), _constant(c)
        if node is not None and factor is not None and factor.size == 1:
            return node, float(factor.reshape(()))
    return None


def _rotated_half(value: ir.Value, x: ir.Value) -> bool:
    concat = producer_of(value, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.attributes["axis"].as_int() not in (-1, 3):
        return False
    neg = producer_of(concat.inputs[0], "Neg")
    upper = producer_of(neg.inputs[0], "Slice") if neg else None
    lower = producer_of(concat.inputs[1], "Slice")
    return upper is not None and lower is not None and upper.inputs[0] is x and lower.inputs[0] is x \
        and _slice_start(upper) not in (None, 0) and _slice_start(lower) == 0


def _rotated_pairs(value: ir.Value, x: ir.Value) -> bool:
    """`value` = Reshape(Concat(Unsqueeze(-x[..., 1::2], -1), Unsqueeze(x[..., 0::2], -1), -1)): each
    pair (x[2i], x[2i+1]) turned to (-x[2i+1], x[2i])."""
    reshape = producer_of(value, "Reshape")
    concat = producer_of(reshape.inputs[0], "Concat") if reshape is not None else None
    if concat is None or len(concat.inputs) != 2 or concat.attributes["axis"].as_int() != -1:
        return False
    odd, even = (producer_of(v, "Unsqueeze") for v in concat.inputs)
    if odd is None or even is None or any(_constant(u.inputs[1]) is None or _constant(u.inputs[1]).reshape(-1).tolist() != [-1]
                                          for u in (odd, even)):
        return False
    neg = producer_of(odd.inputs[0], "Neg")
    odd_slice = producer_of(neg.inputs[0], "Slice") if neg is not None else None
    even_slice = producer_of(even.inputs[0], "Slice")
    return odd_slice is not None and even_slice is not None and odd_slice.inputs[0] is x and even_slice.inputs[0] is x \
        and _slice_bound(odd_slice, 1, step=2) == 1 and _slice_bound(even_slice, 1, step=2) == 0


def _slice_start(node: ir.Node) -> int | None:
    """The start of a Slice of the last axis (of a 4-D value) by a constant; None for another Slice."""
    return _slice_bound(node, 1)


def _slice_end(node: ir.Node) -> int | None:
    return _slice_bound(node, 2)


def _slice_bound(node: ir.Node, index: int, step: int = 1) -> int | None:
    """Input `index` (1: start, 2: end) of a Slice of the last axis by constants, taking every `step`-th value."""
    bound, axes = _constant(node.inputs[index]), _constant(node.inputs[3]) if len(node.inputs) > 3 else None
    steps = _constant(node.inputs[4]) if len(node.inputs) > 4 else None
    if bound is None or bound.size != 1 or (axes is not None and axes.reshape(-1).tolist() not in ([-1], [3])) \
            or (steps.reshape(-1).tolist() if steps is not None else [1]) != [step]:
        return None
    return int(bound.reshape(()))


def _angles(cos: ir.Node, graph: ir.Graph) -> tuple[_Frequencies | None, bool, ir.Value | None]:
    """(frequencies, interleaved, position_ids) of cos = Cos(Unsqueeze(d, 1)) where d doubles
    f = Unsqueeze(Cast(position_ids)) * inv_freq as two halves, Concat(f, f, -1), or interleaved,
    Reshape(Concat(Unsqueeze(f, -1), Unsqueeze(f, -1), -1))."""
    unsqueeze = producer_of(cos.inputs[0], "Unsqueeze")
    doubled, interleaved = (unsqueeze.inputs[0] if unsqueeze else None), False
    concat = producer_of(doubled, "Concat")
    if concat is None:
        reshape = producer_of(doubled, "Reshape")
        concat, interleaved = (producer_of(reshape.inputs[0], "Concat") if reshape else None), True
    if concat is None or len(concat.inputs) != 2 or concat.inputs[0] is not concat.inputs[1]:
        return None, False, None
    angles = concat.inputs[0]
    if interleaved:
        column = producer_of(angles, "Unsqueeze")
        axes = _constant(column.inputs[1]) if column is not None and len(column.inputs) > 1 else None
        if axes is None or axes.reshape(-1).tolist() != [-1] or concat.attributes["axis"].as_int() != -1:
            return None, False, None
        angles = column.inputs[0]
    mul = producer_of(angles, "Mul")
    for positions, freq in (mul.inputs, tuple(reversed(mul.inputs))) if mul else ():
        column = producer_of(positions, "Unsqueeze")
        cast = producer_of(column.inputs[0], "Cast") if column else None
        source = cast.inputs[0] if cast else None
        if source is None or source not in graph.inputs or source.name != "position_ids":
            continue
        frequencies = _frequencies(freq, source)
        if frequencies is not None:
            return frequencies, interleaved, source
    return None, False, None


def _frequencies(value: ir.Value, position_ids: ir.Value) -> _Frequencies | None:
    """A constant `value`'s one set; or long and short where `value` = Where(ReduceMax(position_ids)
    >= P, long, short), the largest of all position ids against a constant P (the decoders of
    models/smollm2.py write a `longrope` embedding's switch so); None otherwise."""
    inv_freq = _constant(value)
    if inv_freq is not None:
        return _Frequencies(inv_freq.reshape(-1))
    where = producer_of(value, "Where")
    compare = producer_of(where.inputs[0], "GreaterOrEqual") if where is not None else None
    largest = producer_of(compare.inputs[0], "ReduceMax") if compare is not None else None
    if largest is None or largest.inputs[0] is not position_ids or len(largest.inputs) > 1 \
            or largest.attributes.get("keepdims") is None or largest.attributes["keepdims"].as_int() != 0:
        return None
    start, long, short = _constant(compare.inputs[1]), _constant(where.inputs[1]), _constant(where.inputs[2])
    if start is None or start.size != 1 or long is None or short is None or long.size != short.size:
        return None
    return _Frequencies(short.reshape(-1), long.reshape(-1), int(start.reshape(())))
