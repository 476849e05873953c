"""The fused `qc` ops that `fuse` creates. Importing this module registers them.

`qc.QLinear(X, <weight inputs>..., [bias]) -> Y_1, ..., Y_s` is a quantized linear with its input
rounding, bias and activation in one op:

    Xr = QuantizeActivation(X) with (act_mode, act_scale, act_zero_point, act_bits)   (act_mode none: X)
    W  = DequantizeWeight(Q, scale[, zero_point]) with (w_axis, w_bits)   weight = "dequantize"
       | the MixedMatMul weight of (perm, classes..., [indices, values])   weight = "mixed"
    Y  = epilogue(Xr @ W + bias)        epilogue: none, relu, gelu, gelu_tanh, silu
    Y_1, ..., Y_s = split(Y, splits, axis=-1)   (a wider op made of linears that read one tensor)

Weight inputs follow X in the order of the op they came from; `bias` (when `has_bias`) is last.
`fused` lists the rewrite rules that built the node.

`qc.NormQuantize(X, scale[, bias]) -> Y` is LayerNormalization(X, scale, bias, axis, epsilon)
followed by QuantizeActivation(mode, act_scale, act_zero_point, bits): a backend can write the
integer codes straight from the normalisation.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from qcompiler.dialect.mixed_ops import mixed_weight, split_class_inputs
from qcompiler.dialect.op_registry import Attr, OpSchema, attributes_of, register
from qcompiler.dialect.qc_ops import ACT_MODES, dequantize_weight, quantize_activation
from qcompiler.errors import VerificationError

EPILOGUES = ("none", "relu", "gelu", "gelu_tanh", "silu")
WEIGHT_KINDS = ("dequantize", "mixed")


def apply_epilogue(y: np.ndarray, act: str) -> np.ndarray:
    if act == "none":
        return y
    if act == "relu":
        return np.maximum(y, 0)
    if act == "gelu":
        erf = np.vectorize(math.erf, otypes=[np.float64])
        return (0.5 * y * (1 + erf(y.astype(np.float64) / math.sqrt(2)))).astype(y.dtype)
    if act == "gelu_tanh":
        u = math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)
        return (0.5 * y * (1 + np.tanh(u))).astype(y.dtype)
    if act == "silu":
        with np.errstate(over="ignore"):  # exp(-y) overflows to inf for very negative y: silu -> 0
            return (y / (1 + np.exp(-y))).astype(y.dtype)
    raise ValueError(f"unknown epilogue {act!r}")


def qlinear_weight(rest: list, a: dict) -> np.ndarray:
    """The dequantized weight [K, N] from the weight inputs (bias excluded)."""
    if a["weight"] == "dequantize":
        q, scale = rest[0], rest[1]
        zero = rest[2] if len(rest) > 2 else None
        return dequantize_weight(q, scale, zero, a["w_axis"])
    classes, outliers = split_class_inputs(rest[1:], a["kinds"], a["bits"], a["sizes"], a["sparse"])
    return mixed_weight(classes, outliers, a["group_size"])


def _qlinear_reference(x, *rest, **a):
    rest = list(rest)
    bias = rest.pop() if a["has_bias"] else None
    x = np.asarray(x)
    xr = x if a["act_mode"] == "none" else quantize_activation(x, a["act_mode"], a["act_scale"], a["act_zero_point"], a["act_bits"])
    if a["weight"] == "mixed":
        xr = xr[..., np.asarray(rest[0], np.int64)]
    y = (xr.astype(np.float32) @ qlinear_weight(rest, a)).astype(x.dtype)
    if bias is not None:
        y = (y + np.asarray(bias, np.float32)).astype(x.dtype)
    y = apply_epilogue(y, a["epilogue"])
    splits = list(a["splits"]) or [y.shape[-1]]
    return tuple(np.split(y, np.cumsum(splits)[:-1], axis=-1))


def _check_qlinear(node: ir.Node) -> None:
    a = attributes_of(node)
    where = f"node '{node.name}' (qc.QLinear)"
    if a["weight"] not in WEIGHT_KINDS:
        raise VerificationError(f"{where}: weight must be one of {', '.join(WEIGHT_KINDS)}")
    if a["act_mode"] not in ("none", *ACT_MODES):
        raise VerificationError(f"{where}: act_mode must be none or one of {', '.join(ACT_MODES)}")
    if a["epilogue"] not in EPILOGUES:
        raise VerificationError(f"{where}: epilogue must be one of {', '.join(EPILOGUES)}")
    splits = list(a["splits"])
    if len(node.outputs) != max(len(splits), 1):
        raise VerificationError(f"{where}: {len(node.outputs)} outputs for {len(splits)} splits")


def _norm_quantize_reference(x, scale, bias=None, axis=-1, epsilon=1e-5, mode="static", act_scale=1.0,
                             act_zero_point=0, bits=8):
    x = np.asarray(x)
    axis = axis + x.ndim if axis < 0 else axis
    axes = tuple(range(axis, x.ndim))
    xf = x.astype(np.float32)
    mean = xf.mean(axis=axes, keepdims=True)
    var = ((xf - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (xf - mean) / np.sqrt(var + np.float32(epsilon)) * np.asarray(scale, np.float32)
    if bias is not None:
        y = y + np.asarray(bias, np.float32)
    return (quantize_activation(y.astype(x.dtype), mode, act_scale, act_zero_point, bits),)


def _check_norm_quantize(node: ir.Node) -> None:
    a = attributes_of(node)
    if a["mode"] not in ACT_MODES:
        raise VerificationError(f"node '{node.name}' (qc.NormQuantize): mode must be one of {', '.join(ACT_MODES)}")


QLINEAR = register(
    OpSchema(
        op_type="QLinear",
        inputs=("X", "weight_inputs"),
        outputs=("Y",),
        attributes={
            "weight": Attr("string", "dequantize"),
            "w_axis": Attr("int", 1),
            "w_bits": Attr("int", 8),
            "kinds": Attr("strings", ()),
            "bits": Attr("ints", ()),
            "sizes": Attr("ints", ()),
            "group_size": Attr("int", 128),
            "sparse": Attr("int", 0),
            "act_mode": Attr("string", "none"),
            "act_scale": Attr("float", 1.0),
            "act_zero_point": Attr("int", 0),
            "act_bits": Attr("int", 8),
            "has_bias": Attr("int", 0),
            "epilogue": Attr("string", "none"),
            "splits": Attr("ints", ()),
            "fused": Attr("strings", ()),
        },
        doc="quantized linear with input rounding, bias and activation epilogue, optionally several linears of one input",
        reference=_qlinear_reference,
        check=_check_qlinear,
        variadic=True,
        variadic_outputs=True,
    )
)

NORM_QUANTIZE = register(
    OpSchema(
        op_type="NormQuantize",
        inputs=("X", "scale", "bias"),
        outputs=("Y",),
        optional_inputs=1,
        attributes={
            "axis": Attr("int", -1),
            "epsilon": Attr("float", 1e-5),
            "mode": Attr("string", "static"),
            "act_scale": Attr("float", 1.0),
            "act_zero_point": Attr("int", 0),
            "bits": Attr("int", 8),
        },
        doc="LayerNormalization followed by activation rounding (QuantizeActivation) in one op",
        reference=_norm_quantize_reference,
        check=_check_norm_quantize,
    )
)
