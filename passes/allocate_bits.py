"""`allocate-bits`: channel-wise mixed precision, CMPQ style (Chen et al., arXiv 2410.13056).

Weight-only. For every linear `Y = X W` (W [K, N]) each input channel k (row of W) gets a bit width
from `candidates` so that the stored bits of the layer (scope=layer), or of all layers together
(scope=model), average `avg-bits` per weight, counting every stored byte (`qcompiler.analysis.bitcost`:
codes, scales, zero points, codebooks, sparse outliers, the permutation).

- Activation outliers: the `outliers-act` fraction of channels with the largest energy
  E_k = mean(x_k^2) stay in fp16 (16 bits, charged to the budget). E_k comes from `calibrate`'s
  statistics (in memory only): a layer whose input has none is refused with the fix.
- Error model: err_k(b) = E_k * ||w_k - Q_b(w_k)||^2 (an estimate of channel k's contribution to
  the output MSE), Q_b min-max group quantization with the zero points the class will store
  (`zero-points`: integer for 2, 4 and 8 bits by default, the form ONNX Runtime's MatMulNBits runs;
  fractional fp16 otherwise). With scope=model and `sensitivity=output`, each layer's errors are
  rescaled by its measured effect on the model's outputs, so layers are compared in output units;
  `sensitivity=kl` measures that effect as the KL divergence of the next-token distributions (an
  LM's logits), which weighs a last projection to logits by what reaches the predictions.
- Solver: every channel starts at the smallest candidate; upgrades are ranked by error reduction
  per stored bit (exact for convex err_k(b) curves) and each is charged its exact cost in stored
  bits (a class's first rows pay for a whole group's metadata, a codebook class for its tables),
  so the budget holds as emitted without a correction afterwards. `blocks`: a MatMulNBits class is
  charged the rows it fills (tight; a class of 16 blocks or more stores, and is charged, whole
  blocks: `bitcost.STORED_WHOLE_FROM`) or the whole blocks of `group-size` rows the kernel holds once
  the session starts (whole; auto: whole in layers of 16 blocks or more), and in a layer where a
  class may be charged whole blocks, rows then move a block's worth at a time while the budget allows
  (`_spend_in_blocks`), and the bits such moves free are climbed again row by row; the statistics' bits are the bits so charged. With `codebook=kmeans` every
  non-empty subset of the candidates is allocated so and the one with the least predicted error is
  kept: the greedy climbs one candidate at a time, and a codebook class's first row pays its whole
  table, so a budget that cannot open the 4-bit class would otherwise never reach 8 bits.
- Quantization-based outliers (`outliers-weight`, kept as sparse fp16 by `quantize-weights`) are
  budgeted here too, so that the average holds after them.

Conv layers (`convs=true`, the default): a Conv's kernel [O, C/g, k...] is held as its im2col
matrix W [C/g * taps, O] (`qcompiler.ir.layers.conv_as_linear`: Transpose + Reshape rebuild the
kernel, exactly), so that a row is one input channel at one tap and the method above applies as to
a linear, with E of a row the energy of its input channel (the mean over the groups). ONNX Runtime
has no low-bit Conv kernel: the kernel is expanded to float32 when the session starts, so it is
priced as that route stores it (`bitcost.EXPANDED`: tight bit-planes at any width), and a kernel
with fewer rows than `group-size` (a depthwise 3x3 has 9) is one group, a scale per output channel.
At scope=layer the Conv layers share one budget: a conv net's layers are many and small, and each
class of each layer pays the lowering's constants.

The allocation is recorded in the IR as `qc.BitAllocation(W, bits)` in front of each weight,
carrying the format it was budgeted for; `quantize-weights` consumes it. The paper reports
Llama-2-7B WikiText-2 perplexity close to 4-bit GPTQ/AWQ at about 3 bits; our defaults
(0.5 % fp16 channels; 0.45 % sparse weights) follow METHODS.md, and the candidates are the widths
ONNX Runtime runs packed (2, 4, 8: its MatMulNBits CPU kernel refuses 3, 5, 6 and 7). A width it
does not run, asked for explicitly, is refused unless `other-widths` says how to store it:
`container` (in the next width it runs, priced at that width, so a 3-bit class costs 4 bits a
weight and runs packed) or `expand` (tight bit-planes, expanded to float32 at load).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import heapq
import logging
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.analysis import bitcost
from qcompiler.analysis.probe import log_softmax, mean_kl
from qcompiler.dialect.ops import QC_OPSET_VERSION
from qcompiler.errors import UserError, shown
from qcompiler.ir.layers import ConvAsLinear, Linear, conv_as_linear, has_kv_cache, linears, new_initializer, weighted_convs
from qcompiler.ir.meta import CREATED_BY, Prop, activation_stats
from qcompiler.passes.quantize_embedding import dequantized_table, lookups
from qcompiler.pipeline.passbase import Pass, PassResult, option, register_pass
from qcompiler.support.progress import progress

log = logging.getLogger(__name__)


LOWERING_BYTES_PER_CLASS = 160
# blocks=auto prices whole blocks from this many blocks of rows up: a 4096-row layer (32 blocks of 128)
# leaves 0.02 to 0.03 bits a weight unspent, a 576-row one (4.5 blocks) 0.5 (docs/results.md)
WHOLE_BLOCKS_FROM = 16
REVISITS = 8
TABLE_WIDTHS = (4, 8)  # what GatherBlockQuantized runs
TABLE_BLOCK = 32  # entries of a row per scale and zero point (quantize-embedding's default)
VARIED_TABLES = 4  # the largest tables whose widths are searched; smaller ones take 8 bits
TABLE_ROWS_AT_ONCE = 4096  # rows of a table whose error is computed at once


@dataclasses.dataclass
class _Layer:
    """A layer's error model. The weight itself is not kept: a weight on disk is read again when needed."""

    linear: Linear | ConvAsLinear
    shape: tuple[int, int]  # the weight's [K, N]
    energy: np.ndarray
    fp16: np.ndarray  # bool [K]: activation outliers
    sparse: int  # number of sparse outliers budgeted
    errors: dict[int, np.ndarray]  # bits -> err_k(b) [K]
    costs: bitcost.StorageCost  # how its storage is priced (the target's, or expanded at load for a Conv)
    group_size: int  # rows per scale group: the pass's, or fewer in a layer of fewer rows (`narrow_group`)

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclasses.dataclass
class _Table:
    """An embedding table inside the budget (`embeddings=budget`): its lookup and error model."""

    lookup: ir.Node  # the Gather
    table: ir.Value
    shape: tuple[int, int]  # [V, D]
    errors: dict[int, float]  # table width -> sum over rows of p_v ||e_v - Q(e_v)||^2

    @property
    def name(self) -> str:
        return self.lookup.name or self.lookup.outputs[0].name

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def stored_bits(self, bits: int) -> int:
        return bitcost.table_bits(*self.shape, bits, TABLE_BLOCK)


@dataclasses.dataclass(frozen=True)
class _SensitivityInputs:
    """What every sensitivity measurement reads (shared read-only, through the executor)."""

    graph: bytes  # the model with the layers' weights as graph inputs
    batch: dict[str, np.ndarray]
    weights: dict[str, np.ndarray]  # weight name -> float weight
    threads: int | None
    kl: bool  # KL divergence of the first output's softmax, else the squared change of every output
    bits: int  # reference width
    group_sizes: dict[str, int]  # weight name -> its layer's rows per scale group
    zero: str  # the reference width's grid (`bitcost.zero_point_kind`)
    tables: frozenset[str] = frozenset()  # weights that are embedding tables, quantized as stored (4 bits, blocks of a row)


def measure_sensitivity(shared: _SensitivityInputs, weight_names: list[str]) -> list[float]:
    """How much the model's outputs move when each weight alone is quantized at the reference width
    (one ONNX Runtime session, one run per weight): a pure function of its inputs, so that it runs
    in-process or as a Ray task (`qcompiler.support.parallel`) with the same results."""
    from qcompiler.analysis.execute import ort_session

    session = ort_session(shared.graph, shared.threads)
    outputs = [o.name for o in session.get_outputs()]
    feeds = {**shared.batch, **shared.weights}
    base = session.run(outputs, feeds)
    log_p = log_softmax(base[0]) if shared.kl else None
    measured = []
    for name in weight_names:
        if name in shared.tables:
            q = dequantized_table(shared.weights[name], TABLE_WIDTHS[0], TABLE_BLOCK)
        else:
            q = bitcost.minmax_grid_quantize(shared.weights[name], shared.bits, shared.group_sizes[name], shared.zero)
        moved = session.run(outputs, {**feeds, name: q})
        if log_p is not None:
            measured.append(mean_kl(log_p, moved[0]))
        else:
            measured.append(float(sum(np.sum((m.astype(np.float64) - b) ** 2) for m, b in zip(moved, base))))
    return measured


def _described(pool: list[_Layer]) -> str:
    """A pool in a message: its one layer's name and shape, or how many Conv kernels it holds."""
    if len(pool) == 1:
        return f"'{shown(pool[0].linear.name)}' ({pool[0].shape[0]} x {pool[0].shape[1]})"
    return f"the {len(pool)} Conv kernels"


def narrow_group(rows: int, group_size: int, smallest: int = 16) -> int:
    """Rows per scale group of a linear with `rows` input channels: `group_size`, or in a layer of fewer
    rows the largest power of two not above them (`smallest` at least: the fewest the target runs packed,
    16 for MatMulNBits' smallest block)."""
    if rows >= group_size:
        return group_size
    return max(smallest, 1 << (max(rows, 1).bit_length() - 1))


@register_pass
@dataclasses.dataclass(frozen=True)
class AllocateBitsPass(Pass):
    """Bits per input channel under a fractional average budget (CMPQ), counting every stored byte."""

    name = "allocate-bits"
    required = frozenset({Prop.CALIBRATED})
    provided = frozenset({Prop.BITS_ALLOCATED})
    reads_statistics = True

    class Stats:
        """Keys of `PassResult.stats` that the report and doctor read (tests/test_report.py holds the pass to them)."""

        PREDICTED_BITS_PER_WEIGHT = "predicted_bits_per_weight"
        PER_LAYER = "per_layer"  # layer name -> {WEIGHT, BITS_PER_WEIGHT, PREDICTED_ERROR, SPARSE_OUTLIERS, ...}
        WEIGHT = "weight"
        BITS_PER_WEIGHT = "bits_per_weight"
        PREDICTED_ERROR = "predicted_error"
        SPARSE_OUTLIERS = "sparse_outliers"

    avg_bits: float = option(3.25, "average stored bits per weight, metadata included (2.0 to 8.0)")
    candidates: tuple[int, ...] = option((2, 4, 8), "bit widths a channel may get (integers 1..8; the target runs some packed: ONNX Runtime 2, 4 and 8, Triton 2, 3, 4 and 8; see other-widths)")
    scope: Literal["layer", "model"] = option("layer", "budget per layer, or shared by the whole model")
    group_size: int = option(128, "rows per scale/zero-point group (32 to 128, a power of 2; a linear of fewer rows: the "
                                    "largest power of two within them, 16 at least)")
    codebook: Literal["uniform", "kmeans"] = option("uniform", "2-4 bit classes: uniform groups, or activation-weighted k-means codebooks per column")
    outliers_act: float = option(0.005, "fraction of input channels kept in fp16 (largest activation energy)")
    outliers_weight: float = option(0.0045, "fraction of weights kept as sparse fp16 (largest weighted error)")
    keep: tuple[str, ...] = option((), "weights (names or globs, e.g. model.layers.*.mlp.down_proj.weight) whose channels all get keep-bits, on top of the budget (an embedding table inside it, embeddings=budget: 8 bits)")
    keep_bits: int = option(8, "bits of every channel of a `keep` layer (2..8)")
    boost: tuple[str, ...] = option((), "weights (names or globs) whose layers are allocated avg-bits + boost-bits instead")
    boost_bits: float = option(1.0, "bits per weight added to the budget of a `boost` layer (0 to 6)")
    sensitivity: Literal["off", "output", "kl"] = option(
        "off", "scope=model: scale each layer's error model by how much its quantization moves the model's outputs "
        "(measured: output, squared change; kl, KL divergence of the first output's softmax, for LMs)")
    zero_points: Literal["auto", "integer", "fractional", "none"] = option(
        "auto", "uniform classes: integer zero points (runnable by MatMulNBits), fp16 fractional ones, auto: integer for 2, 4 "
        "and 8 bits, or none: symmetric codes about 0 (the zero point is the kernel's default mid-code, not stored; only widths "
        "the kernels run)")
    cost: Literal["bits", "latency"] = option(
        "bits", "what decides among allocations that meet the budget: bits (error per stored bit), or latency (each set of "
        "candidate classes allocated by error per stored bit, and the one with the least predicted error x predicted time "
        "kept, time from the target's measured kernel-cost table)")
    blocks: Literal["auto", "tight", "whole"] = option(
        "auto", "how a MatMulNBits class's codes are priced: tight, as the file stores them (the last block of a class of "
        "fewer than 16 blocks is padded at load, and that padding is resident; a larger class stores its padding), whole, in whole blocks of group-size rows as ONNX Runtime holds "
        "them (classes fill their blocks: resident memory close to the file's bytes, but budget a layer cannot spend in "
        "a whole block is left unspent), or auto: whole for layers of at least 16 blocks, where little is left, else tight")
    shared_input: Literal["auto", "apart", "joint"] = option(
        "auto", "linears that read one input (Q/K/V, gate/up): each its own allocation (apart), or one for them together "
        "(joint: the same bits per input channel, chosen by their summed errors, so lower-ort runs them as one wide "
        "kernel per class, the input gathered once; the permutation and the lowering's constants are paid once); auto: "
        "joint in a decoder with a KV cache (a step is one token: each kernel's call costs more than its weights), else apart")
    embeddings: Literal["apart", "budget"] = option(
        "apart", "embedding tables (a Gather of a constant table): apart, outside the budget (float, or quantize-embedding's "
        "width), or budget: inside it, each table stored as 4- or 8-bit codes with a float32 scale and a zero point per "
        "32 entries of a row (ONNX Runtime's GatherBlockQuantized), its width chosen with the layers' bits for the least "
        "predicted error, the layers' average moved by what the tables store")
    convs: bool = option(True, "allocate Conv kernels too, as [C/g * kernel taps, O] matrices (stored packed, expanded to "
                         "float32 when the session starts; at scope=layer all Conv layers share one budget); false leaves them float")
    other_widths: Literal["refuse", "container", "expand"] = option(
        "refuse", "candidate or keep widths ONNX Runtime's MatMulNBits does not run (1, 3, 5, 6, 7): refuse them, store them in "
        "containers of the next width it runs (3 -> 4 bits, priced at 4), or store them tight as bit-planes with fractional "
        "zero points, expanded to a float32 weight at load (priced tight)")

    def __post_init__(self):
        if not 2.0 <= self.avg_bits <= 16.0:
            raise UserError(f"allocate-bits: avg-bits must be in 2.0..16.0, got {self.avg_bits}")
        if not self.candidates or any(not isinstance(b, int) or not 1 <= b <= 8 for b in self.candidates):
            raise UserError(f"allocate-bits: candidates must be integers in 1..8, got {','.join(map(str, self.candidates))}")
        if self.group_size not in (32, 64, 128):
            raise UserError(f"allocate-bits: group-size must be 32, 64 or 128, got {self.group_size}")
        if not 0.0 <= self.boost_bits <= 6.0:
            raise UserError(f"allocate-bits: boost-bits must be in 0..6, got {self.boost_bits}")
        if not isinstance(self.keep_bits, int) or not 2 <= self.keep_bits <= 8:
            raise UserError(f"allocate-bits: keep-bits must be an integer in 2..8, got {self.keep_bits}")
        for key, value in (("outliers-act", self.outliers_act), ("outliers-weight", self.outliers_weight)):
            if not 0.0 <= value <= 0.1:
                raise UserError(f"allocate-bits: {key} must be in [0, 0.1], got {value}")
        if self.other_widths == "expand" and self.zero_points in ("integer", "none"):
            raise UserError("allocate-bits: other-widths=expand stores fractional zero points; drop zero-points=integer "
                            "(integer zero points of any width run on MatMulNBits in containers)")

    def check_target(self, cost_model: bitcost.StorageCost) -> None:
        """A width the target's kernels cannot run packed (`cost_model.packed_widths`: 2, 4, 8 for
        ONNX Runtime's MatMulNBits; 2, 3, 4, 8 for the Triton package), asked for, needs
        `other-widths` to say how to store it."""
        if self.embeddings == "budget" and cost_model.name != "ort":
            raise UserError(f"allocate-bits: embeddings=budget stores tables for ONNX Runtime's GatherBlockQuantized; target "
                            f"'{cost_model.name}' has no quantized lookup: use embeddings=apart")
        asked = set(self.candidates) | ({self.keep_bits} if self.keep else set())
        codebook = self.codebook == "kmeans"  # classes of 4 bits or fewer are codebooks, not MatMulNBits
        packed = cost_model.packed_widths
        other = sorted(b for b in asked if b not in packed and not (codebook and b <= 4))
        if other and self.zero_points == "none":
            raise UserError(f"allocate-bits: zero-points=none stores codes symmetric about the mid-code of a width "
                            f"{cost_model.kernels} run ({', '.join(map(str, packed))} bits), not "
                            f"{','.join(map(str, other))}; choose candidates and keep-bits from those widths")
        if other and self.other_widths == "refuse" and self.zero_points == "auto":
            widths = ",".join(map(str, other))
            raise UserError(
                f"allocate-bits: {cost_model.kernels} run {', '.join(map(str, packed))} bits packed, not {widths}; choose "
                f"candidates from {','.join(map(str, packed))}, or allow {widths} with other-widths=container (stored in the "
                f"next width it runs and priced at it) or other-widths=expand (stored tight, expanded to float32 at load)")

    @property
    def _zero_points(self) -> str:
        """The zero-point policy the classes are stored with (`other-widths=container`: integer for every width)."""
        return "integer" if self.zero_points == "auto" and self.other_widths == "container" else self.zero_points

    def call(self, model: ir.Model) -> PassResult:
        self.check_target(self._costs)
        graph = model.graph
        found: list[Linear | ConvAsLinear] = linears(graph)
        if self.convs:
            found += [conv_as_linear(graph, conv, self.name) for conv in weighted_convs(graph)]
        kept = [linear for linear in found if self._is_kept(linear)]
        tables = self._tables(graph) if self.embeddings == "budget" else []
        self._check_keep_matches(found, tables)
        kept_tables = [table for table in tables if self._matches_name(table.table.name, self.keep)]
        tables = [table for table in tables if table not in kept_tables]
        layers = []
        with progress("allocate-bits: error models", len(found) - len(kept)) as bar:
            for linear in found:
                if linear not in kept:
                    layers.append(self._prepare(linear))
                    bar.update()
        layers, readers = self._one_per_weight(layers)
        if not layers and not kept and not tables and not kept_tables:
            return PassResult(model, False, {"layers": 0})
        model.opset_imports.setdefault("qc", QC_OPSET_VERSION)
        sensitivities = None
        if self.sensitivity != "off" and self.scope == "model":
            sensitivities = self._measure_sensitivity(model, layers, tables)
        boosted = [layer for layer in layers if self._matches(layer.linear, self.boost)]
        joint = self.shared_input == "joint" or (self.shared_input == "auto" and has_kv_cache(graph))
        units = self._joint_units(layers, boosted) if joint else [(layer, [layer]) for layer in layers]
        boosted_layers = {id(layer) for layer in boosted}
        boosted_ids = {id(unit) for unit, members in units if id(members[0]) in boosted_layers}  # a unit's members agree
        plain = [unit for unit, _ in units if id(unit) not in boosted_ids]
        lifted = [unit for unit, _ in units if id(unit) in boosted_ids]
        if self.scope == "model":
            pools = [(pool, budget) for pool, budget in ((plain, self.avg_bits), (lifted, self.avg_bits + self.boost_bits)) if pool]
        else:  # a conv net's layers are many and small (a depthwise 3x3 has 9 rows): they share one budget
            convs = [unit for unit in plain if isinstance(unit.linear, ConvAsLinear)]
            pools = [([unit], self.avg_bits + (self.boost_bits if id(unit) in boosted_ids else 0.0))
                     for unit, _ in units if not isinstance(unit.linear, ConvAsLinear) or id(unit) in boosted_ids]
            pools += [(convs, self.avg_bits)] if convs else []
        # scope=layer without tables: a layer below the budget takes its least, where the layers as a whole fit
        least: list[str] | None = [] if self.scope == "layer" and not tables else None
        if least is not None:
            everything = [layer for pool, _ in pools for layer in pool]
            candidates = sorted(set(self.candidates))
            if everything and self._feasible_range(everything, candidates)[0] > self.avg_bits:
                raise UserError(self._infeasible(everything, candidates, self.avg_bits))
        allocations, widths = self._allocate_with_tables(pools, tables, least)
        if least:  # one warning for all of them (a Swin has dozens of 48 x 48 projections)
            log.warning("allocate-bits: %d %s cannot be stored in %g bits per weight (their group metadata alone is over "
                        "it) and take their least, every row at %d bits: %s", len(least),
                        "layer" if len(least) == 1 else "layers", self.avg_bits, min(self.candidates),
                        "; ".join(least[:6]) + ("; ..." if len(least) > 6 else ""))
        widths |= {table.name: TABLE_WIDTHS[-1] for table in kept_tables}  # kept: on top of the budget, as kept layers
        per_layer = {table.name: self._record_table(graph, table, widths[table.name]) for table in tables + kept_tables}
        for table in kept_tables:
            per_layer[table.name]["kept"] = True
        with progress("allocate-bits: layers", len(layers)) as bar:
            for unit, members in units:
                bits = allocations[unit.linear.name]
                for layer in members:
                    per_layer[layer.linear.name] = self._record(graph, layer, bits, self.outliers_weight)
                    for other in readers.get(id(layer), []):  # the same weight, read by later linears too
                        other.node.replace_input_with(other.weight_index, layer.linear.node.inputs[layer.linear.weight_index])
                    if id(layer) in readers:
                        per_layer[layer.linear.name]["readers"] = [layer.linear.name] + [o.name for o in readers[id(layer)]]
                    bar.update()
                if len(members) > 1:  # stored once for all of them: each is charged its share by columns
                    stored = self._stored_bits(unit, bits)
                    for layer in members:
                        share = stored * layer.shape[1] // unit.shape[1]
                        per_layer[layer.linear.name].update(
                            stored_bits=int(share), bits_per_weight=round(share / layer.size, 4),
                            shared_input=[m.linear.w.name for m in members])
        kept_once: dict[int, Linear | ConvAsLinear] = {}  # a kept weight read by several linears: stored once too
        for linear in kept:
            first = kept_once.get(id(linear.w)) if isinstance(linear, Linear) else None
            if first is not None:
                linear.node.replace_input_with(linear.weight_index, first.node.inputs[first.weight_index])
                per_layer[first.name]["readers"] = per_layer[first.name].get("readers", [first.name]) + [linear.name]
                continue
            kept_once[id(linear.w)] = linear
            shape = tuple(linear.w.const_value.shape)
            layer = _Layer(linear, shape, None, None, 0, {}, self._layer_costs(linear), self._group_of(linear, shape[0]))
            per_layer[linear.name] = self._record(graph, layer, np.full(layer.shape[0], self.keep_bits, np.uint8), 0.0)
            per_layer[linear.name]["kept"] = True
        total_bits = sum(v["stored_bits"] for v in per_layer.values())
        total_weights = (sum(layer.size for layer in layers) + sum(linear.w.const_value.size for linear in kept_once.values())
                         + sum(table.size for table in tables + kept_tables))
        stats = {
            "layers": len(layers) + len(kept) + len(tables) + len(kept_tables),
            "kept_layers": [linear.w.name for linear in kept] + [table.table.name for table in kept_tables],
            "boosted_layers": [layer.linear.w.name for layer in boosted],
            "predicted_bits_per_weight": round(total_bits / total_weights, 4),
            "predicted_error": float(sum(v["predicted_error"] for v in per_layer.values())),
            "per_layer": per_layer,
        }
        if tables or kept_tables:
            stats["tables"] = {table.name: widths[table.name] for table in tables + kept_tables}
        if sensitivities is not None:
            stats["sensitivity"] = sensitivities
        return PassResult(model, True, stats)

    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _one_per_weight(layers: list[_Layer]) -> tuple[list[_Layer], dict[int, list[Linear]]]:
        """Linears that read one weight (ALBERT's layers, DeBERTa's key projection of the hidden states and
        of the position embeddings) as one layer: its errors the sum of theirs, allocated and stored once.
        Returns the layers and, by the first reader's layer, the later readers (Convs stay apart)."""
        by_weight: dict[int, list[_Layer]] = {}
        for layer in layers:
            key = id(layer.linear.w) if isinstance(layer.linear, Linear) else id(layer)
            by_weight.setdefault(key, []).append(layer)
        merged, readers = [], {}
        for members in by_weight.values():
            first = members[0]
            if len(members) > 1:
                first = dataclasses.replace(
                    first, energy=sum(m.energy for m in members), fp16=np.logical_or.reduce([m.fp16 for m in members]),
                    errors={b: sum(m.errors[b] for m in members) for b in first.errors})
                readers[id(first)] = [m.linear for m in members[1:]]
            merged.append(first)
        return merged, readers

    @staticmethod
    def _joint_units(layers: list[_Layer], boosted: list[_Layer]) -> list[tuple[_Layer, list[_Layer]]]:
        """shared-input=joint: the linears that read one input (and are all boosted or all not) as one
        unit, in the order of their first member: a layer of K rows and their columns together,
        whose error per row and width is the sum of theirs (sensitivity factors applied) and whose
        activation outliers and sparse outliers are theirs. Conv kernels stay apart."""
        boosted_ids = {id(layer) for layer in boosted}
        groups: dict[tuple, list[_Layer]] = {}
        for layer in layers:
            joinable = not isinstance(layer.linear, ConvAsLinear)
            key = (id(layer.linear.x), layer.shape[0], id(layer) in boosted_ids) if joinable else (id(layer),)
            groups.setdefault(key, []).append(layer)
        units = []
        for members in groups.values():
            if len(members) == 1:
                units.append((members[0], members))
                continue
            first = members[0]
            joint = _Layer(first.linear, (first.shape[0], sum(m.shape[1] for m in members)), first.energy, first.fp16,
                           sum(m.sparse for m in members), {b: sum(m.errors[b] for m in members) for b in first.errors},
                           first.costs, first.group_size)
            units.append((joint, members))
        return units

    def _tables(self, graph: ir.Graph) -> list[_Table]:
        """embeddings=budget: every table `quantize-embedding` could store as codes, with its error
        model: at each width, the sum over its rows of p_v ||e_v - Q(e_v)||^2, the mean squared error
        of a looked-up row (the units of a linear's E-weighted error: the mean squared error of its
        output), p_v the frequency of row v among the calibration data's indices where the lookup
        reads a graph input, add-one smoothed (a row never seen may still be looked up), else 1/V."""
        from qcompiler.pipeline import context

        batches = context.current().require_calibration(self.name)
        found = []
        for node, table, reason in lookups(graph, TABLE_BLOCK):
            if reason:
                continue
            w = np.asarray(table.const_value.numpy(), np.float32)
            rows = w.shape[0]
            counts = np.ones(rows, np.float64)
            ids = node.inputs[1].name
            for batch in batches:
                if ids in batch:
                    seen = np.asarray(batch[ids]).reshape(-1)
                    counts += np.bincount(seen[(seen >= 0) & (seen < rows)], minlength=rows)
            p = counts / counts.sum()
            errors = {b: 0.0 for b in TABLE_WIDTHS}
            for start in range(0, rows, TABLE_ROWS_AT_ONCE):  # a 7B model's table is 131 M entries
                part = w[start:start + TABLE_ROWS_AT_ONCE]
                for b in TABLE_WIDTHS:
                    squared = np.sum((dequantized_table(part, b, TABLE_BLOCK) - part) ** 2, axis=1, dtype=np.float64)
                    errors[b] += float(p[start:start + len(part)] @ squared)
            found.append(_Table(node, table, tuple(w.shape), errors))
        return found

    def _allocate_with_tables(self, pools: list[tuple[list[_Layer], float]], tables: list[_Table],
                              least: list[str] | None = None) -> tuple[dict, dict]:
        """The layers' allocation, and each table's width (embeddings=budget). Each combination of
        widths of the `VARIED_TABLES` largest tables (smaller ones at 8 bits) moves every pool's
        average by what the tables store above or below avg-bits, spread over the layers' weights
        (the budget holds for tables and layers together); the layers are allocated at that average
        and the combination of least predicted error (layers' and tables') is kept."""
        if not tables:
            return {k: v for pool, avg_bits in pools for k, v in self._allocate(pool, avg_bits, least).items()}, {}
        import itertools

        layer_weights = sum(unit.size for pool, _ in pools for unit in pool)
        table_weights = sum(table.size for table in tables)
        varied = sorted(tables, key=lambda t: -t.size)[:VARIED_TABLES]
        best, best_error, reasons = None, None, []
        for chosen in itertools.product(TABLE_WIDTHS, repeat=len(varied)):
            widths = {t.name: TABLE_WIDTHS[-1] for t in tables} | {t.name: b for t, b in zip(varied, chosen)}
            left = self.avg_bits * table_weights - sum(t.stored_bits(widths[t.name]) for t in tables)
            shift = left / layer_weights if layer_weights else 0.0
            if not layer_weights and left < 0:
                reasons.append(f"the tables at {','.join(map(str, chosen))} bits store more than avg-bits")
                continue
            try:
                allocations = {k: v for pool, avg_bits in pools for k, v in self._allocate(pool, avg_bits + shift).items()}
            except UserError as exc:
                reasons.append(str(exc))
                continue
            error = (sum(self._predicted_error(unit, allocations[unit.linear.name]) for pool, _ in pools for unit in pool)
                     + sum(t.errors[widths[t.name]] for t in tables))
            if best_error is None or error < best_error:
                best, best_error = (allocations, widths), error
        if best is None:
            raise UserError(f"allocate-bits: avg-bits {self.avg_bits:g} cannot hold the embedding tables (at "
                            f"{TABLE_WIDTHS[0]} bits at least) and the layers together ({reasons[0]}); raise avg-bits or use embeddings=apart")
        return best

    def _record_table(self, graph: ir.Graph, table: _Table, bits: int) -> dict:
        """`qc.BitAllocation(table, bits)` in front of the lookup (`quantize-weights` stores it as codes)."""
        rows = table.shape[0]
        bits_value = new_initializer(graph, f"{table.table.name}.bits", np.full(rows, bits, np.uint8))
        node = ir.node(
            "BitAllocation", [table.table, bits_value],
            {"group_size": TABLE_BLOCK, "codebook": "uniform", "outliers_weight": 0.0, "zero_points": "integer"},
            domain="qc", name=f"{table.table.name}.allocation", metadata_props={CREATED_BY: self.name},
        )
        node.outputs[0].name = f"{table.table.name}.allocated"
        node.outputs[0].type = table.table.type
        node.outputs[0].shape = table.table.shape
        graph.insert_before(table.lookup, node)
        table.lookup.replace_input_with(0, node.outputs[0])
        stored = table.stored_bits(bits)
        return {"weight": table.table.name, "bits_histogram": {bits: rows}, "stored_bits": int(stored),
                "bits_per_weight": round(stored / table.size, 4), "predicted_error": table.errors[bits],
                "sparse_outliers": 0, "embedding": True}

    def _group_of(self, linear: Linear | ConvAsLinear, rows: int) -> int:
        """Rows per scale group: a Conv's rows are one group when fewer (its weight is not run packed); a linear
        of fewer rows than group-size (an ALBERT embedding projection, a ConvNeXt stage of 96) gets smaller groups."""
        return self.group_size if isinstance(linear, ConvAsLinear) else narrow_group(rows, self.group_size, self._costs.smallest_group)

    def _layer_costs(self, linear: Linear | ConvAsLinear) -> bitcost.StorageCost:
        """A Conv's weight is expanded at load whatever the target; a linear is priced by the target."""
        return bitcost.EXPANDED if isinstance(linear, ConvAsLinear) else self._costs

    def _prepare(self, linear: Linear | ConvAsLinear) -> _Layer:
        w = linear.w.const_value.numpy().astype(np.float32)
        k, n = w.shape
        conv = isinstance(linear, ConvAsLinear)
        group = self._group_of(linear, k)
        energy = activation_stats(linear.x, self.name, linear.name).mean_sq.astype(np.float64)
        if conv:
            energy = linear.row_energy(energy)
        fp16 = np.zeros(k, bool)
        count = int(round(self.outliers_act * k))
        if count:
            fp16[np.argsort(-energy, kind="stable")[:count]] = True
        errors = {b: energy * bitcost.minmax_grid_error(w, b, group, bitcost.zero_point_kind(b, self._zero_points))
                  for b in sorted(set(self.candidates))}
        sparse = int(round(self.outliers_weight * (k - count) * n))
        return _Layer(linear, w.shape, energy, fp16, sparse, errors, self._layer_costs(linear), group)

    def _measure_sensitivity(self, model: ir.Model, layers: list[_Layer], tables: list[_Table]) -> dict:
        """Scale each layer's error model so that it predicts the model's output error.

        The error model E_k ||w_k - Q_b(w_k)||^2 measures a layer's own output error; layers differ
        in how much of it reaches the model's outputs (a last projection to logits passes all of
        it, a block inside a residual stream a part). For each layer alone, its weight is replaced
        by its quantization at the reference width (the largest candidate at or below avg-bits) and
        the squared change of the graph outputs (`sensitivity=kl`: the mean KL divergence of the first
        output's softmax over its last axis) on the first calibration batch is measured (one
        ONNX Runtime session whose weights are inputs, one run per layer); the layer's errors are
        multiplied by measured / predicted, so the greedy step compares layers in output units.
        The measurements fan out on the compile's executor, one chunk of layers per worker
        (`measure_sensitivity`; in-process: one chunk, as one loop)."""
        import onnx

        from qcompiler.ir import to_proto
        from qcompiler.pipeline import context
        from qcompiler.support.parallel import chunks

        ctx = context.current()
        batch = dict(next(iter(ctx.require_calibration(self.name))))
        candidates = sorted(set(self.candidates))
        reference = max([b for b in candidates if b <= self.avg_bits] or candidates[:1])
        proto = to_proto(model)
        names = {layer.linear.w.name for layer in layers} | {table.table.name for table in tables}
        kept = [t for t in proto.graph.initializer if t.name not in names]
        weights = {}
        for value in [layer.linear.w for layer in layers] + [table.table for table in tables]:
            weights.setdefault(value.name, np.asarray(value.const_value.numpy(), np.float32))
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
        for name, w in weights.items():
            proto.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(w.shape)))
        shared = _SensitivityInputs(proto.SerializeToString(), batch, weights, ctx.threads, self.sensitivity == "kl",
                                    reference, {layer.linear.w.name: layer.group_size for layer in layers},
                                    bitcost.zero_point_kind(reference, self._zero_points),
                                    frozenset(table.table.name for table in tables))
        del proto
        measured_names = [layer.linear.w.name for layer in layers] + [table.table.name for table in tables]
        parts = chunks(measured_names, ctx.executor.workers)
        tasks = [f"allocate-bits sensitivity: layers {sum(map(len, parts[:i])) + 1}-{sum(map(len, parts[:i + 1]))} "
                 f"of {len(measured_names)} (from {part[0]})" for i, part in enumerate(parts)]
        measured = [m for part in ctx.executor.map(measure_sensitivity, parts, shared=shared, names=tasks) for m in part]
        per_layer = {}
        for layer, moved in zip(layers, measured):
            predicted = float(layer.errors[reference].sum()) if reference in layer.errors else 0.0
            factor = moved / predicted if predicted > 0 else 1.0
            for b in layer.errors:
                layer.errors[b] = layer.errors[b] * factor
            per_layer[layer.linear.name] = round(factor, 6)
        for table, moved in zip(tables, measured[len(layers):]):
            predicted = table.errors[TABLE_WIDTHS[0]]
            factor = moved / predicted if predicted > 0 else 1.0
            table.errors = {b: e * factor for b, e in table.errors.items()}
            per_layer[table.name] = round(factor, 6)
        return {"reference_bits": reference, "batch_rows": int(next(iter(batch.values())).shape[0]), "factor": per_layer}

    @property
    def _costs(self) -> bitcost.StorageCost:
        """The run's target cost model (the driver puts it in the context; ONNX Runtime's without one)."""
        from qcompiler.pipeline import context

        return context.current().cost_model or bitcost.ORT

    def _allocate(self, pool: list[_Layer], avg_bits: float, least: list[str] | None = None) -> dict[str, np.ndarray]:
        """Greedy allocation charging the exact stored bits of every step (see `_greedy`); with
        cost=latency, the class set chosen by `_fastest_for_error`. `least` (a list): a pool (a layer, or a
        conv net's kernels) the budget cannot hold is given its least storage instead of refused, and named there."""
        candidates = sorted(set(self.candidates))
        if least is not None:
            low, _ = self._feasible_range(pool, candidates)
            if avg_bits < low:  # small layers whose group metadata alone is over the budget: their cheapest storage
                least.append(f"{_described(pool)} at {low:.3f}")
                avg_bits = low * (1 + 1e-9)
        target = avg_bits * sum(layer.size for layer in pool)
        budget = target - sum(self._constants(layer) for layer in pool)
        if self.cost == "latency":
            return self._fastest_for_error(pool, budget, avg_bits, candidates)
        if self.codebook == "kmeans" and len(candidates) > 1:
            return self._least_error(pool, budget, avg_bits, candidates)
        return self._greedy(pool, budget, avg_bits, candidates)

    def _kernel_costs(self) -> bitcost.KernelCosts:
        costs = self._costs.kernel_costs
        if costs is None:
            raise UserError(f"allocate-bits: cost=latency needs a measured kernel-cost table and target "
                            f"'{self._costs.name}' has none; use cost=bits")
        return costs

    def _fastest_for_error(self, pool: list[_Layer], budget: float, avg_bits: float, candidates: list[int]) -> dict[str, np.ndarray]:
        """cost=latency: every non-empty subset of the candidates that can meet the budget is allocated
        by error per stored bit (`_greedy`, the same budget, so every allocation stores at most the same
        bits); the one with the least predicted error x predicted time (`_predicted_us`) is kept: a
        weighted term in relative units (1 % faster is worth 1 % more predicted error), so no constant
        converts seconds into error. A class costs its launch and time per weight, so a class set
        without a class whose few rows cost a whole launch, or without a slow width, wins when the
        error it adds is smaller than the time it saves. Ties keep the earlier subset (fewer classes,
        smaller widths first). A pool (scope=model) shares one class set."""
        table = self._kernel_costs()
        return self._best_class_set(pool, budget, avg_bits, candidates, lambda bits: (
            sum(self._predicted_error(layer, bits[layer.linear.name]) for layer in pool)
            * sum(self._predicted_us(layer, bits[layer.linear.name], table) for layer in pool)))

    def _least_error(self, pool: list[_Layer], budget: float, avg_bits: float, candidates: list[int]) -> dict[str, np.ndarray]:
        """codebook=kmeans: the greedy climbs one candidate at a time, and a codebook class's first row
        pays its whole table (N x 2^b fp16 centroids: 0.67 bits per weight at 4 bits for a layer of
        384 rows), so where the budget left cannot open the next class every upgrade into it is set
        aside and the wider classes behind it are never reached. Every non-empty subset of the
        candidates that can meet the budget is allocated (`_greedy`, the same budget) and the one with
        the least predicted error is kept, so a row can go from 2 bits to 8 past a 4-bit codebook the
        budget cannot pay for. Ties keep the earlier subset. A pool (scope=model) shares one class set."""
        return self._best_class_set(pool, budget, avg_bits, candidates, lambda bits: (
            sum(self._predicted_error(layer, bits[layer.linear.name]) for layer in pool)))

    def _best_class_set(self, pool: list[_Layer], budget: float, avg_bits: float, candidates: list[int], score) -> dict[str, np.ndarray]:
        """The `_greedy` allocation of the subset of the candidates with the least `score` (subsets in
        order of size, then of widths; those the budget does not allow skipped)."""
        import itertools

        best, best_score = None, None
        for size in range(1, len(candidates) + 1):
            for subset in itertools.combinations(candidates, size):
                try:
                    bits = self._greedy(pool, budget, avg_bits, list(subset))
                except UserError:  # the budget is outside what this subset allows
                    continue
                value = score(bits)
                if best_score is None or value < best_score:
                    best, best_score = bits, value
        if best is None:
            raise UserError(self._infeasible(pool, candidates, avg_bits))
        return best

    @staticmethod
    def _predicted_error(layer: _Layer, bits: np.ndarray) -> float:
        return sum(float(layer.errors[b][bits == b].sum()) for b in np.unique(bits).tolist() if b in layer.errors)

    def _predicted_us(self, layer: _Layer, bits: np.ndarray, table: bitcost.KernelCosts) -> float:
        """Predicted microseconds of the layer at M=1: every non-empty class's launch and time per weight."""
        n = layer.shape[1]
        codebook = self.codebook == "kmeans"
        return sum(table.class_us(layer.costs.route(bitcost.class_kind(b, codebook), b, self._zero_points), int(rows), n)
                   for b, rows in zip(*np.unique(bits, return_counts=True)))

    def _greedy(self, pool: list[_Layer], budget: float, avg_bits: float, candidates: list[int]) -> dict[str, np.ndarray]:
        """Every channel starts at the smallest candidate; upgrades are ranked by error reduction
        per stored bit (group metadata spread over a group's rows) and each is charged its exact
        cost: the bits the two classes store after the move minus before (a class's first rows pay
        a whole group's scales and zero points, a codebook class's first row its tables). An
        upgrade that does not fit is set aside and the next one tried, so the stored total never
        exceeds the budget; the set-aside ones are tried again (a few rounds) while moves that
        empty a group free bits for them."""
        bits = {layer.linear.name: np.full(layer.shape[0], candidates[0], np.uint8) for layer in pool}
        counts = []
        spent = 0.0
        for layer in pool:
            b = bits[layer.linear.name]
            b[layer.fp16] = bitcost.FP16
            counts.append({c: 0 for c in candidates} | {bitcost.FP16: int(layer.fp16.sum()), candidates[0]: int((~layer.fp16).sum())})
            spent += self._stored_bits(layer, b)
        if spent > budget:
            raise UserError(self._infeasible(pool, candidates, avg_bits))
        spent = self._climb(pool, bits, counts, self._upgrades(pool, bits, candidates), spent, budget, candidates)
        if any(self._in_blocks(layer) for layer in pool):
            left, moves = self._spend_in_blocks(pool, bits, counts, budget - spent, candidates)
            if moves:  # rows moved a block at a time (which may free bits): climb again, row by row
                self._climb(pool, bits, counts, self._upgrades(pool, bits, candidates), budget - left, budget, candidates)
        return bits

    def _upgrades(self, pool: list[_Layer], bits: dict[str, np.ndarray], candidates: list[int]) -> list:
        """The heap of every non-fp16 row's next upgrade from the width it has now."""
        heap = []
        for index, layer in enumerate(pool):
            b = bits[layer.linear.name]
            for k in np.flatnonzero(~layer.fp16):
                self._push(heap, layer, index, int(k), candidates.index(int(b[k])), candidates)
        return heap

    def _climb(self, pool: list[_Layer], bits: dict[str, np.ndarray], counts: list[dict], heap: list, spent: float,
               budget: float, candidates: list[int]) -> float:
        """Take the upgrades of `heap` best ratio first, each charged its exact cost, while the budget
        allows; returns the bits spent."""
        deferred = []
        for _ in range(REVISITS + 1):  # a move that empties a group frees bits: retry what did not fit
            taken = 0
            while heap:
                item = heapq.heappop(heap)
                _, index, k, level = item
                layer = pool[index]
                lo, hi = candidates[level], candidates[level + 1]
                count = counts[index]
                delta = (self._class_bits(layer, hi, count[hi] + 1) - self._class_bits(layer, hi, count[hi])
                         + self._class_bits(layer, lo, count[lo] - 1) - self._class_bits(layer, lo, count[lo]))
                if spent + delta > budget:
                    deferred.append(item)
                    continue
                spent += delta
                taken += 1
                count[lo] -= 1
                count[hi] += 1
                bits[layer.linear.name][k] = hi
                self._push(heap, layer, index, k, level + 1, candidates)
            if not taken or not deferred:
                break
            heap, deferred = deferred, []
            heapq.heapify(heap)
        return spent

    def _spend_in_blocks(self, pool: list[_Layer], bits: dict[str, np.ndarray], counts: list[dict], left: float,
                         candidates: list[int]) -> tuple[float, int]:
        """Layers priced in whole blocks: the row-by-row greedy stops where the next row would open a block it cannot
        pay for, although moving a block's worth of rows at once may free a block of the narrower
        class and cost less. While the budget left allows, the move of most error reduction per bit
        among "fill the wider class's last block (or one new block) with the best rows of the
        narrower one", over every layer and pair of neighbouring candidates, is taken. Returns the bits
        left and the number of moves taken."""
        moves = 0
        while True:
            best = None
            for index, layer in enumerate(pool):
                if not self._in_blocks(layer):
                    continue
                b, count = bits[layer.linear.name], counts[index]
                for lo, hi in zip(candidates, candidates[1:]):
                    rows = np.flatnonzero(b == lo)
                    if not len(rows):
                        continue
                    gains = layer.errors[lo][rows] - layer.errors[hi][rows]
                    take = min(len(rows), layer.group_size - count[hi] % layer.group_size)
                    best_rows = np.argsort(-gains, kind="stable")[:take]
                    chosen, gain = rows[best_rows], float(np.sum(gains[best_rows]))
                    delta = (self._class_bits(layer, hi, count[hi] + take) - self._class_bits(layer, hi, count[hi])
                             + self._class_bits(layer, lo, count[lo] - take) - self._class_bits(layer, lo, count[lo]))
                    if gain <= 0 or delta > left:
                        continue
                    ratio = gain / delta if delta > 0 else np.inf
                    if best is None or ratio > best[0]:
                        best = (ratio, index, lo, hi, chosen, delta)
            if best is None:
                return left, moves
            moves += 1
            _, index, lo, hi, chosen, delta = best
            bits[pool[index].linear.name][chosen] = hi
            counts[index][lo] -= len(chosen)
            counts[index][hi] += len(chosen)
            left -= delta

    def _constants(self, layer: _Layer) -> float:
        """The small constants the lowering stores per class (shapes, shifts, ranges)."""
        return (len(self.candidates) + 1) * 8 * LOWERING_BYTES_PER_CLASS

    def _class_bits(self, layer: _Layer, b: int, rows: int) -> int:
        n = layer.shape[1]
        kind = bitcost.class_kind(b, self.codebook == "kmeans")
        return layer.costs.class_bits(kind, b, rows, n, layer.group_size, self._zero_points, self._whole_blocks(layer))

    def _whole_blocks(self, layer: _Layer) -> bool:
        """Whether this layer's MatMulNBits classes are priced in whole blocks (`blocks`)."""
        if not layer.costs.holds_blocks:  # expanded at load (Conv kernels), or a target that stores codes tight
            return False
        return self.blocks == "whole" or (self.blocks == "auto" and layer.shape[0] >= WHOLE_BLOCKS_FROM * layer.group_size)

    def _in_blocks(self, layer: _Layer) -> bool:
        """Whether some class of this layer may be charged whole blocks: the layer is priced so, or it
        has rows for a class of `bitcost.STORED_WHOLE_FROM` blocks, which is stored so under any `blocks`."""
        return self._whole_blocks(layer) or (
            layer.costs.holds_blocks and bitcost.stored_in_whole_blocks(-(-layer.shape[0] // layer.group_size)))

    def _stored_bits(self, layer: _Layer, bits: np.ndarray) -> int:
        """Exact stored bits of one layer's allocation (classes, groups, codebooks, outliers, permutation)."""
        k, n = layer.shape
        classes = {int(b): int(c) for b, c in zip(*np.unique(bits, return_counts=True))}
        costs = layer.costs
        sparse = costs.sparse_bits(self.candidates, self.codebook == "kmeans", self._zero_points) * layer.sparse
        return costs.perm_bits * k + sparse + sum(self._class_bits(layer, b, rows) for b, rows in classes.items())

    def _row_bits(self, layer: _Layer, b: int) -> float:
        codebook = self.codebook == "kmeans" and b <= 4
        return layer.costs.per_row_bits(b, layer.shape[1], layer.group_size, codebook, self._zero_points)

    def _push(self, heap, layer: _Layer, index: int, k: int, level: int, candidates) -> None:
        if level + 1 >= len(candidates):
            return
        lo, hi = candidates[level], candidates[level + 1]
        gain = layer.errors[lo][k] - layer.errors[hi][k]
        cost = self._row_bits(layer, hi) - self._row_bits(layer, lo)
        ratio = gain / cost if cost > 0 else np.inf  # free in containers: 3 -> 4 bits costs nothing more
        heapq.heappush(heap, (-ratio, index, k, level))

    def _feasible_range(self, pool: list[_Layer], candidates) -> tuple[float, float]:
        """The least and most bits per weight the pool can store: every row at the narrowest candidate
        (activation outliers in fp16), and at the widest; group metadata and constants included."""
        low = high = 0.0
        for layer in pool:
            for b, side in ((candidates[0], "low"), (candidates[-1], "high")):
                stored = self._stored_bits(layer, np.where(layer.fp16, bitcost.FP16, b)) + self._constants(layer)
                if side == "low":
                    low += stored
                else:
                    high += stored
        total = sum(layer.size for layer in pool)
        return low / total, high / total

    def _infeasible(self, pool: list[_Layer], candidates, avg_bits: float) -> str:
        low, high = self._feasible_range(pool, candidates)
        where = f"layer {_described(pool)}" if len(pool) == 1 else "here"
        return (
            f"allocate-bits: avg-bits {avg_bits:g} is outside what candidates {','.join(map(str, candidates))} "
            f"and their metadata allow {where}: feasible {low:.3f} to {high:.3f}"
        )

    def _is_kept(self, linear: Linear | ConvAsLinear) -> bool:
        return self._matches(linear, self.keep)

    @classmethod
    def _matches(cls, linear: Linear | ConvAsLinear, patterns: tuple[str, ...]) -> bool:
        return cls._matches_name(linear.w.name, patterns)

    @staticmethod
    def _matches_name(name: str, patterns: tuple[str, ...]) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)

    def _check_keep_matches(self, found: list[Linear | ConvAsLinear], tables: list[_Table]) -> None:
        """Every keep pattern names a layer weight or (embeddings=budget) a table; every boost pattern a layer weight."""
        weights = [linear.w.name for linear in found]
        for key, patterns, names in (("keep", self.keep, weights + [t.table.name for t in tables]), ("boost", self.boost, weights)):
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                    raise UserError(f"allocate-bits: {key} pattern '{pattern}' matches no layer weight (weights are named "
                                    f"like: {', '.join(names[:3])})")

    def _record(self, graph: ir.Graph, layer: _Layer, bits: np.ndarray, outliers_weight: float) -> dict:
        linear = layer.linear
        bits_value = new_initializer(graph, f"{linear.w.name}.bits", bits.astype(np.uint8))
        node = ir.node(
            "BitAllocation", [linear.w, bits_value],
            {"group_size": layer.group_size, "codebook": self.codebook, "outliers_weight": float(outliers_weight),
             "zero_points": self._zero_points},
            domain="qc", name=f"{linear.w.name}.allocation", metadata_props={CREATED_BY: self.name},
        )
        node.outputs[0].name = f"{linear.w.name}.allocated"
        node.outputs[0].type = linear.w.type
        node.outputs[0].shape = linear.w.shape
        graph.insert_before(linear.node, node)
        linear.node.replace_input_with(linear.weight_index, node.outputs[0])
        k, n = layer.shape
        classes = {int(b): int(c) for b, c in zip(*np.unique(bits, return_counts=True))}
        stored = self._stored_bits(layer, bits)
        error = sum(float(layer.errors[b][bits == b].sum()) for b in classes if b in layer.errors)
        out = {"weight": linear.w.name, "bits_histogram": classes, "stored_bits": int(stored), "bits_per_weight": round(stored / (k * n), 4),
               "predicted_error": error, "sparse_outliers": layer.sparse}
        if layer.group_size != self.group_size:  # a layer of fewer rows than group-size
            out["group_size"] = layer.group_size
        if self.cost == "latency":
            out["predicted_us"] = round(self._predicted_us(layer, bits, self._kernel_costs()), 2)
        return out
