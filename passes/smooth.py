"""`smooth`: SmoothQuant (Xiao et al., ICML 2023, arXiv 2211.10438).

Activation outliers sit in a few input channels; weights are easy to quantize. For a linear
layer `Y = X W` and per input channel j,

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha),     X' = X diag(s)^-1,   W' = diag(s) W,

so `X' W' = X W` exactly, while X' has flatter channels. Layers that read the same tensor (Q, K, V;
gate and up) share one s, with max|W_j| taken over their concatenated weights.

In the IR the pass inserts `qc.ChannelScale(X, 1/s)` in front of the group and scales the rows of
each W; `fold-scales` then folds it into the producer of X where it can.

`alpha=auto` chooses alpha per group from the grid 0.30, 0.35, ..., 0.95, minimising the mean
squared error of the group's int8-quantized output against the float output on every calibration
sample row (up to 512, taken in a canonical order so the choice does not depend on the rows'
order). The error models the quantizers `quantize` will apply: per-channel symmetric weights, and
activations as `act-mode` says, which the `w8a8` preset sets to its own `act-mode`:
- `static` (and `dynamic`): one asymmetric per-tensor range, the one `quantize` gives the smoothed
  tensor from the calibrated statistics, `[min_j(min X_j / s_j), max_j(max X_j / s_j)]` over all
  calibration data (for a histogram `method`, the min-max bound of the range `quantize` clips
  within; for `dynamic`, the bound of any run-time batch's range), not the range of the sample rows;
- `per-token`: one symmetric scale per row, max|x'| / 127, as `quantize{act-mode=per-token}` computes at run time.
So an outlier outside the sample still widens the modelled grid, and the chosen alpha serves the
quantizer that will run. The paper reports alpha 0.5 for OPT/BLOOM, 0.75 for GLM-130B, 0.8-0.85 for
Llama-family models.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.calibration import samples_on_disk
from qcompiler.dialect.ops import QC_OPSET_VERSION
from qcompiler.dialect.qc_ops import quantize_activation
from qcompiler.errors import UserError
from qcompiler.ir.layers import Linear, group_by_input, insert_after_value, linears, new_initializer, scale_constant
from qcompiler.ir.meta import CREATED_BY, SMOOTHED_KEY, STATS_KEY, Prop
from qcompiler.passes.quantize import asymmetric_params, quantize_weight_per_channel
from qcompiler.pipeline import context
from qcompiler.pipeline.passbase import Pass, PassResult, option, register_pass
from qcompiler.support.progress import progress

ALPHA_GRID = tuple(round(0.30 + 0.05 * i, 2) for i in range(14))
FLOOR = 1e-5  # smallest channel range used, so empty channels do not divide by zero
SEARCH_COLUMNS = 1024


@register_pass
@dataclasses.dataclass(frozen=True)
class SmoothPass(Pass):
    """SmoothQuant: move activation outliers into the weights, per input channel (one scale per shared input)."""

    name = "smooth"
    required = frozenset({Prop.CALIBRATED})
    provided = frozenset({Prop.SMOOTHED})
    keeps_activation_stats = True  # the smoothed tensor gets the statistics scaled exactly
    reads_statistics = True

    class Stats:
        """Keys of `PassResult.stats` that the report and doctor read (tests/test_report.py holds the pass to them)."""

        GROUPS = "layers"  # shared input -> {LAYERS, ALPHA, ACT_ABSMAX_BEFORE, ACT_ABSMAX_AFTER}
        LAYERS = "layers"
        ALPHA = "alpha"
        ACT_ABSMAX_BEFORE = "act_absmax_before"
        ACT_ABSMAX_AFTER = "act_absmax_after"

    alpha: float | Literal["auto"] = option(0.5, "migration strength in [0, 1], or auto (per-layer grid search)")
    act_mode: Literal["static", "dynamic", "per-token"] = option(
        "static", "alpha=auto: the activation quantizer the search models, as quantize's act-mode (per-tensor calibrated range, or per token)")

    def __post_init__(self):
        if self.alpha != "auto" and not 0.0 <= float(self.alpha) <= 1.0:
            raise UserError(f"smooth: alpha must be in [0, 1] or auto, got {self.alpha}")

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        model.opset_imports.setdefault("qc", QC_OPSET_VERSION)
        groups = [(x_name, group) for x_name, group in group_by_input(linears(graph)).items()
                  if group[0].x.meta.get(STATS_KEY) is not None and not group[0].x.meta.get(SMOOTHED_KEY)]
        weight_absmax: dict[str, np.ndarray] = {}  # filled by the alpha search, which reads every weight anyway
        alphas = self._alphas(groups, weight_absmax)
        layers_stats = {}
        with progress("smooth: layer groups", len(groups)) as bar:
            for (x_name, group), alpha in zip(groups, alphas):
                absmax = weight_absmax.pop(x_name) if x_name in weight_absmax else _weight_absmax(group)
                layers_stats[x_name] = _smooth_group(graph, group, group[0].x.meta[STATS_KEY], alpha, absmax)
                bar.update()
        samples_on_disk([group[0].node.inputs[0].meta[STATS_KEY] for _, group in groups])  # the smoothed inputs'
        return PassResult(model, bool(layers_stats), {"groups": len(layers_stats), "layers": layers_stats})

    def _alphas(self, groups: list[tuple[str, list[Linear]]], weight_absmax: dict[str, np.ndarray]) -> list[float]:
        """Each group's alpha: the fixed one, or (`auto`) the grid search, one task per group on the
        compile's executor (`qcompiler.support.parallel`; in-process by default). Every search reads the
        weights as they were before the pass (a group's scaling rewrites only its own layers), so the
        searches are independent and give the same alphas in any process and order. Building a
        task reads the group's weights once; their max|W_j| goes into `weight_absmax` by input name,
        so that scaling them does not read them again."""
        if self.alpha != "auto":
            return [float(self.alpha)] * len(groups)

        def task(x_name: str, group: list[Linear]) -> AlphaSearch:
            built = alpha_search_task(group, group[0].x.meta[STATS_KEY], self.act_mode)
            weight_absmax[x_name] = built.weight_absmax
            return built

        tasks = (task(x_name, group) for x_name, group in groups)  # each built when its turn comes
        with progress(f"smooth: alpha search over {len(groups)} layer groups", None):
            return context.current().executor.map(search_alpha, tasks,
                                                  names=[f"smooth: alpha of the layers reading '{x}'" for x, _ in groups])


def smoothing_scale(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), with both ranges floored at `FLOOR`."""
    a = np.maximum(act_absmax.astype(np.float64), FLOOR)
    w = np.maximum(weight_absmax.astype(np.float64), FLOOR)
    return (a**alpha / w ** (1.0 - alpha)).astype(np.float32)


def _smooth_group(graph: ir.Graph, group: list[Linear], stats, alpha: float, weight_absmax: np.ndarray) -> dict:
    s = smoothing_scale(stats.absmax, weight_absmax, alpha)
    scale_input_channels(graph, group, stats, s, "smooth")
    return {
        "alpha": alpha,
        "layers": [layer.name for layer in group],
        "act_absmax_before": float(np.max(stats.absmax)),
        "act_absmax_after": float(np.max(stats.absmax / s)),
        "weight_absmax_before": float(np.max(weight_absmax)),
        "weight_absmax_after": float(np.max(weight_absmax * s)),
    }


def _weight_absmax(group: list[Linear]) -> np.ndarray:
    """max|W_j| per input channel over the group's concatenated weights."""
    return np.maximum.reduce([np.max(np.abs(layer.w.const_value.numpy()), axis=1) for layer in group])  # one weight at a time


def scale_input_channels(graph: ir.Graph, group: list[Linear], stats, s: np.ndarray, created_by: str) -> None:
    """`X W = (X / s)(diag(s) W)` for every linear of `group` (all reading X): a
    `qc.ChannelScale(X, 1/s)` in front of them (carrying X's statistics scaled by 1/s, and the
    smoothed flag so that no pass scales its readers twice) and the rows of each W scaled by s;
    `fold-scales` folds the ChannelScale into the producer of X where it can."""
    x = group[0].x
    inverse = new_initializer(graph, f"{x.name}.{created_by}_inv", (1.0 / s).astype(np.float32))
    mul = ir.node("ChannelScale", [x, inverse], {"axis": -1}, domain="qc", name=f"{x.name}.{created_by}",
                  metadata_props={CREATED_BY: created_by})
    mul.outputs[0].name = f"{x.name}.smoothed"
    mul.outputs[0].type = x.type
    mul.outputs[0].shape = x.shape
    mul.outputs[0].meta[STATS_KEY] = stats.scaled(inverse.const_value.numpy())
    mul.outputs[0].meta[SMOOTHED_KEY] = True
    insert_after_value(graph, x, mul)
    x.meta[SMOOTHED_KEY] = True  # its readers now see X / s: never scale them twice
    for layer in group:
        scale_constant(graph, layer.w, s[:, None], layer.node, "smoothed")
        layer.node.replace_input_with(0, mul.outputs[0])


@dataclasses.dataclass(frozen=True)
class AlphaSearch:
    """What the alpha search of one layer group reads (arrays only, so that a worker process can
    take it): the sample rows and the weight columns it measures on, the ranges that set s, the
    calibrated per-channel range of the input, and how activations will be quantized."""

    sample: np.ndarray  # [rows, K] float32, every sample row, in canonical order (`canonical_rows`)
    weight: np.ndarray  # [K, columns] float32: the group's weights side by side, at most SEARCH_COLUMNS-ish columns
    act_absmax: np.ndarray  # [K]
    weight_absmax: np.ndarray  # [K], over all the group's columns
    channel_min: np.ndarray  # [K] float64, min X_j over all calibration data
    channel_max: np.ndarray  # [K] float64, max X_j over all calibration data
    act_mode: str = "static"  # static, dynamic (both: the calibrated per-tensor range) or per-token


def alpha_search_task(group: list[Linear], stats, act_mode: str = "static") -> AlphaSearch:
    """The search task of the layers of `group` (all reading one input with statistics `stats`),
    reading each weight once (a weight on disk is read from its file) and keeping only its
    searched columns."""
    picked = _strided_columns([int(layer.w.const_value.shape[1]) for layer in group])
    columns, absmax = [], []
    for layer, keep in zip(group, picked):
        w = layer.w.const_value.numpy()
        absmax.append(np.max(np.abs(w), axis=1))
        columns.append(np.asarray(w[:, keep], np.float32))
        del w
    return _task(stats, np.concatenate(columns, axis=1), np.maximum.reduce(absmax), act_mode)


def search_task(stats, weights: list[np.ndarray], weight_absmax, act_mode: str = "static") -> AlphaSearch:
    """Every sample row of `stats` (in canonical order) and at most `SEARCH_COLUMNS` output columns
    (evenly strided over the weights side by side, so deterministic): it keeps a 49k-wide LM head
    from dominating compile time (and the task small); each column is quantized on its own, so the
    kept ones are exact."""
    picked = _strided_columns([w.shape[1] for w in weights])
    return _task(stats, np.concatenate([np.asarray(w[:, keep], np.float32) for w, keep in zip(weights, picked)], axis=1),
                 weight_absmax, act_mode)


def _strided_columns(widths: list[int]) -> list[np.ndarray]:
    """The columns of each weight that a stride of ceil(total / SEARCH_COLUMNS) over the weights
    side by side keeps, per weight (so that they need not be put side by side)."""
    total = sum(widths)
    kept = np.arange(0, total, max(1, -(-total // SEARCH_COLUMNS)))
    starts = np.cumsum([0, *widths])
    return [kept[(kept >= lo) & (kept < hi)] - lo for lo, hi in zip(starts[:-1], starts[1:])]


def _task(stats, weight: np.ndarray, weight_absmax, act_mode: str) -> AlphaSearch:
    return AlphaSearch(
        canonical_rows(stats.sample), np.ascontiguousarray(weight), np.asarray(stats.absmax), np.asarray(weight_absmax),
        np.asarray(stats.channel_min, np.float64), np.asarray(stats.channel_max, np.float64), act_mode,
    )




def canonical_rows(sample: np.ndarray) -> np.ndarray:
    """The rows of `sample` sorted by their bytes: the same array whatever order they came in, so
    the search's sums (and its choice) do not depend on the order of the calibration data."""
    x = np.ascontiguousarray(np.asarray(sample, np.float32))
    if len(x) < 2:
        return x
    order = sorted(range(len(x)), key=lambda i: x[i].tobytes())
    return np.ascontiguousarray(x[order])


def search_alpha(_shared, task: AlphaSearch) -> float:
    """The grid alpha whose int8-quantized group output (activations as `quantize` will quantize
    them, per-channel weights) is closest in mean squared error to the float output on the task's
    rows and columns (a pure function of the task: the same result in any process)."""
    x, w = task.sample, task.weight
    if x.size == 0:
        return 0.5
    reference = x @ w
    errors = []
    for alpha in ALPHA_GRID:
        s = smoothing_scale(task.act_absmax, task.weight_absmax, alpha)
        inverse = (1.0 / s).astype(np.float32)  # what the graph's qc.ChannelScale multiplies by
        y = _quantized_activation(x * inverse, task, inverse) @ _quantized_weight(w * s[:, None])
        errors.append(float(np.mean(np.square(y - reference, dtype=np.float64))))
    return ALPHA_GRID[int(np.argmin(errors))]


def choose_alpha(stats, weights: list[np.ndarray], weight_absmax, act_mode: str = "static") -> float:
    """The grid alpha whose int8-quantized group output is closest to the float output (`search_alpha`
    on the rows and columns `search_task` keeps)."""
    return search_alpha(None, search_task(stats, weights, weight_absmax, act_mode))


def smoothed_range(channel_min: np.ndarray, channel_max: np.ndarray, inverse: np.ndarray) -> tuple[float, float]:
    """The per-tensor [lo, hi] of the input times `inverse` per channel, from its calibrated
    per-channel range: what `quantize`'s min-max range of the smoothed tensor will be (the
    statistics `smooth` attaches are the calibrated ones scaled the same way)."""
    c = np.asarray(inverse, np.float64)
    return float((channel_min * c).min()), float((channel_max * c).max())


def _quantized_activation(x: np.ndarray, task: AlphaSearch, inverse: np.ndarray) -> np.ndarray:
    if task.act_mode == "per-token":
        return quantize_activation(x, "per-token")
    scale, zero_point = asymmetric_params(*smoothed_range(task.channel_min, task.channel_max, inverse))
    return quantize_activation(x, "static", scale, zero_point)


def _quantized_weight(w: np.ndarray) -> np.ndarray:
    q, scale = quantize_weight_per_channel(w, axis=1)
    return q.astype(np.float32) * scale[None, :]
