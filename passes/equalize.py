"""`equalize`: cross-layer equalization of Conv pairs (Nagel et al., "Data-Free Quantization
Through Weight Equalization and Bias Correction", ICCV 2019, arXiv 1906.04721).

For two convolutions in a row, `y = conv2(f(conv1(x)))`, with f positive-homogeneous
(`f(x / s) = f(x) / s` for every s > 0: ReLU, LeakyReLU, PReLU, or no activation at all),
dividing conv1's output channel i (its weights W1[i] and bias b1[i]) by s_i > 0 and multiplying
conv2's input channel i (W2[:, i]) by the same s_i leaves y unchanged in exact arithmetic. With
r1_i = max|W1[i]| (the range of output channel i of conv1) and r2_i = max|W2[:, i]| (the range of
input channel i of conv2, over every output channel that reads it),

    s_i = sqrt(r1_i * r2_i) / r2_i = sqrt(r1_i / r2_i)

makes both ranges sqrt(r1_i * r2_i): every channel then uses as much of its int8 grid in conv1 as
in conv2, which is what per-tensor (and, for the reading layer, per-output-channel) weight
quantization needs. A channel with a zero range keeps s_i = 1. Grouped and depthwise
convolutions are handled by their group structure (a depthwise conv2's input channel i is its
output channel i). A conv in the middle of a chain belongs to two pairs; the pass sweeps over
every pair until no scale moves by more than `TOLERANCE` (at most `iterations` sweeps), as the
paper iterates, so a second run finds every pair equal and changes nothing.

Only exact rescalings are made. A pair is skipped, and the statistics and the log say why, when
f is not positive-homogeneous (Sigmoid, HardSwish, Clip with bounds other than [0, inf), ...), an
intermediate tensor or a weight has another reader or is a graph output, or a weight is not a
constant. `clip=per-channel` also equalizes through `Clip(x, 0, m)` (ReLU6): the Clip becomes
`Min(Relu(x), m / s)` with one bound per channel, which is exact, since
`min(max(x / s, 0), m / s) = min(max(x, 0), m) / s`; with `clip=skip` (the default) such pairs
are left as they are.

The paper's setting is per-tensor weight grids. `quantize` gives every Conv weight one grid per
output channel, which the first conv of a pair does not notice; the second conv's rows, whose grid
step is set by their largest entry, may lose: measure before turning it on (docs/results.md,
cross-layer equalization: it costs PSNR on FFDNet, and on EfficientNet-Lite0 adds 3 points of top-1
agreement without ReLU6 and loses 8 through it).

Equalization changes the activations between the pair, so it runs before `calibrate`
(`canonicalize,equalize,calibrate,...`); BatchNorm must be folded into the convs first (the
torch exporter does; a Conv followed by BatchNormalization is skipped with that reason).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.errors import UserError
from qcompiler.ir.layers import new_initializer, remove_unused, set_constant
from qcompiler.ir.meta import CREATED_BY, Prop
from qcompiler.pipeline.passbase import Pass, PassResult, option, register_pass

log = logging.getLogger(__name__)

TOLERANCE = 1e-3  # a pair whose every |s_i - 1| is at most this counts as equalized


@dataclasses.dataclass
class ConvWeights:
    """A Conv's constant weight and optional bias, as float32 arrays being rescaled."""

    node: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None
    dtype: np.dtype  # the stored type, written back (the arithmetic is float32)
    changed: bool = False

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name


@dataclasses.dataclass
class Pair:
    """conv1 -> activation (or none) -> conv2; `bound` is the per-channel upper bound of a Clip."""

    first: ConvWeights
    second: ConvWeights
    activation: ir.Node | None
    bound: np.ndarray | None = None
    applied: bool = False


@register_pass
@dataclasses.dataclass(frozen=True)
class EqualizePass(Pass):
    """Cross-layer equalization: rescale Conv -> ReLU-like -> Conv pairs so each channel has the same weight range in both."""

    name = "equalize"
    provided = frozenset({Prop.EQUALIZED})

    iterations: int = option(100, "most sweeps over all pairs (a conv in a chain belongs to two); stops once no scale moves")
    clip: Literal["skip", "per-channel"] = option(
        "skip", "a Clip(x, 0, m) between the pair (ReLU6): skip the pair, or make it Min(Relu(x), m/s) per channel (exact)")

    def __post_init__(self):
        if self.iterations < 1:
            raise UserError(f"equalize: iterations must be at least 1, got {self.iterations}")

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        pairs, skipped = find_pairs(graph, self.clip)
        for conv, reason in skipped.items():
            log.info("equalize: %s not equalized: %s", conv, reason)
        sweeps = 0
        for sweeps in range(1, self.iterations + 1):
            if not any([equalize_pair(pair) for pair in pairs]):
                break
        else:
            if pairs:
                log.warning("equalize: ranges still moving after %d sweeps; raise iterations", self.iterations)
        write_back(graph, pairs)
        if any(p.applied and p.bound is not None for p in pairs):
            remove_unused(model)  # the Clips' scalar bounds
        applied = [p for p in pairs if p.applied]
        stats = {
            "pairs": len(pairs),
            "pairs_rescaled": len(applied),
            "sweeps": sweeps,
            "clips_made_per_channel": sum(1 for p in applied if p.bound is not None),
            "skipped": len(skipped),
            "skipped_why": skipped,
        }
        log.info("equalize: %d of %d pairs rescaled in %d sweeps, %d convs skipped", len(applied), len(pairs), sweeps, len(skipped))
        return PassResult(model, bool(applied), stats)


# --------------------------------------------------------------------------------------------
# Finding the pairs


def find_pairs(graph: ir.Graph, clip: str) -> tuple[list[Pair], dict[str, str]]:
    """Every exact Conv pair in graph order, and for each Conv that reads a Conv's result without
    being paired with it, why."""
    weights: dict[int, ConvWeights] = {}
    pairs, skipped = [], {}
    for node in graph:
        if not _is_conv(node):
            continue
        first, activation, reason = _pair_ending_at(graph, node, clip)
        if reason:
            skipped[node.name or node.outputs[0].name] = reason
            continue
        if first is None:
            continue
        pair = Pair(_weights_of(weights, first), _weights_of(weights, node), activation)
        reason = _shape_mismatch(pair)
        if reason:
            skipped[node.name or node.outputs[0].name] = reason
            continue
        high = _clip_bounds(activation)[1] if activation is not None and activation.op_type == "Clip" else np.inf
        if not np.isinf(high):
            pair.bound = np.full(pair.first.weight.shape[0], high, np.float32)
        pairs.append(pair)
    return pairs, skipped


def _is_conv(node: ir.Node) -> bool:
    return node.op_type == "Conv" and node.domain in ("", "ai.onnx")


def _pair_ending_at(graph: ir.Graph, conv2: ir.Node, clip: str) -> tuple[ir.Node | None, ir.Node | None, str]:
    """(conv1, activation, "") when `conv2` can be paired with the Conv before it; (None, None, "")
    when nothing that could pair precedes it; (None, None, why) when a Conv precedes it but the
    pair would not be exact."""
    x = conv2.inputs[0]
    producer = x.producer() if x is not None else None
    if producer is None:
        return None, None, ""
    activation = None
    if not _is_conv(producer):
        source = producer.inputs[0] if producer.inputs else None
        conv1 = source.producer() if source is not None else None
        if conv1 is None or not _is_conv(conv1):
            return None, None, ""
        why = _activation_problem(graph, producer, clip)
        if why:
            return None, None, why
        activation, producer = producer, conv1
        if not _single_reader(graph, source):
            return None, None, f"the output of {conv1.name} has other readers"
    conv1 = producer
    if not _single_reader(graph, x):
        return None, None, f"its input has other readers besides {conv2.name}"
    for conv in (conv1, conv2):
        why = _weights_problem(graph, conv)
        if why:
            return None, None, why
    return conv1, activation, ""


def _activation_problem(graph: ir.Graph, node: ir.Node, clip: str) -> str:
    """Why `node` cannot sit between an equalized pair ("" when it can)."""
    kind = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return f"{node.domain}.{kind} between the convs is not known to be positive-homogeneous"
    if kind in ("Relu", "LeakyRelu"):
        return ""
    if kind == "PRelu":
        slope = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] is not None else None
        return "" if slope is not None else "PRelu with a slope that is not a constant"
    if kind == "Clip":
        bounds = _clip_bounds(node)
        if bounds is None:
            return "Clip with bounds that are not constants"
        low, high = bounds
        if low != 0.0:
            return f"Clip({low:g}, {high:g}) is not positive-homogeneous"
        if np.isinf(high) or clip == "per-channel":
            return ""
        return f"Clip(0, {high:g}) (ReLU6) is not positive-homogeneous; clip=per-channel equalizes through it exactly"
    if kind == "BatchNormalization":
        return "BatchNormalization between the convs; fold it first (the torch exporter does)"
    return f"{kind} between the convs is not positive-homogeneous"


def _clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is None:
            bounds.append(default)
        elif value.const_value is None or value.const_value.numpy().size != 1:
            return None
        else:
            bounds.append(float(value.const_value.numpy().reshape(())))
    return bounds[0], bounds[1]


def _single_reader(graph: ir.Graph, value: ir.Value) -> bool:
    return len(value.uses()) == 1 and value not in graph.outputs


def _weights_problem(graph: ir.Graph, conv: ir.Node) -> str:
    for index in (1, 2):
        value = conv.inputs[index] if index < len(conv.inputs) else None
        if value is None:
            continue
        if value.const_value is None or not value.const_value.dtype.is_floating_point():
            return f"{conv.name}'s {'weight' if index == 1 else 'bias'} is not a float constant"
        if len(value.uses()) != 1 or value in graph.outputs:
            return f"{conv.name}'s {'weight' if index == 1 else 'bias'} is shared with another node"
    return ""


def _weights_of(cache: dict[int, ConvWeights], conv: ir.Node) -> ConvWeights:
    key = id(conv)
    if key not in cache:
        bias = conv.inputs[2] if len(conv.inputs) > 2 else None
        weight = conv.inputs[1].const_value.numpy()
        cache[key] = ConvWeights(
            conv, weight.astype(np.float32), None if bias is None else bias.const_value.numpy().astype(np.float32), weight.dtype)
    return cache[key]


def _groups(conv: ir.Node) -> int:
    return conv.attributes["group"].value if "group" in conv.attributes else 1


def _shape_mismatch(pair: Pair) -> str:
    channels = pair.first.weight.shape[0]
    w2 = pair.second.weight
    groups = _groups(pair.second.node)
    if w2.ndim < 3 or w2.shape[1] * groups != channels or w2.shape[0] % groups:
        return f"{pair.first.name} gives {channels} channels, {pair.second.name} reads {w2.shape[1] * groups}"
    return ""


# --------------------------------------------------------------------------------------------
# The rescaling


def output_ranges(weight: np.ndarray) -> np.ndarray:
    """max|W[i]| per output channel i."""
    return np.abs(weight).reshape(weight.shape[0], -1).max(axis=1)


def input_ranges(weight: np.ndarray, groups: int) -> np.ndarray:
    """max|W[:, i]| per input channel i of a (grouped) Conv weight [O, C/groups, ...], over the
    output channels of i's group."""
    out, per_group = weight.shape[0], weight.shape[1]
    grouped = np.abs(weight).reshape(groups, out // groups, per_group, -1)
    return grouped.max(axis=(1, 3)).reshape(-1)


def scale_inputs(weight: np.ndarray, groups: int, s: np.ndarray) -> np.ndarray:
    """W[:, i] *= s_i for every input channel i of a (grouped) Conv weight."""
    out, per_group = weight.shape[0], weight.shape[1]
    grouped = weight.reshape(groups, out // groups, per_group, -1)
    return (grouped * s.reshape(groups, 1, per_group, 1)).reshape(weight.shape).astype(np.float32)


def equalizing_scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """s_i = sqrt(r1_i / r2_i) (both ranges become sqrt(r1_i r2_i)); 1 where a range is zero."""
    r1, r2 = r1.astype(np.float64), r2.astype(np.float64)
    s = np.ones_like(r1)
    usable = (r1 > 0) & (r2 > 0)
    s[usable] = np.sqrt(r1[usable] / r2[usable])
    return s


def equalize_pair(pair: Pair) -> bool:
    """Rescale one pair in place; False (nothing changed) when it is already equal."""
    groups = _groups(pair.second.node)
    s = equalizing_scales(output_ranges(pair.first.weight), input_ranges(pair.second.weight, groups))
    if np.all(np.abs(s - 1.0) <= TOLERANCE):
        return False
    first, second = pair.first, pair.second
    shape = (-1,) + (1,) * (first.weight.ndim - 1)
    first.weight = (first.weight / s.reshape(shape)).astype(np.float32)
    if first.bias is not None:
        first.bias = (first.bias / s).astype(np.float32)
    second.weight = scale_inputs(second.weight, groups, s)
    if pair.bound is not None:
        pair.bound = (pair.bound / s).astype(np.float32)
    first.changed = second.changed = pair.applied = True
    return True


def write_back(graph: ir.Graph, pairs: list[Pair]) -> None:
    """Write the rescaled weights, biases and per-channel Clip bounds into the IR."""
    written = set()
    for pair in pairs:
        for conv in (pair.first, pair.second):
            if conv.changed and id(conv) not in written:
                written.add(id(conv))
                set_constant(graph, conv.node.inputs[1], conv.weight.astype(conv.dtype), conv.node, "equalized")
                if conv.bias is not None:
                    set_constant(graph, conv.node.inputs[2], conv.bias.astype(conv.dtype), conv.node, "equalized")
        if pair.applied and pair.bound is not None:
            _clip_per_channel(graph, pair.activation, pair.bound.astype(pair.first.dtype), pair.first.weight.ndim)


def _clip_per_channel(graph: ir.Graph, clip: ir.Node, bound: np.ndarray, rank: int) -> None:
    """Clip(x, 0, m) -> Min(Relu(x), bound) with bound [C, 1, ...] broadcasting over channels."""
    name = clip.name or clip.outputs[0].name
    relu = ir.node("Relu", [clip.inputs[0]], name=f"{name}.relu", metadata_props={CREATED_BY: "equalize"})
    relu.outputs[0].name = f"{clip.outputs[0].name}.relu"
    limit = new_initializer(graph, f"{name}.bound", bound.reshape((-1,) + (1,) * (rank - 2)))
    minimum = ir.node("Min", [relu.outputs[0], limit], name=name, metadata_props={CREATED_BY: "equalize"})
    out = clip.outputs[0]
    ir.convenience.replace_nodes_and_values(graph, clip, [clip], [relu, minimum], [out], [minimum.outputs[0]])
