"""A small torch interpreter for IR node lists (a block), differentiable where the ops are.

`run_nodes(nodes, env, weight_of)` evaluates `nodes` in order; `env` maps value names to torch
tensors (the block's inputs) and receives every output. Constants (initializers) are read from the
IR once per `Constants` cache. Weighted layers are computed through `weight_of(node)`, which returns
the [K, N] weight to use (float, quantized or learnable); for `qc.MixedMatMul` that weight is in
the node's permuted row order, for `qc.DequantizeWeight` (an int8 weight, `quantize`) it is the
expanded weight. `qc.QuantizeActivation` goes through `quantize(node, x)` (None: the identity, as
the float model computes), and `replaced` names constants a stream reads in place of the stored ones
(a float stream's biases before bias correction). The ops covered are those the bundled models and
the usual transformer exports use (encoders' masks and positions too: CumSum, GatherND, IsNaN, ...); an op
outside them raises NotImplementedError naming it, and `unsupported_ops` names them before a pass starts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection

import numpy as np
import onnx_ir as ir
import torch

from qcompiler.dialect.mixed_ops import MixedMatMulView, is_mixed_matmul
from qcompiler.ir.meta import FLOAT_WEIGHT_KEY

_DTYPES = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
    9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16,
}


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    if a is None:
        return default
    value = a.value
    return list(value) if isinstance(value, (tuple, list)) else value


class Constants:
    """Initializers as torch tensors, converted once."""

    def __init__(self):
        self.cache: dict[int, torch.Tensor] = {}

    def get(self, value: ir.Value) -> torch.Tensor:
        key = id(value)
        if key not in self.cache:
            array = value.const_value.numpy()
            if array.dtype == np.float16:
                array = array.astype(np.float32)
            self.cache[key] = torch.from_numpy(np.array(array))
        return self.cache[key]

    def quantized_table(self, node: ir.Node) -> torch.Tensor:
        """A `qc.GatherQuantized`'s table as stored (codes, scales and zero points constant), dequantized once."""
        key = id(node.inputs[0])
        if key not in self.cache:
            from qcompiler.dialect.qc_ops import gather_quantized

            codes, scale, zero = (node.inputs[i].const_value.numpy() for i in (0, 2, 3))
            table = gather_quantized(codes, np.arange(codes.shape[0]), scale, zero, attr(node, "block_size"))
            self.cache[key] = torch.from_numpy(np.array(table, np.float32))
        return self.cache[key]

    def float_table(self, node: ir.Node) -> torch.Tensor:
        """A `qc.GatherQuantized`'s table as it was in float (`FLOAT_WEIGHT_KEY`, kept by the pass that
        stored it), else as stored."""
        table = node.meta.get(FLOAT_WEIGHT_KEY)
        if table is None:
            return self.quantized_table(node)
        key = id(table)
        if key not in self.cache:
            self.cache[key] = torch.from_numpy(np.array(table.numpy(), np.float32))
        return self.cache[key]

    def dequantized_weight(self, node: ir.Node) -> torch.Tensor:
        """A `qc.DequantizeWeight`'s weight as stored (codes and scales constant), expanded once."""
        key = id(node.outputs[0])
        if key not in self.cache:
            from qcompiler.dialect.ops import attributes_of
            from qcompiler.dialect.qc_ops import dequantize_weight

            arrays = [v.const_value.numpy() for v in node.inputs if v is not None]
            weight = dequantize_weight(*arrays, axis=attributes_of(node)["axis"])
            self.cache[key] = torch.from_numpy(np.array(weight, np.float32))
        return self.cache[key]

    def stored_mixed_matmul(self, node: ir.Node) -> torch.Tensor:
        """A `qc.MixedMatMul`'s weight as stored, in its permuted row order (a layer not learned), dequantized once."""
        key = ("stored", id(node))
        if key not in self.cache:
            self.cache[key] = torch.from_numpy(np.array(MixedMatMulView.of(node).weight(), np.float32))
        return self.cache[key]

    def float_mixed_matmul(self, node: ir.Node) -> torch.Tensor:
        """A `qc.MixedMatMul`'s float weight (`FLOAT_WEIGHT_KEY`) in its permuted row order, converted once."""
        w = node.meta[FLOAT_WEIGHT_KEY]
        key = ("float", id(node))
        if key not in self.cache:
            perm = MixedMatMulView.of(node).perm_array()
            self.cache[key] = torch.from_numpy(np.array(w.numpy(), np.float32)[perm])
        return self.cache[key]

    def mixed_weight(self, node: ir.Node) -> torch.Tensor:
        """A `qc.MixedWeight`'s weight (every input constant), dequantized once."""
        key = id(node.outputs[0])
        if key not in self.cache:
            view = MixedMatMulView.of(node)
            stored = view.weight()
            weight = np.empty_like(stored)
            weight[view.perm_array()] = stored
            self.cache[key] = torch.from_numpy(weight)
        return self.cache[key]


def _ints(t) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _axes(node: ir.Node, inputs, index: int, rank: int):
    axes = inputs[index] if len(inputs) > index and inputs[index] is not None else attr(node, "axes")
    if axes is None:
        return None
    return [a % rank for a in _ints(axes)]


def _reduce(fn, node, inputs):
    x = inputs[0]
    axes = _axes(node, inputs, 1, x.dim())
    keep = bool(attr(node, "keepdims", 1))
    if axes is None or not axes:
        if attr(node, "noop_with_empty_axes", 0) and axes is not None:
            return x
        axes = list(range(x.dim()))
    return fn(x, axes, keep)


def _slice(x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    backwards = []  # (axis, start, end, step) of the slices with a negative step, taken after the others
    for s, e, a, st in zip(starts, ends, axes, steps):
        n = x.shape[a % x.dim()]
        s, e = s + n if s < 0 else s, e + n if e < 0 else e
        if st > 0:
            index[a % x.dim()] = slice(max(0, min(n, s)), max(0, min(n, e)), st)
        else:  # ONNX clamps a backward slice's start to [0, n - 1] and its end to [-1, n - 1]
            backwards.append((a % x.dim(), max(0, min(n - 1, s)), max(-1, min(n - 1, e)), st))
    x = x[tuple(index)]
    for a, s, e, st in backwards:  # empty where the clamped start is not past the end (or the axis is)
        taken = torch.arange(s, e, st, dtype=torch.int64) if x.shape[a] and s > e else torch.zeros(0, dtype=torch.int64)
        x = x.index_select(a, taken.to(x.device))
    return x


def _reshape(x, shape, allowzero):
    shape = _ints(shape)
    if not allowzero:
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def _gather(x, idx, axis):
    axis = axis % x.dim()
    idx = idx.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))  # a tuple: () when the result is a scalar


def _expand(x, shape):
    target = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape)))
    return x.expand(target)


def _layer_norm(node, inputs):
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = attr(node, "axis", -1) % x.dim()
    return torch.nn.functional.layer_norm(x, x.shape[axis:], scale, bias, attr(node, "epsilon", 1e-5))


def _batch_norm(node, inputs):
    """ONNX BatchNormalization in inference form (the stored mean and variance; training outputs refused)."""
    if attr(node, "training_mode", 0) or len([v for v in node.outputs if v is not None and v.uses()]) > 1:
        raise NotImplementedError(f"the block interpreter has no rule for BatchNormalization in training mode (node '{node.name}')")
    x, scale, bias, mean, var = inputs[:5]
    return torch.nn.functional.batch_norm(x, mean, var, scale, bias, training=False, eps=attr(node, "epsilon", 1e-5))


def _lrn(node, x):
    """ONNX LRN: x / (bias + alpha / size * the sum of squares over `size` neighbouring channels) ^ beta,
    the window from floor((size - 1) / 2) channels before to ceil((size - 1) / 2) after (zeros past the ends)."""
    size = attr(node, "size")
    before = (size - 1) // 2
    squares = x * x
    edge = list(x.shape)
    padded = torch.cat([squares.new_zeros(edge[:1] + [before] + edge[2:]), squares,
                        squares.new_zeros(edge[:1] + [size - 1 - before] + edge[2:])], dim=1)
    window = functools.reduce(torch.add, [padded[:, k: k + x.shape[1]] for k in range(size)])
    return x / (attr(node, "bias", 1.0) + attr(node, "alpha", 1e-4) / size * window) ** attr(node, "beta", 0.75)


def _clip(inputs):
    x = inputs[0]
    lo = inputs[1] if len(inputs) > 1 and inputs[1] is not None else None
    hi = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
    return torch.clamp(x, min=None if lo is None else lo.item(), max=None if hi is None else hi.item())


def _cast(node, x):
    to = _DTYPES.get(attr(node, "to"))
    if to is None:
        raise NotImplementedError(f"Cast to ONNX type {attr(node, 'to')}")
    return x.to(to)


def _softmax(x, axis):
    return torch.softmax(x, dim=axis)


def _top_k(node: ir.Node, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ONNX TopK: the k largest (or smallest) values along `axis` and their int64 indices, sorted."""
    values, indices = torch.topk(x, int(k.reshape(-1)[0]), dim=attr(node, "axis", -1), largest=bool(attr(node, "largest", 1)),
                                 sorted=bool(attr(node, "sorted", 1)))
    return values, indices


def _scatter_elements(node: ir.Node, data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    """ONNX ScatterElements without a reduction: `data` with `updates` written at `indices` along `axis`
    (negative indices counted from the end). The updates take the data's type, which ONNX requires and which
    a bfloat16 step's autocast can leave apart."""
    if attr(node, "reduction", "none") != "none":
        raise NotImplementedError(f"the block interpreter has no rule for ScatterElements with a reduction (node '{node.name}')")
    axis = attr(node, "axis", 0) % data.dim()
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    return data.scatter(axis, indices, updates.to(data.dtype))


def _gather_elements(node: ir.Node, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """ONNX GatherElements: `x` read at `idx` along `axis` (negative indices counted from the end)."""
    axis = attr(node, "axis", 0) % x.dim()
    idx = idx.long()
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))


def _gather_nd(node: ir.Node, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """ONNX GatherND: the last axis of `idx` indexes the leading axes of `x` after the `batch_dims` shared ones."""
    b = attr(node, "batch_dims", 0)
    idx = idx.long()
    depth = idx.shape[-1]
    batch = x.shape[:b]
    lead = torch.tensor(x.shape[b:b + depth], dtype=torch.int64)
    idx = torch.where(idx < 0, idx + lead, idx)
    xs = x.reshape(int(np.prod(batch, dtype=np.int64)), *x.shape[b:])
    points = idx.reshape(xs.shape[0], -1, depth)
    rows = torch.arange(xs.shape[0]).unsqueeze(1).expand(-1, points.shape[1])
    out = xs[(rows, *points.unbind(-1))]
    return out.reshape(*idx.shape[:-1], *x.shape[b + depth:])


def _cum_sum(node: ir.Node, x: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """ONNX CumSum along `axis`, `exclusive` (each sum leaves its own element out) and/or `reverse`."""
    a = int(axis.reshape(-1)[0]) % x.dim()
    y = x.flip(a) if attr(node, "reverse", 0) else x
    if attr(node, "exclusive", 0):  # the sums before each element: shifted one along the axis, a zero first
        y = torch.cat([torch.zeros_like(y.narrow(a, 0, 1)), y.narrow(a, 0, y.shape[a] - 1)], dim=a) if y.shape[a] else y
    out = torch.cumsum(y, dim=a, dtype=y.dtype)
    return out.flip(a) if attr(node, "reverse", 0) else out


def _split(node: ir.Node, inputs) -> tuple[torch.Tensor, ...]:
    """ONNX Split: by the `split` sizes, else into `num_outputs` parts of ceil(n / parts), the last shorter."""
    x, axis = inputs[0], attr(node, "axis", 0) % inputs[0].dim()
    if len(inputs) > 1 and inputs[1] is not None:
        return tuple(torch.split(x, _ints(inputs[1]), dim=axis))
    parts = attr(node, "num_outputs", len(node.outputs))
    size = -(-x.shape[axis] // parts)
    sizes = [min(size, max(0, x.shape[axis] - size * i)) for i in range(parts)]  # the last ones may be short or empty
    return tuple(torch.split(x, sizes, dim=axis))


def _arg(node: ir.Node, x: torch.Tensor, largest: bool) -> torch.Tensor:
    """ONNX ArgMax / ArgMin: the first (or, `select_last_index`, the last) position of the extreme value."""
    axis = attr(node, "axis", 0) % x.dim()
    last = bool(attr(node, "select_last_index", 0))
    y = x.flip(axis) if last else x
    out = torch.argmax(y, dim=axis, keepdim=True) if largest else torch.argmin(y, dim=axis, keepdim=True)
    if last:
        out = x.shape[axis] - 1 - out
    return out if attr(node, "keepdims", 1) else out.squeeze(axis)


def _is_inf(node: ir.Node, x: torch.Tensor) -> torch.Tensor:
    found = torch.zeros_like(x, dtype=torch.bool)
    if attr(node, "detect_positive", 1):
        found |= torch.isposinf(x)
    if attr(node, "detect_negative", 1):
        found |= torch.isneginf(x)
    return found


def _constant_of_shape(node: ir.Node, shape: torch.Tensor) -> torch.Tensor:
    """ONNX ConstantOfShape: the `value` tensor's one element (and its type) everywhere; float 0 without it."""
    value = attr(node, "value")
    if value is None:
        return torch.zeros(_ints(shape))
    fill = torch.from_numpy(np.array(value.numpy()).reshape(-1)[:1])
    return fill.expand(_ints(shape)).clone() if _ints(shape) else fill.reshape(()).clone()


def _binary(fn):
    return lambda node, i: fn(i[0], i[1])


OPS: dict[str, Callable] = {
    "Identity": lambda n, i: i[0],
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul),
    "Div": lambda n, i: torch.div(i[0], i[1], rounding_mode="trunc") if not i[0].is_floating_point() else i[0] / i[1],
    "Pow": lambda n, i: torch.pow(i[0], i[1]),
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "Greater": _binary(torch.gt),
    "LessOrEqual": _binary(torch.le), "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or), "Not": lambda n, i: torch.logical_not(i[0]),
    "Where": lambda n, i: torch.where(i[0].bool(), i[1], i[2]),
    "Neg": lambda n, i: -i[0], "Sqrt": lambda n, i: torch.sqrt(i[0]), "Reciprocal": lambda n, i: 1.0 / i[0],
    "Exp": lambda n, i: torch.exp(i[0]), "Log": lambda n, i: torch.log(i[0]), "Tanh": lambda n, i: torch.tanh(i[0]),
    "Erf": lambda n, i: torch.erf(i[0]), "Abs": lambda n, i: torch.abs(i[0]),
    "Cos": lambda n, i: torch.cos(i[0]), "Sin": lambda n, i: torch.sin(i[0]),
    "Sigmoid": lambda n, i: torch.sigmoid(i[0]), "Relu": lambda n, i: torch.relu(i[0]),
    "Gelu": lambda n, i: torch.nn.functional.gelu(i[0], approximate=attr(n, "approximate", "none")),
    "Softmax": lambda n, i: _softmax(i[0], attr(n, "axis", -1)),
    "TopK": lambda n, i: _top_k(n, i[0], i[1]),
    "ScatterElements": lambda n, i: _scatter_elements(n, i[0], i[1], i[2]),
    "MatMul": lambda n, i: torch.matmul(i[0], i[1]),
    "Sum": lambda n, i: functools.reduce(torch.add, i),  # lower-ort writes residual Adds read by a LayerNormalization so
    "Conv": lambda n, i: _conv(n, i),
    "ConvTranspose": lambda n, i: _conv_transpose(n, i),
    "MaxPool": lambda n, i: _pool(n, i[0], "max"),
    "AveragePool": lambda n, i: _pool(n, i[0], "average"),
    "GlobalAveragePool": lambda n, i: i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda n, i: i[0].amax(dim=tuple(range(2, i[0].dim())), keepdim=True),
    "Flatten": lambda n, i: i[0].reshape(int(np.prod(i[0].shape[: attr(n, "axis", 1) % max(i[0].dim(), 1)])), -1)
    if attr(n, "axis", 1) % max(i[0].dim(), 1) else i[0].reshape(1, -1),
    "Mod": lambda n, i: torch.fmod(i[0], i[1]) if attr(n, "fmod", 0) else torch.remainder(i[0], i[1]),
    "Pad": lambda n, i: _pad(n, i),
    "DepthToSpace": lambda n, i: _depth_to_space(n, i[0]),
    "Min": lambda n, i: functools.reduce(torch.minimum, i), "Max": lambda n, i: functools.reduce(torch.maximum, i),
    "Transpose": lambda n, i: i[0].permute(attr(n, "perm", list(range(i[0].dim()))[::-1])),
    "Reshape": lambda n, i: _reshape(i[0], i[1], attr(n, "allowzero", 0)),
    "Shape": lambda n, i: torch.tensor(list(i[0].shape)[attr(n, "start", 0): attr(n, "end", None)], dtype=torch.int64),
    "Squeeze": lambda n, i: i[0].squeeze(_axes(n, i, 1, i[0].dim())) if _axes(n, i, 1, i[0].dim()) is not None else i[0].squeeze(),
    "Unsqueeze": lambda n, i: _unsqueeze(i[0], _ints(i[1])),
    "Concat": lambda n, i: torch.cat([t for t in i], dim=attr(n, "axis")),
    "Slice": lambda n, i: _slice(i[0], i[1], i[2], i[3] if len(i) > 3 else None, i[4] if len(i) > 4 else None),
    "Gather": lambda n, i: _gather(i[0], i[1], attr(n, "axis", 0)),
    "Expand": lambda n, i: _expand(i[0], i[1]),
    "Tile": lambda n, i: i[0].repeat(*_ints(i[1])),
    "Range": lambda n, i: torch.arange(i[0].item(), i[1].item(), i[2].item(), dtype=i[0].dtype),
    "Cast": lambda n, i: _cast(n, i[0]),
    "Trilu": lambda n, i: (torch.triu if attr(n, "upper", 1) else torch.tril)(i[0], int(i[1].item()) if len(i) > 1 and i[1] is not None else 0),
    "ReduceMean": lambda n, i: _reduce(lambda x, a, k: x.mean(dim=a, keepdim=k), n, i),
    "ReduceSum": lambda n, i: _reduce(lambda x, a, k: x.sum(dim=a, keepdim=k), n, i),
    "ReduceMax": lambda n, i: _reduce(lambda x, a, k: x.amax(dim=a, keepdim=k), n, i),
    "ReduceL2": lambda n, i: _reduce(lambda x, a, k: torch.sqrt((x * x).sum(dim=a, keepdim=k)), n, i),
    "LayerNormalization": _layer_norm,
    "BatchNormalization": lambda n, i: _batch_norm(n, i),
    "InstanceNormalization": lambda n, i: torch.nn.functional.instance_norm(i[0], weight=i[1], bias=i[2], eps=attr(n, "epsilon", 1e-5)),
    "LRN": lambda n, i: _lrn(n, i[0]),
    "LeakyRelu": lambda n, i: torch.nn.functional.leaky_relu(i[0], attr(n, "alpha", 0.01)),
    "PRelu": lambda n, i: torch.where(i[0] >= 0, i[0], i[0] * i[1]),
    "HardSigmoid": lambda n, i: torch.clamp(attr(n, "alpha", 0.2) * i[0] + attr(n, "beta", 0.5), 0.0, 1.0),
    "HardSwish": lambda n, i: torch.nn.functional.hardswish(i[0]),
    "Clip": lambda n, i: _clip(i),
    "ConstantOfShape": lambda n, i: _constant_of_shape(n, i[0]),
    # what encoder exports compute their masks and positions with (padding masks, RoBERTa's position ids)
    "IsNaN": lambda n, i: torch.isnan(i[0]), "IsInf": lambda n, i: _is_inf(n, i[0]),
    "CumSum": lambda n, i: _cum_sum(n, i[0], i[1]),
    "GatherElements": lambda n, i: _gather_elements(n, i[0], i[1]),
    "GatherND": lambda n, i: _gather_nd(n, i[0], i[1]),
    "Split": lambda n, i: _split(n, i),
    "ArgMax": lambda n, i: _arg(n, i[0], True), "ArgMin": lambda n, i: _arg(n, i[0], False),
    "Einsum": lambda n, i: torch.einsum(attr(n, "equation"), *i),
    "Size": lambda n, i: torch.tensor(i[0].numel(), dtype=torch.int64),
    "Xor": _binary(torch.logical_xor),
    "Sign": lambda n, i: torch.sign(i[0]), "Floor": lambda n, i: torch.floor(i[0]), "Ceil": lambda n, i: torch.ceil(i[0]),
    "Round": lambda n, i: torch.round(i[0]),  # half to even, as ONNX
    "ReduceMin": lambda n, i: _reduce(lambda x, a, k: x.amin(dim=a, keepdim=k), n, i),
    "LogSoftmax": lambda n, i: torch.log_softmax(i[0], dim=attr(n, "axis", -1)),
    "Softplus": lambda n, i: torch.nn.functional.softplus(i[0]),
    "Elu": lambda n, i: torch.nn.functional.elu(i[0], attr(n, "alpha", 1.0)),
    "Selu": lambda n, i: attr(n, "gamma", 1.05070102214813232421875) * torch.where(
        i[0] > 0, i[0], attr(n, "alpha", 1.67326319217681884765625) * (torch.exp(i[0]) - 1)),
    "Mish": lambda n, i: torch.nn.functional.mish(i[0]),
    "Resize": lambda n, i: _resize(n, i),
}

# ONNX Resize's (mode, coordinate_transformation_mode) pairs torch's interpolate computes alike: the
# torch mode and its align_corners (nearest: floor of the asymmetric coordinate; linear and cubic with
# torch's cubic coefficient -0.75, ONNX's default)
_RESIZE_MODES = {
    ("nearest", "asymmetric"): ("nearest", None),
    ("linear", "half_pixel"): ("linear", False), ("linear", "align_corners"): ("linear", True),
    ("cubic", "half_pixel"): ("cubic", False), ("cubic", "align_corners"): ("cubic", True),
}
_TORCH_RESIZE = {("linear", 1): "linear", ("linear", 2): "bilinear", ("linear", 3): "trilinear", ("cubic", 2): "bicubic"}


def _resize_refused(node: ir.Node, rank: int | None) -> str | None:
    """Why the Resize rule cannot compute `node` as ONNX does (None: it can): its modes, its input's rank
    (3 to 5, known), and, where its scales or sizes are constants, a resize of the batch or channel axis."""
    mode, coords = attr(node, "mode", "nearest"), attr(node, "coordinate_transformation_mode", "half_pixel")
    if (mode, coords) not in _RESIZE_MODES:
        return f"mode={mode} coordinate_transformation_mode={coords}"
    if mode == "nearest" and attr(node, "nearest_mode", "round_prefer_floor") != "floor":
        return f"nearest_mode={attr(node, 'nearest_mode')}"
    if mode == "cubic" and (attr(node, "cubic_coeff_a", -0.75) != -0.75 or attr(node, "exclude_outside", 0)):
        return "cubic_coeff_a or exclude_outside"
    if attr(node, "antialias", 0) or attr(node, "axes") is not None or attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        return "antialias, axes or keep_aspect_ratio_policy"
    if rank is None or rank not in (3, 4, 5) or (mode != "nearest" and (mode, rank - 2) not in _TORCH_RESIZE):
        return f"{mode} mode on a rank-{rank if rank is not None else '?'} input"
    return _resizes_batch_or_channels(node)


def _resizes_batch_or_channels(node: ir.Node) -> str | None:
    """'batch or channel axis resized' where `node`'s constant scales or sizes say so (None where they do not,
    or are computed at run time: `_resize` checks those)."""
    x = node.inputs[0]
    scales = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
    sizes = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] is not None else None
    if sizes is not None and sizes.const_value is not None and sizes.const_value.size:
        known = list(x.shape)[:2] if x.shape is not None else []
        wanted = [int(v) for v in sizes.const_value.numpy()[:2]]
        if any(isinstance(d, int) and d != v for d, v in zip(known, wanted)):
            return "batch or channel axis resized"
    elif scales is not None and scales.const_value is not None and scales.const_value.size:
        if [float(v) for v in scales.const_value.numpy()[:2]] != [1.0, 1.0]:
            return "batch or channel axis resized"
    return None


def _resize(node: ir.Node, inputs) -> torch.Tensor:
    """ONNX Resize of the spatial axes (batch and channels kept) by `sizes`, or by `scales` (the output
    floor(size x scale), the coordinates mapped with the scale as given), in the modes `_RESIZE_MODES` lists."""
    x = inputs[0]
    refused = _resize_refused(node, x.dim())
    if refused:
        raise NotImplementedError(f"the block interpreter has no rule for Resize with {refused} (node '{node.name}')")
    scales = inputs[2] if len(inputs) > 2 and inputs[2] is not None and inputs[2].numel() else None
    sizes = inputs[3] if len(inputs) > 3 and inputs[3] is not None and inputs[3].numel() else None
    kept = [int(v) for v in sizes[:2]] == [x.shape[0], x.shape[1]] if sizes is not None else \
        [float(v) for v in scales[:2]] == [1.0, 1.0]
    if not kept:
        raise NotImplementedError(f"the block interpreter resizes spatial axes only (node '{node.name}')")
    mode, corners = _RESIZE_MODES[(attr(node, "mode", "nearest"), attr(node, "coordinate_transformation_mode", "half_pixel"))]
    torch_mode = "nearest" if mode == "nearest" else _TORCH_RESIZE[(mode, x.dim() - 2)]
    if sizes is not None:
        return torch.nn.functional.interpolate(x, size=[int(v) for v in sizes[2:]], mode=torch_mode, align_corners=corners)
    return torch.nn.functional.interpolate(x, scale_factor=[float(v) for v in scales[2:]], mode=torch_mode, align_corners=corners,
                                           recompute_scale_factor=False)


def _conv(node: ir.Node, inputs) -> torch.Tensor:
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    dims = w.dim() - 2
    if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise NotImplementedError(f"the block interpreter has no rule for Conv with auto_pad (node '{node.name}')")
    pads = attr(node, "pads", [0] * (2 * dims))
    begin, end = pads[:dims], pads[dims:]
    padding = begin
    if begin != end:  # torch pads both sides alike: pad first, the last axis's pair first
        x = torch.nn.functional.pad(x, [p for d in reversed(range(dims)) for p in (begin[d], end[d])])
        padding = [0] * dims
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[dims]
    return conv(x, w, b, stride=attr(node, "strides", [1] * dims), padding=padding,
                dilation=attr(node, "dilations", [1] * dims), groups=attr(node, "group", 1))


def _conv_transpose(node: ir.Node, inputs) -> torch.Tensor:
    """ONNX ConvTranspose: torch's with no padding, then the padded borders cut off, `output_padding`
    added at the end (where only the bias lands), then the bias."""
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    dims = w.dim() - 2
    if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID") or attr(node, "output_shape") is not None:
        raise NotImplementedError(f"the block interpreter has no rule for ConvTranspose with auto_pad or output_shape (node '{node.name}')")
    pads = attr(node, "pads", [0] * (2 * dims))
    extra = attr(node, "output_padding", [0] * dims)
    conv = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d,
            3: torch.nn.functional.conv_transpose3d}[dims]
    y = conv(x, w, None, stride=attr(node, "strides", [1] * dims), groups=attr(node, "group", 1),
             dilation=attr(node, "dilations", [1] * dims))
    if any(extra):
        y = torch.nn.functional.pad(y, [p for d in reversed(range(dims)) for p in (0, extra[d])])
    y = y[(slice(None), slice(None)) + tuple(slice(pads[d], y.shape[2 + d] - pads[dims + d]) for d in range(dims))]
    return y if b is None else y + b.reshape([1, -1] + [1] * dims)


def _pool(node: ir.Node, x: torch.Tensor, kind: str) -> torch.Tensor:
    """ONNX MaxPool / AveragePool (NOTSET or VALID padding; a pad wider on one side is applied first,
    with -inf for max and zeros counted for average only where `count_include_pad` says so)."""
    dims = x.dim() - 2
    if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID") or len([v for v in node.outputs if v is not None and v.uses()]) > 1:
        raise NotImplementedError(f"the block interpreter has no rule for {node.op_type} with auto_pad or indices (node '{node.name}')")
    kernel = attr(node, "kernel_shape")
    strides = attr(node, "strides", [1] * dims)
    pads = attr(node, "pads", [0] * (2 * dims))
    begin, end = pads[:dims], pads[dims:]
    ceil = bool(attr(node, "ceil_mode", 0))
    if kind == "max":
        if begin != end:
            x = torch.nn.functional.pad(x, [p for d in reversed(range(dims)) for p in (begin[d], end[d])], value=float("-inf"))
            begin = [0] * dims
        pool = {1: torch.nn.functional.max_pool1d, 2: torch.nn.functional.max_pool2d, 3: torch.nn.functional.max_pool3d}[dims]
        return pool(x, kernel, strides, begin, attr(node, "dilations", [1] * dims), ceil_mode=ceil)
    include_pad = bool(attr(node, "count_include_pad", 0))
    if (begin != end and (include_pad or ceil)) or any(d != 1 for d in attr(node, "dilations", [1] * dims)):
        raise NotImplementedError(f"the block interpreter has no rule for AveragePool with uneven pads counted or in ceil mode, "
                                  f"or dilations (node '{node.name}')")
    pool = {1: torch.nn.functional.avg_pool1d, 2: torch.nn.functional.avg_pool2d, 3: torch.nn.functional.avg_pool3d}[dims]
    if begin == end:
        return pool(x, kernel, strides, begin, ceil_mode=ceil, count_include_pad=include_pad)
    # uneven pads, not counted: the windows' sums over the zero-padded input divided by their counts of real values
    widths = [p for d in reversed(range(dims)) for p in (begin[d], end[d])]
    total = pool(torch.nn.functional.pad(x, widths), kernel, strides, 0, ceil_mode=ceil)
    count = pool(torch.nn.functional.pad(torch.ones_like(x[:1, :1]), widths), kernel, strides, 0, ceil_mode=ceil)
    return total / count


def unsupported_ops(nodes: list[ir.Node]) -> list[str]:
    """The ops among `nodes` the interpreter has no rule for (domain.op_type), or a rule that refuses
    their attributes (`Conv(auto_pad)`), sorted: what `run_nodes` would raise on, known before it runs.
    A non-constant Pad's amounts are known only then: the rule refuses them by name when it runs."""
    missing = set()
    for node in nodes:
        domain = "" if node.domain == "ai.onnx" else node.domain
        if domain == "qc" and node.op_type in QC_OPS:
            continue
        if domain == "" and (node.op_type in OPS or node.op_type == "Constant"):
            refused = _refused_attributes(node)
            if refused:
                missing.add(f"{node.op_type}({refused})")
            continue
        missing.add(f"{domain}.{node.op_type}" if domain else node.op_type)
    return sorted(missing)


def _refused_attributes(node: ir.Node) -> str | None:
    """The attributes of a node whose rule refuses them (the conditions the rules raise on), or None."""
    op = node.op_type
    padded = attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID")
    used_outputs = len([v for v in node.outputs if v is not None and v.uses()])
    if op == "BatchNormalization" and (attr(node, "training_mode", 0) or used_outputs > 1):
        return "training mode"
    if op == "Cast" and attr(node, "to") not in _DTYPES:
        return f"to={attr(node, 'to')}"
    if op == "ScatterElements" and attr(node, "reduction", "none") != "none":
        return "reduction"
    if op in ("Conv", "ConvTranspose", "MaxPool", "AveragePool") and padded:
        return "auto_pad"
    if op == "ConvTranspose" and attr(node, "output_shape") is not None:
        return "output_shape"
    if op in ("MaxPool", "AveragePool") and used_outputs > 1:
        return "indices"
    if op == "AveragePool":
        dims = len(attr(node, "kernel_shape", []))
        pads = attr(node, "pads", [0] * (2 * dims))
        if (pads[:dims] != pads[dims:] and (attr(node, "count_include_pad", 0) or attr(node, "ceil_mode", 0))) \
                or any(d != 1 for d in attr(node, "dilations", [1] * dims)):
            return "uneven pads counted, ceil mode or dilations"
    if op == "Resize":
        shape = node.inputs[0].shape if node.inputs and node.inputs[0] is not None else None
        return _resize_refused(node, len(shape) if shape is not None else None)
    if op == "Pad" and attr(node, "mode", "constant") != "constant":  # the rule pads spatial axes only in these modes
        pads = node.inputs[1] if len(node.inputs) > 1 else None
        axes = node.inputs[3] if len(node.inputs) > 3 else None
        if pads is None or pads.const_value is None or (axes is not None and axes.const_value is None):
            return None  # amounts computed at run time (an image padded to a multiple of a size): `_pad` checks them then
        values = [int(p) for p in pads.const_value.numpy()]
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else len(values) // 2
        on = [int(a) % rank for a in axes.const_value.numpy()] if axes is not None else list(range(len(values) // 2))
        if any((values[i] or values[i + len(on)]) and a < 2 for i, a in enumerate(on)):
            return f"{attr(node, 'mode')} mode on the batch or channel axis"
    return None


def _pad(node: ir.Node, inputs) -> torch.Tensor:
    x, pads = inputs[0], _ints(inputs[1])
    value = float(inputs[2].item()) if len(inputs) > 2 and inputs[2] is not None and inputs[2].numel() else 0.0
    axes = [a % x.dim() for a in _ints(inputs[3])] if len(inputs) > 3 and inputs[3] is not None else list(range(x.dim()))
    begin, end = dict(zip(axes, pads[: len(axes)])), dict(zip(axes, pads[len(axes):]))
    padded = [d for d in range(x.dim()) if begin.get(d, 0) or end.get(d, 0)]
    first = min(padded) if padded else x.dim()  # torch takes pairs from the last axis back to the first padded one
    flat = [p for d in reversed(range(first, x.dim())) for p in (begin.get(d, 0), end.get(d, 0))]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}[attr(node, "mode", "constant")]
    if not any(flat):
        return x
    if mode != "constant" and first < 2:
        raise NotImplementedError(f"the block interpreter pads only spatial axes in {mode} mode (node '{node.name}')")
    return torch.nn.functional.pad(x, flat, mode=mode, value=value) if mode == "constant" else torch.nn.functional.pad(x, flat, mode=mode)


def _constant(node: ir.Node) -> torch.Tensor:
    """A `Constant` node's tensor, from whichever of its value attributes it has."""
    if node.attributes.get("value") is not None:
        return torch.from_numpy(np.array(attr(node, "value").numpy()))
    for name, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64), ("value_ints", np.int64)):
        if node.attributes.get(name) is not None:
            return torch.from_numpy(np.array(attr(node, name), dtype))
    raise NotImplementedError(f"the block interpreter reads Constant's value, value_float(s) and value_int(s) only (node '{node.name}')")


def _depth_to_space(node: ir.Node, x: torch.Tensor) -> torch.Tensor:
    b = attr(node, "blocksize")
    n, c, h, w = x.shape
    if attr(node, "mode", "DCR") == "CRD":
        return torch.nn.functional.pixel_shuffle(x, b)
    y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


def _unsqueeze(x, axes):
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


# the qc ops run_nodes runs itself (the streams' weights and grids); the standard ops are in OPS
QC_OPS = frozenset({"MixedMatMul", "MixedWeight", "GatherQuantized", "DequantizeWeight", "QuantizeActivation"})


def run_nodes(nodes: list[ir.Node], env: dict[str, torch.Tensor], weight_of: Callable[[ir.Node], torch.Tensor],
              constants: Constants, quantize: Callable[[ir.Node, torch.Tensor], torch.Tensor] | None = None,
              replaced: dict[str, torch.Tensor] | None = None, wanted: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """Evaluate `nodes` in order into `env` (updated in place and returned). With `wanted`, only
    the nodes up to the last that computes one of those values run, and each other value is dropped
    from `env` once its last reader has run: a block's intermediates are not all held at once."""
    replaced = replaced or {}
    drop_after: dict[int, list[str]] = {}
    if wanted is not None:
        nodes, drop_after = _live_range(nodes, set(wanted))
    for position, node in enumerate(nodes):
        _run_node(node, env, weight_of, constants, quantize, replaced)
        for name in drop_after.get(position, ()):
            env.pop(name, None)
    return env


def _live_range(nodes: list[ir.Node], wanted: set[str]) -> tuple[list[ir.Node], dict[int, list[str]]]:
    """The nodes up to the last that computes a `wanted` value, and per node position the values
    (not wanted) that no node after it reads."""
    producers = [i for i, node in enumerate(nodes) if any(v.name in wanted for v in node.outputs)]
    nodes = nodes[: producers[-1] + 1] if producers else []
    last_read: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for value in node.outputs:
            last_read.setdefault(value.name, i)  # never read: dropped as soon as it is made
        for value in node.inputs:
            if value is not None:
                last_read[value.name] = i
    drop_after: dict[int, list[str]] = {}
    for name, i in last_read.items():
        if name not in wanted:
            drop_after.setdefault(i, []).append(name)
    return nodes, drop_after


def _run_node(node: ir.Node, env: dict[str, torch.Tensor], weight_of: Callable[[ir.Node], torch.Tensor],
              constants: Constants, quantize: Callable[[ir.Node, torch.Tensor], torch.Tensor] | None,
              replaced: dict[str, torch.Tensor]) -> None:
    """Evaluate one node into `env`."""
    if node.domain == "qc" and node.op_type == "DequantizeWeight":
        env[node.outputs[0].name] = weight_of(node)
        return
    if node.domain == "qc" and node.op_type == "QuantizeActivation":
        x = env[node.inputs[0].name]
        env[node.outputs[0].name] = x if quantize is None else quantize(node, x)
        return
    if is_mixed_matmul(node):
        view = MixedMatMulView.of(node)
        x = env[view.x.name]
        perm = constants.get(view.perm)
        env[node.outputs[0].name] = torch.matmul(x.index_select(-1, perm), weight_of(node))
        return
    if node.domain == "qc" and node.op_type == "MixedWeight":  # a Conv's kernel, not learned here
        env[node.outputs[0].name] = constants.mixed_weight(node)
        return
    if node.domain == "qc" and node.op_type == "GatherQuantized":  # an embedding table, not learned here
        env[node.outputs[0].name] = _gather(weight_of(node), env[node.inputs[1].name], 0)
        return
    if node.domain not in ("", "ai.onnx"):
        raise NotImplementedError(f"the block interpreter has no rule for {node.domain}.{node.op_type}")
    if node.op_type == "Constant":
        env[node.outputs[0].name] = _constant(node)
        return
    rule = OPS.get(node.op_type)
    if rule is None:
        raise NotImplementedError(f"the block interpreter has no rule for {node.op_type} (node '{node.name}')")
    inputs = []
    for index, value in enumerate(node.inputs):
        if value is None:
            inputs.append(None)
        elif node.op_type == "MatMul" and index == 1 and value.const_value is not None and len(value.const_value.shape) == 2:
            inputs.append(weight_of(node))
        elif value.name in replaced:
            inputs.append(replaced[value.name])
        elif value.const_value is not None:
            inputs.append(constants.get(value))
        else:
            inputs.append(env[value.name])
    result = rule(node, inputs)
    outs = result if isinstance(result, tuple) else (result,)
    for out, t in zip(node.outputs, outs):
        env[out.name] = t
