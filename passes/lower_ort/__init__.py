"""`lower-ort`: rewrite `qc` ops as standard ONNX that ONNX Runtime runs fast and that computes
the same numbers as their references.

- `qc.DequantizeWeight(Q, s[, z])` -> `DequantizeLinear(Q, s[, z], axis)`.
- `qc.GatherQuantized` (an embedding table's codes) -> `com.microsoft.GatherBlockQuantized`, 4-bit
  codes and zero points packed two per byte; the table stays packed in the session. A table that
  holds its tied head's codes (`quantize-embedding{tied=share}`) reads the head's `MatMulNBits`
  weight instead of a copy (`share_tied_codes`).
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
  `int-kernels=nbits` (and `auto`, the default, in a decoder whose attention was fused: its steps
  are one token) makes each such linear one 8-bit `com.microsoft.MatMulNBits` of the float input
  instead (weight codes +128 with the column scale in every block; at accuracy level 4 the kernel
  quantizes the input to int8 per block of K, finer than per row, so the numbers move towards
  float's): one kernel for the row scale's ops, the quantization and the product.
- `qc.MixedMatMul` -> one `com.microsoft.MatMulNBits` per 2/4/8-bit class with integer zero points,
  standard ops for the other classes and the sparse outliers, summed (`mixed.py`);
  `mixed-route=single` puts every MatMulNBits class of a layer in one kernel at the widest class's
  width, `mixed-route=digits` in one kernel at the narrowest, wider codes as its digits,
  `mixed-route=auto` picks split or digits per layer by the target's kernel-cost table;
  `mixed-route=expand` keeps every layer as one float MatMul of a weight expanded at load;
  `fp16-route=load` casts the fp16 classes to float32 once, at load, instead of at every run.
  `qc.MixedMatMul`s that read one input with one permutation and the same classes (Q/K/V and
  gate/up under `allocate-bits{shared-input=joint}`) are first merged into one over their columns,
  then a `Split` (or the packed QKV of a fused attention): one gather and one kernel per class.
- `qc.MixedWeight` (a Conv's mixed-precision kernel) -> the weight expanded from the packed classes
  by standard ops that read only initializers, which ONNX Runtime folds into a float32 kernel when the
  session starts (`mixed.py`): the file stores the budgeted bits, the Conv runs in float32.
- an integer 3D Conv (`DQ -> Conv3d <- DQ(W)`, its output quantized) with more than one depth
  tap becomes a 2D Conv over the output's depth slices, its input unfolded along depth while still
  quantized (`conv3d.py`): ONNX Runtime fuses it into its integer 2D kernel, several times as fast
  as its integer 3D one (which gathers tap by tap), with the same products.
- the fused ops of `fuse` (`qc.QLinear`, `qc.NormQuantize`) are first expanded back into the ops
  above (ONNX Runtime fuses the QDQ form itself).
- with u8 activations (`int-kernels=fused`, the default): a static or dynamic linear with a bias,
  `DQ(x) -> MatMul <- DQ(W)` then `Add(., b)`, becomes one
  `com.microsoft.MatMulIntegerToFloat(x_q, W_q, scales, zero point, b)`, the kernel ONNX Runtime
  makes of the QDQ group anyway, with the bias added in it instead of by a separate Add over the
  output; with `shared-input=wide`, such kernels that read the same quantized input (Q/K/V) become
  one kernel over the concatenated weights and a `Split` (measured a little slower on MiniLM).
  `int-kernels=qdq` keeps plain QDQ.
- `MatMulNBits` kernels that read one input with the same attributes (a decoder's Q/K/V, gate/up)
  become one over the concatenated weights (`shared-input=auto`, the default, or `wide`): its output
  is the packed QKV input of a fused `GroupQueryAttention`, or is split for its readers
  (`shared_input.py`).
- with u8 activations, `weight-format=u8` (auto: on x86 without VNNI) stores the int8 weights of
  integer kernels as uint8 + 128 with zero point 128: ONNX Runtime's u8 x s8 kernels there sum pairs
  of products in 16 bits (VPMADDUBSW) and saturate; its u8 x u8 kernels are exact.
- a Swish `Mul(x, Sigmoid(x))` of a quantized `x` becomes one `com.microsoft.QuickGelu(x, alpha=1)`, and
  `Mul(x, HardSigmoid(x))` with hard swish's constants one `HardSwish(x)` (`activations.py`): ONNX
  Runtime fuses them itself in float graphs, not once `x` is dequantized once per reader.
- a residual `Add` of two computed tensors that a `LayerNormalization` reads is written as `Sum`
  (`residual-norm=apart`, the default): ONNX Runtime fuses `Add` + `LayerNormalization` into its
  `SkipLayerNormalization`, which measured 4.5 to 4.9 times as long as the two ops on x86 (ONNX Runtime
  1.32, MiniLM's 8 x 128 x 384, `benchmarks/residual_norm.py`; `benchmarks/w8a8_peers.py` shows the
  effect on the whole model), and leaves `Sum` alone. `residual-norm=fused` keeps the `Add`.
- a Llama-style decoder layer's attention with a KV cache becomes one
  `com.microsoft.GroupQueryAttention` (`attention=auto`, the default, or `fused`; `attention.py` says
  what is matched and what it assumes).
- with `rms-norm=fused` (and `auto`, the default, in a decoder whose attention was fused), an RMSNorm
  exported as `x * Reciprocal(Sqrt(mean(x^2) + eps))` (torch's `rsqrt`) of a residual sum `Add(a, b)`
  becomes one `com.microsoft.SkipSimplifiedLayerNormalization(a, b, gamma)`, whose fourth output is the
  sum; another is written as `x / Sqrt(...)`, the form ONNX Runtime's optimizer fuses, with the scale
  `Mul` after it, into one `SimplifiedLayerNormalization`. The fused kernels round differently from
  the six ops (a few hundredths of SmolLM2's perplexity), so `auto` leaves the norms of graphs
  without a fused attention (encoders, full-sequence decoders) as they are.

The pass is a package: this module holds the pass and its options; `qdq.py` the rewrite of each
`qc` op, `mixed.py` that of mixed layers, `conv3d.py` integer 3D Convs as 2D ones,
`integer_kernels.py`, `shared_input.py`, `norms.py`, `activations.py` and `attention.py` the rewrites
into ONNX Runtime's fused kernels, `host.py` what the host CPU decides.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import onnx_ir as ir

from qcompiler.analysis import placement
from qcompiler.errors import UserError
from qcompiler.ir.layers import drop_unread, has_kv_cache, remove_unused
from qcompiler.ir.meta import Prop
from qcompiler.passes.lower_ort.activations import gated_activations_as_one_op
from qcompiler.passes.lower_ort.attention import fuse_attention
from qcompiler.passes.lower_ort.conv3d import unfold_integer_conv3d
from qcompiler.passes.lower_ort.host import cpu_has_vnni, is_x86, nbits_accuracy_level, signed_activations_are_faster
from qcompiler.passes.lower_ort.integer_kernels import (fuse_integer_bias, fuse_per_token_integer, per_token_linears_as_nbits,
                                                         unsigned_integer_weights)
from qcompiler.passes.lower_ort.mixed import lower_mixed_matmul, lower_mixed_weight
from qcompiler.passes.lower_ort.norms import keep_residual_norms_apart, rms_norms_as_div, rms_norms_with_skip
from qcompiler.passes.lower_ort.qdq import LOWERINGS, share_tied_codes, unfuse
from qcompiler.passes.lower_ort.shared_input import (pack_split_into_attention, widen_integer_linears,
                                                     widen_shared_input_linears, widen_shared_input_mixed)
from qcompiler.pipeline.passbase import Pass, PassResult, option, register_pass

__all__ = ["LowerOrtPass", "cpu_has_vnni", "nbits_accuracy_level"]

log = logging.getLogger(__name__)


@register_pass
@dataclasses.dataclass(frozen=True)
class LowerOrtPass(Pass):
    """Lower qc ops to standard ONNX (QDQ) for ONNX Runtime, choosing the activation format for the CPU."""

    name = "lower-ort"
    provided = frozenset({Prop.LOWERED_ORT})
    # no qc op is left for a quantizing or learning pass to read: one placed after would change nothing;
    # a model read back from a lowered file (a float model compiled with `default`) compiles again from the start
    followers = frozenset({"canonicalize", "lower-ort"})
    followers_bind_loaded = False

    class Stats:
        """Keys of `PassResult.stats` that the compiler reads."""

        KERNELS = "kernels"  # ONNX Runtime kernels by kind, written into the manifest

    act_format: Literal["auto", "u8", "s8"] = option("auto", "activation integer type: auto picks u8 on x86 (faster in ONNX Runtime there), s8 elsewhere")
    mixed_route: Literal["split", "single", "digits", "auto", "expand"] = option(
        "split", "qc.MixedMatMul: MatMulNBits per class where it can run one (split), every such class in one MatMulNBits "
        "at the widest class's width (single) or at the narrowest, wider codes as its digits (digits), per layer whichever "
        "of split and digits the target's kernel-cost table predicts faster at M=1 (auto), or one float MatMul of a "
        "weight expanded at load")
    fp16_route: Literal["auto", "run", "load"] = option(
        "auto", "qc.MixedMatMul fp16 classes: the fp16 weight cast to float32 at every run (resident as stored), or once "
        "at load (twice the class's bytes resident, the per-run Shape/Mul/Add/Reshape/Cast chain gone); auto: load in a "
        "decoder with a KV cache (a step is one token: the chain's calls cost more than the 0.5 % of channels it keeps "
        "in fp16), else run")
    codebook_route: Literal["load", "run"] = option(
        "load", "qc.MixedMatMul codebook classes (split route): weight expanded to float32 at load, or at every run from the "
        "packed codes (resident as stored; measured 450x slower at M=1 on a 4096x4096 layer)")
    int_kernels: Literal["auto", "fused", "qdq", "nbits"] = option(
        "auto", "u8 activations: static and dynamic linears with a bias as com.microsoft.MatMulIntegerToFloat (bias inside), or plain "
        "QDQ; nbits: as fused, and per-token linears as one 8-bit com.microsoft.MatMulNBits each (the kernel quantizes the "
        "activations per block of K at accuracy level 4, a finer grid than per token; the row scale's ops go); auto: nbits "
        "in a decoder whose attention this pass fused (steps of one token), else fused")
    residual_norm: Literal["apart", "fused"] = option(
        "apart", "a residual Add read by a LayerNormalization: written as Sum, which ONNX Runtime does not fuse into its "
        "SkipLayerNormalization (measured 4.5 to 4.9 times as long as Add + LayerNormalization on x86), or kept as Add")
    shared_input: Literal["auto", "separate", "wide"] = option(
        "auto", "kernels reading one input (Q/K/V, gate/up): one each (separate); one wide kernel and a Split, or the "
        "packed QKV of a fused attention (wide); or wide for MatMulNBits and mixed layers of one allocation "
        "(allocate-bits{shared-input=joint}) and separate for MatMulIntegerToFloat, whose wide form measured a little "
        "slower on MiniLM (auto)")
    rms_norm: Literal["auto", "as-is", "fused"] = option(
        "auto", "RMSNorm written x * Reciprocal(Sqrt(mean(x^2) + eps)): as it is; or fused: one "
        "com.microsoft.SkipSimplifiedLayerNormalization where it normalizes a residual sum (the Add inside), else "
        "x / Sqrt(...), the form ONNX Runtime fuses into one SimplifiedLayerNormalization; auto: fused in a decoder whose "
        "attention this pass fused, else as it is")
    attention: Literal["auto", "as-is", "fused"] = option(
        "auto", "a Llama-style decoder's attention with a KV cache: as exported, or one com.microsoft.GroupQueryAttention "
        "a layer (rotary, cache concatenation, head repeat, masked softmax products in one kernel; assumes full causal "
        "attention, a mask of ones padded at the end, as ONNX Runtime GenAI feeds); auto fuses where it finds one, "
        "fused also warns when it finds none")
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
        fp16_route = self.fp16_route if self.fp16_route != "auto" else ("load" if has_kv_cache(graph) else "run")
        stored: dict = {}  # what the mixed layers that read one stored weight (ALBERT's shared layers) store, made once
        lowerings = dict(LOWERINGS, MixedMatMul=lambda g, n, _: lower_mixed_matmul(
            g, n, level, self.mixed_route, self.codebook_route, fp16_route,
            self._kernel_costs() if self.mixed_route == "auto" else None, stored), MixedWeight=lambda g, n, _: lower_mixed_weight(g, n))
        counts: dict[str, int] = {}
        mixed = False
        unfused = unfuse(graph)
        if unfused:
            counts["unfused"] = unfused
        for op, count in gated_activations_as_one_op(graph).items():
            counts[f"{op}(gated activation of a quantized tensor)"] = count
            if op == "QuickGelu":
                model.opset_imports.setdefault("com.microsoft", 1)
        if self.shared_input != "separate":
            wide_mixed = widen_shared_input_mixed(graph)
            if wide_mixed:
                counts["shared input: one MixedMatMul + Split"] = wide_mixed
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
            mixed |= node.op_type in ("MixedMatMul", "MixedWeight")
        tied = share_tied_codes(graph)
        if tied:
            counts["GatherBlockQuantized(head's codes)"] = tied
        fused_attention = fuse_attention(graph) if self.attention != "as-is" else 0
        if fused_attention:
            counts["GroupQueryAttention"] = fused_attention
            model.opset_imports.setdefault("com.microsoft", 1)
            remove_unused(model)  # the exported attention ops
        elif self.attention == "fused":
            log.warning("lower-ort: attention=fused found no attention it can fuse (a Llama-style decoder with a float KV "
                        "cache and heads a multiple of 16 wide); the attention stays as exported")
        if self.int_kernels == "nbits" or (self.int_kernels == "auto" and fused_attention):
            as_nbits = per_token_linears_as_nbits(graph, level)
            if as_nbits:
                counts["MatMulNBits8(per-token linear)"] = as_nbits
                remove_unused(model)  # the row scales, quantizations and int8 weights the kernels replace
        if self.int_kernels != "qdq":
            per_token = fuse_per_token_integer(graph)
            if per_token:
                counts["MatMulIntegerToFloat(per-token)"] = per_token
                model.opset_imports.setdefault("com.microsoft", 1)
        if self.int_kernels != "qdq" and not signed:
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
        unfolded = unfold_integer_conv3d(graph)
        if unfolded:
            counts["QLinearConv 2D over depth slices (integer Conv3d)"] = unfolded
            remove_unused(model)  # the 5-D int8 kernels, re-stored as 4-D
        if self.residual_norm == "apart":
            apart = keep_residual_norms_apart(graph)
            if apart:
                counts["Sum(residual read by LayerNormalization)"] = apart
        if self.shared_input != "separate":
            wide, packed = widen_shared_input_linears(graph)
            if wide - packed:
                counts["shared input: one wide linear + Split"] = wide - packed
            packed += pack_split_into_attention(graph) if fused_attention else 0
            if packed:
                counts["packed QKV"] = packed
        if self.rms_norm == "fused" or (self.rms_norm == "auto" and fused_attention):
            skipped = rms_norms_with_skip(graph)
            if skipped:
                counts["SkipSimplifiedLayerNormalization"] = skipped
                model.opset_imports.setdefault("com.microsoft", 1)
                remove_unused(model)  # the residual Adds and the norms' ops
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
