"""`quantize`: 8-bit weights and activations, written as `qc` ops so the dumps show them.

Weights: per output channel, symmetric: s_n = max_k |W_kn| / 127, Q = round(W / s) in [-127, 127],
stored int8 and expanded by `qc.DequantizeWeight` (axis 1 for MatMul's [K, N], axis 0 for
Conv's [O, C/groups, k...] in 1, 2 or 3 spatial dimensions, axis 1 for ConvTranspose's
[C, O/groups, k...]). A grouped ConvTranspose's output channel o = g * O/groups + j has its
weights in row block g at column j: one scale per column j serves the j-th channel of every group
(ONNX's per-axis dequantization has one axis), so with groups > 1 each scale covers `groups`
output channels.

Activations, before each quantized layer's input, one `qc.QuantizeActivation` per tensor (shared by
the layers that read it):
- `static` (default): per tensor, asymmetric: [lo, hi] from calibration with the method
  `calibrate` was given (minmax, percentile, entropy, mse), scale = (hi - lo) / 255,
  zero_point = round(-128 - lo / scale). The ranges must see what `smooth` and `fold-scales` did:
  for minmax, when only those passes ran since `calibrate`, the attached statistics (which they
  rescale exactly, per channel) give the range; otherwise, and for the histogram methods, the
  statistics are collected again on the graph as it is now. Each input's quantization SQNR on the
  calibration rows is recorded; `float-inputs=N` keeps the N worst in float (weights still int8).
- `dynamic`: per tensor, computed at run time (ONNX Runtime's dynamic quantization).
- `per-token`: one symmetric scale per row, computed at run time (ZeroQuant, Yao et al. 2022).

Bias correction (`bias-correction=true`, or `conv` for Conv and ConvTranspose layers only, as the `w8a8` preset does;
Nagel et al. 2019, "Data-Free Quantization"): each layer's bias absorbs the mean change its int8 weights make on the calibration
inputs, b' = b - E[x] (W_q - W), with E[x] per input channel from the calibrated sample rows (for a
Conv, summed over its taps and its group's input channels). Only layers with a bias to shift are
touched: a Conv or ConvTranspose (one is created when it has none), or a MatMul whose output alone
feeds an `Add` of a constant [N] bias; the weight error, a copy of the weight's size, is computed for those only.

Rounding (`rounding=gptq`; `auto`, the `w8a8` preset's default `conv-rounding`, does so where the Convs'
H have at most `GPTQ_UP_TO_ENTRIES` entries in all, and rounds to nearest above): each Conv kernel's codes on the
same per-output-channel grid are chosen by GPTQ (`passes/gptq.py`, `gptq_fixed_grid`) instead of to
nearest: the kernel as its im2col matrix, rows rounded in order, each row's error spread over the rows
after it, on H = P^T P of its patches P over the calibration data (`conv_hessians`, on the model as it
is before any layer is quantized; centred where bias correction absorbs the mean error). A group of
output channels keeps round-to-nearest where GPTQ leaves no less error on H, and a whole kernel does
where H comes from fewer than 8 patches per kernel row. The scales, and so what ONNX Runtime runs, are
unchanged. Linears keep round-to-nearest.

Placement: with int8 activations, a layer is quantized only where ONNX Runtime will run it as an
integer kernel (`qcompiler.analysis.placement`): every MatMul, and every Conv (2D or 3D) in static mode,
whose output (or that of a Relu alone reading it) is then quantized too, as `QLinearConv` needs;
readers of it that are no layer read it dequantized. Other layers (a Conv writing a graph output;
any Conv with dynamic scales; a 3D Conv with more than one tap and few input channels, where the
integer kernel is slower; every ConvTranspose, which ONNX Runtime's CPU provider runs in float even
between Q/DQ pairs) stay in float, weights too, each listed with the reason in `float_placement`
(a Conv behind a dequantize runs in float and only pays the quantize and dequantize). `force=GLOBS`
(`*`: all) quantizes the matching layers anyway.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.analysis import calibration, placement
from qcompiler.analysis.bias_correction import conv_bias_shift, subtract_from_bias
from qcompiler.analysis.calib_cache import collect_cached
from qcompiler.dialect.ops import QC_OPSET_VERSION
from qcompiler.errors import UserError
from qcompiler.ir.layers import insert_after_value, linears, new_initializer, set_constant
from qcompiler.ir.meta import CALIBRATION_KEY, CREATED_BY, FLOAT_BIAS_KEY, FLOAT_WEIGHT_KEY, STATS_KEY, Prop
from qcompiler.pipeline import context
from qcompiler.pipeline.passbase import Pass, PassResult, model_properties, option, register_pass
from qcompiler.support.progress import progress

QMAX = 127
# rounding=auto (the w8a8 preset's default): GPTQ for the Conv kernels where their H (every group's K x K, float64,
# held at once) has at most this many entries in all: 128 MB. EfficientNet-Lite0 (12.0 M) and the FFDNets (4.6 M,
# 8.2 M) compile 2 to 4.5 times slower for it (seconds); CRAFT (158 M, 3 x 3 Convs of 512 channels: K = 4608) and
# deepbet (52 M) would spend minutes a layer, and keep round-to-nearest.
GPTQ_UP_TO_ENTRIES = 16_000_000
# The convolutions `quantize` handles, each with its weight's output-channel axis.
CONV_OPS = {"Conv": 0, "ConvTranspose": 1}
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Target:
    """A layer to quantize: its node, activation input, weight, and the weight's output-channel axis."""

    node: ir.Node
    x: ir.Value
    w: ir.Value
    weight_axis: int
    channel_axis: int  # of the activation


@register_pass
@dataclasses.dataclass(frozen=True)
class QuantizePass(Pass):
    """Per-channel int8 weights; int8 activations static per tensor, dynamic, or per token."""

    name = "quantize"
    required = frozenset({Prop.CALIBRATED})
    provided = frozenset({Prop.QUANTIZED})

    class Stats:
        """Keys of `PassResult.stats` that the report and doctor read (tests/test_report.py holds the pass to them)."""

        PER_LAYER = "per_layer"  # layer name -> {WEIGHT_SQNR_DB, ACTIVATION_SQNR_DB, ...}
        WEIGHT_SQNR_DB = "weight_sqnr_db"
        ACTIVATION_SQNR_DB = "activation_sqnr_db"
        ACTIVATIONS_IN_FLOAT = "activations_in_float"  # inputs kept in float by float-inputs
        FLOAT_PLACEMENT = "float_placement"  # layer name -> why it stays in float

    weights: Literal["int8"] = option("int8", "weight format (per output channel, symmetric)")
    activations: Literal["int8", "none"] = option("int8", "activation format, or none for weight-only")
    act_mode: Literal["static", "dynamic", "per-token"] = option("static", "how activation scales are found")
    conv: bool = option(True, "quantize Conv layers as well as linears")
    float_inputs: int = option(0, "static mode: keep this many inputs, those that quantize worst (lowest SQNR), in float")
    keep: tuple[str, ...] = option((), "weights (names or globs) whose layers stay in float")
    force: tuple[str, ...] = option((), "weights (names or globs, * for all) whose layers are quantized even where ONNX Runtime would run them in float")
    bias_correction: Literal["false", "conv", "true"] = option(
        "false", "shift each layer's bias by the mean change its int8 weights make on the calibration inputs: "
        "every layer with a bias (true), Conv and ConvTranspose layers only (conv), or none (false)")
    rounding: Literal["nearest", "gptq", "auto"] = option(
        "nearest", "how Conv kernels are rounded to their int8 codes: to nearest, or by GPTQ on the im2col patches of the "
        "calibration inputs, each output channel's scale kept; nearest stays where GPTQ leaves no less error (a group of "
        "output channels), where a kernel has fewer than 8 patches a row, and everywhere when the model's outputs on "
        "held-out calibration batches do not come closer to float; auto: gptq where the Convs' H have at most "
        f"{GPTQ_UP_TO_ENTRIES // 1_000_000} M entries in all, nearest above")
    conv_method: Literal["calibrated", "minmax", "percentile", "entropy", "mse"] = option(
        "calibrated", "static mode: clipping rule of the activations Conv layers read and write: calibrate's method "
        "(calibrated) or minmax, percentile, entropy, mse (the w8a8 preset uses mse)")

    def __post_init__(self):
        if self.float_inputs < 0:
            raise UserError(f"quantize: float-inputs must be 0 or more, got {self.float_inputs}")

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        found = find_targets(graph, self.conv)
        targets = [t for t in found if not any(fnmatch.fnmatchcase(t.w.name, p) for p in self.keep)]
        for pattern in self.keep:
            if not any(fnmatch.fnmatchcase(t.w.name, pattern) for t in found):
                raise UserError(f"quantize: keep pattern '{pattern}' matches no layer weight")
        placed_float = {}
        if self.activations == "int8":
            targets, placed_float = self._integer_placement(graph, targets)
        if not targets:
            return PassResult(model, False, {"layers": 0, "float_placement": placed_float})
        model.opset_imports.setdefault("qc", QC_OPSET_VERSION)
        ranges, act_sqnr, recollected = {}, {}, 0
        static = self.activations == "int8" and self.act_mode == "static"
        conv_outputs = placement.quantized_conv_outputs(graph, [t.node for t in targets]) if static else {}
        if static:
            conv_tensors = {t.x.name for t in targets if t.node.op_type == "Conv"} | set(conv_outputs)
            methods = {name: self.conv_method for name in conv_tensors} if self.conv_method != "calibrated" else {}
            ranges, act_sqnr, recollected = _static_ranges(model, targets, {name: 1 for name in conv_outputs}, methods)
        inputs = {t.x.name for t in targets}
        worst_first = sorted((n for n in act_sqnr if n in inputs), key=lambda name: (np.inf if act_sqnr[name] is None else act_sqnr[name], name))
        in_float = set(worst_first[: self.float_inputs])
        quantized_inputs: dict[str, ir.Value] = {}
        layer_stats = {}
        slots = {id(t.node): slot for t in targets if self._corrects(t) and (slot := bias_slot(t)) is not None}
        input_means = _input_means(model, [t for t in targets if id(t.node) in slots]) if slots else {}
        gptq_codes, rounding, gptq_check = {}, {}, {}
        entries = gram_entries(targets)
        if self._rounds_by_gptq(entries):
            gptq_codes, rounding, gptq_check = gptq_conv_codes(model, targets, input_means, set(slots))
        elif self.rounding == "auto" and entries:
            gptq_check = {"skipped": f"the Convs' H would have {entries:,} entries, above "
                                     f"{GPTQ_UP_TO_ENTRIES:,}: every kernel rounded to nearest"}
        corrected = 0
        with progress("quantize: layers", len(targets)) as bar:
            for target in targets:
                entry = {"weight_axis": target.weight_axis}
                slot = slots.get(id(target.node))
                error = _quantize_weight(graph, target, entry, keep_error=slot is not None, codes=gptq_codes.pop(id(target.node), None))
                if (target.node.name or target.node.outputs[0].name) in rounding:
                    entry["rounding"] = rounding[target.node.name or target.node.outputs[0].name]
                if slot is not None:
                    # the node that adds the bias (the Conv, or the MatMul's Add) keeps it as it was, for the learners' float stream
                    slot.node.meta[FLOAT_BIAS_KEY] = None if slot.value is None else slot.value.const_value.numpy().copy()
                    shift = weight_bias_shift(target, error, input_means[target.x.name])
                    _shift_bias(graph, target, slot, shift)
                    entry["bias_shift_max"] = float(np.max(np.abs(shift)))
                    corrected += 1
                    del error
                if target.x.name in act_sqnr:
                    entry["activation_sqnr_db"] = act_sqnr[target.x.name]
                if self.activations == "int8" and target.x.name not in in_float:
                    x_name = target.x.name
                    if x_name not in quantized_inputs:
                        quantized_inputs[x_name] = _quantize_activation(graph, target.x, self.act_mode, ranges.get(x_name))
                    q_value = quantized_inputs[x_name]
                    target.node.replace_input_with(0, q_value)
                    entry["activation"] = _act_summary(q_value.producer())
                layer_stats[target.node.name or target.node.outputs[0].name] = entry
                bar.update()
        outputs_quantized = 0
        for name, value in conv_outputs.items():  # every reader sees the grid the integer Conv writes
            if name in in_float:
                continue
            if name not in quantized_inputs:
                quantized_inputs[name] = _quantize_activation(graph, value, "static", ranges[name])
            q_value = quantized_inputs[name]
            for use in list(value.uses()):
                if use.node is not q_value.producer():
                    use.node.replace_input_with(use.idx, q_value)
            outputs_quantized += 1
        stats = {
            "layers": len(targets),
            "activations_quantized": len(quantized_inputs),
            "conv_outputs_quantized": outputs_quantized,
            "activation_ranges_recollected": recollected,
            **({"biases_corrected": corrected} if self.bias_correction != "false" else {}),
            **({"kernels_by_gptq": sum(1 for e in layer_stats.values() if e.get("rounding") == "gptq"), "gptq_check": gptq_check}
               if self.rounding != "nearest" and entries else {}),
            "activations_in_float": sorted(in_float),
            "kept_in_float": sorted(t.w.name for t in found if any(fnmatch.fnmatchcase(t.w.name, p) for p in self.keep)),
            "float_placement": placed_float,
            "per_layer": layer_stats,
        }
        return PassResult(model, True, stats)

    def _corrects(self, target: Target) -> bool:
        return self.bias_correction == "true" or (self.bias_correction == "conv" and target.node.op_type in CONV_OPS)

    def _rounds_by_gptq(self, entries: int) -> bool:
        """Whether the Conv kernels, whose H have `entries` in all (`gram_entries`), are rounded by GPTQ:
        `gptq`, or `auto` within `GPTQ_UP_TO_ENTRIES`."""
        if self.rounding == "auto":
            return 0 < entries <= GPTQ_UP_TO_ENTRIES
        return self.rounding == "gptq"

    def _integer_placement(self, graph: ir.Graph, targets: list[Target]) -> tuple[list[Target], dict[str, str]]:
        """(the targets ONNX Runtime runs as integer kernels or `force` names, {layer: why float} for the rest)."""
        forced = [t for t in targets if any(fnmatch.fnmatchcase(t.w.name, p) for p in self.force)]
        for pattern in self.force:
            if not any(fnmatch.fnmatchcase(t.w.name, pattern) for t in targets):
                raise UserError(f"quantize: force pattern '{pattern}' matches no layer weight")
        floats = placement.integer_layers(graph, [t.node for t in targets], static=self.act_mode == "static")
        kept = [t for t in targets if id(t.node) not in floats or t in forced]
        placed_float = {t.node.name or t.node.outputs[0].name: floats[id(t.node)] for t in targets if t not in kept}
        if placed_float:
            log.info("quantize: %d of %d layers left in float where ONNX Runtime has no integer kernel for them "
                     "(quantize{force=...} quantizes them anyway)", len(placed_float), len(targets))
        return kept, placed_float


def find_targets(graph: ir.Graph, conv: bool) -> list[Target]:
    targets = [Target(layer.node, layer.x, layer.w, 1, -1) for layer in linears(graph)]
    if conv:
        for node in graph:
            if node.op_type not in CONV_OPS or node.domain not in ("", "ai.onnx"):
                continue
            w = node.inputs[1]
            if w is not None and w.is_initializer() and w.const_value is not None and w.const_value.dtype.is_floating_point():
                targets.append(Target(node, node.inputs[0], w, CONV_OPS[node.op_type], 1))
    order = {id(n): i for i, n in enumerate(graph)}
    return sorted(targets, key=lambda t: order[id(t.node)])


ROWS_AT_ONCE_ELEMENTS = 1 << 22  # weights are quantized in slices of rows of about this many elements


def quantize_weight_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes and float32 scales, one scale per slice along `axis`. Computed a slice
    of rows at a time (the same values as all at once): the temporaries stay small beside a
    weight of a gigabyte."""
    axis = axis % w.ndim
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    if axis == 0:
        absmax = np.concatenate([np.max(np.abs(w[rows]), axis=reduce) for rows in _row_slices(w)])
    else:
        absmax = np.maximum.reduce([np.max(np.abs(w[rows]), axis=reduce) for rows in _row_slices(w)])
    scale = absmax.astype(np.float32) / QMAX
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    scales = scale.reshape(shape)
    q = np.empty(w.shape, np.int8)
    for rows in _row_slices(w):
        q[rows] = np.clip(np.round(w[rows] / (scales[rows] if axis == 0 else scales)), -QMAX, QMAX)
    return q, scale


def _row_slices(w: np.ndarray) -> list[slice]:
    step = max(1, ROWS_AT_ONCE_ELEMENTS // max(1, w[:1].size))
    return [slice(start, start + step) for start in range(0, w.shape[0], step)]


def weight_sqnr(w: np.ndarray, q: np.ndarray, scales: np.ndarray, axis: int) -> float | None:
    """SQNR in dB of the dequantized codes `q * scales` (`scales` broadcast against `w`, one per
    slice along `axis`) against `w`, in float64, a slice of rows at a time."""
    err = energy = 0.0
    for rows in _row_slices(w):
        reference = w[rows].astype(np.float64)
        dequantized = q[rows].astype(np.float32) * (scales[rows] if axis % w.ndim == 0 else scales)
        err += float(np.sum((reference - dequantized) ** 2))
        energy += float(np.sum(reference**2))
    return round(10 * np.log10(energy / err), 2) if err > 0 and energy > 0 else None


@dataclasses.dataclass
class KernelGrams:
    """What GPTQ rounds a Conv kernel on: per group of output channels, H = P^T P / n of its im2col
    patches P on the calibration data and their mean patch, and the number of patches n."""

    hessians: list[np.ndarray]
    means: list[np.ndarray]
    patches: int


def gram_entries(targets: list[Target]) -> int:
    """Entries of the H GPTQ measures for the Conv targets: K x K for each group of each kernel, K its
    input channels a group times its taps."""
    total = 0
    for target in targets:
        if target.node.op_type == "Conv":
            shape = target.w.const_value.shape
            group = target.node.attributes.get_int("group", 1)
            rows = int(np.prod([int(d) for d in shape[1:]]))
            total += group * rows * rows
    return total


def gptq_conv_codes(model: ir.Model, targets: list[Target], input_means: dict[str, np.ndarray],
                    corrected: set[int]) -> tuple[dict[int, np.ndarray], dict[str, str], dict]:
    """The Conv targets' int8 codes rounded by GPTQ (`gptq_kernel`), on H from the calibration batches but
    every `HOLD_OUT_EVERY`-th (`passes/gptq.py`, `held_out`), on the inputs the model gives them now,
    before any layer is quantized. Kept only if the model's outputs with every Conv kernel dequantized
    (biases of the layers in `corrected` shifted by the mean change their kernels make on inputs of
    `input_means`, as bias correction does; activations and other layers float) are closer to its float
    outputs on the held-out batches (all the batches when there are fewer than 4) than with every kernel
    rounded to nearest: lower errors layer by layer need not give a lower error at the outputs.
    ({id(Conv): codes} of the kernels GPTQ rounds, {layer: how it is rounded}, the check's numbers)."""
    from qcompiler.analysis.execute import run_expanded
    from qcompiler.passes.gptq import conv_hessians, held_out, patch_rule

    convs = [t for t in targets if t.node.op_type == "Conv"]
    rounded_convs = [t for t in convs if patch_rule(t.node) is not None]
    how = {t.node.name or t.node.outputs[0].name: "nearest: GPTQ takes no patches of a Conv with this auto_pad"
           for t in convs if patch_rule(t.node) is None}
    if not rounded_convs:
        return {}, how, {}
    ctx = context.current()
    fit, check = held_out(list(ctx.require_calibration("quantize{rounding=gptq}")))
    hessians, means, _, patches = conv_hessians(model, [t.node for t in rounded_convs], fit, ctx.threads)
    nearest = {id(t.node): quantize_weight_per_channel(t.w.const_value.numpy(), t.weight_axis) for t in convs}
    by_gptq = {}
    for target in rounded_convs:
        key, name = id(target.node), target.node.name or target.node.outputs[0].name
        q, scale = nearest[key]
        grams = KernelGrams(hessians.pop(key), means.pop(key), patches[key])
        codes, how[name] = gptq_kernel(target.w.const_value.numpy(), q, scale, grams, centred=key in corrected)
        if how[name] == "gptq":
            by_gptq[key] = codes
    if not by_gptq:
        return {}, how, {}

    def shift(target: Target, error: np.ndarray) -> np.ndarray | None:
        return weight_bias_shift(target, error, input_means[target.x.name]) if id(target.node) in corrected else None

    float_outputs = [run_expanded(model, batch, ctx.threads) for batch in check]
    with_gptq = {key: (by_gptq.get(key, q), scale) for key, (q, scale) in nearest.items()}
    errors = {label: _kernels_error(model, convs, kernels, shift, check, float_outputs, ctx.threads)
              for label, kernels in (("nearest", nearest), ("gptq", with_gptq))}
    summary = {"output_error_nearest": errors["nearest"], "output_error_gptq": errors["gptq"],
               "checked_on": f"{len(check)} held-out batches" if check is not fit else "the calibration batches"}
    if errors["gptq"] >= errors["nearest"]:
        how.update({name: "nearest: the model's held-out error did not fall" for name, rule in how.items() if rule == "gptq"})
        return {}, how, summary
    return by_gptq, how, summary


def _kernels_error(model: ir.Model, convs: list[Target], kernels: dict[int, tuple], bias_shift, batches, float_outputs,
                   threads) -> float:
    """Squared distance of the model's outputs from `float_outputs` (its own, one dict per batch) over
    `batches` when the Convs' kernels are the dequantized `kernels` ({id(Conv): (codes, scale)}), each
    bias shifted by `bias_shift(target, kernel error)` (None: left)."""
    from qcompiler.analysis.execute import run_expanded
    from qcompiler.ir import to_proto
    from qcompiler.passes.gptq import squared_distance

    copy = ir.serde.deserialize_model(to_proto(model))
    nodes = {node.outputs[0].name: node for node in copy.graph if node.outputs}  # by output: node names may be empty
    for target in convs:
        codes, scale = kernels[id(target.node)]
        w = target.w.const_value.numpy()
        dequantized = codes.astype(np.float32) * scale.reshape([-1] + [1] * (w.ndim - 1))
        node = nodes[target.node.outputs[0].name]
        set_constant(copy.graph, node.inputs[1], dequantized, node, "check")  # a kernel two Convs read: each its own
        shift = bias_shift(target, np.subtract(dequantized, w, dtype=np.float64))
        if shift is not None:
            subtract_from_bias(copy.graph, node, node.inputs[2] if len(node.inputs) > 2 else None, shift,
                               f"{node.outputs[0].name}.bias_check")
    total = 0.0
    for batch, want in zip(batches, float_outputs):
        got = run_expanded(copy, batch, threads)
        total += squared_distance(got, want)
    return total


def gptq_kernel(w: np.ndarray, q: np.ndarray, scale: np.ndarray, grams: KernelGrams, centred: bool) -> tuple[np.ndarray, str]:
    """The int8 codes of Conv kernel `w` [O, C/g, k...] on its per-output-channel `scale`, each group's
    rounded by GPTQ on its H (`passes/gptq.py`, `gptq_fixed_grid`), centred (`H - m m^T`) when the bias
    absorbs the kernel's mean error: the codes `q` (round-to-nearest) kept for a group where GPTQ leaves no
    less `tr(dW^T H dW)`, and for the whole kernel when H comes from fewer than `MIN_PATCHES_PER_ROW`
    patches per kernel row (it would fit the calibration data). (codes, "gptq" or why nearest)."""
    from qcompiler.passes.gptq import MIN_PATCHES_PER_ROW, gptq_fixed_grid, output_error

    rows = grams.hessians[0].shape[0]
    if grams.patches < MIN_PATCHES_PER_ROW * rows:
        return q, f"nearest: {grams.patches} patches for {rows} kernel rows"
    per_group = w.shape[0] // len(grams.hessians)
    codes, improved = q.copy(), 0
    for g, (h, m) in enumerate(zip(grams.hessians, grams.means)):
        channels = slice(g * per_group, (g + 1) * per_group)
        h = h - np.outer(m, m) if centred else h
        matrix = w[channels].reshape(per_group, -1).T.astype(np.float64)  # [K, O/g], the patches' rows
        steps = scale[channels].astype(np.float64)
        rounded = gptq_fixed_grid(matrix, h.copy(), steps, QMAX)
        nearest = q[channels].reshape(per_group, -1).T
        if output_error(matrix - rounded * steps, h) < output_error(matrix - nearest * steps, h):
            codes[channels] = rounded.T.reshape(codes[channels].shape)
            improved += 1
    return codes, "gptq" if improved else "nearest: GPTQ left no less error"


def _quantize_weight(graph: ir.Graph, target: Target, entry: dict, keep_error: bool = False,
                     codes: np.ndarray | None = None) -> np.ndarray | None:
    """Replace the target's weight by int8 codes (rounded to nearest, or `codes` on the same scales) and
    a `qc.DequantizeWeight`; with `keep_error`, return the dequantized weight minus the float one (a copy
    of the weight's size: only then)."""
    w = target.w.const_value.numpy()
    q, scale = quantize_weight_per_channel(w, target.weight_axis)
    if codes is not None:
        q = codes.astype(np.int8)
    base = target.w.name
    q_value = new_initializer(graph, f"{base}.q", q)
    s_value = new_initializer(graph, f"{base}.scale", scale)
    node = ir.node(
        "DequantizeWeight", [q_value, s_value], {"axis": target.weight_axis, "bits": 8}, domain="qc",
        name=f"{base}.dequantize", metadata_props={CREATED_BY: "quantize"},
    )
    node.meta[FLOAT_WEIGHT_KEY] = target.w.const_value  # the float weight, for flexround and tune-scales (in memory only)
    node.outputs[0].name = f"{base}.dq"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    node.outputs[0].shape = ir.Shape(w.shape)
    graph.insert_before(target.node, node)
    target.node.replace_input_with(1, node.outputs[0])
    if not target.w.uses():
        graph.initializers.pop(target.w.name)
    scales = scale.reshape([-1 if i == target.weight_axis % w.ndim else 1 for i in range(w.ndim)])
    entry["weight_sqnr_db"] = weight_sqnr(w, q, scales, target.weight_axis)
    return np.subtract(q.astype(np.float32) * scales, w, dtype=np.float64) if keep_error else None


def _input_means(model: ir.Model, targets: list[Target]) -> dict[str, np.ndarray]:
    """Per layer input: its mean per channel over the calibrated sample rows (attached statistics
    when still exact, otherwise collected again on the calibration data)."""
    stats = current_minmax_stats(model, targets)
    missing = {t.x.name: t.channel_axis for t in targets if t.x.name not in stats}
    if missing:
        ctx = context.current()
        batches = ctx.require_calibration("quantize{bias-correction=true}")
        stats.update(collect_cached(model, batches, missing, cache_dir=ctx.cache_dir, threads=ctx.threads, sequential=ctx.block_sequential,
                                    executor=ctx.executor))
    return {name: np.asarray(s.sample, np.float64).mean(axis=0) for name, s in stats.items()}


def weight_bias_shift(target: Target, error: np.ndarray, mean_in: np.ndarray) -> np.ndarray:
    """E[(W_q - W) x] per output channel for inputs of mean `mean_in` per channel: for a MatMul
    [K, N] weight `mean_in @ error`; for a Conv [O, I/groups, kh, kw] weight the sum over its
    taps and the input channels of its group (borders, where padding reads zeros, are ignored);
    for a ConvTranspose's [C, O/groups, k...] weight the same sum over its group's input channels,
    divided by the product of its strides (each input voxel spreads its taps over that many outputs)."""
    if target.node.op_type == "ConvTranspose":
        return transpose_bias_shift(target.node, error, mean_in)
    if target.node.op_type != "Conv":
        return mean_in @ error
    return conv_bias_shift(error, mean_in)


def transpose_bias_shift(node: ir.Node, error: np.ndarray, mean_in: np.ndarray) -> np.ndarray:
    """E[(W_q - W) x] per output channel of a ConvTranspose, averaged over its output positions."""
    in_channels, per_group = error.shape[:2]
    groups = int(node.attributes["group"].value) if "group" in node.attributes else 1
    strides = node.attributes["strides"].value if "strides" in node.attributes else [1] * (error.ndim - 2)
    taps = error.reshape(in_channels, per_group, -1).sum(axis=2) * mean_in.reshape(-1, 1)
    return taps.reshape(groups, in_channels // groups, per_group).sum(axis=1).reshape(-1) / float(np.prod(strides))


@dataclasses.dataclass(frozen=True)
class BiasSlot:
    """Where a layer's bias lives: the node that adds it (a Conv itself, or the Add that alone reads
    a MatMul's output) and the constant bias value (None: a Conv without a bias, one is created)."""

    node: ir.Node
    value: ir.Value | None


def bias_slot(target: Target) -> BiasSlot | None:
    """The layer's bias, when bias correction can shift it: a Conv's or ConvTranspose's constant
    bias (or none yet), or the constant [N] (or [1, .., N]) operand of the Add that alone reads a
    MatMul's output."""
    node = target.node
    if node.op_type in CONV_OPS:
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        return BiasSlot(node, bias) if bias is None or bias.const_value is not None else None
    readers = list(node.outputs[0].uses())
    if len(readers) != 1 or readers[0].node.op_type != "Add":
        return None
    add = readers[0].node
    bias = add.inputs[1 - readers[0].idx]
    if bias is None or bias.const_value is None:
        return None
    channels = target.w.shape[target.weight_axis] if target.w.shape is not None else None
    shape = tuple(bias.const_value.shape)
    if not isinstance(channels, int) or shape[-1:] != (channels,) or int(np.prod(shape)) != channels:
        return None
    return BiasSlot(add, bias)


def _shift_bias(graph: ir.Graph, target: Target, slot: BiasSlot, shift: np.ndarray) -> None:
    subtract_from_bias(graph, slot.node, slot.value, shift, f"{target.w.name}.bias")


def _quantize_activation(graph: ir.Graph, x: ir.Value, mode: str, value_range) -> ir.Value:
    attrs: dict = {"mode": mode, "bits": 8}
    if mode == "static":
        scale, zero_point = asymmetric_params(*value_range)
        attrs.update(scale=scale, zero_point=zero_point)
    node = ir.node("QuantizeActivation", [x], attrs, domain="qc", name=f"{x.name}.quantize",
                   metadata_props={CREATED_BY: "quantize"})
    node.outputs[0].name = f"{x.name}.q"
    node.outputs[0].type = x.type
    node.outputs[0].shape = x.shape
    insert_after_value(graph, x, node)
    return node.outputs[0]


def asymmetric_params(lo: float, hi: float) -> tuple[float, int]:
    """int8 scale and zero point covering [lo, hi] (widened to include 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero_point = int(np.clip(np.round(-128 - lo / scale), -128, 127))
    return float(np.float32(scale)), zero_point


def _static_ranges(model: ir.Model, targets: list[Target], extra: dict[str, int] | None = None,
                   methods: dict[str, str] | None = None) -> tuple[dict, dict, int]:
    """Per activation (the targets' inputs, and the tensors of `extra`: name -> channel axis): the
    calibrated [lo, hi], and the SQNR (dB) of int8 quantization with it on the calibration sample
    rows; and how many activations had to be run again on calibration data. `methods` (name ->
    clipping rule) overrides calibrate's method for some tensors (`conv-method`)."""
    config = model.meta.get(CALIBRATION_KEY, {})
    method = config.get("method", "minmax")
    methods = methods or {}
    method_of = {name: methods.get(name, method) for name in [t.x.name for t in targets] + list(extra or {})}
    stats = current_minmax_stats(model, targets) if method == "minmax" else {}
    stats = {name: s for name, s in stats.items() if method_of[name] == "minmax"}  # the others need a histogram
    wanted = {t.x.name: t.channel_axis for t in targets}
    wanted.update(extra or {})
    missing = {name: axis for name, axis in wanted.items() if name not in stats}
    if missing:
        ctx = context.current()
        batches = ctx.require_calibration("quantize")
        # what calibrate kept (coarse for min-max, which reads none); a histogram rule on min-max statistics gets calibrate's default bins
        bins = config.get("bins", calibration.MINMAX_BINS)
        if any(method_of[name] != "minmax" for name in missing):
            bins = max(bins, calibration.HISTOGRAM_BINS)
        stats.update(collect_cached(model, batches, missing, cache_dir=ctx.cache_dir, threads=ctx.threads, bins=bins,
                                    sequential=ctx.block_sequential, executor=ctx.executor))
    percentile = config.get("percentile", 99.99)
    ranges = {name: s.clip_range(method_of[name], percentile=percentile) for name, s in stats.items()}
    sqnr = {name: activation_sqnr(stats[name].sample, *ranges[name]) for name in stats}
    return ranges, sqnr, len(missing)


def current_minmax_stats(model: ir.Model, targets: list[Target]) -> dict[str, calibration.TensorStats]:
    """The attached statistics of the targets' activations, when every pass since `calibrate` kept
    them exact (`smooth` and `fold-scales` rescale them): the min-max range needs no new run."""
    if Prop.STATS_CURRENT not in model_properties(model):
        return {}
    found = {}
    for t in targets:
        stats = t.x.meta.get(STATS_KEY)
        if stats is not None and stats.channel_axis == t.channel_axis:
            found[t.x.name] = stats
    return found


def activation_sqnr(sample: np.ndarray, lo: float, hi: float) -> float | None:
    """SQNR (dB) of static int8 quantization over [lo, hi] on sample rows (None: exact, or no rows)."""
    x = np.asarray(sample, np.float64)
    if x.size == 0:
        return None
    scale, zero_point = asymmetric_params(lo, hi)
    from qcompiler.dialect.qc_ops import quantize_activation

    err = float(np.sum((quantize_activation(x.astype(np.float32), "static", scale, zero_point) - x) ** 2))
    energy = float(np.sum(x**2))
    return round(10 * np.log10(energy / err), 2) if err > 0 and energy > 0 else None


def _act_summary(node: ir.Node) -> dict:
    return {name: attr.value for name, attr in node.attributes.items()}
