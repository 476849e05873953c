"""`awq-scale`: activation-aware weight scaling for weight-only quantization (AWQ; Lin et al.,
MLSys 2024, arXiv 2306.00978).

A few input channels of a linear `Y = X W` carry large activations; the rows of W they read matter
most, yet a group's grid is set by its largest weights, whichever rows they sit in. Scaling input
channel k by s_k,

    X W = (X diag(s)^-1) (diag(s) W),      s_k = mean|x_k|^alpha / sqrt(max_j m_j^alpha * min_j m_j^alpha),

is exact in real arithmetic, and quantizing `diag(s) W` instead of W gives the salient rows a finer
grid relative to their size (their quantization error is divided by s_k on the way out) at the
cost of a coarser one for the rest. alpha = 0 leaves the layer as it is; alpha is chosen per group
of linears that read the same tensor (Q, K, V; gate and up), which share one s, from the grid
0.0, 0.1, ..., 0.9 refined by the two points 0.05 either side of the best (the paper searches
0.00, 0.05, ..., 0.95; the error is unimodal in alpha in practice, so this finds the same point
with 12 evaluations instead of 20), minimising the squared error of the group's quantized output

    sum over the group ||X W - (X / s) Q_s(diag(s) W)||^2

on the calibration sample rows (float activations of the float model, which scaling leaves
unchanged), as the paper does. The activation statistic is mean |x_k| from `calibrate`.

Width: `Q_s` is the quantization the layer will get. `allocate-bits` decides widths per input
channel after this pass, and it decides them on the scaled weights and statistics (a scaled row
has energy E_k / s_k^2 and weights s_k w_k), so the search replays its rule at scope=layer for
each candidate s: the `outliers-act` fraction of channels with the largest (scaled) energy in fp16,
the rest starting at the smallest candidate and upgraded by the largest predicted error reduction
per stored bit (min-max errors of groups in row order, `bitcost.per_row_bits` costs with the zero
points `allocate-bits` stores by default, its fixed charges) until `avg-bits` is spent; each width
class then quantized in its own groups of `group-size` rows with the energy-weighted clipping
search of `quantize-weights` (grid=mse, the preset's). That search matters: min-max groups
overstate what scaling buys, since clipping already recovers part of it. With the preset's
scope=layer this is the allocation to come, up to how the exact greedy spends the last bits
(and, in layers of 2048 rows or more, up to `allocate-bits{blocks=auto}` pricing whole blocks);
with scope=model it is an estimate at the average budget. Running before `allocate-bits`, rather
than inside it, keeps the allocation a pure function of the weights and statistics it sees and lets
`fold-scales` do the folding, as for `smooth`.

Measured (docs/results.md): on SmolLM2 it makes the `mixed` preset worse (perplexity 65.4 -> 71.1 at
3.25 bits, 29.3 -> 29.8 at 4.25), since the allocation already gives salient channels fp16 or 8
bits and the clipping search recovers much of the rest; the preset leaves it off (`act-scale=none`).

In the IR the pass inserts `qc.ChannelScale(X, 1/s)` in front of the group and scales the rows of
each W (`smooth.scale_input_channels`, the same rewrite as `smooth`); `fold-scales` then folds it
into the producer of X: the weight of an RMSNorm or LayerNorm, or the columns of the linear that
produces X (a gated MLP's up projection for the down projection). Weight-only quantization must
cost nothing at run time, so a group whose input has readers other than the group (a residual
connection, as after a post-LayerNorm in BERT) or whose producer is not such a node is skipped
(`skipped` in the statistics, with the reason); if a fold still fails, `fold-scales{unfoldable=unsmooth}`
folds the scale back into the weights. The search reads at most `SEARCH_ROWS` sample rows and
`SEARCH_COLUMNS` output columns of the group's weights side by side, evenly strided, so it is
deterministic.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompiler.analysis import bitcost
from qcompiler.dialect.mixed_ops import dequantize_uniform
from qcompiler.dialect.ops import QC_OPSET_VERSION
from qcompiler.errors import UserError
from qcompiler.ir.layers import Linear, group_by_input, linears
from qcompiler.ir.meta import SMOOTHED_KEY, STATS_KEY, Prop
from qcompiler.passes.allocate_bits import LOWERING_BYTES_PER_CLASS
from qcompiler.passes.quantize_weights import uniform_groups
from qcompiler.passes.smooth import scale_input_channels
from qcompiler.pipeline.passbase import Pass, PassResult, option, register_pass
from qcompiler.support.progress import progress

COARSE_GRID = tuple(round(0.1 * i, 1) for i in range(10))
FINE_STEP = 0.05
FLOOR = 1e-5
SEARCH_ROWS = 128
SEARCH_COLUMNS = 256
ABSORBING_PRODUCERS = ("LayerNormalization", "Mul", "Add", "MatMul")  # what fold-scales folds a scale into


@register_pass
@dataclasses.dataclass(frozen=True)
class AwqScalePass(Pass):
    """AWQ: scale input channels by mean|x|^alpha (alpha searched per shared input at the width allocate-bits will give), folded into the producer."""

    name = "awq-scale"
    required = frozenset({Prop.CALIBRATED})
    provided = frozenset({Prop.SMOOTHED})
    keeps_activation_stats = True  # the scaled tensor gets the statistics scaled exactly
    reads_statistics = True

    avg_bits: float = option(3.25, "the budget allocate-bits will give each layer (stored bits per weight)")
    candidates: tuple[int, ...] = option((2, 4, 8), "the widths allocate-bits will choose from")
    group_size: int = option(128, "rows per scale/zero-point group, as allocate-bits will use")
    outliers_act: float = option(0.005, "fraction of input channels allocate-bits will keep in fp16")

    def __post_init__(self):
        if not 2.0 <= self.avg_bits <= 16.0:
            raise UserError(f"awq-scale: avg-bits must be in 2.0..16.0, got {self.avg_bits}")
        if not self.candidates or any(not isinstance(b, int) or not 1 <= b <= 8 for b in self.candidates):
            raise UserError(f"awq-scale: candidates must be integers in 1..8, got {','.join(map(str, self.candidates))}")
        if self.group_size not in (32, 64, 128):
            raise UserError(f"awq-scale: group-size must be 32, 64 or 128, got {self.group_size}")
        if not 0.0 <= self.outliers_act <= 0.1:
            raise UserError(f"awq-scale: outliers-act must be in [0, 0.1], got {self.outliers_act}")

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        groups = group_by_input(linears(graph))
        scaled, skipped = {}, {}
        with progress("awq-scale: layer groups", len(groups)) as bar:
            for x_name, group in groups.items():
                reason = self._why_not(graph, group)
                if reason is None:
                    scaled[x_name] = self._scale_group(graph, group)
                elif reason:
                    skipped[x_name] = reason
                bar.update()
        changed = any(entry["alpha"] > 0 for entry in scaled.values())
        if changed:
            model.opset_imports.setdefault("qc", QC_OPSET_VERSION)
        stats = {"groups": sum(entry["alpha"] > 0 for entry in scaled.values()), "searched": scaled, "skipped": skipped}
        return PassResult(model, changed, stats)

    def _why_not(self, graph: ir.Graph, group: list[Linear]) -> str | None:
        """None when the group is scaled; why not otherwise ('' for an input already scaled or
        without statistics, which is not worth a line)."""
        x = group[0].x
        if x.meta.get(SMOOTHED_KEY) or x.meta.get(STATS_KEY) is None:
            return ""
        if any(linear.w.const_value.shape[0] < self.group_size for linear in group):
            return f"fewer input channels than group-size {self.group_size}"
        readers = {id(use.node) for use in x.uses()}
        if readers != {id(linear.node) for linear in group} or x in graph.outputs:
            return "input has readers other than the group (e.g. a residual connection): a scale would cost a Mul"
        producer = x.producer()
        if producer is None or not _absorbs_scale(producer):
            kind = "a graph input" if producer is None else f"produced by {producer.op_type}"
            return f"input is {kind}, which cannot absorb a per-channel scale"
        return None

    def _scale_group(self, graph: ir.Graph, group: list[Linear]) -> dict:
        stats = group[0].x.meta[STATS_KEY]
        weights = [linear.w.const_value.numpy() for linear in group]
        alpha, errors = choose_alpha(stats.sample, weights, stats.mean_abs, stats.mean_sq, self._stored)
        if alpha > 0:
            scale_input_channels(graph, group, stats, awq_scale(stats.mean_abs, alpha), self.name)
        return {"alpha": alpha, "layers": [linear.name for linear in group],
                "error_ratio": round(errors[alpha] / errors[0.0], 6) if errors[0.0] > 0 else 1.0}

    def _stored(self, w: np.ndarray, energy: np.ndarray, spans) -> np.ndarray:
        """`w` as `allocate-bits` (scope=layer) and `quantize-weights` will store it."""
        return quantize_as_allocated(w, energy, spans, self.avg_bits, tuple(sorted(set(self.candidates))), self.group_size,
                                     self.outliers_act)


def _absorbs_scale(node: ir.Node) -> bool:
    """Whether `fold-scales` can fold a per-channel scale into `node`: a LayerNormalization, a
    linear, an Add of a constant (a bias), or a Mul by a constant vector (an RMSNorm's weight) or
    by a linear read by nothing else (a gated MLP's up projection)."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ABSORBING_PRODUCERS:
        return False
    if node.op_type in ("LayerNormalization", "MatMul"):
        return True
    constants = [v is not None and v.const_value is not None for v in node.inputs]
    if node.op_type == "Add":
        return any(constants)
    if any(constants):
        return True
    return any(v is not None and len(v.uses()) == 1 and v.producer() is not None
               and v.producer().op_type in ("MatMul", "Add") for v in node.inputs)


def awq_scale(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """s_k = m_k^alpha, normalised so that sqrt(max s * min s) = 1 (m floored at `FLOOR`)."""
    s = np.maximum(mean_abs.astype(np.float64), FLOOR) ** alpha
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def choose_alpha(sample: np.ndarray, weights: list[np.ndarray], mean_abs: np.ndarray, energy: np.ndarray, stored):
    """The alpha whose quantized group output is closest to the float output, and the error of
    every alpha tried: the coarse grid 0.0, 0.1, ..., 0.9, then the two points 0.05 either side of
    the best. The group's weights are searched side by side, [K, sum N]; `stored(w, energy, spans)`
    is that matrix as it will be stored, `spans` the (first, last + 1, full width) of each layer's
    columns in it."""
    x = np.asarray(sample, np.float32)
    if x.size == 0:
        return 0.0, {0.0: 0.0}
    x = x[:: max(1, -(-len(x) // SEARCH_ROWS))]
    widths = [w.shape[1] for w in weights]
    picked = np.arange(0, sum(widths), max(1, -(-sum(widths) // SEARCH_COLUMNS)))
    w = np.concatenate(weights, axis=1)[:, picked].astype(np.float32)
    edges = np.searchsorted(picked, np.cumsum([0] + widths))
    spans = [(int(a), int(b), n) for a, b, n in zip(edges[:-1], edges[1:], widths)]
    reference = x @ w
    share = np.concatenate([np.full(b - a, n / max(b - a, 1)) for a, b, n in spans])  # columns each picked one stands for

    def error(alpha: float) -> float:
        s = awq_scale(mean_abs, alpha)
        w_hat = stored(w * s[:, None], energy / (s.astype(np.float64) ** 2), spans)
        return float(np.sum(np.sum(((x / s) @ w_hat - reference) ** 2, axis=0, dtype=np.float64) * share))

    errors = {alpha: error(alpha) for alpha in COARSE_GRID}
    best = min(errors, key=lambda a: (errors[a], a))
    for alpha in (round(best - FINE_STEP, 2), round(best + FINE_STEP, 2)):
        if 0.0 < alpha < 1.0:
            errors[alpha] = error(alpha)
    return min(errors, key=lambda a: (errors[a], a)), errors


def quantize_as_allocated(w: np.ndarray, energy: np.ndarray, spans, avg_bits: float, candidates: tuple[int, ...],
                          group_size: int, outliers_act: float) -> np.ndarray:
    """W [K, n] quantized (and dequantized) as `allocate-bits` (scope=layer, default zero points)
    and `quantize-weights` (grid=mse) would store each layer's columns (`spans`) under `avg_bits`:
    widths from the min-max errors of groups in row order (`allocate-bits`' error model), then
    each width class in its own groups, with the clipping that minimises the energy-weighted error;
    fp16 channels kept exact."""
    squared = {b: (w.astype(np.float64) - bitcost.minmax_grid_quantize(w, b, group_size, bitcost.zero_point_kind(b, "auto"))) ** 2
               for b in candidates}
    w_hat = w.astype(np.float32, copy=True)
    for first, last, columns in spans:
        errors = {b: energy * sq[:, first:last].sum(axis=1) for b, sq in squared.items()}
        bits = allocate_rows(errors, energy, avg_bits, candidates, group_size, outliers_act, columns)
        for b in candidates:
            rows = np.flatnonzero(bits == b)
            if rows.size:
                codes, scale, zero = uniform_groups(w[rows, first:last], energy[rows], b, group_size, "mse",
                                                    bitcost.zero_point_kind(b, "auto"))
                w_hat[rows, first:last] = dequantize_uniform(codes, scale, zero, group_size)
    return w_hat


def allocate_rows(errors: dict[int, np.ndarray], energy: np.ndarray, avg_bits: float, candidates: tuple[int, ...],
                  group_size: int, outliers_act: float, columns: int) -> np.ndarray:
    """Bits per input channel as `allocate-bits` chooses them at scope=layer, from each row's
    predicted error at every candidate width (`errors`): the largest-energy channels in fp16,
    then upgrades ranked by error reduction per stored bit, taken in that order while the budget
    lasts (each row's later upgrades ranked no higher than its earlier ones, so a row climbs one
    width at a time). Costs are per weight of a column of `columns` rows' layer."""
    k = energy.shape[0]
    bits = np.full(k, candidates[0], np.int64)
    fp16 = np.zeros(k, bool)
    count = int(round(outliers_act * k))
    if count:
        fp16[np.argsort(-energy, kind="stable")[:count]] = True
    bits[fp16] = bitcost.FP16
    cost = {b: bitcost.per_row_bits(b, columns, group_size, False, "auto") / columns for b in candidates}
    constants = (len(candidates) + 1) * 8 * LOWERING_BYTES_PER_CLASS + bitcost.PERM_BITS * k  # allocate-bits' fixed charges
    spare = avg_bits * k - constants / columns - bitcost.FP16 * count - cost[candidates[0]] * (k - count)
    rows = np.flatnonzero(~fp16)
    if len(candidates) < 2 or spare <= 0 or rows.size == 0:
        return bits
    ratios, costs = [], []
    bound = np.full(rows.size, np.inf)
    for lo, hi in zip(candidates, candidates[1:]):
        step = cost[hi] - cost[lo]
        gain = errors[lo][rows] - errors[hi][rows]
        bound = np.minimum(bound, gain / step if step > 0 else np.inf)
        ratios.append(bound)
        costs.append(np.full(rows.size, step))
    ratio = np.concatenate(ratios)
    level = np.repeat(np.arange(len(candidates) - 1), rows.size)
    order = np.lexsort((level, -ratio))  # best ratio first; a row's lower step before its higher one
    taken = order[np.cumsum(np.concatenate(costs)[order]) <= spare]
    steps = np.bincount(taken % rows.size, minlength=rows.size)
    bits[rows] = np.asarray(candidates)[steps]
    return bits
