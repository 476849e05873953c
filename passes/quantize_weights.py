"""`quantize-weights`: carry out a bit allocation as a `qc.MixedMatMul` (or, for a Conv kernel held
as a matrix, a `qc.MixedWeight`).

For each `MatMul(X, qc.BitAllocation(W, bits))`, and each Conv whose kernel is rebuilt from
`qc.BitAllocation(W, bits)` (`qcompiler.ir.layers.ConvAsLinear`: E_k of a row is its channel's):
1. Permute the input channels so that each bit class is contiguous (classes by increasing bits,
   fp16 last; channels keep their order inside a class).
2. Quantize each class:
   - fp16 (activation outliers): stored as is, in fp16;
   - 2-4 bits with `codebook=kmeans`: per output column, 2^b centroids fitted by 1-D k-means
     weighted by the channels' activation energy E_k (SqueezeLLM, Kim et al. 2023);
   - otherwise uniform asymmetric groups of `group_size` rows per column, min-max (`grid=minmax`)
     or with the clipping ratio that minimises the E-weighted error (`grid=mse`);
3. Quantization-based outliers: the `outliers_weight` fraction of weights with the largest
   |w - Q(w)| * sqrt(E_k) are kept exactly, as sparse fp16 (row, column, value).
4. A Conv's bias absorbs the mean change its quantized kernel makes on the calibration inputs
   (`bias-correction`, on by default; Nagel et al. 2019, as `quantize{bias-correction=conv}` does for
   int8): bias -= E[(W_hat - W) x] per output channel, from the mean of each input channel over
   calibrate's sampled rows. Linears are left as they are.

E_k = mean(x_k^2) comes from `calibrate`'s statistics (in memory only): a layer whose input has none
is refused with the fix, never quantized with unit energies.

The result computes `X[..., perm] @ W_hat` (a Conv: its kernel rebuilt from W_hat with the rows put
back in channel order); effective bits are counted by the backend from the bytes it writes.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.analysis import bitcost
from qcompiler.dialect.mixed_ops import FP16_BITS, dequantize_codebook, dequantize_uniform
from qcompiler.dialect.ops import attributes_of
from qcompiler.ir.layers import ConvAsLinear, conv_reading, new_initializer, remove_unused
from qcompiler.ir.meta import CREATED_BY, FLOAT_BIAS_KEY, FLOAT_WEIGHT_KEY, Prop, activation_stats
from qcompiler.dialect.ops import QC_OPSET_VERSION
from qcompiler.analysis.bias_correction import conv_bias_shift, subtract_from_bias
from qcompiler.passes.quantize_embedding import dequantized_table, replace_lookup
from qcompiler.pipeline.passbase import Pass, PassResult, option, register_pass
from qcompiler.support.progress import progress

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
KMEANS_ITERATIONS = 12
FP16_ZERO_LIMIT = 30000.0


@register_pass
@dataclasses.dataclass(frozen=True)
class QuantizeWeightsPass(Pass):
    """Quantize allocated weights: uniform grids or k-means codebooks per bit class, fp16 and sparse outliers."""

    name = "quantize-weights"
    required = frozenset({Prop.BITS_ALLOCATED})
    provided = frozenset({Prop.WEIGHTS_QUANTIZED})
    reads_statistics = True

    class Stats:
        """Keys of `PassResult.stats` that the report and doctor read (tests/test_report.py holds the pass to them)."""

        PER_LAYER = "per_layer"  # layer name -> {WEIGHTED_SQNR_DB, ...}
        WEIGHTED_SQNR_DB = "weighted_sqnr_db"

    grid: Literal["minmax", "mse"] = option("mse", "uniform classes: min-max range, or the clipping that minimises weighted error")
    bias_correction: bool = option(True, "shift each mixed Conv's bias by the mean change its quantized kernel makes on the calibration inputs")

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        per_layer = {}
        allocations = [node for node in graph if node.domain == "qc" and node.op_type == "BitAllocation"]
        tables = [(node, use.node) for node in allocations for use in node.outputs[0].uses()
                  if use.node.op_type == "Gather" and use.idx == 0]
        for node, lookup in tables:  # an embedding table inside the budget (allocate-bits{embeddings=budget})
            per_layer[lookup.name or lookup.outputs[0].name] = _store_table(graph, node, lookup)
        allocations = [node for node in allocations if not any(node is table for table, _ in tables)]
        layers = [(node, [use.node for use in node.outputs[0].uses() if use.node.op_type == "MatMul" and use.idx == 1]
                   or [c for c in [conv_reading(node.outputs[0])] if c is not None])
                  for node in allocations]
        # every layer's channel energies, read before any layer is replaced: a replaced layer's output
        # is a new value, without the statistics of the layer that reads it
        energies = {id(layer): self._energy(layer) for _, readers in layers for layer in readers}
        with progress("quantize-weights: layers", len(allocations)) as bar:
            for node, readers in layers:
                if len(readers) > 1 and all(isinstance(r, ir.Node) for r in readers):  # one weight, several linears:
                    # stored once, its grids fitted to their inputs together (as allocate-bits priced it)
                    stats = self._replace(graph, node, readers, sum(energies[id(r)] for r in readers))
                    per_layer.update({r.name or r.outputs[0].name: stats for r in readers})
                else:
                    for layer in readers:
                        name = layer.name or layer.outputs[0].name
                        per_layer[name] = self._replace(graph, node, layer, energies[id(layer)])
                bar.update()
        if per_layer:
            remove_unused(model)
        if tables:
            model.opset_imports.setdefault("qc", QC_OPSET_VERSION)
        return PassResult(model, bool(per_layer), {"layers": len(per_layer), "per_layer": per_layer})

    def _energy(self, layer: ir.Node | ConvAsLinear) -> np.ndarray:
        """E_k = mean(x_k^2) of the layer's input channels (a Conv: of its kernel's rows), from calibrate's statistics."""
        if isinstance(layer, ConvAsLinear):
            return layer.row_energy(activation_stats(layer.x, self.name, layer.name).mean_sq.astype(np.float64))
        return activation_stats(layer.inputs[0], self.name, layer.name or layer.outputs[0].name).mean_sq.astype(np.float64)

    def _replace(self, graph: ir.Graph, allocation: ir.Node, layer: ir.Node | ConvAsLinear | list[ir.Node],
                 energy: np.ndarray) -> dict:
        """A MatMul `layer` (or each of a list of MatMuls that read one weight) becomes a `qc.MixedMatMul`
        reading the stored classes; for a Conv, `allocation` becomes a `qc.MixedWeight`."""
        fmt = attributes_of(allocation)
        bits = allocation.inputs[1].const_value.numpy().astype(np.int64)
        perm = np.argsort(bits, kind="stable")  # classes by increasing bits, fp16 (16) last
        wp = np.asarray(allocation.inputs[0].const_value.numpy(), np.float32)[perm]  # one float copy: a head is 0.26 GB at 1.5B
        ep, bp = energy[perm], bits[perm]
        base = allocation.inputs[0].name
        inputs = [new_initializer(graph, f"{base}.perm", perm.astype(np.int64))]
        kinds, class_bits, sizes = [], [], []
        w_hat = np.empty_like(wp)  # what the classes compute, written class by class (each a run of rows)
        for b in np.unique(bp):
            rows = np.flatnonzero(bp == b)
            block, e = wp[rows], ep[rows]
            if b == FP16_BITS:
                kind, arrays, dequant = "fp16", [block.astype(np.float16)], block.astype(np.float16).astype(np.float32)
            elif fmt["codebook"] == "kmeans" and b <= 4:
                codes, book = kmeans_codebook(block, e, int(b))
                kind, arrays, dequant = "codebook", [codes, book], dequantize_codebook(codes, book)
            else:
                zero_kind = bitcost.zero_point_kind(int(b), fmt["zero_points"])
                codes, scale, zero = uniform_groups(block, e, int(b), fmt["group_size"], self.grid, zero_kind)
                kind, arrays, dequant = "uniform", [codes, scale, zero], dequantize_uniform(codes, scale, zero, fmt["group_size"])
            for i, array in enumerate(arrays):
                inputs.append(new_initializer(graph, f"{base}.b{b}.{kind}.{i}", array))
            kinds.append(kind)
            class_bits.append(int(b))
            sizes.append(len(rows))
            w_hat[rows[0]:rows[-1] + 1] = dequant
            del dequant
        indices, values = sparse_outliers(wp, w_hat, ep, bp, fmt["outliers_weight"])
        sparse = int(len(values) > 0)
        if sparse:
            inputs.append(new_initializer(graph, f"{base}.outlier_index", indices))
            inputs.append(new_initializer(graph, f"{base}.outlier_value", values))
            w_hat[indices[:, 0], indices[:, 1]] = values.astype(np.float32)
        attributes = {"kinds": kinds, "bits": class_bits, "sizes": sizes, "group_size": int(fmt["group_size"]), "sparse": sparse}
        corrected = {}
        if isinstance(layer, ConvAsLinear):
            node = ir.node("MixedWeight", inputs, attributes, domain="qc", name=f"{base}.mixed", metadata_props={CREATED_BY: self.name})
            replaced = allocation.outputs[0]
            node.outputs[0].type, node.outputs[0].shape = replaced.type, replaced.shape
            node.meta[FLOAT_WEIGHT_KEY] = allocation.inputs[0].const_value  # [K, N] in channel order, for gptq
            bias = layer.conv.inputs[2] if len(layer.conv.inputs) > 2 else None
            node.meta[FLOAT_BIAS_KEY] = bias.const_value.numpy().copy() if bias is not None and bias.const_value is not None else None
            ir.convenience.replace_nodes_and_values(graph, allocation, [allocation], [node], [replaced], [node.outputs[0]])
            if self.bias_correction:
                kernel_error = np.empty_like(wp)
                kernel_error[perm] = w_hat - wp  # rows back in channel order
                corrected = _correct_conv_bias(graph, layer, kernel_error, base)
        else:
            for matmul in layer if isinstance(layer, list) else [layer]:
                node = ir.node("MixedMatMul", [matmul.inputs[0], *inputs], attributes, domain="qc", name=matmul.name,
                               metadata_props={CREATED_BY: self.name})
                ir.convenience.replace_nodes_and_values(graph, matmul, [matmul], [node], [matmul.outputs[0]], [node.outputs[0]])
                # the float weight stays reachable (in memory only) for passes that learn against it
                node.meta[FLOAT_WEIGHT_KEY] = allocation.inputs[0].const_value
        error = _weighted_square_sum(wp, ep, w_hat)
        energy_total = _weighted_square_sum(wp, ep)
        return {
            "classes": dict(zip([k if k == "fp16" else f"{k}{b}" for k, b in zip(kinds, class_bits)], sizes)),
            "sparse_outliers": int(len(values)),
            "weighted_sqnr_db": round(10 * np.log10(energy_total / error), 2) if error > 0 else None,
            **corrected,
        }


def _weighted_square_sum(rows: np.ndarray, energy: np.ndarray, minus: np.ndarray | None = None) -> float:
    """sum(energy[:, None] * (rows - minus) ** 2) in float64, 256 rows at a time: no temporary the
    size of the layer (a head's would be 0.5 GB in float64 at 1.5B)."""
    total, n = 0.0, 256
    for start in range(0, len(rows), n):
        part = rows[start:start + n] if minus is None else rows[start:start + n] - minus[start:start + n]
        total += float(np.sum(energy[start:start + n, None] * part**2))
    return total


def _store_table(graph: ir.Graph, allocation: ir.Node, lookup: ir.Node) -> dict:
    """The lookup becomes a `qc.GatherQuantized` of the table's codes at its allocated width (one for
    the whole table, as GatherBlockQuantized runs), blocks of `group_size` entries of a row."""
    bits = np.unique(allocation.inputs[1].const_value.numpy())
    if len(bits) != 1:
        raise ValueError(f"table '{allocation.inputs[0].name}' has rows of several widths ({bits.tolist()}); one is stored")
    table = allocation.inputs[0]
    w = table.const_value.numpy().astype(np.float32)
    block_size = int(attributes_of(allocation)["group_size"])
    stored = replace_lookup(graph, lookup, table, int(bits[0]), block_size)
    stored.meta[FLOAT_WEIGHT_KEY] = table.const_value  # the float table: the learners' float targets read it
    error = float(np.sum((dequantized_table(w, int(bits[0]), block_size) - w) ** 2))
    return {"classes": {f"uniform{int(bits[0])}": int(w.shape[0])}, "sparse_outliers": 0,
            "weighted_sqnr_db": round(10 * np.log10(float(np.sum(w.astype(np.float64) ** 2)) / error), 2) if error > 0 else None}


def _correct_conv_bias(graph: ir.Graph, conv: ConvAsLinear, error: np.ndarray, base: str) -> dict:
    """Subtract E[(W_hat - W) x] from the Conv's bias (created when it has none), `error` the kernel's
    error as its matrix [K, N]; the input means come from calibrate's sampled rows."""
    mean_in = np.asarray(activation_stats(conv.x, QuantizeWeightsPass.name, conv.name).sample, np.float64).mean(axis=0)
    shape = tuple(int(d) for d in conv.conv.inputs[1].shape)
    shift = conv_bias_shift(error.T.reshape(shape), mean_in)
    bias = conv.conv.inputs[2] if len(conv.conv.inputs) > 2 else None
    if bias is not None and bias.const_value is None:
        return {}
    subtract_from_bias(graph, conv.conv, bias, shift, f"{base}.bias")
    return {"bias_shift_max": float(np.max(np.abs(shift)))}


def uniform_groups(block: np.ndarray, energy: np.ndarray, bits: int, group_size: int, grid: str, zero: str = "fractional"):
    """Uniform codes per (group of rows, column): uint8 codes, fp16 scales and zero points, on the
    `zero` grid (`bitcost.zero_point_kind`):
    - `fractional`: asymmetric, fp16 zero points, so the grid's minimum need not sit on an integer
      step: a grid [lo, hi] is reproduced exactly, e.g. weights that passed through a 4-bit
      scale + min format;
    - `integer`: asymmetric, uint8 zero points (the range widened to hold 0, as ONNX Runtime's
      MatMulNBits and most 4-bit formats store them);
    - `symmetric`: every zero point the mid-code 2^(b-1) (uint8), the scale fitted to the value
      of largest magnitude (`bitcost.symmetric_scale`, negative when that value is positive)."""
    levels = (1 << bits) - 1
    k, n = block.shape
    groups = -(-k // group_size)
    codes = np.empty((k, n), np.uint8)
    scales = np.empty((groups, n), np.float16)
    zeros = np.empty((groups, n), np.float16 if zero == "fractional" else np.uint8)
    fit = {"fractional": _grid, "integer": _integer_grid, "symmetric": _symmetric_grid}[zero]
    for g in range(groups):
        rows = slice(g * group_size, (g + 1) * group_size)
        part, e = block[rows].astype(np.float64), energy[rows][:, None]
        best = None
        for ratio in CLIP_RATIOS if grid == "mse" else (1.0,):
            q, s, z = fit(part, levels, ratio)
            err = np.sum(e * (part - (q - z) * s) ** 2, axis=0)
            if best is None:
                best = (err, q, s, z)
            else:
                better = err < best[0]
                best = tuple(np.where(better, new, old) for new, old in zip((err, q, s, z), best))
        _, q, s, z = best
        codes[rows], scales[g], zeros[g] = q.astype(np.uint8), s.astype(np.float16), z.astype(zeros.dtype)
    return codes, scales, zeros


def _grid(part: np.ndarray, levels: int, ratio: float):
    """Codes, scale and zero (both at their stored fp16 precision) for a range shrunk by `ratio`
    about its centre."""
    lo, hi = part.min(axis=0), part.max(axis=0)
    centre, half = (lo + hi) / 2, (hi - lo) / 2 * ratio
    lo, hi = centre - half, centre + half
    scale = np.where(hi > lo, (hi - lo) / levels, 1.0).astype(np.float16).astype(np.float64)
    scale = np.where(scale > 0, scale, 1.0)
    # The zero point -lo / scale is stored in fp16: a narrow range far from 0 would overflow it.
    scale = np.maximum(scale, (np.abs(lo) / FP16_ZERO_LIMIT).astype(np.float16).astype(np.float64))
    zero = (-lo / scale).astype(np.float16).astype(np.float64)
    q = np.clip(np.round(part / scale + zero), 0, levels)
    return q, scale, zero


def _integer_grid(part: np.ndarray, levels: int, ratio: float):
    """Codes, fp16 scale and an integer zero point in 0..levels for a range that holds 0, shrunk
    by `ratio` about its centre."""
    lo, hi = np.minimum(part.min(axis=0), 0.0), np.maximum(part.max(axis=0), 0.0)
    centre, half = (lo + hi) / 2, (hi - lo) / 2 * ratio
    lo, hi = centre - half, centre + half
    scale = np.where(hi > lo, (hi - lo) / levels, 1.0).astype(np.float16).astype(np.float64)
    scale = np.where(scale > 0, scale, 1.0)
    zero = np.clip(np.round(-lo / scale), 0, levels)
    q = np.clip(np.round(part / scale + zero), 0, levels)
    return q, scale, zero


def _symmetric_grid(part: np.ndarray, levels: int, ratio: float):
    """Codes, fp16 scale and the mid-code zero point for a range about 0 shrunk by `ratio`."""
    half = (levels + 1) // 2
    scale = (bitcost.symmetric_scale(part, levels.bit_length()) * ratio).astype(np.float16).astype(np.float64)
    scale = np.where(scale != 0, scale, 1.0)
    zero = np.full(part.shape[1], float(half))
    q = np.clip(np.round(part / scale + zero), 0, levels)
    return q, scale, zero


def kmeans_codebook(block: np.ndarray, energy: np.ndarray, bits: int, chunk: int = 2048):
    """Per output column, 2^b centroids by 1-D k-means weighted by the rows' energy.

    Deterministic: centroids start at weighted quantiles; empty clusters keep their centroid.
    Columns are processed in chunks to bound memory."""
    k, n = block.shape
    codes = np.empty((k, n), np.uint8)
    book = np.empty((n, 1 << bits), np.float16)
    weight = np.maximum(energy.astype(np.float64), 1e-12)
    for start in range(0, n, chunk):
        cols = slice(start, min(n, start + chunk))
        codes[:, cols], book[cols] = _kmeans_columns(block[:, cols].astype(np.float64).T, weight, 1 << bits)
    return codes, book


def _kmeans_columns(x: np.ndarray, weight: np.ndarray, size: int):
    n, k = x.shape
    order = np.argsort(x, axis=1, kind="stable")
    sorted_x = np.take_along_axis(x, order, axis=1)
    cum = np.cumsum(weight[order], axis=1)
    targets = (np.arange(size) + 0.5) / size * cum[:, -1:]
    positions = np.minimum(np.array([np.searchsorted(c, t) for c, t in zip(cum, targets)]), k - 1)
    centroids = np.take_along_axis(sorted_x, positions, axis=1)  # [n, size]
    offsets = (np.arange(n) * size)[:, None]
    w_full = np.broadcast_to(weight, (n, k)).ravel()
    for _ in range(KMEANS_ITERATIONS):
        assign = _nearest(x, centroids) + offsets
        mass = np.bincount(assign.ravel(), weights=w_full, minlength=n * size).reshape(n, size)
        total = np.bincount(assign.ravel(), weights=(x * weight).ravel(), minlength=n * size).reshape(n, size)
        centroids = np.where(mass > 0, total / np.maximum(mass, 1e-300), centroids)
    stored = centroids.astype(np.float16)
    return _nearest(x, stored.astype(np.float64)).T.astype(np.uint8), stored


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for each value: x [n, k], centroids [n, s] -> [n, k]."""
    return np.argmin(np.abs(x[:, :, None] - centroids[:, None, :]), axis=2)


def sparse_outliers(w: np.ndarray, w_hat: np.ndarray, energy: np.ndarray, bits: np.ndarray, fraction: float):
    """The largest |w - w_hat| * sqrt(E_k) among quantized rows: int32 [n, 2] (row, col), fp16 [n]."""
    quantized = bits != FP16_BITS
    count = int(round(fraction * quantized.sum() * w.shape[1]))
    if count == 0:
        return np.zeros((0, 2), np.int32), np.zeros(0, np.float16)
    score = np.abs(w - w_hat) * np.sqrt(energy)[:, None]
    score[~quantized] = -1.0
    flat = np.argpartition(-score.ravel(), count - 1)[:count]
    flat = np.sort(flat)
    rows, cols = np.unravel_index(flat, w.shape)
    indices = np.stack([rows, cols], axis=1).astype(np.int32)
    return indices, w[rows, cols].astype(np.float16)
