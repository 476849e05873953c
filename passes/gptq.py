"""`gptq`: error-compensating rounding of the quantized weights (GPTQ, Frantar et al., ICLR 2023,
arXiv 2210.17323), block by block.

Runs after `quantize-weights`, on its `qc.MixedMatMul` ops, keeping each op's classes, bit widths,
group size and sparse-outlier positions. For a layer `Y = X[..., perm] @ W` (rows of `W` are input
channels, in the op's class order: lowest bits first, fp16 last) with `H = X^T X` over the
calibration tokens, the rows are rounded one at a time and each row's rounding error is spread over
the rows not yet rounded so that `||X W - X W_hat||^2` stays least (the optimal brain surgeon
update, with the Cholesky factor `U` of `H^-1`): `W[j] -= U[i, j] / U[i, i] * (W[i] - W_hat[i])` for
`j > i`. Because fp16 and 8-bit rows come last, they absorb the error of the low-bit rows before
them. Uniform grids (scale and zero point per group) are chosen again from the updated rows when a
group starts, codebooks when a class starts (the same grid search and k-means as
`quantize-weights`); fp16 rows and sparse outliers are stored at the updated values. `order=act`
rounds each class's rows by decreasing H diagonal instead (GPTQ's act order; a group's grid is then
chosen when its first row comes): the same layout, a lower error on the calibration data, but no
better held out on SmolLM2 or MiniLM (docs/results.md), so stored order is the default.

`H` is collected on the quantized stream: the block's inputs come from the already-rounded blocks
before it, and within a block the layers are rounded in order (layers reading the same tensor
together), each group's `H` measured with the layers before it already rounded (`sequential=1`).
`H` is damped by `damp` times its mean diagonal. GPTQ's usual 0.01 assumes H measured on hundreds of
thousands of tokens; on a few thousand the rounding fits the calibration tokens. `damp=auto` chooses
per input (the layers reading one tensor together) among `DAMP_CANDIDATES`: H is summed apart over
every `HOLD_OUT_EVERY`-th calibration batch, each candidate rounds the layers on the other batches'
H, the one whose weight change leaves the least error on the held-out H wins, and the layers are
rounded with it on every batch's H (four more roundings per input, of every fourth output column
only, `trial_columns`; H held twice; Convs keep 0.01). An input whose layers' round-to-nearest weights
leave no more held-out error than the best candidate keeps them: GPTQ would fit the calibration data
there (a few calibration tokens per input channel). With fewer than `HOLD_OUT_EVERY` batches, every
`HOLD_OUT_EVERY`-th token row of each batch is held out instead. `max-weights` keeps round-to-nearest
in a model whose mixed layers hold more weights than that (the mixed preset's `rounding=auto`). Measured in docs/results.md, "GPTQ's damping". A block whose output error against the float block
does not fall keeps its round-to-nearest weights (the mechanics shared with `flexround`:
`qcompiler.analysis.reconstruct`). Deterministic: no randomness, float64 arithmetic.

A Conv's kernel (`qc.MixedWeight`, rows = one input channel at one tap) is rounded the same way,
with `H = P^T P` over its im2col patches P (`conv_hessians`: the Conv's inputs on the calibration
data, run once through the model as quantized so far, every position up to `PATCH_ROWS` a batch,
evenly spaced) and one H per group of a grouped Conv (its columns rounded apart; a depthwise Conv
has a 9 x 9 H per channel). A Conv whose H comes from fewer than `MIN_PATCHES_PER_ROW` patches per
kernel row keeps round-to-nearest: such an H has low rank and GPTQ fits the calibration data (a
1x1 Conv of 1152 rows on 7x7 maps of 44 crops). A Conv with a bias has its kernel's mean error absorbed by it, so H is
centred there (`P^T P / n - m m^T`, m the mean patch) and the rounding spends its freedom on the
rest; measured on FFDNet grey at 4 bits, 30.79 dB against 30.64 uncentred. A group keeps its
round-to-nearest kernel unless GPTQ lowers `tr((W - W_hat)^T H (W - W_hat))`; the Conv's bias moves
by the mean change the new kernel makes on the calibration inputs, so that the correction
`quantize-weights` made still holds. Lower errors layer by layer need not make a lower error at the
model's outputs (on EfficientNet-Lite0 they did not: logits' relative error 0.45 against 0.35 at 4
bits), so the model's outputs are compared with the float model's before and after, on every fourth
calibration batch, held out of H (`held_out`; all of them when there are fewer than 4), and every
kernel and bias goes back to round-to-nearest unless that error falls (`convs.kept`). 1-D, 2-D and
3-D Convs without `auto_pad`, or with VALID; others keep their round-to-nearest kernels (`convs_skipped`).

`gptq_fixed_grid` is the same rounding on a fixed symmetric grid, one step per column: `quantize{rounding=gptq}`
rounds int8 Conv kernels with it, on `conv_hessians` of the float model.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.bias_correction import conv_bias_shift, subtract_from_bias
from qcompiler.analysis.probe import leads_with_tokens
from qcompiler.analysis.reconstruct import BlockProblem, Options, reconstruct, unsupported_block_ops
from qcompiler.dialect.mixed_ops import (MixedClass, MixedMatMulView, class_slices, is_mixed_matmul, mixed_weights_over,
                                        split_class_inputs, uniform_zero_kind)
from qcompiler.errors import UserError
from qcompiler.ir.layers import ConvAsLinear, conv_reading, drop_unread, new_initializer
from qcompiler.ir.meta import FLOAT_BIAS_KEY, FLOAT_WEIGHT_KEY, Prop
from qcompiler.passes.quantize_weights import kmeans_codebook, uniform_groups
from qcompiler.pipeline import context
from qcompiler.pipeline.passbase import Pass, PassResult, option, register_pass

LAZY_ROWS = 128  # rows rounded between two updates of the rows after them (GPTQ's lazy batch)
PATCH_ROWS = 16384  # im2col patches per calibration batch at most, for a Conv's H
MIN_PATCHES_PER_ROW = 8  # a Conv's H from fewer patches than this many per kernel row is not trusted
log = logging.getLogger(__name__)
HOLD_OUT_EVERY = 4  # every 4th calibration batch checks the mixed Convs' rounding at the model's outputs


@register_pass
@dataclasses.dataclass(frozen=True)
class GPTQPass(Pass):
    """Round quantized weights row by row, spreading each row's error over the rows after it (GPTQ)."""

    name = "gptq"
    required = frozenset({Prop.WEIGHTS_QUANTIZED, Prop.CALIBRATED})
    provided = frozenset({Prop.ROUNDING_COMPENSATED})
    rerun_changes = ("a second run rounds the float weights again with H measured on the quantized stream the first "
                     "run produced, so the codes move again whenever the block's error falls further")

    damp: float | Literal["auto"] = option(
        0.01, "added to the diagonal of X^T X, as a fraction of its mean (0 < damp <= 1); auto: per input, the one of "
              "0.01, 0.03, 0.1 and 0.3 whose rounding (fitted without every 4th calibration batch) leaves the least "
              "error on those batches (or round-to-nearest, where none leaves less)")
    grid: Literal["minmax", "mse"] = option("mse", "uniform classes: min-max range, or the clipping that minimises weighted error")
    sequential: int = option(1, "1: layers measured with the block's earlier layers already rounded; 0: all on the block's float weights")
    regions: int = option(2, "residual regions per block (2: attention + MLP of one transformer layer)")
    order: Literal["class", "act"] = option(
        "class", "the order rows are rounded in within each class: as stored (class), or by decreasing H diagonal (act: "
        "the most active input channels first, so that more rows are left to absorb their error; the stored layout "
        "and groups are unchanged)")
    max_weights: int = option(
        0, "round only models whose mixed linear layers hold at most this many weights; above it the pass keeps "
           "round-to-nearest and says so (0: no limit; the mixed preset's rounding=auto sets it)")
    unsupported: Literal["error", "skip"] = option(
        "error", "a model with ops the block interpreter cannot run: refuse it (error), or keep round-to-nearest and "
                 "say which ops (skip; the mixed preset's rounding=auto)")

    def __post_init__(self):
        if self.damp != "auto" and (isinstance(self.damp, bool) or not isinstance(self.damp, (int, float))
                                    or not 0.0 < self.damp <= 1.0):
            raise UserError(f"gptq: damp must be in (0, 1] or auto, got {self.damp}; the method's usual value is 0.01")
        if self.sequential not in (0, 1):
            raise UserError(f"gptq: sequential must be 0 or 1, got {self.sequential}")
        if isinstance(self.regions, bool) or not isinstance(self.regions, int) or not 1 <= self.regions <= 64:
            raise UserError(f"gptq: regions must be an integer from 1 to 64, got {self.regions}")
        if isinstance(self.max_weights, bool) or not isinstance(self.max_weights, int) or self.max_weights < 0:
            raise UserError(f"gptq: max-weights must be a whole number of weights, 0 for no limit, got {self.max_weights}")

    def _options(self) -> Options:
        return Options("gptq", 1, 1.0, 0, 0.0, self.regions, self.name, batch=1 << 20)

    def _why_skipped(self, model: ir.Model) -> tuple[str, str] | None:
        """Why the model keeps round-to-nearest (max-weights; unsupported=skip), with what to do instead, or None: round."""
        weights = mixed_weights_over(model, self.max_weights)
        if weights:
            return (f"{weights} weights in mixed layers, over max-weights={self.max_weights}",
                    "rounding=gptq in the mixed preset rounds any size")
        missing = unsupported_block_ops(model, self._options()) if self.unsupported == "skip" else []
        if missing:
            return f"the block interpreter cannot run {', '.join(missing)}", "rounding=nearest in the mixed preset says so up front"
        return None

    def ensures(self, model: ir.Model) -> None:
        if self._why_skipped(model) is None:  # skipped, the model is as quantize-weights left it, properties included
            super().ensures(model)

    def call(self, model: ir.Model) -> PassResult:
        skipped = self._why_skipped(model)
        if skipped:
            reason, instead = skipped
            log.warning("gptq: %s: kept round-to-nearest (%s)", reason, instead)
            return PassResult(model, False, {"skipped": reason})
        opts = self._options()
        ctx = context.current()
        chosen: dict[str, float | None] = {}
        stats = reconstruct(model, opts, ctx.require_calibration(self.name), ctx.threads,
                            solve=lambda problem: self._solve(problem, chosen))
        if chosen:  # damp=auto: how many inputs took each damping, or kept round-to-nearest
            stats["damp_chosen"] = {str(d): sum(1 for v in chosen.values() if v == d) for d in (*DAMP_CANDIDATES, None)}
        convs = [(node, conv) for node in model.graph if node.domain == "qc" and node.op_type == "MixedWeight"
                 and (conv := conv_reading(node.outputs[0])) is not None]
        if convs:
            stats["convs"] = self._round_convs(model, convs, ctx.require_calibration(self.name), ctx.threads)
        return PassResult(model, bool(stats.get("blocks_improved")) or bool(stats.get("convs", {}).get("improved")), stats)

    def _round_convs(self, model: ir.Model, convs: list[tuple[ir.Node, ConvAsLinear]], calibration, threads) -> dict:
        """Each mixed Conv kernel rounded by GPTQ on its patches' H, one group of columns at a time."""

        runnable = [(node, conv) for node, conv in convs if patch_rule(conv.conv) is not None]
        fit, check = held_out(list(calibration))
        error_before = _model_error(model, check, threads)
        saved = [(value, value.const_value) for node, _ in runnable for value in _class_values(MixedMatMulView.of(node))]
        saved_biases = [(conv.conv, conv.conv.inputs[2], conv.conv.inputs[2].const_value) for _, conv in runnable
                        if len(conv.conv.inputs) > 2 and conv.conv.inputs[2] is not None and conv.conv.inputs[2].const_value is not None]
        hessians, patch_means, means, patches = conv_hessians(model, [conv.conv for _, conv in runnable], fit, threads)
        improved, per_layer = 0, {}
        for node, conv in runnable:
            if FLOAT_WEIGHT_KEY not in node.meta:
                raise UserError(f"gptq: Conv '{conv.name}' has no float kernel to round again (it lives in memory only); "
                                f"run gptq in the same pipeline as quantize-weights")
            view = MixedMatMulView.of(node)
            perm = view.perm_array()
            w = node.meta[FLOAT_WEIGHT_KEY].numpy().astype(np.float64)[perm]
            old = view.weight().astype(np.float64)
            a = attributes_of_mixed(node)
            arrays = [c.inputs for c in view.class_arrays()]
            outliers = view.outlier_arrays()
            originals = [x for inputs in arrays for x in inputs] + (list(outliers) if outliers is not None else [])
            bias = conv.conv.inputs[2] if len(conv.conv.inputs) > 2 else None
            corrected = bias is not None and bias.const_value is not None
            # the bias absorbs the kernel's mean error, so the rounding minimises the rest: H centred
            groups = [h - np.outer(m, m) if corrected else h for h, m in zip(hessians[id(conv.conv)], patch_means[id(conv.conv)])]
            if patches[id(conv.conv)] < MIN_PATCHES_PER_ROW * groups[0].shape[0]:  # H of low rank: GPTQ would fit the calibration data
                per_layer[conv.name] = {"groups": len(groups), "groups_improved": 0,
                                        "kept_rounding": f"{patches[id(conv.conv)]} patches for {groups[0].shape[0]} rows"}
                continue
            columns = w.shape[1] // len(groups)
            new_arrays = [x.copy() for x in originals]
            better = 0
            for g, h in enumerate(groups):
                cols = np.arange(g * columns, (g + 1) * columns)
                hp = h[np.ix_(perm, perm)]
                part = gptq_round(w[:, cols], hp, a["kinds"], a["bits"], a["sizes"], view.group_size,
                                  _columns_of(originals, a["kinds"], cols, a["sparse"]), a["sparse"], self.grid, self._conv_damp,
                                  self.order)
                trial = [x.copy() for x in new_arrays]
                _write_columns(trial, part, a["kinds"], cols, a["sparse"])
                candidate = _dequantized(trial, a, view.group_size)[:, cols]
                if output_error(w[:, cols] - candidate, hp) < output_error(w[:, cols] - old[:, cols], hp):
                    new_arrays, better = trial, better + 1
            if not better:
                per_layer[conv.name] = {"groups": len(groups), "groups_improved": 0}
                continue
            improved += 1
            for value, array in zip(_class_values(view), new_arrays):
                value.const_value = ir.tensor(array, name=value.name)
            new = _dequantized(new_arrays, a, view.group_size)
            change = np.empty_like(new)
            change[perm] = new - old  # rows back in channel order
            shift = conv_bias_shift(change.T.reshape(tuple(int(d) for d in conv.conv.inputs[1].shape)), means[id(conv.conv)])
            if corrected:
                subtract_from_bias(model.graph, conv.conv, bias, shift, "", suffix="gptq")
            per_layer[conv.name] = {"groups": len(groups), "groups_improved": better}
        kept = "gptq"
        if improved:
            error_after = _model_error(model, check, threads)
            if error_after >= error_before:  # each layer's error fell, the model's did not: keep round-to-nearest
                kept, improved = "round-to-nearest", 0
                for value, tensor in saved:
                    value.const_value = tensor
                for conv_node, bias, tensor in saved_biases:
                    bias.const_value = tensor
                    if conv_node.inputs[2] is not bias:
                        written = conv_node.inputs[2]
                        conv_node.replace_input_with(2, bias)
                        drop_unread(model.graph, [written])
            per_layer_error = {"output_error_before": error_before, "output_error_after": error_after,
                               "checked_on": f"{len(check)} held-out batches" if check is not fit else "the calibration batches"}
        else:
            per_layer_error = {}
        return {"layers": len(convs), "improved": improved, "kept": kept, **per_layer_error, "convs_skipped": [c.name for _, c in convs if patch_rule(c.conv) is None],
                "per_layer": per_layer}

    @property
    def _conv_damp(self) -> float:
        """A Conv's damping: the option's, or (auto) the smallest candidate: a Conv keeps its GPTQ
        rounding only where the model's error on held-out batches falls (`_round_convs`)."""
        return DAMP_CANDIDATES[0] if self.damp == "auto" else float(self.damp)

    def _solve(self, problem: BlockProblem, chosen: dict[str, float | None]) -> tuple[dict, int]:
        """Each layer of the block rounded by `gptq_round` on the H its inputs give: the groups in
        order, the layers of one group (independent once H is measured) fanned out on the compile's
        executor (`qcompiler.support.parallel`; in-process by default), with the same results; with
        damp=auto, each input's chosen damping goes into `chosen` (None: its layers keep round-to-nearest)."""
        import torch

        executor = context.current().executor
        rounded: dict[int, torch.Tensor] = {}
        arrays: dict[int, list[np.ndarray]] = {}

        def weight_of(node):
            return rounded[id(node)] if id(node) in rounded else problem.stored_weight(node)

        for group in _by_input(problem.layers) if self.sequential else [problem.layers]:
            sums = _gram_sums(problem, group, weight_of, split=self.damp == "auto")
            damps = self._damps(group, sums, executor)
            rounding = [layer for layer in group if damps[MixedMatMulView.of(layer.node).x.name] is not None]
            factors = _factors(rounding, sums, damps, self.order)
            results = dict(zip(map(id, rounding), self._round_split(rounding, factors, executor)))
            for layer in group:  # the layers of an input that keeps round-to-nearest: their stored arrays
                a = results.get(id(layer), [x.copy() for x in layer.originals])
                arrays[id(layer.node)] = a
                rounded[id(layer.node)] = layer.reference_weight(a)
            if self.damp == "auto":
                chosen.update(damps)
        problem.bar.update()
        return arrays, 0

    def _round_split(self, group, factors: dict[int, tuple], executor) -> list[list[np.ndarray]]:
        """The layers of `group` rounded on their factors (`_factors`): whole and one task a layer
        in-process; on several workers each layer's output columns are cut into one contiguous part per
        worker (`column_parts`) and every part is a task, so that a group of one layer (o_proj,
        down_proj) keeps every worker busy. A layer's task (its weight, H's factor, its arrays) goes to
        the object store once and its parts read it there (`round_columns`): a 7B model's down_proj
        factor is about 1 GB. The same arrays either way: each column's rounding is independent of the
        others' (`trial_columns`; tests/test_gptq.py)."""
        if executor.workers <= 1:
            return self._round_group(group, factors, executor)
        running, parts = [], []
        for layer in group:
            whole = executor.share(rounding_task(layer, factors.pop(id(layer.node)), None))
            parts.append(column_parts(int(layer.w.shape[1]), executor.workers))
            running += [executor.submit(round_columns, (self.grid, cols), shared=whole,
                                        name=f"gptq: layer '{layer.name}' columns {cols[0]} to {cols[-1]}") for cols in parts[-1]]
            del whole  # the store keeps it while its tasks hold it
        rounded = iter([task.result() for task in running])
        out = []
        for layer, cols_of_layer in zip(group, parts):
            arrays = [x.copy() for x in layer.originals]
            for cols in cols_of_layer:
                _write_columns(arrays, next(rounded), layer.kinds, cols, layer.sparse)
            out.append(arrays)
        return out

    def _round_group(self, group, factors: dict[int, tuple], executor, columns=None) -> list[list[np.ndarray]]:
        """The layers of `group` rounded on their factors (`_factors`), fanned out on `executor`; with
        `columns` (per layer), only those output columns of each (the same values as rounding all:
        GPTQ's update and every grid are per column)."""
        columns = columns or [None] * len(group)
        tasks = [rounding_task(layer, factors.pop(id(layer.node)), cols) for layer, cols in zip(group, columns)]
        return executor.map(round_layer, tasks, shared=self.grid, names=[f"gptq: layer '{layer.name}'" for layer in group])

    def _damps(self, group, sums: "GramSums", executor) -> dict[str, float | None]:
        """Per input, the damping: the option's value, or (auto) the candidate whose rounding fitted
        on the fitting batches' H leaves the least error `tr(dW^T H dW)` on the held-out batches' H,
        summed over the layers that read it (the first, smallest, on a tie; 0.01 where no batch is
        held out). The candidates round only each layer's `trial_columns`. None where round-to-nearest
        leaves no more error there than the best candidate: GPTQ would fit the calibration data."""
        names = {MixedMatMulView.of(layer.node).x.name for layer in group}
        if self.damp != "auto":
            return {name: float(self.damp) for name in names}
        if not sums.check_count:
            return {name: DAMP_CANDIDATES[0] for name in names}
        errors = {name: [] for name in names}
        columns = [trial_columns(int(layer.w.shape[1])) for layer in group]
        nearest = dict.fromkeys(names, 0.0)
        for layer, cols in zip(group, columns):
            nearest[MixedMatMulView.of(layer.node).x.name] += _held_out_error(
                layer, cols, _columns_of(layer.originals, layer.kinds, cols, layer.sparse), sums)
        for damp in DAMP_CANDIDATES:
            factors = _factors(group, sums, {name: damp for name in names}, self.order, fit_only=True)
            totals = dict.fromkeys(names, 0.0)
            for layer, cols, a in zip(group, columns, self._round_group(group, factors, executor, columns)):
                totals[MixedMatMulView.of(layer.node).x.name] += _held_out_error(layer, cols, a, sums)
            for name in names:
                errors[name].append(totals[name])
        best = {name: int(np.argmin(errors[name])) for name in names}
        return {name: DAMP_CANDIDATES[best[name]] if errors[name][best[name]] < nearest[name] else None for name in names}


def _held_out_error(layer, cols: np.ndarray, arrays: list[np.ndarray], sums: "GramSums") -> float:
    """`tr(dW^T H dW) / tokens` on the held-out batches' H, for the layer's columns `cols` stored as
    `arrays` (restricted to those columns) against its float weight."""
    view = MixedMatMulView.of(layer.node)
    change = np.empty((layer.w.shape[0], len(cols)), np.float64)  # rows back in channel order, as H's
    change[view.perm_array()] = (layer.w.numpy()[:, cols].astype(np.float64)
                                 - layer.reference_weight(arrays).numpy().astype(np.float64))
    return float(np.sum((sums.check[view.x.name] @ change) * change)) / sums.check_count


@dataclasses.dataclass(frozen=True)
class RoundingTask:
    """What `gptq_round` reads for one layer (arrays only, so that a worker process can take it): H
    as its inverse's factor U and its diagonal (`_factors`), not H itself, which would double the
    K x K arrays held."""

    w: np.ndarray
    factor: np.ndarray  # U, upper triangular, with (H + damping)^-1 = U^T U, in rounding order
    energy: np.ndarray  # H's diagonal, negatives at 0, in stored order
    order: np.ndarray | None  # the stored rows in rounding order (`rounding_order`); None: as stored
    kinds: list[str]
    bits: list[int]
    sizes: list[int]
    group_size: int
    originals: list[np.ndarray]
    sparse: int

    def columns(self, cols: np.ndarray) -> RoundingTask:
        """The same task for the output columns `cols` only (outliers among them renumbered)."""
        return dataclasses.replace(self, w=self.w[:, cols], originals=_columns_of(self.originals, self.kinds, cols, self.sparse))


def rounding_task(layer, factor: tuple, cols: np.ndarray | None) -> RoundingTask:
    """The task rounding `layer` (all its output columns, or `cols`) on its factor (`_factors`)."""
    task = RoundingTask(layer.w.numpy(), *factor, layer.kinds, layer.bits, layer.sizes, layer.group_size, layer.originals, layer.sparse)
    return task if cols is None else task.columns(cols)


def column_parts(n: int, parts: int) -> list[np.ndarray]:
    """`n` output columns cut into `parts` contiguous runs of near-equal length (fewer when `n` is smaller)."""
    return [cols for cols in np.array_split(np.arange(n), max(1, min(parts, n))) if len(cols)]


def round_columns(task: RoundingTask, part: tuple[str, np.ndarray]) -> list[np.ndarray]:
    """The output columns `part[1]` of `task`'s layer rounded on the grid `part[0]`: the class arrays of
    those columns (outliers among them renumbered), the same values as the whole layer's rounding gives them."""
    grid, cols = part
    return round_layer(grid, task.columns(cols))


def round_layer(grid: str, task: RoundingTask) -> list[np.ndarray]:
    """One layer's GPTQ rounding (a pure function of its task: the same result in any process)."""
    return _round(task.w, task.factor, task.energy, task.kinds, task.bits, task.sizes, task.group_size, task.originals,
                  task.sparse, grid, task.order)


def _by_input(layers) -> list[list]:
    """The layers in order, those reading the same tensor together (Q/K/V, gate/up)."""
    groups: dict[str, list] = {}
    for layer in layers:
        groups.setdefault(MixedMatMulView.of(layer.node).x.name, []).append(layer)
    return list(groups.values())


DAMP_CANDIDATES = (0.01, 0.03, 0.1, 0.3)  # damp=auto's choices, smallest first
TRIAL_COLUMN_EVERY = 4  # damp=auto's candidates round every 4th output column of a layer


def trial_columns(n: int) -> np.ndarray:
    """The output columns damp=auto's candidates are rounded and compared on: every
    `TRIAL_COLUMN_EVERY`-th of a layer's `n`, all of them below 16 such. Each column's rounding is
    independent of the others', so these are exactly the full rounding's columns, at a quarter of
    its cost; the comparison reads a quarter of the error."""
    return np.arange(0, n, TRIAL_COLUMN_EVERY if n >= 16 * TRIAL_COLUMN_EVERY else 1)


@dataclasses.dataclass
class GramSums:
    """Per input of a group of layers, X^T X summed over the calibration tokens (float64, non-padding
    positions): `fit` over the batches H is fitted on, `check` over those held out (damp=auto:
    every `HOLD_OUT_EVERY`-th batch; otherwise none, and `fit` holds every batch)."""

    fit: dict[str, np.ndarray]
    check: dict[str, np.ndarray]
    fit_count: int
    check_count: int


def _gram_sums(problem: BlockProblem, layers, weight_of, split: bool) -> GramSums:
    """The inputs' X^T X over the calibration batches (`GramSums`); with `split`, the batches
    `is_held_out` names are summed into `check` instead of `fit`, or, with fewer batches than
    `HOLD_OUT_EVERY`, every `HOLD_OUT_EVERY`-th token row of each batch."""
    import torch

    names = sorted({MixedMatMulView.of(l.node).x.name for l in layers})
    batches = len(problem.env_q)
    by_rows = split and batches < HOLD_OUT_EVERY
    sums = GramSums({}, {}, 0, 0)

    def add(into: dict, name: str, x) -> None:
        gram = x.T @ x
        if name not in into:
            into[name] = gram
        else:
            into[name] += gram  # in place: two K x K arrays at a time, not three

    with torch.no_grad():
        for index, (env, valid) in enumerate(zip(problem.env_q, problem.valid)):
            checked = split and is_held_out(index, batches)
            values = problem.run_all(env, weight_of, wanted=names)  # the block run only as far as these inputs
            for name in names:
                x = values[name]
                if leads_with_tokens(x.shape, valid):
                    x = x[valid]
                x = x.reshape(-1, x.shape[-1]).to(torch.float64)
                if by_rows:
                    held = torch.arange(x.shape[0]) % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
                    add(sums.fit, name, x[~held])
                    add(sums.check, name, x[held])
                else:
                    add(sums.check if checked else sums.fit, name, x)
            held_rows = int(x.shape[0]) // HOLD_OUT_EVERY if by_rows else int(x.shape[0]) if checked else 0
            sums.check_count += held_rows
            sums.fit_count += int(x.shape[0]) - held_rows
    sums.fit = {name: total.numpy() for name, total in sums.fit.items()}
    sums.check = {name: total.numpy() for name, total in sums.check.items()}
    return sums


def _factors(layers, sums: GramSums, damps: dict[str, float], order: str = "class", fit_only: bool = False) -> dict[int, tuple]:
    """Per layer, {id(layer.node): (U, H's diagonal, rounding order)} for H = X^T X / tokens of its
    input, damped by `damps[input]`: U in the rounding order (`rounding_order`), the diagonal in the
    layer's row order. H over the fitting batches (`fit_only`, the sums kept), or over every batch,
    each input's sums then released as its last layer takes its copy: two K x K arrays at a time
    while factoring."""
    out = {}
    count = sums.fit_count if fit_only else sums.fit_count + sums.check_count
    for readers in _by_input(layers):
        name = MixedMatMulView.of(readers[0].node).x.name
        if fit_only:
            total = sums.fit[name]
        else:
            total = sums.fit.pop(name)
            if name in sums.check:
                total += sums.check.pop(name)
        for layer in readers:
            perm = MixedMatMulView.of(layer.node).perm_array()
            energy = np.maximum(np.diag(total)[perm] / max(count, 1), 0.0)
            rows = rounding_order(energy, layer.sizes, order)
            h = [total[np.ix_(perm[rows], perm[rows])] if rows is not None else total[np.ix_(perm, perm)]]  # this layer's copy
            h[0] /= max(count, 1)
            if layer is readers[-1] and not fit_only:
                total = None  # the sum's last reader: released before factoring
            h[0] = _damped(h[0], damps[name])
            out[id(layer.node)] = (_inverse_factor(h), energy, rows)
    return out


def rounding_order(energy: np.ndarray, sizes, order: str) -> np.ndarray | None:
    """The stored rows in the order GPTQ rounds them: None for `class` (as stored), for `act` each
    class's rows by decreasing H diagonal (`energy`; ties in stored order). Classes keep their spans,
    so the low-bit classes still come first."""
    if order == "class":
        return None
    rows, start = [], 0
    for size in sizes:
        rows.append(start + np.argsort(-energy[start:start + size], kind="stable"))
        start += size
    return np.concatenate(rows) if rows else np.arange(0)


def gptq_round(w: np.ndarray, hessian: np.ndarray, kinds, bits, sizes, group_size: int, originals: list[np.ndarray],
               sparse: int, grid: str = "mse", damp: float = 0.01, order: str = "class") -> list[np.ndarray]:
    """The class arrays of a `qc.MixedMatMul` (laid out as `originals`: codes, scales, zero points,
    codebooks, fp16 rows, then sparse indices and values) for the float weight `w` [K, N] (rows in
    the op's order) rounded with GPTQ on `hessian` [K, K] (same order), in the `order` of
    `rounding_order`."""
    energy = np.maximum(np.diag(hessian).astype(np.float64), 0.0)
    rows = rounding_order(energy, sizes, order)
    h = np.array(hessian if rows is None else np.asarray(hessian)[np.ix_(rows, rows)], np.float64)
    factor = _inverse_factor([_damped(h, damp)])
    return _round(w, factor, energy, kinds, bits, sizes, group_size, originals, sparse, grid, rows)


def _round(w: np.ndarray, u: np.ndarray, energy: np.ndarray, kinds, bits, sizes, group_size: int, originals: list[np.ndarray],
           sparse: int, grid: str, order: np.ndarray | None = None) -> list[np.ndarray]:
    """`gptq_round` given U (upper, (H + damping)^-1 = U^T U, in rounding order), H's diagonal
    `energy` (stored order) and the rounding order (`rounding_order`; None: as stored). Position i
    of the loop rounds stored row order[i]; a uniform group's grid is chosen when its first row
    comes, a codebook when its class's does, and a lazy block starts there, so that the rows they
    are chosen from have taken every earlier row's update."""
    k = w.shape[0]
    order = np.arange(k) if order is None else np.asarray(order, np.int64)
    position = np.empty(k, np.int64)
    position[order] = np.arange(k)
    w = np.array(w, np.float64)[order]  # rows in rounding order

    def current(rows: np.ndarray) -> np.ndarray:
        return w[position[rows]]  # stored rows' values as updated so far, in stored order

    arrays = [a.copy() for a in originals]
    classes, outliers = split_class_inputs(arrays, kinds, bits, sizes, sparse)
    sparse_cols = _sparse_columns(outliers[0], k) if outliers is not None else {}
    rounders = [_Rounder(c, group_size, grid, energy) for c in classes]
    row_class = np.repeat(np.arange(len(rounders)), sizes)  # by stored row, and by position: classes keep their spans
    grids = {i for rounder in rounders for i in rounder.grid_positions(position)}
    starts = sorted(set(_block_starts(kinds, sizes, group_size, k)) | grids)
    kept: dict[tuple[int, int], float] = {}
    for first, stop in zip(starts, starts[1:] + [k]):
        errors = np.empty((stop - first, w.shape[1]))
        for i in range(first, stop):
            r = int(order[i])
            rounder = rounders[row_class[i]]
            if i in grids:
                rounder.begin(current, r)
            q = rounder.round(w[i], r)
            cols = sparse_cols.get(r)
            if cols is not None:  # outliers are stored exactly, at the row's updated values
                q[cols] = w[i, cols].astype(np.float16).astype(np.float64)
                kept.update({(r, int(c)): q[c] for c in cols})
            errors[i - first] = (w[i] - q) / u[i, i]
            w[i + 1:stop] -= np.outer(u[i, i + 1:stop], errors[i - first])
        w[stop:] -= u[first:stop, stop:].T @ errors
    if outliers is not None:
        indices, values = outliers
        values[...] = np.array([kept[(int(r), int(c))] for r, c in indices], np.float16)
    return arrays


def gptq_fixed_grid(w: np.ndarray, hessian: np.ndarray, scales: np.ndarray, qmax: int, damp: float = 0.01) -> np.ndarray:
    """Symmetric integer codes in [-qmax, qmax] of `w` [K, N] on the fixed grid `scales` [N] (one step
    per column), its rows rounded in order by GPTQ on `hessian` [K, K] (float64, the caller's to give up),
    damped by `damp` times its mean diagonal: each row's error is spread over the rows after it, as
    `_round` does for the mixed classes, in lazy blocks of `LAZY_ROWS`."""
    k = w.shape[0]
    u = _inverse_factor([_damped(hessian, damp)])
    w = np.array(w, np.float64)
    steps = np.asarray(scales, np.float64)
    codes = np.empty(w.shape, np.int32)
    for first in range(0, k, LAZY_ROWS):
        stop = min(first + LAZY_ROWS, k)
        errors = np.empty((stop - first, w.shape[1]))
        for i in range(first, stop):
            codes[i] = np.clip(np.round(w[i] / steps), -qmax, qmax)
            errors[i - first] = (w[i] - codes[i] * steps) / u[i, i]
            w[i + 1:stop] -= np.outer(u[i, i + 1:stop], errors[i - first])
        w[stop:] -= u[first:stop, stop:].T @ errors
    return codes


def _damped(h: np.ndarray, damp: float) -> np.ndarray:
    """`h` (float64, the caller's to give up) with a dead input's (zero) diagonal set to 1 and `damp`
    times the mean diagonal added to every diagonal entry, in place."""
    diagonal = np.diag(h).copy()
    diagonal[diagonal <= 0] = 1.0
    h[np.diag_indices(len(h))] = diagonal + damp * float(np.mean(diagonal))
    return h


def _inverse_factor(held: list[np.ndarray]) -> np.ndarray:
    """The upper triangular U with H^-1 = U^T U, from H's own Cholesky factor (the method's reference
    computes it so). H comes in a one-item list that nothing else holds, and is released once
    factored: two K x K float64 arrays at a time (K = 5632: 0.25 GB each)."""
    import torch

    lower = torch.linalg.cholesky(torch.from_numpy(held.pop()))
    inverse = torch.cholesky_inverse(lower)
    del lower
    return torch.linalg.cholesky(inverse, upper=True).numpy()


def _block_starts(kinds, sizes, group_size: int, k: int) -> list[int]:
    """Rows where a lazy block starts: every class start, every group start, at most LAZY_ROWS apart,
    so that a grid or codebook is always chosen from fully updated rows."""
    starts = set()
    for kind, _, start, stop in class_slices(kinds, sizes):
        step = group_size if kind == "uniform" else LAZY_ROWS
        starts |= set(range(start, stop, min(step, LAZY_ROWS)))
    return sorted(s for s in starts if s < k)


def _sparse_columns(indices: np.ndarray, k: int) -> dict[int, np.ndarray]:
    index = indices.astype(np.int64)
    return {int(r): index[index[:, 0] == r, 1] for r in np.unique(index[:, 0]) if r < k}


class _Rounder:
    """Rounds the rows of one class, writing its arrays as it goes."""

    def __init__(self, c: MixedClass[np.ndarray], group_size: int, grid: str, energy: np.ndarray):
        self.kind, self.bits, self.start, self.stop = c.kind, c.bits, c.start, c.stop
        self.arrays = c.inputs  # codes, then scale and zero or the codebook: written in place
        self.group_size, self.grid, self.energy = group_size, grid, energy
        self.grids: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # group -> its chosen scale and zero point, as the rows use them
        if self.kind == "uniform":
            self.zero_kind = uniform_zero_kind(self.arrays[2], self.bits)

    def grid_positions(self, position: np.ndarray) -> list[int]:
        """Where in the rounding order a grid is chosen: each uniform group's first row, a codebook class's first row."""
        if self.kind == "uniform":
            return [int(position[g:min(g + self.group_size, self.stop)].min())
                    for g in range(self.start, self.stop, self.group_size)]
        if self.kind == "codebook" and self.stop > self.start:
            return [int(position[self.start:self.stop].min())]
        return []

    def begin(self, current, row: int) -> None:
        """Choose the grid (uniform: the group holding stored row `row`) or codebook (the class) from
        the updated rows (`current(rows)`: their values so far, in stored order)."""
        a = self.arrays
        if self.kind == "uniform":
            g = (row - self.start) // self.group_size
            first = self.start + g * self.group_size
            rows = np.arange(first, min(first + self.group_size, self.stop))
            _, scale, zero = uniform_groups(current(rows), self.energy[rows], self.bits, self.group_size, self.grid,
                                            self.zero_kind)
            a[1][g], a[2][g] = scale[0], zero[0]
            self.grids[g] = (scale[0].astype(np.float32).astype(np.float64), zero[0].astype(np.float32).astype(np.float64))
        elif self.kind == "codebook":
            rows = np.arange(self.start, self.stop)
            _, book = kmeans_codebook(current(rows), self.energy[self.start:self.stop], self.bits)
            a[1][...] = book
            self.book = book.astype(np.float64)

    def round(self, row: np.ndarray, i: int) -> np.ndarray:
        """Stored row `i` (values `row`) on its class's grid or codebook: its codes written, its value returned."""
        a, r = self.arrays, i - self.start
        if self.kind == "uniform":
            scale, zero = self.grids[r // self.group_size]
            q = np.clip(np.round(row / scale + zero), 0, (1 << self.bits) - 1)
            a[0][r] = q.astype(np.uint8)
            value = (q.astype(np.float32) - zero.astype(np.float32)) * scale.astype(np.float32)
        elif self.kind == "codebook":
            code = np.argmin(np.abs(row[:, None] - self.book), axis=1)
            a[0][r] = code.astype(np.uint8)
            value = self.book[np.arange(len(row)), code]
        else:
            a[0][r] = row.astype(np.float16)
            value = row.astype(np.float16)
        return np.array(value, np.float64)


def attributes_of_mixed(node: ir.Node) -> dict:
    from qcompiler.dialect.ops import attributes_of

    a = attributes_of(node)
    return {"kinds": list(a["kinds"]), "bits": list(a["bits"]), "sizes": list(a["sizes"]), "sparse": int(a["sparse"])}


def _class_values(view: MixedMatMulView) -> list[ir.Value]:
    """The op's class inputs and outliers as values, in `gptq_round`'s array order."""
    return [v for c in view.classes for v in c.inputs] + (list(view.outliers) if view.outliers is not None else [])


def _column_axes(kinds) -> list[int]:
    """Per class array, the axis that runs over the weight's columns (a codebook's table is [N, 2^b])."""
    return [axis for kind in kinds for axis in {"uniform": (1, 1, 1), "codebook": (1, 0), "fp16": (1,)}[kind]]


def _columns_of(arrays: list[np.ndarray], kinds, cols: np.ndarray, sparse: int) -> list[np.ndarray]:
    """The class arrays restricted to `cols` (outliers: those in `cols`, renumbered)."""
    out = [np.take(x, cols, axis=axis).copy() for x, axis in zip(arrays, _column_axes(kinds))]
    if sparse:
        indices, values = arrays[-2], arrays[-1]
        inside = np.isin(indices[:, 1].astype(np.int64), cols)
        local = indices[inside].copy()
        local[:, 1] = np.searchsorted(cols, local[:, 1].astype(np.int64))  # the position among `cols` (sorted)
        out += [local, values[inside].copy()]
    return out


def _write_columns(arrays: list[np.ndarray], part: list[np.ndarray], kinds, cols: np.ndarray, sparse: int) -> None:
    for x, p, axis in zip(arrays, part, _column_axes(kinds)):
        index = [slice(None)] * x.ndim
        index[axis] = cols
        x[tuple(index)] = p
    if sparse:
        indices, values = arrays[-2], arrays[-1]
        inside = np.flatnonzero(np.isin(indices[:, 1].astype(np.int64), cols))
        values[inside] = part[-1]


def _dequantized(arrays: list[np.ndarray], a: dict, group_size: int) -> np.ndarray:
    from qcompiler.dialect.mixed_ops import mixed_weight

    classes, outliers = split_class_inputs(arrays, a["kinds"], a["bits"], a["sizes"], a["sparse"])
    return mixed_weight(classes, outliers, group_size).astype(np.float64)


def output_error(delta: np.ndarray, h: np.ndarray) -> float:
    """tr(delta^T H delta): the layer's output error on the patches H was measured on."""
    return float(np.einsum("kn,kj,jn->", delta, h, delta))


def patch_rule(conv: ir.Node) -> dict | None:
    """unfold's arguments for a 1-D, 2-D or 3-D Conv (pads split into a pad before unfolding), or None."""
    shape = conv.inputs[1].shape
    dims = len(shape) - 2 if shape is not None else 0
    auto_pad = conv.attributes.get("auto_pad")
    if dims not in (1, 2, 3) or (auto_pad is not None and auto_pad.value not in ("NOTSET", "VALID")):
        return None
    def ints(name, default):
        a = conv.attributes.get(name)
        return list(a.value) if a is not None else default
    kernel = [int(d) for d in shape[2:]]
    valid = auto_pad is not None and auto_pad.value == "VALID"  # no padding, whatever a stale `pads` says
    return {"kernel": kernel, "strides": ints("strides", [1] * dims), "dilations": ints("dilations", [1] * dims),
            "pads": [0] * (2 * dims) if valid else ints("pads", [0] * (2 * dims)),
            "group": conv.attributes["group"].value if "group" in conv.attributes else 1}


def _patches(x, rule: dict):
    """im2col of x [B, C, (D, H,) W]: [positions, C * taps], columns channel-major as the kernel's matrix rows,
    every `_patch_step`-th position (rows in batch, then output position order), so that at most `PATCH_ROWS`
    remain (a 3D Conv's positions thinned to every k-th output depth slice first, `_patches_3d`). Only
    the positions kept are gathered: a batch's patches whole are taps times its size."""
    import torch

    dims = len(rule["kernel"])
    if dims == 3:
        patches = _patches_3d(x, rule)
        return patches[::_patch_step(patches.shape[0])]
    if dims == 1:
        x = x.unsqueeze(2)
        rule = {**rule, "kernel": [1, *rule["kernel"]], "strides": [1, *rule["strides"]], "dilations": [1, *rule["dilations"]],
                "pads": [0, rule["pads"][0], 0, rule["pads"][1]]}
    top, left, bottom, right = rule["pads"]
    x = torch.nn.functional.pad(x, [left, right, top, bottom])
    (kh, kw), (sh, sw), (dh, dw) = rule["kernel"], rule["strides"], rule["dilations"]
    out_h = (x.shape[2] - (kh - 1) * dh - 1) // sh + 1
    out_w = (x.shape[3] - (kw - 1) * dw - 1) // sw + 1
    total = x.shape[0] * out_h * out_w
    kept = torch.arange(0, total, _patch_step(total))
    image, position = kept // (out_h * out_w), kept % (out_h * out_w)
    rows = (position // out_w)[:, None] * sh + torch.arange(kh) * dh  # [n, kh]
    cols = (position % out_w)[:, None] * sw + torch.arange(kw) * dw  # [n, kw]
    channels = torch.arange(x.shape[1])
    patches = x[image[:, None, None, None], channels[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]
    return patches.reshape(len(kept), -1)


def _patch_step(positions: int) -> int:
    """Every how many im2col positions one is kept, so that at most `PATCH_ROWS` remain."""
    return max(1, -(-positions // PATCH_ROWS))


def _patches_3d(x, rule: dict):
    """im2col of x [B, C, D, H, W] for a 3D kernel [kd, kh, kw]: [positions, C * kd * kh * kw], columns
    channel-major then taps (the kernel's [O, C/groups, kd, kh, kw] rows). The windows are views
    (`Tensor.unfold` along each axis, dilated taps sliced); only every k-th output depth slice is copied
    out, k chosen so that about `PATCH_ROWS` positions remain: a volume's patches whole would be
    taps times its size."""
    import torch

    front, back = rule["pads"][:3], rule["pads"][3:]
    x = torch.nn.functional.pad(x, [front[2], back[2], front[1], back[1], front[0], back[0]])
    for axis, (k, stride, dilation) in enumerate(zip(rule["kernel"], rule["strides"], rule["dilations"])):
        x = x.unfold(2 + axis, (k - 1) * dilation + 1, stride)  # a window axis appended: [B, C, oD, oH, oW, ...]
    d, h, w = rule["dilations"]
    x = x[..., ::d, ::h, ::w]
    depth_step = max(1, min(x.shape[2], -(-x.shape[0] * x.shape[2] * x.shape[3] * x.shape[4] // PATCH_ROWS)))
    x = x[:, :, ::depth_step]
    return x.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(-1, x.shape[1] * x.shape[5] * x.shape[6] * x.shape[7])


def conv_hessians(model: ir.Model, convs: list[ir.Node], calibration, threads) -> tuple[dict, dict, dict, dict]:
    """Per Conv node (each with a `patch_rule`): H = P^T P / positions (float64) of its im2col patches
    and their mean patch, one per group, the mean of each input channel and the number of patches, over
    the calibration batches run through the model as it is (qc ops expanded): ({id(conv): [H_g]},
    {id(conv): [mean patch_g]}, {id(conv): mean [C]}, {id(conv): patches})."""
    import torch

    from qcompiler.analysis.execute import expanded_copy, ort_session

    copy = expanded_copy(model)
    wanted = {conv.inputs[0].name for conv in convs}
    values = {v.name: v for node in copy.graph for v in node.outputs if v.name in wanted}
    values.update({v.name: v for v in copy.graph.inputs if v.name in wanted})
    names = sorted(wanted)
    for name in names:
        if values[name] not in copy.graph.outputs:
            copy.graph.outputs.append(values[name])
    session = ort_session(copy, threads)
    sums: dict[int, list] = {}
    patch_sums: dict[int, np.ndarray] = {}
    channel_sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}  # positions seen per Conv (for the channel means)
    rows: dict[int, int] = {}  # patches summed per Conv (for H)
    for batch in calibration:
        feeds = {i.name: batch[i.name] for i in session.get_inputs() if i.name in batch}
        outputs = dict(zip(names, session.run(names, feeds)))
        for conv in convs:
            key = id(conv)
            rule = patch_rule(conv)
            x = torch.from_numpy(np.ascontiguousarray(outputs[conv.inputs[0].name], np.float32))
            per_channel = x.to(torch.float64).sum(dim=tuple(i for i in range(x.dim()) if i != 1)).numpy()
            channel_sums[key] = channel_sums.get(key, 0) + per_channel
            counts[key] = counts.get(key, 0) + x.numel() // x.shape[1]
            patches = _patches(x, rule).to(torch.float64)
            per_group = patches.shape[1] // rule["group"]
            grams = [(p.T @ p).numpy() for p in patches.split(per_group, dim=1)]
            previous = sums.get(key)
            sums[key] = grams if previous is None else [a + b for a, b in zip(previous, grams)]
            rows[key] = rows.get(key, 0) + patches.shape[0]
            patch_sums[key] = patch_sums.get(key, 0) + patches.sum(dim=0).numpy()
    hessians = {key: [g / max(rows[key], 1) for g in grams] for key, grams in sums.items()}
    patch_means = {key: list(np.split(total / max(rows[key], 1), len(hessians[key]))) for key, total in patch_sums.items()}
    means = {key: channel_sums[key] / max(counts[key], 1) for key in channel_sums}
    return hessians, patch_means, means, rows


def held_out(batches: list) -> tuple[list, list]:
    """(fit, check): every `HOLD_OUT_EVERY`-th calibration batch checks the model's error and gives no
    patches to H, so that a rounding fitted to the calibration data is not kept for it; with fewer
    than `HOLD_OUT_EVERY` batches both are all of them (the same object)."""
    if len(batches) < HOLD_OUT_EVERY:
        return batches, batches
    return ([b for i, b in enumerate(batches) if not is_held_out(i, len(batches))],
            [b for i, b in enumerate(batches) if is_held_out(i, len(batches))])


def is_held_out(index: int, count: int) -> bool:
    """Whether calibration batch `index` of `count` is held out of the fitting (`held_out`, damp=auto):
    every `HOLD_OUT_EVERY`-th, and none when there are fewer batches than that."""
    return count >= HOLD_OUT_EVERY and index % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1


def _model_error(model: ir.Model, calibration, threads) -> float:
    """Squared distance of the model's outputs from the float model's (every `qc.MixedWeight` and
    `qc.MixedMatMul` with its float weight) over the calibration batches."""
    from qcompiler.analysis.execute import run_expanded
    from qcompiler.ir import to_proto

    reference = ir.serde.deserialize_model(to_proto(model))
    floats = {n.name: n for n in model.graph
              if n.domain == "qc" and n.op_type in ("MixedWeight", "MixedMatMul") and FLOAT_WEIGHT_KEY in n.meta}
    for node in list(reference.graph):
        source = floats.get(node.name)
        if source is None or node.domain != "qc":
            continue
        conv = conv_reading(node.outputs[0]) if node.op_type == "MixedWeight" else None
        if conv is not None and len(conv.conv.inputs) > 2 and conv.conv.inputs[2] is not None:  # the bias before correction
            bias = source.meta.get(FLOAT_BIAS_KEY)
            conv.conv.replace_input_with(2, new_initializer(reference.graph, f"{node.name}.float_bias", bias) if bias is not None else None)
        weight = new_initializer(reference.graph, f"{node.name}.float", source.meta[FLOAT_WEIGHT_KEY].numpy())
        if node.op_type == "MixedMatMul":
            matmul = ir.node("MatMul", [node.inputs[0], weight], name=f"{node.name}.float_matmul")
            reference.graph.insert_before(node, matmul)
            weight = matmul.outputs[0]
        ir.convenience.replace_all_uses_with(node.outputs[0], weight, replace_graph_outputs=True)
        reference.graph.remove(node, safe=True)
    total = 0.0
    for batch in calibration:
        want = run_expanded(reference, batch, threads)
        got = run_expanded(model, batch, threads)
        total += squared_distance(got, want)
    return total


def squared_distance(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    """Summed squared difference, in float64, of every output in `want` from the same output in `got`."""
    return sum(float(np.sum((got[k].astype(np.float64) - want[k]) ** 2)) for k in want)
