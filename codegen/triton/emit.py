"""The Triton backend: a standalone Python package that runs a compiled graph with torch and triton.

    DIR/__init__.py          load(device=None, dtype=None) -> Model; PackageError
    DIR/__main__.py          `python DIR [--device D]`: load, check, run the example input
    DIR/kernels.py           the Triton kernel library (codegen/triton/kernels.py, verbatim) and one
                             specialised entry point per distinct linear configuration of this graph,
                             named after what it does (qc_gemm_w4a16_g128_bias_gelu, qc_gemm_w8a8_bias,
                             qc_gemm_mixed_w2_w4_f16_a16_g128_sparse, ...), each headed by a comment
                             naming the IR nodes it serves
    DIR/model.py             ONNX operators in torch (codegen/triton/runtime.py, verbatim), a reader of
                             safetensors files, and the graph as one `forward` function: quantized
                             linears call kernels.py, everything else torch (extern-kernel style)
    DIR/weights.safetensors  every weight in its kernel's layout (scales, CSC outliers, int8 W^T),
                             except codes: stored tight at their own width and turned into the
                             kernels' k-strided words once, at load; never pickle
    DIR/manifest.json        graph input/output names, dtypes and shapes, each weight's shape, dtype and
                             source initializer, kernels and the nodes they serve, pipeline, versions
    DIR/README.md            how to load the package by path

Linears, found in the IR this backend receives:
    qc.QLinear (made by `fuse`)                   -> its kernel, epilogue (bias, activation) included
    MatMul(qc.QuantizeActivation(X), qc.DequantizeWeight(Q, s)) -> int8 W8A8 kernel
    MatMul(X, qc.DequantizeWeight(Q, s))          -> weight-only 8-bit kernel
    qc.MixedMatMul(X, perm, classes...)           -> several classes: one launch of the mixed kernel
                                                     (every class's K tiles, fp16 rows and sparse
                                                     outliers into one accumulator; Emitter.one_launch
                                                     says when); one class, or uniform groups not a
                                                     multiple of 32 rows: one weight-only launch per
                                                     class (outliers in the launch of their class),
                                                     fp16 classes as torch matmuls, summed
A bias Add and an activation (Relu, Gelu, SiLU as x * Sigmoid(x)) that read nothing but the linear's
output are fused into the kernel's epilogue when the linear is one launch.

Nothing taken from the model reaches the generated code except as sanitised identifiers
([A-Za-z0-9_]) and, in comments, as `ascii()` literals (no line breaks); the names themselves live in
manifest.json.
"""

from __future__ import annotations

import dataclasses
import json
import keyword
import logging
import math
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.dialect import ops
from qcompiler.dialect.mixed_ops import MixedClass, mixed_weight, split_class_inputs
from qcompiler.errors import UserError

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = "qcompiler.triton-manifest/1"
HERE = Path(__file__).resolve().parent
KERNEL_BITS = (2, 3, 4, 8)
PACK_ROWS = 32
# ONNX op -> attributes it may carry (name -> kind); an op absent here is not lowered
ONNX_OPS: dict[str, dict[str, str]] = {
    **{op: {} for op in (
        "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Equal", "Less", "Greater", "LessOrEqual",
        "GreaterOrEqual", "And", "Or", "Not", "Where", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log", "Tanh",
        "Erf", "Sin", "Cos", "Floor", "Ceil", "Round", "Sigmoid", "Relu", "Identity", "MatMul", "Size", "Expand",
        "Tile", "Range", "Unsqueeze", "Squeeze", "Slice", "Clip")},
    "Gelu": {"approximate": "gelu"},
    "Softmax": {"axis": "int"},
    "LayerNormalization": {"axis": "int", "epsilon": "float", "stash_type": "ignore"},
    "Gemm": {"alpha": "float", "beta": "float", "transA": "int", "transB": "int"},
    "Cast": {"to": "dtype", "saturate": "ignore"},
    "Shape": {"start": "int", "end": "int"},
    "Reshape": {"allowzero": "int"},
    "Flatten": {"axis": "int"},
    "Transpose": {"perm": "ints"},
    "Concat": {"axis": "int"},
    "Split": {"axis": "int", "num_outputs": "int"},
    "Gather": {"axis": "int"},
    "Trilu": {"upper": "int"},
    "ReduceSum": {"keepdims": "int", "noop_with_empty_axes": "int"},
    "ReduceMean": {"keepdims": "int", "noop_with_empty_axes": "int"},
    "ReduceMax": {"keepdims": "int", "noop_with_empty_axes": "int"},
    "ReduceMin": {"keepdims": "int", "noop_with_empty_axes": "int"},
    "ReduceL2": {"keepdims": "int", "noop_with_empty_axes": "int"},
    "ConstantOfShape": {"value": "tensor"},
}
_CAST_TYPES = {1, 2, 3, 5, 6, 7, 9, 10, 11, 16}
_NUMPY_TO_ST = {
    np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64", np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32", np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}
_QC_ADVICE = {
    "BitAllocation": "add 'quantize-weights' after 'allocate-bits' (the 'mixed' preset does)",
    "ChannelScale": "add 'fold-scales' after 'smooth' (the 'w8a8' preset does)",
    "MixedWeight": "the package has no Conv kernels: compile with --target ort",
}


def _lit(v: Any) -> str:
    """A Python literal for a number or a list of numbers (nothing else is ever emitted)."""
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f):
            return "float('nan')"
        if math.isinf(f):
            return "float('inf')" if f > 0 else "-float('inf')"
        return repr(f)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_lit(x) for x in v) + "]"
    raise TypeError(f"no literal for {type(v).__name__}")


def _comment(text: str, limit: int = 100) -> str:
    """Model-derived text for a comment: an ascii() literal (no line breaks), shortened."""
    s = ascii(text)
    return s if len(s) <= limit else s[: limit - 4] + "...'"


class Names:
    """Unique Python identifiers made from arbitrary strings."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.used: set[str] = set()
        self.by_key: dict[Any, str] = {}

    def get(self, key: Any, hint: str) -> str:
        if key in self.by_key:
            return self.by_key[key]
        base = re.sub(r"[^0-9A-Za-z_]", "_", hint)[:48].strip("_") or "t"
        base = f"{self.prefix}{base}"
        name, i = base, 1
        while name in self.used or keyword.iskeyword(name):
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        self.by_key[key] = name
        return name


@dataclasses.dataclass
class Weight:
    array: np.ndarray
    place: str  # "float": compute dtype on the device; "raw": as stored, on the device; "host": CPU
    source: str  # the IR value (or node) it came from
    linear: bool = False  # stored for a linear layer (counted in the effective bits per weight)
    unpack: dict | None = None  # codes stored tight: {"segments": [[bits, kernel width, rows], ...], "columns": N}


@dataclasses.dataclass
class Kernel:
    name: str
    family: str  # wq-uniform, wq-codebook, w8a8
    bits: int = 8
    group: int | None = None
    sparse: bool = False
    bias: bool = False
    act: str = "none"
    serves: list[str] = dataclasses.field(default_factory=list)
    classes: list[str] = dataclasses.field(default_factory=list)  # wq-mixed: the tile kinds, e.g. ["w2", "w4", "f16"]
    kinds_mask: int = 0  # wq-mixed: the kernel's KINDS constexpr


class Emitter:
    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.values = Names("v_")
        self.wnames = Names("")
        self.weights: dict[str, Weight] = {}
        self.kernels: dict[str, Kernel] = {}
        self.lines: list[str] = []
        self.absorbed: set[int] = set()  # ids of nodes emitted as part of a linear
        self.needs_ones = False
        self.in_linear = False

    # ---------------------------------------------------------------- weights and values
    def weight(self, hint: str, array: np.ndarray, place: str, source: str, unpack: dict | None = None) -> str:
        key = self.wnames.get(("w", hint, len(self.weights)), hint)
        self.weights[key] = Weight(np.ascontiguousarray(array), place, source, self.in_linear, unpack)
        return f"W[{key!r}]"

    def code_words(self, hint: str, segments: list[tuple[np.ndarray, int, int]], source: str) -> str:
        """Codes a kernel reads as k-strided int32 words (`reference.pack_codes` of each segment,
        stacked): stored tight (`reference.pack_tight`, no padding rows, no spare word bits) and
        turned into the words once, at load (`runtime.code_words`). `segments`: (codes [rows, N],
        stored bits, kernel width) each."""
        from qcompiler.codegen.triton.reference import pack_tight

        stream = np.concatenate([pack_tight(codes, bits) for codes, bits, _ in segments])
        unpack = {"segments": [[int(bits), int(width), int(codes.shape[0])] for codes, bits, width in segments],
                  "columns": int(segments[0][0].shape[1])}
        return self.weight(hint, stream, "raw", source, unpack)

    def const_of(self, value: ir.Value | None) -> np.ndarray | None:
        if value is None or value.const_value is None:
            return None
        return value.const_value.numpy()

    def ref(self, value: ir.Value | None) -> str:
        """The expression for a value: a local, or a weight (initializers are loaded once)."""
        if value is None or value.name == "":
            return "None"
        key = ("v", id(value))
        if key in self.values.by_key:
            return self.values.by_key[key]
        array = self.const_of(value)
        if array is None:
            raise UserError(f"value {value.name!r} is read before it is computed; the graph is not in topological order "
                            "(run 'canonicalize')")
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        place = "float" if array.dtype.kind == "f" else ("host" if array.size <= 64 else "raw")
        expr = self.weight(value.name or "const", array, place, value.name)
        self.values.by_key[key] = expr
        return expr

    def define(self, value: ir.Value) -> str:
        return self.values.get(("v", id(value)), value.name or "t")

    def emit(self, line: str = "") -> None:
        self.lines.append(line)

    # ---------------------------------------------------------------- planning
    def uses(self, value: ir.Value) -> list[ir.Node]:
        return [u.node for u in value.uses()]

    def only_reader(self, value: ir.Value) -> ir.Node | None:
        readers = self.uses(value)
        if len(readers) != 1 or value in self.graph.outputs:
            return None
        return readers[0]

    def epilogue(self, out: ir.Value, n: int) -> tuple[ir.Value, np.ndarray | None, str, list[ir.Node]]:
        """Bias Add and activation reading only `out`: (final value, bias, act, absorbed nodes)."""
        taken: list[ir.Node] = []
        bias = None
        node = self.only_reader(out)
        if node is not None and node.op_type == "Add" and node.domain == "" and len(node.inputs) == 2:
            other = node.inputs[1] if node.inputs[0] is out else node.inputs[0]
            b = self.const_of(other)
            if b is not None and b.dtype.kind == "f" and b.size == n and b.shape[-1:] == (n,):
                bias = b.reshape(n).astype(np.float32)
                taken.append(node)
                out = node.outputs[0]
        act = "none"
        readers = [] if out in self.graph.outputs else self.uses(out)
        if len(readers) == 1 and readers[0].domain == "":
            r = readers[0]
            if r.op_type == "Relu":
                act = "relu"
            elif r.op_type == "Gelu":
                approx = r.attributes.get("approximate")
                act = "gelu_tanh" if approx is not None and approx.value == "tanh" else "gelu"
            if act != "none":
                taken.append(r)
                out = r.outputs[0]
        elif len(readers) == 2 and all(r.domain == "" for r in readers):
            sig = next((r for r in readers if r.op_type == "Sigmoid"), None)
            mul = next((r for r in readers if r.op_type == "Mul"), None)
            if sig is not None and mul is not None and self.only_reader(sig.outputs[0]) is mul \
                    and set(id(v) for v in mul.inputs) == {id(out), id(sig.outputs[0])}:
                act = "silu"
                taken += [sig, mul]
                out = mul.outputs[0]
        return out, bias, act, taken

    def kernel(self, family: str, bits: int, group: int | None, sparse: bool, bias: bool, act: str,
               serves: list[ir.Node], classes: list[str] | None = None, kinds_mask: int = 0) -> str:
        if family == "w8a8":
            name = "qc_gemm_w8a8"
        elif family == "wq-mixed":
            name = "qc_gemm_mixed_" + "_".join(classes) + "_a16" + ("" if group is None else f"_g{group}")
        elif family == "wq-uniform":
            name = f"qc_gemm_w{bits}a16_g{group}"
        else:
            name = f"qc_gemm_lut{bits}a16"
        name += ("_sparse" if sparse else "") + ("_bias" if bias else "") + ("" if act == "none" else f"_{act}")
        k = self.kernels.setdefault(name, Kernel(name, family, bits, group, sparse, bias, act,
                                                 classes=list(classes or []), kinds_mask=kinds_mask))
        k.serves.extend(f"{n.name} ({(n.domain + '.') if n.domain else ''}{n.op_type})" for n in serves)
        return name

    # ---------------------------------------------------------------- linears
    def try_linear(self, node: ir.Node) -> bool:
        self.in_linear = True
        try:
            return self._try_linear(node)
        finally:
            self.in_linear = False

    def _try_linear(self, node: ir.Node) -> bool:
        if node.domain == "qc" and node.op_type == "QLinear":
            from qcompiler.passes.fuse import qlinear_parts

            parts = qlinear_parts(node)
            self.absorbed.add(id(node))
            if parts["weight"] == "mixed":
                return self.mixed_linear(node, parts["x"], parts["weight_inputs"], parts["attrs"], [node],
                                         node.outputs, parts["bias"], parts["act"], parts["act_quant"])
            return self.dq_linear(node, parts, [node])
        if node.domain == "qc" and node.op_type == "MixedMatMul":
            attrs = ops.attributes_of(node)
            out, bias, act, taken = self.epilogue(node.outputs[0], self._mixed_n(node))
            self.absorbed.update(id(n) for n in [node, *taken])
            return self.mixed_linear(node, node.inputs[0], list(node.inputs[1:]), attrs, [node, *taken], [out],
                                     bias, act, None)
        if node.domain == "" and node.op_type == "MatMul":
            a, b = node.inputs
            dq = b.producer() if b is not None else None
            if dq is None or dq.domain != "qc" or dq.op_type != "DequantizeWeight":
                return False
            q, scale = self.const_of(dq.inputs[0]), self.const_of(dq.inputs[1])
            zp = self.const_of(dq.inputs[2]) if len(dq.inputs) > 2 else None
            if q is None or scale is None or q.ndim != 2 or (len(dq.inputs) > 2 and dq.inputs[2] is not None and zp is None):
                return False
            qa = a.producer() if a is not None else None
            act_quant = None
            x = a
            if qa is not None and qa.domain == "qc" and qa.op_type == "QuantizeActivation":
                qattrs = ops.attributes_of(qa)
                if qattrs["mode"] in ("static", "per-token") and qattrs["bits"] == 8:
                    act_quant = {k: qattrs[k] for k in ("mode", "scale", "zero_point", "bits")}
                    act_quant["node"] = qa
                    x = qa.inputs[0]
            n = q.shape[1]
            out, bias, act, taken = self.epilogue(node.outputs[0], n)
            self.absorbed.update(id(t) for t in [node, *taken])
            parts = {"x": x, "q": q, "scale": scale, "zp": zp, "axis": ops.attributes_of(dq)["axis"],
                     "act_quant": act_quant, "bias": bias, "act": act, "splits": [n], "outputs": [out]}
            return self.dq_linear(node, parts, [node, *taken], dq_node=dq)
        return False

    def _mixed_n(self, node: ir.Node) -> int:
        return self.const_of(node.inputs[2]).shape[1]

    def quantized_input(self, x: ir.Value, aq: dict) -> tuple[str, str]:
        """int8 codes and the per-row scale vector of X, computed once per (value, grid)."""
        key = ("q", id(x), aq["mode"], float(aq["scale"]), int(aq["zero_point"]))
        if key in self.values.by_key:
            return self.values.by_key[key]
        xq = self.values.get(("qx", key), f"{x.name}_q")
        sx = self.values.get(("qs", key), f"{x.name}_qscale")
        if aq["mode"] == "per-token":
            self.emit(f"        {xq}, {sx} = K.qc_quantize_per_token_int8({self.ref(x)})")
        else:
            self.emit(f"        {xq} = R.qc_quantize_static({self.ref(x)}, {_lit(float(aq['scale']))}, "
                      f"{_lit(int(aq['zero_point']))}, -128, 127)")
            self.emit(f"        {sx} = self.ones({xq})")
            self.needs_ones = True
        self.values.by_key[key] = (xq, sx)
        return xq, sx

    def dq_linear(self, node: ir.Node, p: dict, serves: list[ir.Node], dq_node: ir.Node | None = None) -> bool:
        q, scale, zp, axis = p["q"], p["scale"], p["zp"], p["axis"]
        k, n = q.shape
        axis = axis + 2 if axis < 0 else axis
        if scale.size not in (1, q.shape[axis]) or (scale.size > 1 and axis != 1):
            raise UserError(f"node {node.name!r}: weight scales along input channels have no Triton kernel; "
                            "quantize per output channel (the 'quantize' pass does) or use --target ort")
        sw = np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (n,)).astype(np.float32)
        wz = np.zeros(n, np.float32) if zp is None else np.broadcast_to(np.asarray(zp, np.float32).reshape(-1), (n,))
        bias, act, aq = p["bias"], p["act"], p["act_quant"]
        hint = node.name or "linear"
        outs = [self.define(v) for v in p["outputs"]]
        target = outs[0] if len(outs) == 1 else self.values.get(("wide", id(node)), f"{hint}_wide")
        self.emit(f"        # {_comment(node.name)} ({'qc.' if node.domain else ''}{node.op_type})"
                  + (" + fused epilogue" if len(serves) > 1 else ""))
        if aq is not None and not wz.any():
            xq, sx = self.quantized_input(p["x"], aq)
            # Y = s_x sw (sum_k (q_x - z_x) q_w) = s_x sw (q_x . q_w) - s_x sw z_x colsum(q_w)
            s_x = float(aq["scale"]) if aq["mode"] == "static" else 1.0
            z_x = int(aq["zero_point"]) if aq["mode"] == "static" else 0
            sw_eff = (sw * np.float32(s_x)).astype(np.float32)
            total_bias = None if bias is None else bias.astype(np.float64)
            if z_x:
                corr = -(sw.astype(np.float64) * s_x * z_x * q.astype(np.int64).sum(axis=0))
                total_bias = corr if total_bias is None else total_bias + corr
            name = self.kernel("w8a8", 8, None, False, total_bias is not None, act, serves)
            wt = self.weight(f"{hint}.wq_t", np.ascontiguousarray(q.T.astype(np.int8)), "raw", dq_node.inputs[0].name if dq_node else node.name)
            sws = self.weight(f"{hint}.sw", sw_eff, "raw", node.name)
            args = f"{xq}, {sx}, {wt}, {sws}"
            if total_bias is not None:
                args += ", " + self.weight(f"{hint}.bias", total_bias.astype(np.float32), "raw", node.name)
            self.emit(f"        {target} = K.{name}({args}, out_dtype=self.dtype)")
        else:
            x = p["x"]
            xexpr = self.ref(x)
            if aq is not None:  # a grid the int8 kernel does not take: round X in torch, then weight-only
                xexpr = (f"R.qc_fake_quantize({xexpr}, {aq['mode']!r}, {_lit(float(aq['scale']))}, "
                         f"{_lit(int(aq['zero_point']))}, {_lit(int(aq['bits']))})")
            # weight-only 8-bit: codes q - qmin in 0..255, zero z - qmin, one group of all K rows
            codes = (q.astype(np.int32) + 128).astype(np.uint8)
            name = self.kernel("wq-uniform", 8, k, False, bias is not None, act, serves)
            args = ", ".join([
                xexpr,
                self.code_words(f"{hint}.packed", [(codes, 8, 8)], node.name),
                self.weight(f"{hint}.scale", sw.reshape(1, n).astype(np.float32), "raw", node.name),
                self.weight(f"{hint}.zero", (wz + 128).reshape(1, n).astype(np.float32), "raw", node.name),
            ])
            if bias is not None:
                args += ", bias=" + self.weight(f"{hint}.bias", bias.astype(np.float32), "raw", node.name)
            self.emit(f"        {target} = K.{name}({args})")
        if len(outs) > 1:
            self.emit(f"        {', '.join(outs)} = torch.split({target}, {_lit(list(p['splits']))}, dim=-1)")
        return True

    def mixed_linear(self, node: ir.Node, x: ir.Value, inputs: list, attrs: dict, serves: list[ir.Node],
                     outputs: list[ir.Value], bias, act: str, act_quant) -> bool:
        from qcompiler.codegen.triton.reference import _csc

        kinds, bits, sizes = list(attrs["kinds"]), list(attrs["bits"]), list(attrs["sizes"])
        group, sparse = int(attrs["group_size"]), int(attrs["sparse"])
        arrays = [self.const_of(v) for v in inputs]
        if any(a is None for a in arrays):
            raise UserError(f"node {node.name!r} (qc.MixedMatMul) has weights computed at run time; the triton target "
                            "needs them constant (run 'canonicalize')")
        perm = arrays[0].astype(np.int64)
        classes, outliers = split_class_inputs(arrays[1:], kinds, bits, sizes, sparse)
        hint = node.name or "mixed"
        out = self.define(outputs[0])
        w_perm = mixed_weight(classes, outliers, group)  # dequantized, permuted rows
        n = w_perm.shape[1]
        xexpr = self.ref(x)
        if act_quant is not None:
            xexpr = (f"R.qc_fake_quantize({xexpr}, {act_quant['mode']!r}, {_lit(float(act_quant['scale']))}, "
                     f"{_lit(int(act_quant['zero_point']))}, {_lit(int(act_quant['bits']))})")
        launches = [c for c in classes if c.kind != "fp16"]
        fused = len(classes) == 1 and launches and (group % PACK_ROWS == 0 or kinds[0] == "codebook")
        self.emit(f"        # {_comment(node.name)} (qc.MixedMatMul, {len(kinds)} class(es): "
                  + ", ".join(f"{k}{b if k != 'fp16' else ''}x{s}" for k, b, s in zip(kinds, bits, sizes)) + ")"
                  + (" + fused epilogue" if len(serves) > 1 else ""))
        if outliers is not None:
            idx = outliers[0].astype(np.int64)
            vals = outliers[1].astype(np.float32)
        terms = []
        xp = self.values.get(("xp", id(node)), f"{hint}_xperm")
        # X's channels in stored order, once; each class reads a contiguous column range of it (int32
        # indices: index_select takes them, and they cost half of int64's bits)
        self.emit(f"        {xp} = {xexpr}.index_select(-1, {self.weight(f'{hint}.perm', perm.astype(np.int32), 'raw', node.name)})")
        if self.one_launch(kinds, group):
            self.mixed_one_launch(node, xp, classes, outliers, group, w_perm, serves, out, bias, act)
            return True
        for ci, c in enumerate(classes):
            kind, b, start, stop, class_args = c.kind, c.bits, c.start, c.stop, c.inputs
            term = self.values.get(("term", id(node), ci), f"{hint}_c{ci}")
            xs = f"{xp}[..., {start}:{stop}]" if len(sizes) > 1 else xp
            if kind == "fp16" or (kind == "uniform" and group % PACK_ROWS):
                block = w_perm[start:stop]
                wexpr = self.weight(f"{hint}.c{ci}.w", block.astype(np.float16), "float", node.name)
                self.emit(f"        {term} = torch.matmul({xs}, {wexpr})")
                terms.append(term)
                continue
            kb = next(kb for kb in KERNEL_BITS if kb >= b)
            args = [xs]
            codes = class_args[0].astype(np.int64)
            args.append(self.code_words(f"{hint}.c{ci}.packed", [(codes, b, kb)], node.name))
            if kind == "uniform":
                args.append(self.weight(f"{hint}.c{ci}.scale", class_args[1].astype(np.float16), "raw", node.name))
                args.append(self.weight(f"{hint}.c{ci}.zero", class_args[2].astype(np.float16), "raw", node.name))
                family = "wq-uniform"
            else:
                table = class_args[1].astype(np.float16)  # [N, 2^b]
                lut = np.zeros((1, n, 1 << kb), np.float16)
                lut[0, :, : table.shape[1]] = table
                args.append(self.weight(f"{hint}.c{ci}.lut", lut, "raw", node.name))
                family = "wq-codebook"
            has_sp = False
            if outliers is not None:
                rows = idx[:, 0]
                sel = (rows >= start) & (rows < stop)
                if sel.any():
                    r, c = rows[sel] - start, idx[sel, 1]
                    corr = vals[sel] - self._deq_at(kind, class_args, group, r, c)
                    csc = _csc(r, c, corr, stop - start, n)
                    sp = [self.weight(f"{hint}.c{ci}.sp_colptr", csc.col_ptr, "raw", node.name),
                          self.weight(f"{hint}.c{ci}.sp_rows", csc.row_idx, "raw", node.name),
                          self.weight(f"{hint}.c{ci}.sp_vals", csc.values, "raw", node.name)]
                    args.append(f"sparse=({', '.join(sp)})")
                    has_sp = True
            use_bias = fused and bias is not None
            if use_bias:
                args.append("bias=" + self.weight(f"{hint}.bias", bias.astype(np.float32), "raw", node.name))
            name = self.kernel(family, kb, group if kind == "uniform" else None, has_sp, use_bias,
                               act if fused else "none", serves)
            self.emit(f"        {term} = K.{name}({', '.join(args)})")
            terms.append(term)
        if fused:
            self.emit(f"        {out} = {terms[0]}")
            return True
        self.emit(f"        {out} = {' + '.join(terms)}")
        if bias is not None:
            self.emit(f"        {out} = {out} + " + self.weight(f"{hint}.bias", bias, "float", node.name))
        if act != "none":
            fn = {"relu": "torch.relu({})", "gelu": "R.Gelu({})", "gelu_tanh": "R.Gelu({}, 'tanh')",
                  "silu": "torch.nn.functional.silu({})"}[act]
            self.emit(f"        {out} = " + fn.format(out))
        return True

    @staticmethod
    def one_launch(kinds: list[str], group: int) -> bool:
        """Whether a mixed layer runs as one launch of the mixed kernel: more than one class, at least
        one quantized, and uniform groups that the kernel's 32-row chunks do not straddle. (A layer of
        one quantized class keeps the more specialised single-class kernel.)"""
        return len(kinds) > 1 and any(k != "fp16" for k in kinds) and \
            (group % PACK_ROWS == 0 or "uniform" not in kinds)

    def mixed_one_launch(self, node: ir.Node, xp: str, classes: list[MixedClass], outliers: tuple | None,
                         group: int, w_perm: np.ndarray, serves: list[ir.Node], out: str, bias, act: str) -> None:
        """Every class, the sparse outliers and the epilogue in one launch of the mixed kernel."""
        from qcompiler.codegen.triton.reference import MIXED_KINDS, _csc, pack_mixed

        hint, src = node.name or "mixed", node.name
        n = w_perm.shape[1]
        kinds = [c.kind for c in classes]
        packed, corrections = self._mixed_classes(classes, outliers, group, w_perm)
        layout = pack_mixed(packed, group, n)
        tags = [{"uniform": f"w{w}", "codebook": f"lut{w}", "fp16": "f16"}[kind]
                for j, (kind, w) in enumerate(MIXED_KINDS) if layout.kinds_mask >> j & 1]
        name = self.kernel("wq-mixed", 0, group if "uniform" in kinds else None, corrections is not None,
                           bias is not None, act, serves, classes=tags, kinds_mask=layout.kinds_mask)
        args = [xp, self.code_words(f"{hint}.words", layout.segments, src) if layout.segments
                else self.weight(f"{hint}.words", layout.words, "raw", src)]
        args += [self.weight(f"{hint}.{part}", getattr(layout, part), "raw", src) for part in ("tiles", "seg")]
        if layout.scale is not None:
            args += [self.weight(f"{hint}.scale", layout.scale, "raw", src),
                     self.weight(f"{hint}.zero", layout.zero, "raw", src)]
        if layout.lut is not None:
            args.append(self.weight(f"{hint}.lut", layout.lut, "raw", src))
        if layout.dense is not None:
            args.append(self.weight(f"{hint}.dense", layout.dense, "float", src))
        if corrections is not None:
            csc = _csc(*corrections, classes[-1].stop, n)
            args.append("(" + ", ".join(self.weight(f"{hint}.sp_{part}", a, "raw", src) for part, a in
                                         (("colptr", csc.col_ptr), ("rows", csc.row_idx), ("vals", csc.values))) + ")")
        if bias is not None:
            args.append(self.weight(f"{hint}.bias", bias.astype(np.float32), "raw", src))
        self.emit(f"        {out} = K.{name}({', '.join(args)})")

    def _mixed_classes(self, classes: list[MixedClass], outliers: tuple | None, group: int,
                       w_perm: np.ndarray) -> tuple[list[MixedClass], tuple | None]:
        """The classes for `reference.pack_mixed` and the outlier corrections (rows, columns, value
        minus the dequantized code) of the quantized classes' rows; fp16 rows keep their outliers."""
        packed, parts = [], []
        if outliers is not None:
            rows, cols = outliers[0][:, 0].astype(np.int64), outliers[0][:, 1].astype(np.int64)
        for c in classes:
            if c.kind == "fp16":  # the rows as stored, outliers included (as the per-class path stores them)
                packed.append(dataclasses.replace(c, inputs=(w_perm[c.start:c.stop],)))
                continue
            if c.kind == "uniform":
                codes, scale, zero = c.inputs
                packed.append(dataclasses.replace(c, inputs=(codes, scale.astype(np.float16), zero.astype(np.float16))))
            else:
                packed.append(c)
            if outliers is not None:
                sel = (rows >= c.start) & (rows < c.stop)
                r, col = rows[sel], cols[sel]
                deq = self._deq_at(c.kind, c.inputs, group, r - c.start, col)
                parts.append((r, col, outliers[1][sel].astype(np.float32) - deq))
        if not any(p[0].size for p in parts):
            return packed, None
        return packed, tuple(np.concatenate(p) for p in zip(*parts))

    @staticmethod
    def _deq_at(kind: str, class_args: list, group: int, r: np.ndarray, c: np.ndarray) -> np.ndarray:
        codes = class_args[0]
        if kind == "uniform":
            g = r // group
            return ((codes[r, c].astype(np.float32) - class_args[2][g, c].astype(np.float32))
                    * class_args[1][g, c].astype(np.float32))
        return class_args[1][c, codes[r, c].astype(np.int64)].astype(np.float32)

    # ---------------------------------------------------------------- other nodes
    def plain(self, node: ir.Node) -> None:
        where = f"node {node.name!r}"
        if node.domain == "qc":
            self.qc_node(node)
            return
        if node.domain not in ("", "ai.onnx") or node.op_type not in ONNX_OPS and node.op_type != "Constant":
            op = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
            advice = ("remove 'lower-ort' from the pipeline: the triton target runs the qc ops itself"
                      if node.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
                      else "compile with --target ort, which runs every ONNX op")
            raise UserError(f"the triton target cannot lower {op} ({where}); {advice}")
        outs = ", ".join(self.define(v) for v in node.outputs) if node.outputs else "_"
        if len(node.outputs) == 1:
            outs = self.define(node.outputs[0])
        if node.op_type == "Constant":
            attr = node.attributes.get("value")
            if attr is None:
                raise UserError(f"the triton target cannot lower Constant ({where}) without a 'value' tensor; run 'canonicalize'")
            arr = attr.value.numpy()
            place = "float" if arr.dtype.kind == "f" else ("host" if arr.size <= 64 else "raw")
            self.emit(f"        {outs} = " + self.weight(node.outputs[0].name or "const", arr, place, node.name))
            return
        allowed = ONNX_OPS[node.op_type]
        kwargs = []
        for name, attr in sorted(node.attributes.items()):
            kind = allowed.get(name)
            if kind is None:
                raise UserError(f"the triton target cannot lower {node.op_type} with attribute '{name}' ({where}); "
                                "compile with --target ort")
            value = attr.value
            if kind == "ignore":
                continue
            if kind == "gelu":
                if value not in ("none", "tanh"):
                    raise UserError(f"Gelu approximate must be 'none' or 'tanh' ({where})")
                kwargs.append(f"approximate={value!r}")
            elif kind == "dtype":
                if int(value) not in _CAST_TYPES:
                    raise UserError(f"the triton target cannot Cast to ONNX type {int(value)} ({where}); compile with --target ort")
                kwargs.append(f"to={int(value)}")
            elif kind == "tensor":
                arr = value.numpy()
                kwargs.append("value=" + self.weight(f"{node.name or 'const'}.value", arr,
                                                      "host" if arr.size <= 64 else "raw", node.name))
            elif kind == "ints":
                kwargs.append(f"{name}={_lit([int(v) for v in value])}")
            elif kind == "float":
                kwargs.append(f"{name}={_lit(float(value))}")
            else:
                kwargs.append(f"{name}={_lit(int(value))}")
        args = [self.ref(v) for v in node.inputs]
        if node.op_type in ("MatMul", "Gemm") and len(args) > 1 and args[1].startswith("W["):
            self.weights[args[1][3:-2]].linear = True  # a float linear's weight
        while args and args[-1] == "None":
            args.pop()
        if node.op_type == "Cast":
            kwargs.append("rt=self.rt")
        if node.op_type == "Split" and len(args) < 2 and not any(k.startswith("num_outputs") for k in kwargs):
            kwargs.append(f"num_outputs={len(node.outputs)}")
        call = ", ".join(args + kwargs)
        self.emit(f"        {outs} = R.{node.op_type}({call})  # {_comment(node.name, 60)}")

    def qc_node(self, node: ir.Node) -> None:
        attrs = ops.attributes_of(node)
        out = self.define(node.outputs[0])
        where = _comment(node.name, 60)
        if node.op_type == "QuantizeActivation":
            self.emit(f"        {out} = R.qc_fake_quantize({self.ref(node.inputs[0])}, {attrs['mode']!r}, "
                      f"{_lit(float(attrs['scale']))}, {_lit(int(attrs['zero_point']))}, {_lit(int(attrs['bits']))})  # {where}")
        elif node.op_type == "DequantizeWeight" and all(v is None or v.const_value is not None for v in node.inputs):
            q, s = self.const_of(node.inputs[0]), self.const_of(node.inputs[1])
            z = self.const_of(node.inputs[2]) if len(node.inputs) > 2 else None
            from qcompiler.dialect.qc_ops import dequantize_weight

            w = dequantize_weight(q, s, z, attrs["axis"])
            self.emit(f"        {out} = " + self.weight(node.name or "dequantized", w, "float", node.name) + f"  # {where}")
        elif node.op_type == "MixedMatMul":
            self.try_linear(node)
        elif node.op_type == "ChannelScale":
            self.emit(f"        {out} = R.qc_channel_scale({self.ref(node.inputs[0])}, {self.ref(node.inputs[1])}, "
                      f"{_lit(int(attrs['axis']))})  # {where}")
        elif node.op_type == "NormQuantize":
            from qcompiler.passes.fuse import norm_quantize_parts

            p = norm_quantize_parts(node)
            normed = f"R.LayerNormalization({self.ref(node.inputs[0])}, {', '.join(self.ref(v) for v in node.inputs[1:])}, " \
                     f"axis={_lit(p['axis'])}, epsilon={_lit(p['epsilon'])})"
            self.emit(f"        {out} = R.qc_fake_quantize({normed}, {p['mode']!r}, {_lit(p['scale'])}, "
                      f"{_lit(p['zero_point'])}, {_lit(p['bits'])})  # {where}")
        else:
            advice = _QC_ADVICE.get(node.op_type, "compile with --target ort")
            raise UserError(f"the triton target cannot lower qc.{node.op_type} (node {node.name!r}); {advice}")

    # ---------------------------------------------------------------- the whole graph
    def run(self) -> str:
        g = self.graph
        for v in g.inputs:
            self.define(v)
        for i, v in enumerate(g.inputs):
            self.emit(f"        {self.define(v)} = inputs[{i}]")
        for node in g:
            if id(node) in self.absorbed:
                continue
            if self.try_linear(node):
                continue
            if node.domain == "qc" and node.op_type == "NormQuantize" and self.norm_to_codes(node):
                continue
            if node.domain == "qc" and node.op_type in ("QuantizeActivation", "DequantizeWeight"):
                if node.outputs[0] not in g.outputs and not self._read_later(node):
                    continue  # every reader is a linear that takes the codes themselves
            self.plain(node)
        outs = ", ".join(self.ref(v) for v in g.outputs)
        self.emit(f"        return ({outs},)")
        return "\n".join(self.lines)

    def norm_to_codes(self, node: ir.Node) -> bool:
        """A NormQuantize read only by int8 QLinears of its own grid: normalise and write the int8
        codes at once (the rounded float is never made)."""
        from qcompiler.passes.fuse import norm_quantize_parts, qlinear_parts

        p = norm_quantize_parts(node)
        out = node.outputs[0]
        if out in self.graph.outputs or p["mode"] != "static" or p["bits"] != 8:
            return False
        for r in self.uses(out):
            if r.domain != "qc" or r.op_type != "QLinear" or r.inputs[0] is not out:
                return False
            q = qlinear_parts(r)
            aq = q["act_quant"]
            if q["weight"] != "dequantize" or aq is None or (aq["mode"], float(aq["scale"]), int(aq["zero_point"]), aq["bits"]) \
                    != ("static", p["scale"], p["zero_point"], 8) or (q["zp"] is not None and np.any(q["zp"])):
                return False
        key = ("q", id(out), "static", p["scale"], p["zero_point"])
        xq = self.values.get(("qx", key), f"{out.name}_codes")
        sx = self.values.get(("qs", key), f"{out.name}_qscale")
        args = ", ".join(self.ref(v) for v in node.inputs)
        self.emit(f"        # {_comment(node.name)} (qc.NormQuantize): normalise, then int8 codes for the linears reading it")
        self.emit(f"        {xq} = R.qc_quantize_static(R.LayerNormalization({args}, axis={_lit(p['axis'])}, "
                  f"epsilon={_lit(p['epsilon'])}), {_lit(p['scale'])}, {_lit(p['zero_point'])}, -128, 127)")
        self.emit(f"        {sx} = self.ones({xq})")
        self.values.by_key[key] = (xq, sx)
        return True

    def _read_later(self, node: ir.Node) -> bool:
        """Whether a reader of `node` that is not yet absorbed may still need it (a linear is absorbed
        only when reached; a QuantizeActivation or DequantizeWeight is emitted unless every reader is
        a linear that absorbs it)."""
        for r in self.uses(node.outputs[0]):
            if id(r) in self.absorbed:
                continue
            if r.domain == "" and r.op_type == "MatMul":
                b = r.inputs[1]
                dq = b.producer() if b is not None else None
                if dq is not None and dq.domain == "qc" and dq.op_type == "DequantizeWeight" and \
                        all(v is None or v.const_value is not None for v in dq.inputs):
                    if node.op_type == "DequantizeWeight" or self._int8_grid(node):
                        continue
            return True
        return False

    @staticmethod
    def _int8_grid(node: ir.Node) -> bool:
        a = ops.attributes_of(node)
        return a["mode"] in ("static", "per-token") and a["bits"] == 8


# ==================================================================================================
# files


def _safetensors(weights: dict[str, Weight]) -> bytes:
    header: dict[str, Any] = {}
    blobs, offset = [], 0
    for key in sorted(weights):
        a = weights[key].array
        if a.dtype not in _NUMPY_TO_ST:
            a = a.astype(np.float32)
        data = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
        header[key] = {"dtype": _NUMPY_TO_ST[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def _kernels_source(kernels: dict[str, Kernel]) -> str:
    lib = (HERE / "kernels.py").read_text()
    parts = [lib, "\n\n# " + "=" * 96 + "\n# Specialised entry points of this model: one per distinct configuration. Each fixes every\n"
             "# constexpr of its kernel (code width, group, table, outliers, bias, activation), so Triton\n"
             "# compiles one variant per entry; M picks the decode (M <= 16) or prefill configurations.\n\n"
             "_generic_wq_a16 = qc_gemm_wq_a16\n_generic_w8a8 = qc_gemm_w8a8\n_generic_mixed_a16 = qc_gemm_mixed_a16\n"
             "# A model has many distinct shapes (every bit class of every layer has its own K): tuning each\n"
             "# on first use takes minutes, so a package uses each path's first configuration unless\n"
             "# QC_TRITON_AUTOTUNE=1 is set.\n"
             "AUTOTUNE_DEFAULT = False\n"]
    for name in sorted(kernels):
        k = kernels[name]
        parts.append("\n\n# " + "-" * 96 + f"\n# {name}\n# serves {len(k.serves)} IR node(s):\n")
        parts.extend(f"#   {_comment(s, 96)}\n" for s in k.serves)
        if k.family == "wq-mixed":
            sig, body, doc = _mixed_entry(k)
        elif k.family == "w8a8":
            sig = "xq, sx, wq_t, sw" + (", bias" if k.bias else "") + ", out_dtype=torch.float32"
            body = (f"    lead = xq.shape[:-1]\n"
                    f"    y = _generic_w8a8(xq.reshape(-1, xq.shape[-1]), sx.reshape(-1), wq_t, sw, "
                    f"bias={'bias' if k.bias else 'None'}, act={k.act!r}, out_dtype=out_dtype)\n"
                    f"    return y.reshape(*lead, wq_t.shape[0])\n")
            doc = f"int8 X times int8 W^T, per-row and per-column scales{', bias' if k.bias else ''}, {k.act} epilogue"
        else:
            extra = (", sparse" if k.sparse else "") + (", bias" if k.bias else "")
            if k.family == "wq-uniform":
                sig = f"x, packed, scale, zero{extra}"
                wargs = f"group={k.group}, scale=scale, zero=zero"
                doc = f"{k.bits}-bit uniform codes, groups of {k.group} rows"
            else:
                sig = f"x, packed, lut{extra}"
                wargs = "lut=lut"
                doc = f"{k.bits}-bit codes into per-column fp16 tables"
            sparse_arg = "sparse" if k.sparse else "None"
            body = (f"    return _generic_wq_a16(x, packed, bits={k.bits}, k=x.shape[-1], {wargs}, "
                    f"bias={'bias' if k.bias else 'None'}, act={k.act!r}, sparse={sparse_arg})\n")
            doc += (", sparse fp16 outliers" if k.sparse else "") + (", bias" if k.bias else "") + f", {k.act} epilogue"
        parts.append(f"def {name}({sig}):\n    \"\"\"{doc}.\"\"\"\n{body}")
    return "".join(parts)


def _mixed_entry(k: Kernel) -> tuple[str, str, str]:
    """Signature, body and docstring of a mixed layer's one-launch entry point."""
    uniform = any(c.startswith("w") for c in k.classes)
    codebook = any(c.startswith("lut") for c in k.classes)
    dense = "f16" in k.classes
    params = ["x", "words", "tiles", "seg"] + (["scale", "zero"] if uniform else []) + (["lut"] if codebook else []) \
        + (["dense"] if dense else []) + (["sparse"] if k.sparse else []) + (["bias"] if k.bias else [])
    body = (f"    return _generic_mixed_a16(x, words, tiles, seg, kinds={k.kinds_mask}, group={k.group or PACK_ROWS}, "
            f"scale={'scale' if uniform else 'None'}, zero={'zero' if uniform else 'None'}, "
            f"lut={'lut' if codebook else 'None'}, dense={'dense' if dense else 'None'}, "
            f"bias={'bias' if k.bias else 'None'}, act={k.act!r}, sparse={'sparse' if k.sparse else 'None'})\n")
    doc = (f"a mixed layer in one launch, tiles of {', '.join(k.classes)}"
           + (f", groups of {k.group} rows" if uniform else "") + (", sparse fp16 outliers" if k.sparse else "")
           + (", bias" if k.bias else "") + f", {k.act} epilogue")
    return ", ".join(params), body, doc


_MODEL_HEAD = '''"""The compiled graph, run with torch operators; quantized linears call kernels.py.

Generated by qcompiler. Weights are read from weights.safetensors (a JSON header and raw tensors;
no pickle) and checked against manifest.json.
"""

import json
import os
import struct
from pathlib import Path

'''

_MODEL_TAIL = '''

# ---- weights ----

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path):
    """name -> CPU tensor, from a safetensors file, without the safetensors package."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise PackageError(f"{path} is not a safetensors file (too short); re-emit the package")
    (size,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + size])
    except ValueError:
        raise PackageError(f"{path} has an unreadable header; re-emit the package") from None
    header.pop("__metadata__", None)
    buf = bytearray(data[8 + size:])
    out = {}
    for name, info in header.items():
        start, stop = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        if stop > len(buf):
            raise PackageError(f"{path}: tensor {name} runs past the end of the file; re-emit the package")
        t = torch.frombuffer(buf, dtype=dtype, offset=start, count=(stop - start) // dtype.itemsize) if stop > start \\
            else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"])
    return out


def _check_weights(weights, manifest):
    expected = manifest["tensors"]
    for key in sorted(expected):
        if key not in weights:
            raise PackageError(f"weights.safetensors lacks tensor {key} listed in manifest.json; re-emit the package")
        have, want = weights[key], expected[key]
        if list(have.shape) != want["shape"] or _DTYPE_NAMES[have.dtype] != want["dtype"]:
            raise PackageError(f"weight {key} is {_DTYPE_NAMES[have.dtype]}{list(have.shape)} in weights.safetensors but "
                               f"manifest.json says {want['dtype']}{want['shape']}; re-emit the package")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise PackageError(f"weights.safetensors holds {extra[0]}, which manifest.json does not list; re-emit the package")


_DTYPE_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class Model(torch.nn.Module):
    """The graph as a module: call it with the graph's inputs (positionally, or by name as keyword
    arguments); it returns a dict from output name to tensor. `input_names` and `output_names` hold
    the graph's names."""

    def __init__(self, directory, device=None, dtype=None):
        super().__init__()
        directory = Path(directory)
        manifest = json.loads((directory / "manifest.json").read_text())
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise PackageError("running on the CPU needs TRITON_INTERPRET=1 in the environment before triton is imported")
        if dtype is None:
            dtype = torch.float32 if device.type == "cpu" else torch.float16
        self.manifest = manifest
        self.input_names = [i["name"] for i in manifest["inputs"]]
        self.output_names = [o["name"] for o in manifest["outputs"]]
        self.device, self.dtype = device, dtype
        self.rt = R.Runtime(device, dtype)
        raw = read_safetensors(directory / "weights.safetensors")
        _check_weights(raw, manifest)
        self.weights = {}
        for key, t in raw.items():
            place = manifest["tensors"][key]["place"]
            unpack = manifest["tensors"][key].get("unpack")
            if unpack is not None:  # codes stored tight: the kernel's words, built once
                t = R.code_words(t, unpack["segments"], unpack["columns"])
            if place == "host":
                self.weights[key] = t.clone()
            elif place == "float":
                self.weights[key] = t.to(device=device, dtype=dtype)
            else:
                self.weights[key] = t.to(device=device)
        self._ones = torch.ones(1, dtype=torch.float32, device=device)

    def ones(self, x):
        m = x.numel() // x.shape[-1] if x.dim() else 1
        if self._ones.numel() < m:
            self._ones = torch.ones(m, dtype=torch.float32, device=self.device)
        return self._ones[:m]

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            outs = self._graph(*self._inputs(args, kwargs))
        return dict(zip(self.output_names, outs))

    def capture(self, *args, **kwargs):
        """A CUDA-graph replay of `forward` for inputs of these shapes: returns a callable taking
        inputs of the same shapes (copied into static buffers) and returning the outputs dict (its
        tensors are overwritten by the next call). Runs forward twice eagerly first (Triton's
        autotuning, workspaces), recording the few CPU -> GPU copies of shape-derived tensors."""
        if self.device.type != "cuda":
            raise PackageError("capture needs a CUDA device")
        self.forward(*args, **kwargs)
        R._Transfers.mode, R._Transfers.log, R._Transfers.at = "record", [], 0
        try:
            static = self._inputs(args, kwargs)
            self._graph(*static)
        finally:
            R._Transfers.mode = None
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        R._Transfers.mode, R._Transfers.at = "replay", 0
        try:
            with torch.no_grad(), torch.cuda.graph(graph):
                outs = self._graph(*static)
        finally:
            R._Transfers.mode = None
        names = self.output_names

        def replay(*a, **k):
            for buf, new in zip(static, self._inputs(a, k)):
                buf.copy_(new)
            graph.replay()
            return dict(zip(names, outs))

        replay.graph = graph
        return replay

    def _inputs(self, args, kwargs):
        if len(args) > len(self.input_names):
            raise PackageError(f"the model takes {len(self.input_names)} inputs, got {len(args)}")
        inputs = list(args) + [None] * (len(self.input_names) - len(args))
        for name, value in kwargs.items():
            if name not in self.input_names:
                raise PackageError(f"unknown input {name!r}; inputs: {self.input_names}")
            inputs[self.input_names.index(name)] = value
        for name, value in zip(self.input_names, inputs):
            if value is None:
                raise PackageError(f"missing input {name!r}")
        return [self._place(v) for v in inputs]

    def _place(self, v):
        v = torch.as_tensor(v)
        if v.is_floating_point():
            return v.to(device=self.device, dtype=self.dtype).clone()
        return v.to(self.device).clone()

    def _graph(self, *inputs):
        W = self.weights
'''


def _init_source() -> str:
    return '''"""A compiled model; see README.md. Load with `load(device=None, dtype=None)`."""

from pathlib import Path

try:
    from .model import Model, PackageError
except ImportError as exc:  # triton (or torch) missing
    name = getattr(exc, "name", None) or "triton"
    raise ImportError(f"this package needs torch and triton ({name} is not installed): pip install torch triton") from None


def load(device=None, dtype=None):
    """The model on `device` (default: cuda when available) computing in `dtype` (default float16 on
    a GPU, float32 on the CPU, which needs TRITON_INTERPRET=1)."""
    return Model(Path(__file__).resolve().parent, device=device, dtype=dtype)
'''


def _main_source() -> str:
    return '''"""`python DIR [--device D]`: load the package, check its weights, run the example input."""

import importlib.util
import sys
from pathlib import Path


def main(argv):
    here = Path(__file__).resolve().parent
    device = argv[argv.index("--device") + 1] if "--device" in argv else None
    try:
        spec = importlib.util.spec_from_file_location("qc_package", here / "__init__.py",
                                                      submodule_search_locations=[str(here)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["qc_package"] = pkg
        spec.loader.exec_module(pkg)
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    try:
        model = pkg.load(device=device)
        feeds = []
        for spec_in in model.manifest["inputs"]:
            shape = [d if isinstance(d, int) else 2 for d in spec_in["shape"]]
            dtype = getattr(torch, spec_in["dtype"])
            feeds.append(torch.ones(shape, dtype=dtype) if dtype.is_floating_point else torch.ones(shape, dtype=dtype))
        outs = model(*feeds)
    except pkg.PackageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, value in outs.items():
        print(f"{name!r}: {tuple(value.shape)} {value.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''


_TORCH_DTYPES = {
    ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16",
    ir.DataType.DOUBLE: "float64", ir.DataType.INT64: "int64", ir.DataType.INT32: "int32", ir.DataType.INT8: "int8",
    ir.DataType.UINT8: "uint8", ir.DataType.BOOL: "bool", ir.DataType.INT16: "int16",
}


def _interface(values) -> list[dict]:
    out = []
    for v in values:
        dims = [] if v.shape is None else [d if isinstance(d, int) else str(d) for d in v.shape]
        out.append({"name": v.name, "dtype": _TORCH_DTYPES.get(v.dtype, "float32"), "shape": dims})
    return out


def _readme(manifest: dict) -> str:
    inputs = ", ".join(f"{i['dtype']}{i['shape']}" for i in manifest["inputs"])
    return f"""# A model compiled by qcompiler for the Triton target

Needs only torch and triton. Load it by path (any folder name works):

```python
import importlib.util, sys, torch

path = "path/to/this/folder"
spec = importlib.util.spec_from_file_location("qc_model", f"{{path}}/__init__.py", submodule_search_locations=[path])
pkg = importlib.util.module_from_spec(spec); sys.modules["qc_model"] = pkg; spec.loader.exec_module(pkg)

model = pkg.load(device="cuda")           # float16 on a GPU; pkg.load("cuda", torch.bfloat16) for bf16
print(model.input_names, model.output_names)
outputs = model(*inputs)                  # or model(**{{name: tensor}}); a dict output name -> tensor
```

Inputs ({len(manifest['inputs'])}): {inputs} (names in `model.input_names`, dtypes and shapes in manifest.json).

On the CPU, set `TRITON_INTERPRET=1` in the environment before anything imports triton, and load
with `device="cpu"` (float32). `python path/to/this/folder [--device cpu|cuda]` loads the package,
checks its weights against the manifest and runs an all-ones example input.

Kernel configurations: each path (M = 1, M <= 16, larger M) uses a fixed configuration; with
`QC_TRITON_AUTOTUNE=1` every new (GPU, shape, specialisation) is autotuned on its first call
(minutes for a whole model). `model.capture(*inputs)` returns a CUDA-graph replay of the model
for inputs of those shapes (no Python or launch overhead).

Files: `kernels.py` (the Triton kernels and one entry point per linear configuration of this model,
each headed by the graph nodes it serves), `model.py` (the graph as torch operators calling those
kernels), `weights.safetensors` (every weight in its kernel's layout, except codes: stored tight and
laid out for the kernels at load), `manifest.json` (names,
shapes, dtypes, weights, kernels, the pipeline that made it).
"""


def _weight_bytes(em: Emitter, source_weights: int | None) -> dict[str, Any]:
    """Bytes this package stores for linear layers (codes as packed, scales, tables, outliers, perms,
    float linears) and bits per source weight."""
    total = sum(w.array.nbytes for w in em.weights.values() if w.linear)
    count = source_weights or 0
    return {"weight_bytes": total, "weights": count,
            "effective_bits_per_weight": round(8 * total / count, 4) if count else None}


def check_triton() -> str:
    try:
        import triton
    except ImportError:
        raise UserError("the triton target needs triton installed: pip install triton (or use --target ort)") from None
    return triton.__version__


def emit(model: ir.Model, directory: Path, manifest: dict[str, Any]) -> list[Path]:
    """Write the package into `directory` (an empty temporary folder owned by the caller)."""
    triton_version = check_triton()
    em = Emitter(model)
    body = em.run()
    model_src = (_MODEL_HEAD + (HERE / "runtime.py").read_text()
                 + "\n\nR = __import__('sys').modules[__name__]\n"
                 + "try:\n    from . import kernels as K\nexcept ImportError as exc:\n"
                 + "    raise ImportError(f\"this package needs triton: pip install triton ({exc})\") from None\n"
                 + _MODEL_TAIL + body + "\n")
    weights = {k: {"shape": list(w.array.shape), "dtype": _NUMPY_TO_ST[w.array.dtype if w.array.dtype in _NUMPY_TO_ST else np.dtype(np.float32)],
                   "place": w.place, "source": w.source, **({"unpack": w.unpack} if w.unpack else {})}
               for k, w in sorted(em.weights.items())}
    blob = _safetensors(em.weights)
    full = {
        "schema": MANIFEST_SCHEMA,
        "target": "triton",
        **manifest,
        "packages": {**manifest.get("packages", {}), "triton": triton_version},
        "inputs": _interface(model.graph.inputs),
        "outputs": _interface(model.graph.outputs),
        "kernels": {k.name: {"family": k.family, "bits": k.bits, "group": k.group, "sparse": k.sparse, "bias": k.bias,
                             "act": k.act, "serves": k.serves, **({"classes": k.classes} if k.classes else {})}
                    for k in sorted(em.kernels.values(), key=lambda k: k.name)},
        "tensors": weights,
        "weights_file_bytes": len(blob),
        **_weight_bytes(em, manifest.get("source", {}).get("weights")),
    }
    files = {
        "__init__.py": _init_source(),
        "__main__.py": _main_source(),
        "kernels.py": _kernels_source(em.kernels),
        "model.py": model_src,
        "README.md": _readme(full),
    }
    full["files"] = sorted([*files, "manifest.json", "weights.safetensors"])
    written = []
    for name, text in files.items():
        (directory / name).write_text(text)
        written.append(directory / name)
    (directory / "weights.safetensors").write_bytes(blob)
    (directory / "manifest.json").write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    written += [directory / "weights.safetensors", directory / "manifest.json"]
    log.info("triton package: %d kernels, %d weights, %d bytes", len(em.kernels), len(weights), len(blob))
    return sorted(written)
