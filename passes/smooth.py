"""`smooth`: SmoothQuant (Xiao et al., ICML 2023, arXiv 2211.10438).

Activation outliers sit in a few input channels; weights are easy to quantize. For a linear
layer `Y = X W` and per input channel j,

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha),     X' = X diag(s)^-1,   W' = diag(s) W,

so `X' W' = X W` exactly, while X' has flatter channels. Layers that read the same tensor (Q, K, V;
gate and up) share one s, with max|W_j| taken over their concatenated weights.

In the IR the pass inserts `qc.ChannelScale(X, 1/s)` in front of the group and scales the rows of
each W; `fold-scales` then folds it into the producer of X where it can.

`alpha=auto` chooses alpha per group from the grid 0.30, 0.35, ..., 0.95, minimising the mean
squared error of the group's int8-quantized output (per-tensor activations, per-channel weights)
against the float output, on the calibration sample rows. The paper reports alpha 0.5 for
OPT/BLOOM, 0.75 for GLM-130B, 0.8-0.85 for Llama-family models.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.dialect.ops import QC_OPSET_VERSION
from qcompiler.errors import UserError
from qcompiler.ir.layers import Linear, group_by_input, insert_after_value, linears, new_initializer, scale_constant
from qcompiler.ir.meta import CREATED_BY, SMOOTHED_KEY, STATS_KEY, Prop
from qcompiler.pipeline import context
from qcompiler.pipeline.passbase import Pass, PassResult, option, register_pass
from qcompiler.support.progress import progress

ALPHA_GRID = tuple(round(0.30 + 0.05 * i, 2) for i in range(14))
FLOOR = 1e-5
SEARCH_ROWS = 128
SEARCH_COLUMNS = 1024  # smallest channel range used, so empty channels do not divide by zero


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

    def __post_init__(self):
        if self.alpha != "auto" and not 0.0 <= float(self.alpha) <= 1.0:
            raise UserError(f"smooth: alpha must be in [0, 1] or auto, got {self.alpha}")

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        model.opset_imports.setdefault("qc", QC_OPSET_VERSION)
        groups = [(x_name, group) for x_name, group in group_by_input(linears(graph)).items()
                  if group[0].x.meta.get(STATS_KEY) is not None and not group[0].x.meta.get(SMOOTHED_KEY)]
        alphas = self._alphas(groups)
        layers_stats = {}
        with progress("smooth: layer groups", len(groups)) as bar:
            for (x_name, group), alpha in zip(groups, alphas):
                layers_stats[x_name] = _smooth_group(graph, group, group[0].x.meta[STATS_KEY], alpha)
                bar.update()
        return PassResult(model, bool(layers_stats), {"groups": len(layers_stats), "layers": layers_stats})

    def _alphas(self, groups: list[tuple[str, list[Linear]]]) -> list[float]:
        """Each group's alpha: the fixed one, or (`auto`) the grid search, one task per group on the
        compile's executor (`qcompiler.support.parallel`; in-process by default). Every search reads the
        weights as they were before the pass (a group's scaling rewrites only its own layers), so the
        searches are independent and give the same alphas in any process and order."""
        if self.alpha != "auto":
            return [float(self.alpha)] * len(groups)
        tasks = (alpha_search_task(group, group[0].x.meta[STATS_KEY]) for _, group in groups)  # each built when its turn comes
        with progress(f"smooth: alpha search over {len(groups)} layer groups", None):
            return context.current().executor.map(search_alpha, tasks,
                                                  names=[f"smooth: alpha of the layers reading '{x}'" for x, _ in groups])


def smoothing_scale(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), with both ranges floored at `FLOOR`."""
    a = np.maximum(act_absmax.astype(np.float64), FLOOR)
    w = np.maximum(weight_absmax.astype(np.float64), FLOOR)
    return (a**alpha / w ** (1.0 - alpha)).astype(np.float32)


def _smooth_group(graph: ir.Graph, group: list[Linear], stats, alpha: float) -> dict:
    weight_absmax = _weight_absmax(group)
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
    take it): the sample rows and the weight columns it measures on, and the ranges that set s."""

    sample: np.ndarray  # [rows, K] float32, at most SEARCH_ROWS rows
    weight: np.ndarray  # [K, columns] float32: the group's weights side by side, at most SEARCH_COLUMNS-ish columns
    act_absmax: np.ndarray  # [K]
    weight_absmax: np.ndarray  # [K], over all the group's columns


def alpha_search_task(group: list[Linear], stats) -> AlphaSearch:
    """The search task of the layers of `group` (all reading one input with statistics `stats`),
    reading each weight once (a weight on disk is read from its file)."""
    widths = [int(layer.w.const_value.shape[1]) for layer in group]
    picked = _strided_columns(widths)
    columns, absmax = [], []
    for layer, keep in zip(group, picked):
        w = layer.w.const_value.numpy()
        absmax.append(np.max(np.abs(w), axis=1))
        columns.append(np.asarray(w[:, keep], np.float32))
        del w
    return _task(stats.sample, np.concatenate(columns, axis=1), stats.absmax, np.maximum.reduce(absmax))


def search_task(sample: np.ndarray, weights: list[np.ndarray], act_absmax, weight_absmax) -> AlphaSearch:
    """At most `SEARCH_ROWS` sample rows and `SEARCH_COLUMNS` output columns (evenly strided, so
    deterministic): enough to rank the alphas, and it keeps a 49k-wide LM head from dominating
    compile time (and the task small)."""
    picked = _strided_columns([w.shape[1] for w in weights])
    return _task(sample, np.concatenate([np.asarray(w[:, keep], np.float32) for w, keep in zip(weights, picked)], axis=1),
                 act_absmax, weight_absmax)


def _strided_columns(widths: list[int]) -> list[np.ndarray]:
    """The columns of each weight that a stride of ceil(total / SEARCH_COLUMNS) over the weights
    side by side keeps, per weight (so that they need not be put side by side)."""
    total = sum(widths)
    kept = np.arange(0, total, max(1, -(-total // SEARCH_COLUMNS)))
    starts = np.cumsum([0, *widths])
    return [kept[(kept >= lo) & (kept < hi)] - lo for lo, hi in zip(starts[:-1], starts[1:])]


def _task(sample: np.ndarray, weight: np.ndarray, act_absmax, weight_absmax) -> AlphaSearch:
    x = np.asarray(sample, np.float32)
    x = x[:: max(1, -(-len(x) // SEARCH_ROWS))]
    return AlphaSearch(np.ascontiguousarray(x), np.ascontiguousarray(weight), np.asarray(act_absmax), np.asarray(weight_absmax))


def search_alpha(_shared, task: AlphaSearch) -> float:
    """The grid alpha whose int8-quantized group output (per-tensor activations, per-channel
    weights) is closest in mean squared error to the float output on the task's rows and columns
    (a pure function of the task: the same result in any process)."""
    x, w = task.sample, task.weight
    if x.size == 0:
        return 0.5
    reference = x @ w
    errors = []
    for alpha in ALPHA_GRID:
        s = smoothing_scale(task.act_absmax, task.weight_absmax, alpha)
        y = _fake_quant_per_tensor(x / s) @ _fake_quant_per_channel(w * s[:, None])
        errors.append(float(np.mean((y - reference) ** 2)))
    return ALPHA_GRID[int(np.argmin(errors))]


def choose_alpha(sample: np.ndarray, weights: list[np.ndarray], act_absmax, weight_absmax) -> float:
    """The grid alpha whose int8-quantized group output is closest to the float output (`search_alpha`
    on the rows and columns `search_task` keeps)."""
    return search_alpha(None, search_task(sample, weights, act_absmax, weight_absmax))


def _fake_quant_per_tensor(x: np.ndarray) -> np.ndarray:
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255 if hi > lo else 1.0
    zero = np.round(-128 - lo / scale)
    q = np.clip(np.round(x / scale) + zero, -128, 127)
    return ((q - zero) * scale).astype(np.float32)


def _fake_quant_per_channel(w: np.ndarray) -> np.ndarray:
    scale = np.maximum(np.max(np.abs(w), axis=0, keepdims=True), 1e-12) / 127
    return (np.clip(np.round(w / scale), -127, 127) * scale).astype(np.float32)
