"""`lower-ort`: rewrite `qc` ops as standard ONNX that ONNX Runtime runs fast and that computes
the same numbers as their references.

- `qc.DequantizeWeight(Q, s[, z])` -> `DequantizeLinear(Q, s[, z], axis)`.
- `qc.GatherQuantized` (an embedding table's codes) -> `com.microsoft.GatherBlockQuantized`, 4-bit
  codes and zero points packed two per byte; the table stays packed in the session.
- `qc.QuantizeActivation` static -> `QuantizeLinear` + one `DequantizeLinear` per reader (QDQ:
  ONNX Runtime fuses each DQ -> MatMul/Conv <- DQ group into an integer kernel; one DQ per
  reader keeps every group fusable). The activation type follows `act-format`:
  `s8` (int8), `u8` (uint8, zero point + 128: the same grid, shifted), or `auto`: `u8` on x86,
  where ONNX Runtime's integer kernels take unsigned activations (signed ones run slower than
  float32 without VNNI, and measured slower than u8 even with VNNI), `s8` elsewhere.
- dynamic -> `DynamicQuantizeLinear` + `DequantizeLinear` (ONNX Runtime's dynamic quantization;
  u8, so linears reading it take the fused integer kernel below).
- per-token (8 bits) -> the row scale in standard ops and the codes as `QuantizeLinear(x / s, 1, zp)`;
  an int8 linear reading them becomes `com.microsoft.MatMulIntegerToFloat` (integer GEMM, weight
  scales applied) followed by a `Mul` by the row scale: exact, since the scale is constant along a
  row. Other readers get `DequantizeLinear(codes, 1, zp) * s`; other widths float ops.
- `qc.MixedMatMul` -> one `com.microsoft.MatMulNBits` per 2/4/8-bit class with integer zero points,
  standard ops for the other classes and the sparse outliers, summed (`passes/lower_mixed.py`);
  `mixed-route=single` puts every MatMulNBits class of a layer in one kernel at the widest class's
  width, `mixed-route=digits` in one kernel at the narrowest, wider codes as its digits,
  `mixed-route=auto` picks split or digits per layer by the target's kernel-cost table;
  `mixed-route=expand` keeps every layer as one float MatMul of a weight expanded at load;
  `fp16-route=load` casts the fp16 classes to float32 once, at load, instead of at every run.
- the fused ops of `fuse` (`qc.QLinear`, `qc.NormQuantize`) are first expanded back into the ops
  above (ONNX Runtime fuses the QDQ form itself).
- with u8 activations (`int-kernels=fused`, the default): a static or dynamic linear with a bias,
  `DQ(x) -> MatMul <- DQ(W)` then `Add(., b)`, becomes one
  `com.microsoft.MatMulIntegerToFloat(x_q, W_q, scales, zero point, b)`, the kernel ONNX Runtime
  makes of the QDQ group anyway, with the bias added in it instead of by a separate Add over the
  output; with `shared-input=wide`, such kernels that read the same quantized input (Q/K/V) become
  one kernel over the concatenated weights and a `Split` (measured a little slower on MiniLM).
  `int-kernels=qdq` keeps plain QDQ.
- with u8 activations, `weight-format=u8` (auto: on x86 without VNNI) stores the int8 weights of
  integer kernels as uint8 + 128 with zero point 128: ONNX Runtime's u8 x s8 kernels there sum pairs
  of products in 16 bits (VPMADDUBSW) and saturate; its u8 x u8 kernels are exact.
- a residual `Add` of two computed tensors that a `LayerNormalization` reads is written as `Sum`
  (`residual-norm=apart`, the default): ONNX Runtime fuses `Add` + `LayerNormalization` into its
  `SkipLayerNormalization`, which measured 4.5 to 4.9 times as long as the two ops on x86 (ONNX Runtime
  1.32, MiniLM's 8 x 128 x 384, `benchmarks/residual_norm.py`; `benchmarks/w8a8_peers.py` shows the
  effect on the whole model), and leaves `Sum` alone. `residual-norm=fused` keeps the `Add`.
- with `rms-norm=fused`, an RMSNorm exported as `x * Reciprocal(Sqrt(mean(x^2) + eps))` (torch's
  `rsqrt`) is written as `x / Sqrt(...)`, the form ONNX Runtime's optimizer fuses, with the scale
  `Mul` after it, into one `SimplifiedLayerNormalization`: 6 ops a norm become 1. Not the default
  yet: the fused kernel rounds differently, and the SmolLM2 figures in the docs were measured
  without it.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.analysis import placement
from qcompiler.errors import UserError
from qcompiler.dialect import ops
from qcompiler.ir.layers import drop_unread, new_initializer, remove_unused
from qcompiler.ir.meta import CREATED_BY, Prop
from qcompiler.passes.lower_mixed import lower_mixed_matmul, pack_nbits
from qcompiler.pipeline.passbase import Pass, PassResult, option, register_pass


@functools.cache
def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI int8 dot products (Linux /proc/cpuinfo flags)."""
    if not is_x86():
        return False
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


@functools.cache
def nbits_accuracy_level() -> int:
    """MatMulNBits' accuracy_level for this CPU: 4 (int8 compute) where ONNX Runtime has fast int8
    kernels for it (x86 with AVX2 or AVX-512, 64-bit Arm); measured on a 2-core AVX-512 VNNI Xeon at
    M=1, 4096x4096, 4-bit g128: 0.47 ms against 1.86 ms with 0 (float compute). 0 elsewhere."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return 4
    if not is_x86():
        return 0
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return 4  # every x86-64 CPU ONNX Runtime ships for since 2013 has AVX2
    return 4 if " avx2" in flags or "avx512" in flags else 0


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def signed_activations_are_faster() -> bool:
    """ONNX Runtime's x86 int8 kernels take unsigned activations (U8S8); signed ones are
    converted first. Measured here (benchmarks/w8a8_peers.py, Xeon with AVX-512 VNNI, 2 threads):
    MiniLM at 0.70x of float32 latency with u8 against 0.86x with s8; SmolLM2 0.52x against 1.03x.
    Without VNNI the gap is reported larger still. Arm's kernels prefer signed (S8S8)."""
    return not is_x86()


@register_pass
@dataclasses.dataclass(frozen=True)
class LowerOrtPass(Pass):
    """Lower qc ops to standard ONNX (QDQ) for ONNX Runtime, choosing the activation format for the CPU."""

    name = "lower-ort"
    provided = frozenset({Prop.LOWERED_ORT})

    class Stats:
        """Keys of `PassResult.stats` that the compiler reads."""

        KERNELS = "kernels"  # ONNX Runtime kernels by kind, written into the manifest

    act_format: Literal["auto", "u8", "s8"] = option("auto", "activation integer type: auto picks u8 on x86 (faster in ONNX Runtime there), s8 elsewhere")
    mixed_route: Literal["split", "single", "digits", "auto", "expand"] = option(
        "split", "qc.MixedMatMul: MatMulNBits per class where it can run one (split), every such class in one MatMulNBits "
        "at the widest class's width (single) or at the narrowest, wider codes as its digits (digits), per layer whichever "
        "of split and digits the target's kernel-cost table predicts faster at M=1 (auto), or one float MatMul of a "
        "weight expanded at load")
    fp16_route: Literal["run", "load"] = option(
        "run", "qc.MixedMatMul fp16 classes: the fp16 weight cast to float32 at every run (resident as stored), or once "
        "at load (twice the class's bytes resident, the per-run Shape/Mul/Add/Reshape/Cast chain gone)")
    codebook_route: Literal["load", "run"] = option(
        "load", "qc.MixedMatMul codebook classes (split route): weight expanded to float32 at load, or at every run from the "
        "packed codes (resident as stored; measured 450x slower at M=1 on a 4096x4096 layer)")
    int_kernels: Literal["fused", "qdq"] = option(
        "fused", "u8 activations: static and dynamic linears with a bias as com.microsoft.MatMulIntegerToFloat (bias inside), or plain QDQ")
    residual_norm: Literal["apart", "fused"] = option(
        "apart", "a residual Add read by a LayerNormalization: written as Sum, which ONNX Runtime does not fuse into its "
        "SkipLayerNormalization (measured 4.5 to 4.9 times as long as Add + LayerNormalization on x86), or kept as Add")
    shared_input: Literal["separate", "wide"] = option(
        "separate", "fused kernels reading one quantized input (Q/K/V): one each, or one wide kernel and a Split "
        "(measured a little slower on MiniLM: the Split copies)")
    rms_norm: Literal["as-is", "fused"] = option(
        "as-is", "RMSNorm written x * Reciprocal(Sqrt(mean(x^2) + eps)): as it is, or as x / Sqrt(...), the form ONNX "
        "Runtime fuses into one SimplifiedLayerNormalization (fused: 6 ops a norm to 1; SmolLM2 decodes 1.03 to 1.08x as fast)")
    weight_format: Literal["auto", "s8", "u8"] = option(
        "auto", "int8 weights of integer kernels: s8, or u8 (+128, zero point 128: the same values), which auto picks "
        "on x86 without VNNI, where ONNX Runtime's u8 x s8 kernels saturate")
    accuracy_level: Literal["auto", "0", "1", "2", "3", "4"] = option(
        "auto", "MatMulNBits compute type: 4 = int8 activations per block (fast on x86 with AVX2 and on Arm), 0 = float32; auto picks 4 where fast")

    def _unsigned_weights(self) -> bool:
        return self.weight_format == "u8" or (self.weight_format == "auto" and is_x86() and not cpu_has_vnni())

    def _kernel_costs(self):
        """The run's target's measured kernel-cost table (`mixed-route=auto` decides by it)."""
        from qcompiler.pipeline import context

        model = context.current().cost_model
        if model is None or model.kernel_costs is None:
            raise UserError("lower-ort: mixed-route=auto needs the target's measured kernel-cost table and this run has none; "
                            "use mixed-route=split or digits")
        return model.kernel_costs

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        signed = self.act_format == "s8" or (self.act_format == "auto" and signed_activations_are_faster())
        level = nbits_accuracy_level() if self.accuracy_level == "auto" else int(self.accuracy_level)
        lowerings = dict(_LOWERINGS, MixedMatMul=lambda g, n, _: lower_mixed_matmul(
            g, n, level, self.mixed_route, self.codebook_route, self.fp16_route,
            self._kernel_costs() if self.mixed_route == "auto" else None))
        counts: dict[str, int] = {}
        mixed = False
        unfused = unfuse(graph)
        if unfused:
            counts["unfused"] = unfused
        for node in list(graph):
            if node.domain != "qc":
                continue
            lower = lowerings.get(node.op_type)
            if lower is None:
                continue
            read = [v for v in node.inputs if v is not None and v.is_initializer()]
            route = lower(graph, node, signed)
            drop_unread(graph, read)  # a layer's old weights go as soon as its lowered form has its own
            counts[route] = counts.get(route, 0) + 1
            mixed |= node.op_type == "MixedMatMul"
        if self.int_kernels == "fused":
            per_token = fuse_per_token_integer(graph)
            if per_token:
                counts["MatMulIntegerToFloat(per-token)"] = per_token
                model.opset_imports.setdefault("com.microsoft", 1)
        if self.int_kernels == "fused" and not signed:
            fused = fuse_integer_bias(graph)
            if fused:
                counts["MatMulIntegerToFloat(bias)"] = fused
                model.opset_imports.setdefault("com.microsoft", 1)
                widened = widen_integer_linears(graph) if self.shared_input == "wide" else 0
                if widened:
                    counts["MatMulIntegerToFloat(shared input)+Split"] = widened
                    remove_unused(model)  # the per-layer weights, now concatenated
        if self._unsigned_weights():
            widened_weights = unsigned_integer_weights(graph)
            if widened_weights:
                counts["uint8 weights"] = widened_weights
                remove_unused(model)  # the int8 copies
        if self.residual_norm == "apart":
            apart = keep_residual_norms_apart(graph)
            if apart:
                counts["Sum(residual read by LayerNormalization)"] = apart
        if self.rms_norm == "fused":
            divided = rms_norms_as_div(graph)
            if divided:
                counts["RMSNorm as Div (fused by ONNX Runtime)"] = divided
        if mixed:
            remove_unused(model)  # the qc op's class initializers, re-stored in the lowered form
        if counts and "qc" in model.opset_imports and not any(n.domain == "qc" for n in graph):
            del model.opset_imports["qc"]
        stats = {"activation_format": "s8" if signed else "u8", "cpu_vnni": cpu_has_vnni(), "routes": counts}
        kernels = placement.census(graph)
        if kernels["integer_kernels"] or kernels["float_kernels_behind_qdq"]:
            stats["kernels"] = {**kernels, "predicted_slower_than_float": placement.predicted_slower(kernels)}
        if any(n.op_type == "GatherBlockQuantized" for n in graph):
            model.opset_imports.setdefault("com.microsoft", 1)
        if any(n.op_type == "MatMulNBits" for n in graph):
            stats["matmul_nbits_accuracy_level"] = level
            model.opset_imports.setdefault("com.microsoft", 1)
        return PassResult(model, bool(counts), stats)


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


def keep_residual_norms_apart(graph: ir.Graph) -> int:
    """`LayerNormalization(Add(a, b))` with a and b both computed -> `LayerNormalization(Sum(a, b))`
    (the same numbers; ONNX Runtime's SkipLayerNormalization fusion matches only Add)."""
    count = 0
    for norm in list(graph):
        if norm.op_type != "LayerNormalization" or norm.domain not in ("", "ai.onnx"):
            continue
        add = norm.inputs[0].producer()
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or \
                any(v is None or v.const_value is not None for v in add.inputs):
            continue
        total = ir.node("Sum", list(add.inputs), name=add.name, metadata_props={CREATED_BY: "lower-ort"})
        ir.convenience.replace_nodes_and_values(graph, add, [add], [total], [add.outputs[0]], [total.outputs[0]])
        count += 1
    return count


def rms_norms_as_div(graph: ir.Graph) -> int:
    """`Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2)), eps))))` -> `Div(x, Sqrt(...))`: the
    pattern ONNX Runtime's optimizer fuses into one `SimplifiedLayerNormalization` (with the
    following scale `Mul`); the optimizer does not match the Reciprocal form torch's `rsqrt` exports.
    A Reciprocal that is a graph output or has other readers stays."""
    count = 0
    for mul in list(graph):
        if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx"):
            continue
        found = [(x, inverse, root) for x, inverse in (mul.inputs, tuple(reversed(mul.inputs)))
                 if (root := _rms_denominator(x, inverse)) is not None]
        if not found:
            continue
        x, inverse, root = found[0]
        div = ir.node("Div", [x, root], name=mul.name, metadata_props={CREATED_BY: "lower-ort"})
        ir.convenience.replace_nodes_and_values(graph, mul, [mul], [div], [mul.outputs[0]], [div.outputs[0]])
        reciprocal = inverse.producer()
        if not inverse.uses() and not inverse.is_graph_output():
            graph.remove(reciprocal, safe=True)
        count += 1
    return count


def _rms_denominator(x: ir.Value | None, inverse: ir.Value | None) -> ir.Value | None:
    """Sqrt(mean(x^2) + eps) when `inverse` is its Reciprocal, of the same `x`; else None."""
    def producer(value, op_type):
        node = value.producer() if value is not None else None
        return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None

    reciprocal = producer(inverse, "Reciprocal")
    root = producer(reciprocal.inputs[0], "Sqrt") if reciprocal else None
    add = producer(root.inputs[0], "Add") if root else None
    if add is None:
        return None
    for mean_value, eps in (add.inputs, reversed(add.inputs)):
        mean = producer(mean_value, "ReduceMean")
        power = producer(mean.inputs[0], "Pow") if mean else None
        if power is not None and eps is not None and eps.const_value is not None and power.inputs[0] is x \
                and power.inputs[1].const_value is not None and float(power.inputs[1].const_value.numpy()) == 2.0:
            return root.outputs[0]
    return None


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


def widen_integer_linears(graph: ir.Graph) -> int:
    """MatMulIntegerToFloat nodes with the same quantized input, scale and zero point (Q, K, V) ->
    one over the concatenated weights, scales and biases, then a Split; returns the groups merged."""
    groups: dict[tuple, list[ir.Node]] = {}
    for node in graph:
        if node.op_type == "MatMulIntegerToFloat" and node.domain == "com.microsoft" and len(node.inputs) == 7:
            x_q, _, x_scale, _, x_zero, _, _ = node.inputs
            groups.setdefault((id(x_q), id(x_scale), id(x_zero)), []).append(node)
    merged = 0
    for nodes in groups.values():
        if len(nodes) < 2 or any(n.inputs[i].const_value is None for n in nodes for i in (1, 3, 6)):
            continue
        first = nodes[0]
        base = first.name or first.outputs[0].name
        parts = {index: [n.inputs[index].const_value.numpy() for n in nodes] for index in (1, 3, 6)}
        w = new_initializer(graph, f"{base}.wide.weight", np.concatenate(parts[1], axis=1))
        scale = new_initializer(graph, f"{base}.wide.scale", np.concatenate(parts[3]))
        bias = new_initializer(graph, f"{base}.wide.bias", np.concatenate(parts[6]))
        sizes = new_initializer(graph, f"{base}.wide.splits", np.array([p.shape[1] for p in parts[1]], np.int64))
        wide = ir.node("MatMulIntegerToFloat", [first.inputs[0], w, first.inputs[2], scale, first.inputs[4], None, bias],
                       domain="com.microsoft", name=f"{base}.wide", metadata_props={CREATED_BY: "lower-ort"})
        wide.outputs[0].name = f"{base}.wide"
        split = ir.node("Split", [wide.outputs[0], sizes], {"axis": -1}, num_outputs=len(nodes), name=f"{base}.split",
                        metadata_props={CREATED_BY: "lower-ort"})
        olds = [n.outputs[0] for n in nodes]
        read = [v for n in nodes for v in n.inputs if v is not None and v.is_initializer()]
        ir.convenience.replace_nodes_and_values(graph, first, nodes, [wide, split], olds, list(split.outputs))
        drop_unread(graph, read)  # the per-layer weights, now concatenated
        merged += 1
    return merged


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


_LOWERINGS = {
    "ChannelScale": _lower_channel_scale,
    "DequantizeWeight": _lower_dequantize_weight,
    "GatherQuantized": _lower_gather_quantized,
    "QuantizeActivation": _lower_quantize_activation,
}
