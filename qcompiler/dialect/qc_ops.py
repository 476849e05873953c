"""The `qc` ops of uniform quantization. Importing this module registers them.

`qc.QuantizeActivation(X) -> Y` rounds an activation to an integer grid and back, so that the
graph computes what the quantized runtime will:
    static:    q = clip(round(X / scale) + zero_point, qmin, qmax);  Y = (q - zero_point) * scale
    dynamic:   the same with scale and zero_point computed at run time from min/max of the whole
               tensor (unsigned, asymmetric, as ONNX's DynamicQuantizeLinear does)
    per-token: symmetric, one scale per row (all axes but the last), scale = max|x_row| / qmax
               (ZeroQuant, Yao et al. 2022)
Rounding is half to even, as ONNX's QuantizeLinear.

`qc.DequantizeWeight(Q, scale[, zero_point]) -> W` expands stored integer weights:
    W = (Q - zero_point) * scale, `scale` and `zero_point` broadcast along `axis`.
Q is stored as int8 (values within the `bits`-bit signed range).

`qc.GatherQuantized(Q, indices, scale, zero_point) -> Y` looks rows up in a quantized table (an
embedding): Q [V, D] holds unsigned `bits`-bit codes (stored one per uint8), scale and zero_point
[V, D / block_size] one per block of `block_size` consecutive columns of a row:
    Y[..., d] = (Q[i, d] - zero_point[i, d // block_size]) * scale[i, d // block_size],  i = indices[...]

`qc.ChannelScale(X, scale) -> Y` multiplies X by one constant per channel of `axis`:
Y = X * scale. `smooth` writes its diag(s)^-1 this way, so that `fold-scales` can find it and fold
it into a producer (and turn what it cannot fold into a plain Mul).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.dialect.op_registry import Attr, OpSchema, attributes_of, register
from qcompiler.errors import VerificationError

ACT_MODES = ("static", "dynamic", "per-token")


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def quantize_activation(x, mode="static", scale=1.0, zero_point=0, bits=8):
    x = np.asarray(x)
    if mode == "static":
        lo, hi = int_range(bits, signed=True)
        q = np.clip(np.round(x / np.float32(scale)) + zero_point, lo, hi)
        return ((q - zero_point) * np.float32(scale)).astype(x.dtype)
    if mode == "dynamic":
        lo, hi = int_range(bits, signed=False)
        x_min = min(float(x.min()), 0.0) if x.size else 0.0
        x_max = max(float(x.max()), 0.0) if x.size else 0.0
        s = np.float32((x_max - x_min) / (hi - lo)) if x_max > x_min else np.float32(1.0)
        zp = np.clip(np.round(-x_min / s), lo, hi)
        q = np.clip(np.round(x / s) + zp, lo, hi)
        return ((q - zp) * s).astype(x.dtype)
    if mode == "per-token":
        _, hi = int_range(bits, signed=True)
        s = (np.max(np.abs(x), axis=-1, keepdims=True) / hi).astype(np.float32)
        s = np.where(s == 0, np.float32(1.0), s)
        return (np.clip(np.round(x / s), -hi, hi) * s).astype(x.dtype)
    raise ValueError(f"unknown activation mode {mode!r}")


def _quantize_activation_reference(x, mode="static", scale=1.0, zero_point=0, bits=8):
    return (quantize_activation(x, mode, scale, zero_point, bits),)


def _check_quantize_activation(node: ir.Node) -> None:
    attrs = attributes_of(node)
    where = f"node '{node.name}' (qc.QuantizeActivation)"
    if attrs["mode"] not in ACT_MODES:
        raise VerificationError(f"{where}: mode must be one of {', '.join(ACT_MODES)}")
    if not 2 <= attrs["bits"] <= 8:
        raise VerificationError(f"{where}: bits must be in 2..8")
    if attrs["mode"] == "static":
        lo, hi = int_range(attrs["bits"], signed=True)
        if not attrs["scale"] > 0:
            raise VerificationError(f"{where}: a static scale must be positive")
        if not lo <= attrs["zero_point"] <= hi:
            raise VerificationError(f"{where}: zero_point {attrs['zero_point']} is outside [{lo}, {hi}]")


def dequantize_weight(q, scale, zero_point=None, axis=1):
    q = np.asarray(q).astype(np.float32)
    shape = [1] * q.ndim
    shape[axis] = -1
    scale = np.asarray(scale, np.float32).reshape(shape)
    if zero_point is not None:
        q = q - np.asarray(zero_point, np.float32).reshape(shape)
    return q * scale


def _dequantize_weight_reference(q, scale, zero_point=None, axis=1, bits=8):
    return (dequantize_weight(q, scale, zero_point, axis),)


def _check_dequantize_weight(node: ir.Node) -> None:
    attrs = attributes_of(node)
    where = f"node '{node.name}' (qc.DequantizeWeight)"
    q, scale = node.inputs[0], node.inputs[1]
    if q.const_value is not None:
        if q.const_value.dtype != ir.DataType.INT8:
            raise VerificationError(f"{where}: weights must be stored as int8, not {q.const_value.dtype.name}")
        rank = len(q.const_value.shape)
        if not -rank <= attrs["axis"] < rank:
            raise VerificationError(f"{where}: axis {attrs['axis']} is out of range for rank {rank}")
        if scale.const_value is not None and scale.const_value.size not in (1, q.const_value.shape[attrs["axis"]]):
            raise VerificationError(f"{where}: {scale.const_value.size} scales for {q.const_value.shape[attrs['axis']]} channels")
        lo, hi = int_range(attrs["bits"], signed=True)
        values = q.const_value.numpy()
        if values.size and (values.min() < lo or values.max() > hi):
            raise VerificationError(f"{where}: codes outside the {attrs['bits']}-bit range [{lo}, {hi}]")


QUANTIZE_ACTIVATION = register(
    OpSchema(
        op_type="QuantizeActivation",
        inputs=("X",),
        outputs=("Y",),
        attributes={
            "mode": Attr("string", "static"),
            "scale": Attr("float", 1.0),
            "zero_point": Attr("int", 0),
            "bits": Attr("int", 8),
        },
        doc="round an activation to a `bits`-bit grid and back (static, dynamic or per-token)",
        reference=_quantize_activation_reference,
        check=_check_quantize_activation,
    )
)

DEQUANTIZE_WEIGHT = register(
    OpSchema(
        op_type="DequantizeWeight",
        inputs=("Q", "scale", "zero_point"),
        outputs=("W",),
        optional_inputs=1,
        attributes={"axis": Attr("int", 1), "bits": Attr("int", 8)},
        doc="W = (Q - zero_point) * scale along `axis`, Q stored as int8",
        reference=_dequantize_weight_reference,
        check=_check_dequantize_weight,
    )
)


def gather_quantized(q, indices, scale, zero_point, block_size=32):
    """The rows `indices` of the table whose codes are `q`, expanded to float32."""
    q, zero_point = np.asarray(q), np.asarray(zero_point)
    rows, columns = q.shape
    blocks = (q.reshape(rows, -1, block_size).astype(np.float32) - zero_point[..., None].astype(np.float32)) * np.asarray(scale, np.float32)[..., None]
    return blocks.reshape(rows, columns)[np.asarray(indices)]


def _gather_quantized_reference(q, indices, scale, zero_point, bits=4, block_size=32):
    return (gather_quantized(q, indices, scale, zero_point, block_size),)


def _check_gather_quantized(node: ir.Node) -> None:
    attrs = attributes_of(node)
    where = f"node '{node.name}' (qc.GatherQuantized)"
    if attrs["bits"] not in (4, 8):
        raise VerificationError(f"{where}: bits must be 4 or 8, got {attrs['bits']}")
    block = attrs["block_size"]
    if block < 16 or block & (block - 1):
        raise VerificationError(f"{where}: block_size must be a power of 2, at least 16, got {block}")
    q, scale, zero = node.inputs[0], node.inputs[2], node.inputs[3]
    if any(v.const_value is None for v in (q, scale, zero)):
        raise VerificationError(f"{where}: the codes, scales and zero points must be constants")
    if q.const_value.dtype != ir.DataType.UINT8 or len(q.const_value.shape) != 2:
        raise VerificationError(f"{where}: codes must be a 2-D uint8 table, got {q.const_value.dtype.name} {list(q.const_value.shape)}")
    rows, columns = q.const_value.shape
    if columns % block:
        raise VerificationError(f"{where}: {columns} columns are not a whole number of blocks of {block}")
    expected = [rows, columns // block]
    for name, value in (("scale", scale), ("zero_point", zero)):
        if list(value.const_value.shape) != expected:
            raise VerificationError(f"{where}: {name} has shape {list(value.const_value.shape)}, expected {expected}")
    codes = q.const_value.numpy()
    if codes.size and int(codes.max()) >= 1 << attrs["bits"]:
        raise VerificationError(f"{where}: codes outside the {attrs['bits']}-bit range [0, {(1 << attrs['bits']) - 1}]")


GATHER_QUANTIZED = register(
    OpSchema(
        op_type="GatherQuantized",
        inputs=("Q", "indices", "scale", "zero_point"),
        outputs=("Y",),
        attributes={"bits": Attr("int", 4), "block_size": Attr("int", 32)},
        doc="rows of a quantized table: Y = (Q[i] - zero_point[i]) * scale[i] per block of `block_size` columns",
        reference=_gather_quantized_reference,
        check=_check_gather_quantized,
    )
)


def channel_scale(x, scale, axis=-1):
    x = np.asarray(x)
    shape = [1] * x.ndim
    shape[axis] = -1
    return (x * np.asarray(scale, x.dtype).reshape(shape)).astype(x.dtype)


def _channel_scale_reference(x, scale, axis=-1):
    return (channel_scale(x, scale, axis),)


def _check_channel_scale(node: ir.Node) -> None:
    scale = node.inputs[1]
    if scale is None or scale.const_value is None or len(scale.const_value.shape) != 1:
        raise VerificationError(f"node '{node.name}' (qc.ChannelScale): scale must be a constant vector")


CHANNEL_SCALE = register(
    OpSchema(
        op_type="ChannelScale",
        inputs=("X", "scale"),
        outputs=("Y",),
        attributes={"axis": Attr("int", -1)},
        doc="Y = X * scale, one constant per channel of `axis` (a smoothing scale waiting to be folded)",
        reference=_channel_scale_reference,
        check=_check_channel_scale,
    )
)
