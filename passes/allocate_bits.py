"""`allocate-bits`: channel-wise mixed precision, CMPQ style (Chen et al., arXiv 2410.13056).

Weight-only. For every linear `Y = X W` (W [K, N]) each input channel k (row of W) gets a bit width
from `candidates` so that the stored bits of the layer (scope=layer), or of all layers together
(scope=model), average `avg-bits` per weight, counting every stored byte (`qcompiler.bitcost`:
codes, scales, zero points, codebooks, sparse outliers, the permutation).

- Activation outliers: the `outliers-act` fraction of channels with the largest energy
  E_k = mean(x_k^2) stay in fp16 (16 bits, charged to the budget).
- Error model: err_k(b) = E_k * ||w_k - Q_b(w_k)||^2 (an estimate of channel k's contribution to
  the output MSE), Q_b min-max group quantization.
- Solver: every channel starts at the smallest candidate; upgrades are taken greedily by error
  reduction per stored bit (exact for convex err_k(b) curves) while the budget allows.
- Quantization-based outliers (`outliers-weight`, kept as sparse fp16 by `quantize-weights`) are
  budgeted here too, so that the average holds after them.

The allocation is recorded in the IR as `qc.BitAllocation(W, bits)` in front of each weight,
carrying the format it was budgeted for; `quantize-weights` consumes it. The paper reports
Llama-2-7B WikiText-2 perplexity close to 4-bit GPTQ/AWQ at about 3 bits; our defaults
(candidates 2, 3, 4, 8; 0.5 % fp16 channels; 0.45 % sparse weights) follow METHODS.md.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import heapq
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler import bitcost
from qcompiler.calibration import STATS_KEY
from qcompiler.errors import UserError
from qcompiler.layers import CREATED_BY, Linear, linears, new_initializer
from qcompiler.ops import QC_OPSET_VERSION
from qcompiler.passbase import Pass, PassResult, option, register_pass


LOWERING_BYTES_PER_CLASS = 160


@dataclasses.dataclass
class _Layer:
    linear: Linear
    w: np.ndarray
    energy: np.ndarray
    fp16: np.ndarray  # bool [K]: activation outliers
    sparse: int  # number of sparse outliers budgeted
    errors: dict[int, np.ndarray]  # bits -> err_k(b) [K]


@register_pass
@dataclasses.dataclass(frozen=True)
class AllocateBitsPass(Pass):
    """Bits per input channel under a fractional average budget (CMPQ), counting every stored byte."""

    name = "allocate-bits"
    required = frozenset({"calibrated"})
    provided = frozenset({"bits-allocated"})

    avg_bits: float = option(3.25, "average stored bits per weight, metadata included (2.0 to 8.0)")
    candidates: tuple[int, ...] = option((2, 3, 4, 8), "bit widths a channel may get (integers 1..8)")
    scope: Literal["layer", "model"] = option("layer", "budget per layer, or shared by the whole model")
    group_size: int = option(128, "rows per scale/zero-point group (32 to 128, a power of 2)")
    codebook: Literal["uniform", "kmeans"] = option("uniform", "2-4 bit classes: uniform groups, or activation-weighted k-means codebooks per column")
    outliers_act: float = option(0.005, "fraction of input channels kept in fp16 (largest activation energy)")
    outliers_weight: float = option(0.0045, "fraction of weights kept as sparse fp16 (largest weighted error)")
    keep: tuple[str, ...] = option((), "weights (names or globs, e.g. model.layers.*.mlp.down_proj.weight) whose channels all get keep-bits, on top of the budget")
    keep_bits: int = option(8, "bits of every channel of a `keep` layer (2..8)")

    def __post_init__(self):
        if not 2.0 <= self.avg_bits <= 16.0:
            raise UserError(f"allocate-bits: avg-bits must be in 2.0..16.0, got {self.avg_bits}")
        if not self.candidates or any(not isinstance(b, int) or not 1 <= b <= 8 for b in self.candidates):
            raise UserError(f"allocate-bits: candidates must be integers in 1..8, got {','.join(map(str, self.candidates))}")
        if self.group_size not in (32, 64, 128):
            raise UserError(f"allocate-bits: group-size must be 32, 64 or 128, got {self.group_size}")
        if not isinstance(self.keep_bits, int) or not 2 <= self.keep_bits <= 8:
            raise UserError(f"allocate-bits: keep-bits must be an integer in 2..8, got {self.keep_bits}")
        for key, value in (("outliers-act", self.outliers_act), ("outliers-weight", self.outliers_weight)):
            if not 0.0 <= value <= 0.1:
                raise UserError(f"allocate-bits: {key} must be in [0, 0.1], got {value}")

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        found = linears(graph)
        kept = [linear for linear in found if self._is_kept(linear)]
        self._check_keep_matches(found)
        layers = [self._prepare(linear) for linear in found if linear not in kept]
        if not layers and not kept:
            return PassResult(model, False, {"layers": 0})
        model.opset_imports.setdefault("qc", QC_OPSET_VERSION)
        pools = [layers] if self.scope == "model" else [[layer] for layer in layers]
        allocations = {}
        for pool in pools:
            allocations.update(self._allocate(pool))
        per_layer = {}
        for layer in layers:
            bits = allocations[layer.linear.name]
            per_layer[layer.linear.name] = self._record(graph, layer, bits, self.outliers_weight)
        for linear in kept:
            layer = _Layer(linear, linear.w.const_value.numpy(), None, None, 0, {})
            per_layer[linear.name] = self._record(graph, layer, np.full(layer.w.shape[0], self.keep_bits, np.uint8), 0.0)
            per_layer[linear.name]["kept"] = True
        total_bits = sum(v["stored_bits"] for v in per_layer.values())
        total_weights = sum(layer.w.size for layer in layers) + sum(linear.w.const_value.size for linear in kept)
        stats = {
            "layers": len(layers) + len(kept),
            "kept_layers": [linear.w.name for linear in kept],
            "predicted_bits_per_weight": round(total_bits / total_weights, 4),
            "predicted_error": float(sum(v["predicted_error"] for v in per_layer.values())),
            "per_layer": per_layer,
        }
        return PassResult(model, True, stats)

    # ------------------------------------------------------------------------------------------

    def _prepare(self, linear: Linear) -> _Layer:
        w = linear.w.const_value.numpy().astype(np.float32)
        k, n = w.shape
        if k < self.group_size:
            raise UserError(
                f"allocate-bits: layer '{linear.name}' has {k} input channels, fewer than group-size "
                f"{self.group_size}; lower group-size"
            )
        stats = linear.x.meta.get(STATS_KEY)
        energy = stats.mean_sq.astype(np.float64) if stats is not None else np.ones(k)
        fp16 = np.zeros(k, bool)
        count = int(round(self.outliers_act * k))
        if count:
            fp16[np.argsort(-energy, kind="stable")[:count]] = True
        errors = {b: energy * bitcost.minmax_grid_error(w, b, self.group_size) for b in sorted(set(self.candidates))}
        sparse = int(round(self.outliers_weight * (k - count) * n))
        return _Layer(linear, w, energy, fp16, sparse, errors)

    def _allocate(self, pool: list[_Layer]) -> dict[str, np.ndarray]:
        """Greedy allocation; the per-row costs spread group metadata evenly, so the exact stored
        bits (partial groups per class, small lowering constants) are checked afterwards and the
        budget tightened by any overshoot, a few times at most."""
        target = self.avg_bits * sum(layer.w.size for layer in pool)
        budget = target - sum(self._constants(layer) for layer in pool)
        fitted = None
        for _ in range(4):
            try:
                bits = self._greedy(pool, budget)
            except UserError:
                if fitted is None:
                    raise
                return fitted  # tightening went below the floor: keep the last allocation
            fitted = bits
            stored = sum(self._stored_bits(layer, bits[layer.linear.name]) + self._constants(layer) for layer in pool)
            if stored <= target:
                return bits
            budget -= stored - target
        return bits

    def _greedy(self, pool: list[_Layer], budget: float) -> dict[str, np.ndarray]:
        candidates = sorted(set(self.candidates))
        codebook = self.codebook == "kmeans"
        bits = {layer.linear.name: np.full(layer.w.shape[0], candidates[0], np.uint8) for layer in pool}
        spent = 0.0
        heap = []
        for index, layer in enumerate(pool):
            n = layer.w.shape[1]
            b = bits[layer.linear.name]
            b[layer.fp16] = bitcost.FP16
            spent += bitcost.fixed_bits(candidates, layer.w.shape[0], n, codebook, layer.sparse)
            spent += layer.fp16.sum() * bitcost.per_row_bits(bitcost.FP16, n, self.group_size, codebook)
            rows = np.flatnonzero(~layer.fp16)
            spent += len(rows) * self._row_bits(candidates[0], n, codebook)
            for k in rows:
                self._push(heap, layer, index, int(k), 0, candidates, codebook)
        if spent > budget:
            raise UserError(self._infeasible(pool, candidates, codebook))
        while heap:
            _, index, k, level = heapq.heappop(heap)
            layer = pool[index]
            n = layer.w.shape[1]
            delta = self._row_bits(candidates[level + 1], n, codebook) - self._row_bits(candidates[level], n, codebook)
            if spent + delta > budget:
                continue
            spent += delta
            bits[layer.linear.name][k] = candidates[level + 1]
            self._push(heap, layer, index, k, level + 1, candidates, codebook)
        return bits

    def _constants(self, layer: _Layer) -> float:
        """The small constants the lowering stores per class (shapes, shifts, ranges)."""
        return (len(self.candidates) + 1) * 8 * LOWERING_BYTES_PER_CLASS

    def _stored_bits(self, layer: _Layer, bits: np.ndarray) -> int:
        """Exact stored bits of one layer's allocation (classes, groups, codebooks, outliers, permutation)."""
        k, n = layer.w.shape
        classes = {int(b): int(c) for b, c in zip(*np.unique(bits, return_counts=True))}
        codebook = self.codebook == "kmeans"
        stored = bitcost.fixed_bits([], k, n, False, layer.sparse)  # codebook tables are in class_bits
        for b, rows in classes.items():
            kind = "fp16" if b == bitcost.FP16 else ("codebook" if codebook and b <= 4 else "uniform")
            stored += bitcost.class_bits(kind, b, rows, n, self.group_size)
        return stored

    def _row_bits(self, b: int, n: int, codebook: bool) -> float:
        return bitcost.per_row_bits(b, n, self.group_size, codebook and b <= 4)

    def _push(self, heap, layer: _Layer, index: int, k: int, level: int, candidates, codebook: bool) -> None:
        if level + 1 >= len(candidates):
            return
        lo, hi = candidates[level], candidates[level + 1]
        n = layer.w.shape[1]
        gain = layer.errors[lo][k] - layer.errors[hi][k]
        cost = self._row_bits(hi, n, codebook) - self._row_bits(lo, n, codebook)
        heapq.heappush(heap, (-gain / cost, index, k, level))

    def _infeasible(self, pool: list[_Layer], candidates, codebook: bool) -> str:
        low = high = 0.0
        total = sum(layer.w.size for layer in pool)
        for layer in pool:
            k, n = layer.w.shape
            fixed = bitcost.fixed_bits(candidates, k, n, codebook, layer.sparse) + self._constants(layer)
            fp16 = layer.fp16.sum() * bitcost.FP16 * n
            rows = k - layer.fp16.sum()
            low += fixed + fp16 + rows * self._row_bits(candidates[0], n, codebook)
            high += fixed + fp16 + rows * self._row_bits(candidates[-1], n, codebook)
        return (
            f"allocate-bits: avg-bits {self.avg_bits} is outside what candidates {','.join(map(str, candidates))} "
            f"and their metadata allow here: feasible {low / total:.3f} to {high / total:.3f}"
        )

    def _is_kept(self, linear: Linear) -> bool:
        return any(fnmatch.fnmatchcase(linear.w.name, pattern) for pattern in self.keep)

    def _check_keep_matches(self, found: list[Linear]) -> None:
        for pattern in self.keep:
            if not any(fnmatch.fnmatchcase(linear.w.name, pattern) for linear in found):
                names = ", ".join(linear.w.name for linear in found[:3])
                raise UserError(f"allocate-bits: keep pattern '{pattern}' matches no layer weight (weights are named like: {names})")

    def _record(self, graph: ir.Graph, layer: _Layer, bits: np.ndarray, outliers_weight: float) -> dict:
        linear = layer.linear
        bits_value = new_initializer(graph, f"{linear.w.name}.bits", bits.astype(np.uint8))
        node = ir.node(
            "BitAllocation", [linear.w, bits_value],
            {"group_size": self.group_size, "codebook": self.codebook, "outliers_weight": float(outliers_weight)},
            domain="qc", name=f"{linear.w.name}.allocation", metadata_props={CREATED_BY: self.name},
        )
        node.outputs[0].name = f"{linear.w.name}.allocated"
        node.outputs[0].type = linear.w.type
        node.outputs[0].shape = linear.w.shape
        graph.insert_before(linear.node, node)
        linear.node.replace_input_with(1, node.outputs[0])
        k, n = layer.w.shape
        classes = {int(b): int(c) for b, c in zip(*np.unique(bits, return_counts=True))}
        stored = self._stored_bits(layer, bits)
        error = sum(float(layer.errors[b][bits == b].sum()) for b in classes if b in layer.errors)
        return {"weight": linear.w.name, "bits_histogram": classes, "stored_bits": int(stored), "bits_per_weight": round(stored / (k * n), 4),
                "predicted_error": error, "sparse_outliers": layer.sparse}
