"""`lower-ort`'s integer 3D convolutions as 2D ones over the output's depth slices.

ONNX Runtime's integer 3D Conv (`QLinearConv` on a 5-D input) gathers its input tap by tap and
runs about as fast as the float Conv at 16 input channels, slower below; its integer 2D Conv is
several times faster. A 3D Conv with kernel depth kd is the sum over its depth taps of 2D Convs, so
it is one 2D Conv over the depth-unfolded input: for each output depth slice d, the kd input slices
it reads (d * stride + j * dilation, j < kd, in the depth-padded input) stacked as kd x C channels,
`(c, j)` channel c's tap j, and the weight [O, C / group, kd, kh, kw] read as [O, C / group * kd, kh,
kw]. The output depth slices are the 2D Conv's batch:

    x [N, C, D, H, W] -> Pad(depth) -> Gather(axis 2, [Do, kd]) -> [N, C, Do, kd, H, W]
      -> Transpose -> [N, Do, C, kd, H, W] -> Reshape -> [N * Do, C * kd, H, W]
      -> Conv2d -> [N * Do, O, Ho, Wo] -> Reshape -> [N, Do, O, Ho, Wo] -> Transpose -> [N, O, Do, Ho, Wo]

The rewrite applies to a QDQ group `DQ(x_q) -> Conv3d <- DQ(W_q)` whose output, or that of the
`Relu` or `Clip` alone reading it, goes to one `QuantizeLinear` (the group ONNX Runtime fuses into
one integer Conv): the unfolding moves onto the quantized input (depth padded with its zero point:
the padding still reads 0.0), the layout back onto the quantized output, so ONNX Runtime still fuses
`DQ -> Conv2d -> Q`, now into its 2D kernel, and the gather and transposes copy bytes, not floats.
The products are the same; only the order of the int32 sums changes, which is exact.

Measured by `benchmarks/conv3d_integer.py` (2 threads, ONNX Runtime 1.32, int8 / float32 time:
benchmarks/results/conv3d_integer.json): 0.26 for 16 -> 16 channels 3^3 at 32^3 and 0.55 for a
1 -> 16 7^3 stride-2 stem at 128^3, where the 3D integer kernel took 1.1x and 10.7x float32 (3^3
kernels, 16 and 1 input channels, before this lowering). Which 3D Convs `lower-ort` writes so is
`placement.unfolds_to_2d`, so that `quantize` places int8 where this form pays.
A kernel of one depth tap (1 x kh x kw, depth stride 1, no depth padding) needs no gather: each
output slice reads its own input slice, moved next to the batch by the Transpose alone. A 1^3
kernel of depth stride 1 is left as it is (one tap, nothing gathered), as are Convs with `auto_pad`
or shapes not known at compile time (channels, depth, height and width; the batch may be free).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.placement import conv_output, unfolds_to_2d
from qcompiler.ir import op_key, producer_of
from qcompiler.ir.layers import drop_unread, new_initializer
from qcompiler.ir.meta import CREATED_BY


def unfold_integer_conv3d(graph: ir.Graph) -> int:
    """Rewrite every integer 3D Conv with more than one tap (or a depth stride) as a 2D Conv over
    depth-unfolded input; returns how many."""
    count = 0
    for conv in list(graph):
        group = _integer_conv3d(graph, conv)
        if group is not None:
            _unfold(graph, conv, *group)
            count += 1
    return count


def _integer_conv3d(graph: ir.Graph, conv: ir.Node):
    """(input DQ, weight DQ, output Q, input shape) where `conv` is a 3D Conv of an integer QDQ group
    worth unfolding, else None."""
    if op_key(conv) != ("", "Conv") or len(conv.inputs) < 2:
        return None
    x_dq, w_dq = producer_of(conv.inputs[0], "DequantizeLinear"), producer_of(conv.inputs[1], "DequantizeLinear")
    if x_dq is None or w_dq is None:
        return None
    # the DQs' outputs and the Conv's become 4-D: each must be read by this Conv (or its Relu) alone
    if any(len(v.uses()) != 1 or v in graph.outputs for v in (conv.inputs[0], conv.inputs[1], conv.outputs[0])):
        return None
    weight = w_dq.inputs[0].const_value
    if weight is None or len(weight.shape) != 5 or any(x.const_value is None or x.const_value.size != 1 for x in x_dq.inputs[1:] if x is not None):
        return None
    shape = _static_shape(conv.inputs[0])
    if not unfolds_to_2d(conv, tuple(weight.shape), shape):
        return None
    out = conv_output(graph, conv)  # the Conv's output, or its Relu's or Clip's
    uses = list(out.uses())
    q = uses[0].node if len(uses) == 1 and uses[0].idx == 0 and out not in graph.outputs else None
    if q is None or op_key(q) != ("", "QuantizeLinear") or q.outputs[0] in graph.outputs:
        return None
    return x_dq, w_dq, q, shape


def _static_shape(value: ir.Value) -> list | None:
    """[N, C, D, H, W] with C, D, H and W known (N may be a symbol), read through the DQ and Q that
    lowering put between the tensor `canonicalize` shaped and the Conv."""
    while value is not None:
        shape = value.shape
        if shape is not None and len(shape) == 5 and all(isinstance(d, int) for d in list(shape)[1:]):
            return list(shape)
        producer = value.producer()
        if producer is None or op_key(producer) not in (("", "DequantizeLinear"), ("", "QuantizeLinear")):
            return None
        value = producer.inputs[0]
    return None


def _unfold(graph: ir.Graph, conv: ir.Node, x_dq: ir.Node, w_dq: ir.Node, q: ir.Node, shape: list) -> None:
    attrs = conv.attributes
    weight = w_dq.inputs[0].const_value.numpy()
    out_channels, per_group, kd, kh, kw = weight.shape
    _, channels, depth, height, width = shape
    strides = attrs["strides"].as_ints() if "strides" in attrs else [1, 1, 1]
    dilations = attrs["dilations"].as_ints() if "dilations" in attrs else [1, 1, 1]
    pads = attrs["pads"].as_ints() if "pads" in attrs else [0] * 6
    group = attrs["group"].as_int() if "group" in attrs else 1
    out_depth = (depth + pads[0] + pads[3] - dilations[0] * (kd - 1) - 1) // strides[0] + 1
    out_hw = [(size + pads[1 + i] + pads[4 + i] - dilations[1 + i] * (k - 1) - 1) // strides[1 + i] + 1
              for i, (size, k) in enumerate(((height, kh), (width, kw)))]
    base = f"{conv.name or conv.outputs[0].name}.unfold"

    def op(name, op_type, inputs, attributes=None):
        return ir.node(op_type, inputs, attributes, name=f"{base}.{name}", outputs=[ir.Value(name=f"{base}.{name}")],
                       metadata_props={CREATED_BY: "lower-ort"})

    def const(name, array):
        return new_initializer(graph, f"{base}.{name}", np.asarray(array, np.int64))

    # the quantized input, unfolded along depth (padded with its zero point, which reads 0.0)
    x_q, zero = x_dq.inputs[0], x_dq.inputs[2] if len(x_dq.inputs) > 2 else None
    nodes = []
    if kd == 1 and strides[0] == 1 and not (pads[0] or pads[3]):  # each output slice reads its own input slice
        nodes.append(op("slices_first", "Transpose", [x_q], {"perm": [0, 2, 1, 3, 4]}))
    else:
        if pads[0] or pads[3]:
            nodes.append(op("depth_padded", "Pad", [x_q, const("depth_pads", [0, 0, pads[0], 0, 0, 0, 0, pads[3], 0, 0]), zero]))
        taps = np.arange(out_depth)[:, None] * strides[0] + np.arange(kd)[None, :] * dilations[0]
        nodes.append(op("taps", "Gather", [nodes[-1].outputs[0] if nodes else x_q, const("depth_taps", taps)], {"axis": 2}))
        nodes.append(op("slices_first", "Transpose", [nodes[-1].outputs[0]], {"perm": [0, 2, 1, 3, 4, 5]}))
    nodes.append(op("slices", "Reshape", [nodes[-1].outputs[0], const("slices_shape", [-1, channels * kd, height, width])]))
    for node in nodes:
        graph.insert_before(x_dq, node)
    x_dq.replace_input_with(0, nodes[-1].outputs[0])

    # the weight as [O, C / group * kd, kh, kw]: channel c's tap j at c * kd + j, as the input stacks them
    w_q = w_dq.inputs[0]
    w_dq.replace_input_with(0, new_initializer(graph, f"{w_q.name}.2d", weight.reshape(out_channels, per_group * kd, kh, kw)))
    drop_unread(graph, [w_q])

    conv.attributes.clear()
    conv.attributes.update({
        "pads": ir.AttrInt64s("pads", [pads[1], pads[2], pads[4], pads[5]]),
        "strides": ir.AttrInt64s("strides", strides[1:]),
        "dilations": ir.AttrInt64s("dilations", dilations[1:]),
        "group": ir.AttrInt64("group", group),
        "kernel_shape": ir.AttrInt64s("kernel_shape", [kh, kw]),
    })
    for value in (x_dq.outputs[0], w_dq.outputs[0], conv.outputs[0], q.inputs[0], q.outputs[0]):
        value.shape = None  # now 4-D; ONNX Runtime infers them

    # the quantized output back to [N, O, Do, Ho, Wo] for the Q's readers
    y_q = q.outputs[0]
    readers = list(y_q.uses())
    batched = op("volume_slices", "Reshape", [y_q, const("volume_shape", [-1, out_depth, out_channels, *out_hw])])
    restored = op("volume", "Transpose", [batched.outputs[0]], {"perm": [0, 2, 1, 3, 4]})
    graph.insert_after(q, [batched, restored])
    for use in readers:
        use.node.replace_input_with(use.idx, restored.outputs[0])
    zero_point = q.inputs[2] if len(q.inputs) > 2 else None  # the codes' type (uint8 where the Q names none)
    restored.outputs[0].type = ir.TensorType(zero_point.dtype if zero_point is not None and zero_point.dtype else ir.DataType.UINT8)
    restored.outputs[0].shape = ir.Shape([shape[0], out_channels, out_depth, *out_hw])  # a next Conv3d reads its dims here
