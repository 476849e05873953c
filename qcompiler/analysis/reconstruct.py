"""Block-wise reconstruction of quantized weights: what `flexround`, `tune-scales` and `gptq` share.

Blocks come from `qcompiler.analysis.blocks` (one transformer layer, a conv stage). Two streams of
activations are carried over the calibration batches, block by block:

- the float stream: the float model (each `qc.MixedMatMul` computed with the float weight that
  `quantize-weights` kept in the node's `meta`), whose block outputs are the targets;
- the quantized stream: the model with the already-learned preceding blocks, whose block inputs
  the learning sees (so each block also corrects the error that reaches it).

For each block, the parameters of its `qc.MixedMatMul` classes are learned with Adam to minimise
the mean squared error between the block's floating outputs on the quantized stream and the float
targets, one calibration batch per step in a fixed seeded order. Padding positions (where a 0/1
`attention_mask` input says so) are left out of the error: the model never reads them.

What is learned:

- `flexround` (Lee et al., ICML 2023), uniform classes: `W_hat = s1 * (clip(round(W / (s1 * S2 *
  s3 * s4) + z), 0, 2^b - 1) - z)` per group `s1` (the stored scale, learned), element-wise `S2`,
  row `s3` and column `s4`, all stored as logs and initialised at 0 (`s1` at the grid's scale);
  round with a straight-through estimator; the zero point `z` stays.
- `tune-scales` (PEQA style), uniform classes: codes frozen, `W_hat = s1 * (q - z)`, only `s1`, and
  `z` where it is a stored fp16 value (fractional zero points), as `z + delta`.
- codebook classes (both): codes frozen, entries learned (`entry + delta * step`, `step` the
  column's codebook range / 2^b).
- fp16 classes and sparse fp16 outliers are left as they are (exact already).

A pass may bring its own solver instead of Adam (`gptq` rounds row by row on the block's measured
inputs); the driver around it, the streams, the check and the write-back below, are the same.

After learning, the integers and fp16 scales are written back into the same `qc.MixedMatMul`
initializers (lowering is unchanged), the block loss is measured again with exactly the written
values, and a block whose loss did not improve keeps its round-to-nearest weights. Memory: the
activations at one block boundary for both streams, the block's float outputs where they are small
(`FloatTargets`; a model's logits are computed again when read), plus one block's parameters and
optimiser state.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.blocks import Block, find_blocks
from qcompiler.analysis.probe import leads_with_tokens, valid_positions
from qcompiler.dialect.mixed_ops import MixedMatMulView, is_mixed_matmul, mixed_weight, split_class_inputs
from qcompiler.dialect.ops import attributes_of
from qcompiler.dialect.qc_ops import quantize_activation
from qcompiler.errors import UserError
from qcompiler.ir.layers import set_constant
from qcompiler.ir.meta import FLOAT_BIAS_KEY, FLOAT_WEIGHT_KEY
from qcompiler.support import memory
from qcompiler.support.progress import progress

log = logging.getLogger(__name__)

HELD_TARGET_BYTES = 256 << 20  # a block's float targets over all batches held up to this size, or more (below), else recomputed when read
HELD_TARGET_SHARE = 8  # ... up to this fraction (1/8) of the memory available when the block starts, where that is more
LEARNED_MODES = ("flexround", "scales")  # modes whose parameters Adam learns; others solve a block their own way


@dataclasses.dataclass
class Options:
    mode: str  # "flexround" or "scales" (learned with Adam), or a solver's own name
    steps: int
    lr: float
    seed: int
    time_budget: float  # seconds for the whole pass; 0: no limit
    regions: int
    pass_name: str
    batch: int = 1
    loss: str = "mse"  # "mse", or "kl": the first output's softmax against the float model's (whole-model block)
    grids: bool = True  # learn the scales of the block's static int8 activation grids (Adam modes)
    tile: int = 0  # learn on tile x tile spatial crops of 4-D/5-D image inputs (0: whole inputs)
    margin: int = 0  # with tile: a border of this many input pixels left out of the loss (scaled to each output's size)
    holdout: int = 0  # Adam modes: learn on all but every holdout-th batch, keep the parameters of least loss on those (0: off)
    compute: str = "fp32"  # Adam modes: the learning steps' matrix products in float32, or bfloat16 (torch's CPU autocast)
    schedule: str = "constant"  # Adam modes: the learning rate lr throughout, or "cosine": from lr decaying along half a cosine toward 0


class _Layer:
    """One qc.MixedMatMul: its float weight, its classes and their learnable parameters."""

    def __init__(self, node: ir.Node, mode: str, compute: str = "fp32"):
        import torch

        self.node, self.mode = node, mode
        self.dtype = torch.bfloat16 if compute == "bf16" else torch.float32  # of the weight a learning step builds
        self.name = node.name or node.outputs[0].name
        a = attributes_of(node)
        self.kinds, self.bits, self.sizes = list(a["kinds"]), list(a["bits"]), list(a["sizes"])
        self.group_size, self.sparse = int(a["group_size"]), int(a["sparse"])
        view = MixedMatMulView.of(node)
        w = np.asarray(node.meta[FLOAT_WEIGHT_KEY].numpy(), np.float32)[view.perm_array()]
        self.w = torch.from_numpy(np.ascontiguousarray(w))
        self.class_values = list(node.inputs[2:])
        self.originals = [v.const_value.numpy().copy() for v in self.class_values]
        self.params: list = []
        self.classes = []
        read, outliers = self.split(self.originals)
        for c in read:
            entry = {"kind": c.kind, "index": c.slot, "rows": slice(c.start, c.stop), "bits": c.bits}
            if mode in LEARNED_MODES:  # a solver of its own reads the stored arrays instead
                entry.update(self._learnable(c))
            self.classes.append(entry)
        if outliers is not None:
            idx = outliers[0].astype(np.int64)
            self.sparse_index = (torch.from_numpy(idx[:, 0]), torch.from_numpy(idx[:, 1]))
            self.sparse_values = torch.from_numpy(outliers[1].astype(np.float32))

    def _learnable(self, c) -> dict:
        """One class's values as tensors, and its parameters (added to `params`) for the Adam modes."""
        import torch

        mode, arrays, out = self.mode, c.inputs, {}
        if c.kind == "uniform":
            scale, zero = (torch.from_numpy(np.asarray(x, np.float32)) for x in arrays[1:3])
            groups = torch.arange(c.stop - c.start) // self.group_size
            out.update(scale=scale, zero=zero, groups=groups, levels=(1 << c.bits) - 1)
            if mode == "scales":  # flexround rounds the float weight again instead
                out["codes"] = torch.from_numpy(np.asarray(arrays[0], np.float32))
            out["log_s1"] = torch.zeros_like(scale, requires_grad=True)
            self.params.append(out["log_s1"])
            if mode == "scales" and arrays[2].dtype == np.float16:  # fractional zero points are stored values too
                out["zero_delta"] = torch.zeros_like(zero, requires_grad=True)
                self.params.append(out["zero_delta"])
            elif mode == "scales":  # codes and integer zero points frozen: q - z once (small integers, exact in bfloat16)
                out["centered"] = (out.pop("codes") - zero[groups]).to(self.dtype)
            if mode == "flexround":
                k, n = arrays[0].shape
                out["log_s2"] = torch.zeros((k, n), requires_grad=True)
                out["log_s3"] = torch.zeros((k, 1), requires_grad=True)
                out["log_s4"] = torch.zeros((1, n), requires_grad=True)
                self.params += [out["log_s2"], out["log_s3"], out["log_s4"]]
        elif c.kind == "codebook":
            codes, book = arrays
            book_t = torch.from_numpy(np.asarray(book, np.float32))
            n, size = book_t.shape
            step = (book_t.amax(1, keepdim=True) - book_t.amin(1, keepdim=True)).clamp_min(1e-8) / size
            flat = torch.from_numpy(codes.astype(np.int64)) + torch.arange(n)[None, :] * size
            out.update(book=book_t, step=step, flat=flat, delta=torch.zeros_like(book_t, requires_grad=True))
            self.params.append(out["delta"])
        else:
            out["w16"] = torch.from_numpy(np.asarray(arrays[0], np.float32))
        return out

    # -- weights ---------------------------------------------------------------------------------

    def learned_weight(self):
        import torch

        blocks = []
        for c in self.classes:
            if "centered" in c:  # tune-scales, integer zero points: (q - z) * s, in the step's precision
                blocks.append(self._scaled(c["centered"], (c["scale"] * torch.exp(c["log_s1"])).to(self.dtype)))
            elif c["kind"] == "uniform" and self.mode == "scales":  # fractional zero points, learned too
                blocks.append(self._scaled(c["codes"], c["scale"] * torch.exp(c["log_s1"]), c["zero"] + c["zero_delta"]))
            elif c["kind"] == "uniform":
                g = c["groups"]
                s = (c["scale"] * torch.exp(c["log_s1"]))[g]
                z = (c["zero"] + c["zero_delta"])[g] if "zero_delta" in c else c["zero"][g]
                if self.mode == "flexround":
                    div = s * torch.exp(c["log_s2"] + c["log_s3"] + c["log_s4"])
                    x = self.w[c["rows"]] / div + z
                    q = torch.clamp(x + (torch.round(x) - x).detach(), 0, c["levels"])
                else:
                    q = c["codes"]
                blocks.append((q - z) * s)
            elif c["kind"] == "codebook":
                book = c["book"] + c["delta"] * c["step"]
                blocks.append(book.reshape(-1)[c["flat"]])
            else:
                blocks.append(c["w16"])
        w = torch.cat([block.to(self.dtype) for block in blocks], 0)
        if self.sparse:
            w = w.index_put(self.sparse_index, self.sparse_values.to(w.dtype))
        return w

    def _scaled(self, q, s, z=None):
        """Rows `q` [K_c, N] less their group's zero point (`z`, where given) times their group's scale
        (`s` and `z` [ceil(K_c / group), N]): each whole group and the partial last one broadcast,
        without gathering a per-row copy of the scales (whose backward, an indexed accumulation, cost
        a step more than its products)."""
        import torch

        k, n = q.shape
        whole = k // self.group_size * self.group_size
        groups = whole // self.group_size
        parts = []
        if whole:
            grouped = q[:whole].view(groups, self.group_size, n)
            if z is not None:
                grouped = grouped - z[:groups, None, :]
            parts.append((grouped * s[:groups, None, :]).view(whole, n))
        if whole < k:
            tail = q[whole:] if z is None else q[whole:] - z[groups]
            parts.append(tail * s[groups])
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    def stored_arrays(self) -> list[np.ndarray]:
        """The class inputs with the learned values, at their stored precision."""
        import torch

        arrays = [a.copy() for a in self.originals]
        with torch.no_grad():
            for c in self.classes:
                i = c["index"]
                if c["kind"] == "uniform":
                    s = (c["scale"] * torch.exp(c["log_s1"])).numpy()
                    with np.errstate(over="ignore"):
                        s16 = s.astype(np.float16)
                    bad = ~np.isfinite(s16) | (s16 == 0)  # out of fp16's range: keep the grid's scale (symmetric grids' may be negative)
                    s16[bad] = arrays[i + 1][bad]
                    arrays[i + 1] = s16
                    if "zero_delta" in c:
                        arrays[i + 2] = (c["zero"] + c["zero_delta"]).numpy().astype(np.float16)
                    if self.mode == "flexround":
                        g = c["groups"]
                        srow = torch.from_numpy(s16.astype(np.float32))[g]
                        div = srow * torch.exp(c["log_s2"] + c["log_s3"] + c["log_s4"])
                        q = torch.clamp(torch.round(self.w[c["rows"]] / div + c["zero"][g]), 0, c["levels"])
                        arrays[i] = q.numpy().astype(np.uint8)
                elif c["kind"] == "codebook":
                    arrays[i + 1] = (c["book"] + c["delta"] * c["step"]).numpy().astype(np.float16)
        return arrays

    def reference_weight(self, arrays: list[np.ndarray]):
        """The weight the numpy reference (and the lowering) computes from `arrays`."""
        import torch

        return torch.from_numpy(mixed_weight(*self.split(arrays), self.group_size))

    def split(self, arrays: list[np.ndarray]):
        """The class inputs `arrays` (laid out as the op's inputs after X and perm) by role."""
        return split_class_inputs(arrays, self.kinds, self.bits, self.sizes, self.sparse)

    def write(self, graph: ir.Graph, arrays: list[np.ndarray]) -> None:
        _write_changed(graph, self, arrays)

    def counts(self) -> dict[str, int]:
        out = {"uniform": 0, "codebook": 0, "fp16": 0}
        for c in self.classes:
            out[c["kind"]] += 1
        return out


def _write_changed(graph: ir.Graph, layer, arrays: list[np.ndarray]) -> None:
    """Write back each of a layer's stored arrays that learning changed (the op's inputs, in place)."""
    for value, array, original in zip(layer.class_values, arrays, layer.originals):
        if not np.array_equal(array, original):
            set_constant(graph, value, array, layer.node, "learned")


def is_int8_weight(node: ir.Node) -> bool:
    """A `qc.DequantizeWeight` (`quantize`'s int8 weight, symmetric, one scale per output channel)."""
    return node.domain == "qc" and node.op_type == "DequantizeWeight"


class _Int8Layer:
    """One `qc.DequantizeWeight` (int8 codes, a scale per output channel; `quantize`): its float weight
    and learnable parameters. FlexRound on a per-channel grid: `W_hat = s1 * clip(round(W / (s1 * S2 *
    s4)), -127, 127)` with `s1` the channel's scale (learned), `S2` element-wise and `s4` per input
    channel (the row factor `s3` of a group grid is `s1` itself here); `tune-scales`: the codes
    frozen, `s1` learned."""

    sparse = 0

    def __init__(self, node: ir.Node, mode: str):
        import torch

        self.node, self.mode = node, mode
        self.name = node.name or node.outputs[0].name
        a = attributes_of(node)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            raise UserError(f"learned rounding: '{self.name}' has a zero point; only quantize's symmetric int8 weights are learned")
        self.levels = (1 << (int(a["bits"]) - 1)) - 1
        w = np.asarray(node.meta[FLOAT_WEIGHT_KEY].numpy(), np.float32)
        self.axis = int(a["axis"]) % w.ndim
        self.w = torch.from_numpy(np.ascontiguousarray(w))
        self.class_values = list(node.inputs[:2])
        self.originals = [v.const_value.numpy().copy() for v in self.class_values]
        shape = [1] * w.ndim
        shape[self.axis] = -1
        self.shape = shape
        self.codes = torch.from_numpy(self.originals[0].astype(np.float32))
        self.scale = torch.from_numpy(self.originals[1].astype(np.float32))
        self.params: list = []
        if mode in LEARNED_MODES:
            self.log_s1 = torch.zeros_like(self.scale, requires_grad=True)
            self.params.append(self.log_s1)
        if mode == "flexround":
            self.log_s2 = torch.zeros_like(self.w, requires_grad=True)
            inputs = [1] * w.ndim
            inputs[1 if self.axis == 0 else 0] = -1  # the input-channel axis: Conv [O, C, ...], MatMul [K, N]
            self.log_s4 = torch.zeros(w.shape[1 if self.axis == 0 else 0]).reshape(inputs).requires_grad_(True)
            self.params += [self.log_s2, self.log_s4]

    def _s1(self):
        import torch

        return (self.scale * torch.exp(self.log_s1)).reshape(self.shape)

    def learned_weight(self):
        import torch

        s = self._s1()
        if self.mode == "flexround":
            x = self.w / (s * torch.exp(self.log_s2 + self.log_s4))
            q = torch.clamp(x + (torch.round(x) - x).detach(), -self.levels, self.levels)
        else:
            q = self.codes
        return q * s

    def stored_arrays(self) -> list[np.ndarray]:
        """The codes and scales with the learned values (int8, float32)."""
        import torch

        if self.mode not in LEARNED_MODES:
            return [a.copy() for a in self.originals]
        with torch.no_grad():
            s = self._s1()
            scale = s.reshape(-1).numpy().astype(np.float32)
            bad = ~np.isfinite(scale) | (scale <= 0)
            scale[bad] = self.originals[1][bad]
            codes = self.originals[0]
            if self.mode == "flexround":
                s = torch.from_numpy(scale).reshape(self.shape)
                q = torch.clamp(torch.round(self.w / (s * torch.exp(self.log_s2 + self.log_s4))), -self.levels, self.levels)
                codes = q.numpy().astype(np.int8)
        return [codes, scale]

    def reference_weight(self, arrays: list[np.ndarray]):
        import torch

        codes, scale = arrays
        return torch.from_numpy(codes.astype(np.float32) * scale.astype(np.float32).reshape(self.shape))

    def write(self, graph: ir.Graph, arrays: list[np.ndarray]) -> None:
        _write_changed(graph, self, arrays)

    def counts(self) -> dict[str, int]:
        return {"uniform": 1, "codebook": 0, "fp16": 0}


class _ActivationGrids:
    """The static int8 grids (`qc.QuantizeActivation`, per tensor) of one block: applied with a
    straight-through round on the quantized stream, and, when learned, each scale as `scale *
    exp(t)` with `t` learned (the zero point stays), as LSQ (Esser et al., ICLR 2020) learns a step size."""

    def __init__(self, nodes: list[ir.Node], learn: bool):
        import torch

        self.nodes = [n for n in nodes if n.domain == "qc" and n.op_type == "QuantizeActivation"]
        self.stored = {id(n): attributes_of(n) for n in self.nodes}
        self.log_scale = {id(n): torch.zeros((), requires_grad=True) for n in self.nodes
                          if learn and self.stored[id(n)]["mode"] == "static"}
        self.params = list(self.log_scale.values())

    def quantize(self, scales: dict | None = None):
        """`quantize(node, x)` for `run_nodes`: the learned scales (`scales` None) or the given ones."""
        import torch

        def apply(node, x):
            a = self.stored[id(node)]
            x = x.float()  # the grid in float32 (a bfloat16 step's products arrive in bfloat16)
            if a["mode"] != "static":
                y = torch.from_numpy(quantize_activation(x.detach().numpy(), a["mode"], bits=a["bits"]))
                return x + (y - x).detach()
            lo, hi = -(1 << (a["bits"] - 1)), (1 << (a["bits"] - 1)) - 1
            if scales is not None:
                s = torch.tensor(scales.get(id(node), a["scale"]), dtype=torch.float32)
            elif id(node) in self.log_scale:
                s = a["scale"] * torch.exp(self.log_scale[id(node)])
            else:
                s = torch.tensor(a["scale"], dtype=torch.float32)
            z = float(a["zero_point"])
            v = x / s
            q = torch.clamp(v + (torch.round(v) - v).detach() + z, lo, hi)
            return (q - z) * s

        return apply

    def learned_scales(self) -> dict[int, float]:
        """The learned scales as stored (float32), where learned and positive."""
        out = {}
        for node in self.nodes:
            t = self.log_scale.get(id(node))
            if t is None:
                continue
            s = float(np.float32(self.stored[id(node)]["scale"] * float(np.exp(float(t.detach())))))
            if np.isfinite(s) and s > 0 and s != self.stored[id(node)]["scale"]:
                out[id(node)] = s
        return out

    def write(self, scales: dict[int, float]) -> None:
        for node in self.nodes:
            if id(node) in scales:
                node.attributes["scale"] = ir.AttrFloat32("scale", scales[id(node)])


def _mse(outputs: dict, targets: dict, names: list[str], valid=None):
    """Sum over `names` of each float output's mean squared error; over the token positions in
    `valid` (a [batch, sequence] bool tensor) for outputs of one feature vector a position (`leads_with_tokens`)."""
    import torch

    total = None
    for name in names:
        y, t = outputs[name], targets[name]
        if not t.is_floating_point():
            continue
        if leads_with_tokens(t.shape, valid):
            y, t = y[valid], t[valid]
        term = torch.nn.functional.mse_loss(y, t)  # one temporary the size of y (a model's logits can be 0.2 GB a batch)
        total = term if total is None else total + term
    return total


def _kl(outputs: dict, targets: dict, names: list[str], valid=None):
    """Mean KL divergence KL(p || q) of the softmax over the last axis of the first output in
    `names`, p from the float targets, q from the outputs, over the `valid` positions."""
    import torch

    name = next(n for n in names if targets[n].is_floating_point())
    y, t = outputs[name], targets[name]
    if leads_with_tokens(t.shape, valid):
        y, t = y[valid], t[valid]
    log_p, log_q = torch.log_softmax(t, -1), torch.log_softmax(y, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


LOSSES = {"mse": _mse, "kl": _kl}


def _learned_blocks(graph: ir.Graph, opts: Options) -> tuple[list[Block], list[ir.Node]]:
    """The blocks up to the last that holds a layer to learn, and those layers. int8 weights (quantize)
    are learned by the Adam modes; a solver of its own (gptq) rounds mixed layers only."""
    blocks = find_blocks(graph, opts.regions)
    learned = [n for b in blocks for n in b.nodes if (is_mixed_matmul(n) or (is_int8_weight(n) and opts.mode in LEARNED_MODES))
               and not _stores_shared(n)]
    ids = {id(n) for n in learned}
    last = max((b.index for b in blocks if any(id(n) in ids for n in b.nodes)), default=-1)
    return blocks[: last + 1], learned


def _stores_shared(node: ir.Node) -> bool:
    """Whether a layer's stored arrays are read by another layer too (one weight read by several linears,
    stored once): what is learned for one reader would not fit the others, so such layers keep their values."""
    return any(v is not None and v.const_value is not None and any(use.node is not node for use in v.uses())
               for v in node.inputs[1:])


def unsupported_block_ops(model: ir.Model, opts: Options) -> list[str]:
    """The ops of the blocks `reconstruct` would run that the block interpreter has no rule for (sorted;
    empty: it can run them), so that a pass can step aside before it starts."""
    from qcompiler.analysis.torch_exec import unsupported_ops

    blocks, _ = _learned_blocks(model.graph, opts)
    return unsupported_ops([n for b in blocks for n in b.nodes])


def reconstruct(model: ir.Model, opts: Options, calibration, threads: int | None = None,
                solve: Callable[[BlockProblem], tuple[dict, int]] | None = None) -> dict:
    """Run `solve` (default: `learn_with_adam`) on each block that holds a qc.MixedMatMul, on the
    quantized stream of the `calibration` batches; keep what it returns where it lowers the block's
    error. `threads`: torch's thread count while learning (None: torch's default)."""
    import torch

    from qcompiler.analysis.torch_exec import Constants, run_nodes, unsupported_ops

    graph = model.graph
    batches = list(calibration)
    if opts.tile:
        _check_tile(graph, opts)
        batches = [_tiled(b, opts.tile) for b in batches]
    blocks, mixed = _learned_blocks(graph, opts)
    if not mixed:
        return {"blocks": len(find_blocks(graph, opts.regions)), "layers": 0,
                "note": "no qc.MixedMatMul or qc.DequantizeWeight to learn (run quantize-weights or quantize first)"}
    for node in mixed:
        if FLOAT_WEIGHT_KEY not in node.meta:
            raise UserError(
                f"{opts.pass_name}: layer '{node.name}' has no float weight to compare its block with (the float "
                f"reference lives in memory only); run {opts.pass_name} in the same pipeline as quantize-weights or quantize"
            )
    learned_ids = {id(n) for n in mixed}
    missing = unsupported_ops([n for b in blocks for n in b.nodes])
    if missing:  # before any block is learned
        raise UserError(f"{opts.pass_name}: the block interpreter cannot run {', '.join(missing)} in this model; "
                        f"leave {opts.pass_name} out of the pipeline")

    rng = np.random.default_rng(opts.seed)
    constants = Constants()
    per_block, totals = [], {"uniform": 0, "codebook": 0, "fp16": 0, "sparse_outliers": 0}
    # live activations per batch, by value name, for both streams
    rebatched = _rebatch(batches, opts.batch)
    env_f = [{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()} for b in rebatched]
    valid = [_token_positions(b) for b in rebatched]
    env_q = [dict(e) for e in env_f]
    needed_after = _last_uses(blocks)
    total_steps = sum(opts.steps for b in blocks if any(id(n) in learned_ids for n in b.nodes))

    threads_before = torch.get_num_threads()
    deterministic_before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    # with more than one thread some CPU kernels otherwise sum in a run-dependent order, and the
    # learned rounding (a long chain of steps) would differ from run to run
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(opts.seed)
    start_all = time.perf_counter()
    try:
        with progress(f"{opts.pass_name} ({len(blocks)} blocks)", total_steps) as bar:
            for block in blocks:
                layers = [_Layer(n, opts.mode, opts.compute) if is_mixed_matmul(n) else _Int8Layer(n, opts.mode)
                          for n in block.nodes if id(n) in learned_ids]
                float_w = {id(l.node): l.w for l in layers}
                keep = needed_after[block.index]
                record = _learn_block(block, layers, float_w, env_f, env_q, valid, constants, opts, rng, bar,
                                      start_all, len(blocks) - block.index, run_nodes, graph, keep, not per_block,
                                      solve or learn_with_adam)
                if record is not None:
                    per_block.append(record)
                    log.info("%s block %d/%d: loss %.4g -> %.4g (%s), %d steps, %.1f s", opts.pass_name, block.index + 1,
                             len(blocks), record["loss_before"], record["loss_after"], record["kept"], record["steps"],
                             record["seconds"])
                    for l in layers:
                        for k, v in l.counts().items():
                            totals[k] += v
                        totals["sparse_outliers"] += int(l.sparse_values.numel()) if l.sparse else 0
                for envs in (env_f, env_q):
                    for e in envs:
                        for name in [k for k in e if k not in keep]:
                            del e[name]
                constants.cache.clear()
                memory.return_freed()  # the block's weights, targets and temporaries: their pages too
    finally:
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(deterministic_before[0], warn_only=deterministic_before[1])
    learned = [r for r in per_block if r["kept"] == "learned"]
    return {
        "mode": opts.mode,
        **({"compute": opts.compute} if opts.mode in LEARNED_MODES else {}),
        "blocks": len(per_block),
        "blocks_improved": len(learned),
        "layers": len(mixed),
        "activation_grids_learned": sum(r.get("activation_grids_learned", 0) for r in per_block),
        "classes": {"uniform_learned": totals["uniform"],
                    "codebook_entries_tuned": totals["codebook"],
                    "fp16_left": totals["fp16"]},
        "sparse_outliers_left": totals["sparse_outliers"],
        "loss_before": float(sum(r["loss_before"] for r in per_block)),
        "loss_after": float(sum(r["loss_after"] for r in per_block)),
        "seconds": round(time.perf_counter() - start_all, 2),
        "per_block": per_block,
    }


@dataclasses.dataclass
class BlockProblem:
    """What a solver sees of one block: its layers, its inputs on the quantized stream and the float
    targets, per batch, and how to run it. A solver returns ({id(layer.node): stored arrays}, steps)."""

    layers: list  # _Layer (a qc.MixedMatMul) or _Int8Layer (a qc.DequantizeWeight)
    grids: _ActivationGrids  # the block's int8 activation grids; forward and run_all apply them as learned
    env_q: list[dict]  # the block's inputs on the quantized stream, per batch
    targets: FloatTargets  # the float block's outputs, per batch
    valid: list  # per batch: the non-padding positions, or None
    loss_names: list[str]
    loss: Callable  # loss(outputs, targets, valid) -> the block's loss (the interior of tiles only)
    forward: Callable  # forward(env, weight_of) -> the block's outputs
    run_all: Callable  # run_all(env, weight_of, wanted=None) -> every value the block computes (or those wanted)
    float_weight: Callable  # node -> its float weight (a quantized table: the float table, for the targets)
    stored_weight: Callable  # node -> what the quantized stream computes with where nothing is learned (a table: as stored)
    opts: Options
    rng: np.random.Generator
    bar: object
    start_all: float  # when the pass started (perf_counter)
    t_start: float  # when this block started
    t_block: float  # when this block's learning could start (targets and loss before done)
    blocks_left: int
    first: bool  # the first block learned
    held_out: dict | None = None  # with opts.holdout: the held-out batches, the step kept, the loss at each check


def learn_with_adam(problem: BlockProblem) -> tuple[dict, int]:
    """The layers' parameters learned with Adam against the block's float outputs (flexround, tune-scales).
    With `opts.holdout` N (and N or more batches) every N-th batch is held out of the steps: its loss is
    measured before learning and every `HOLDOUT_CHECKS`-th of the steps, and the parameters where it was
    least are the ones returned (the starting ones where no step lowered it)."""
    opts, layers, env_q, bar = problem.opts, problem.layers, problem.env_q, problem.bar
    params = [p for l in layers for p in l.params] + problem.grids.params
    steps = 0
    if params:
        optimizer = _Adam(params, opts.lr)
        learned = {}
        weight_of = lambda node: learned[id(node)] if id(node) in learned else problem.stored_weight(node)  # noqa: E731
        held = held_out_batches(len(env_q), opts.holdout)
        fitting = [b for b in range(len(env_q)) if b not in held]
        best = _HeldOutBest(problem, layers, params, held, learned, weight_of)
        check_every = max(1, opts.steps // HOLDOUT_CHECKS)
        allotted = None
        if opts.time_budget:
            # this block's even share of what was left when it started, less what it has spent
            # (float targets, loss before) and the evaluation after learning (about the one before)
            share = (opts.time_budget - (problem.t_start - problem.start_all)) / problem.blocks_left
            allotted = share - (time.perf_counter() - problem.t_start) - (time.perf_counter() - problem.t_block)
        order = []
        t_learn = time.perf_counter()
        for step in range(opts.steps):
            if not order:
                order = [fitting[i] for i in problem.rng.permutation(len(fitting))]
            b = order.pop()
            optimizer.lr = scheduled_lr(opts, step)
            optimizer.zero_grad()
            for l in layers:
                learned[id(l.node)] = l.learned_weight()
            loss = _step_loss(problem, b, weight_of)
            loss.backward()
            optimizer.step()
            steps += 1
            bar.update()
            if held and (steps % check_every == 0 or steps == opts.steps):
                best.measure(steps)
            if opts.time_budget:
                if problem.first and step == 0 and time.perf_counter() - problem.start_all > opts.time_budget:
                    raise UserError(
                        f"{opts.pass_name}: time-budget={opts.time_budget:g} s is shorter than one learning step "
                        f"({time.perf_counter() - problem.start_all:.1f} s so far on block 0); raise time-budget, or 0 for no limit"
                    )
                if time.perf_counter() - t_learn > allotted:
                    bar.update(bar.done + opts.steps - steps)
                    break
        log.debug("%s: %d learning steps in %.1f s (compute=%s)", opts.pass_name, steps, time.perf_counter() - t_learn, opts.compute)
        if held:
            best.restore()
        learned.clear()
    return {id(l.node): l.stored_arrays() for l in layers}, steps


def scheduled_lr(opts: Options, step: int) -> float:
    """The learning rate of step `step` (from 0) of `opts.steps`: `opts.lr`, or with the cosine schedule
    lr * (1 + cos(pi * step / steps)) / 2, lr at the first step and near 0 at the last."""
    if opts.schedule == "constant":
        return opts.lr
    return opts.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(opts.steps, 1)))


def _step_loss(problem: BlockProblem, b: int, weight_of):
    """The block's loss on batch `b` as a learning step computes it (in `opts.compute`'s precision)."""
    with _step_precision(problem.opts.compute):
        outputs = problem.forward(problem.env_q[b], weight_of)
    return problem.loss(_as_float32(outputs), problem.targets[b], problem.valid[b])


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (x86 AVX-512 BF16 or AMX, Arm's BF16 extension;
    Linux /proc/cpuinfo flags), where torch's bfloat16 matrix products run several times faster than
    float32's. Elsewhere torch emulates them, slower than float32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def step_compute(compute: str) -> str:
    """A pass's `compute` option as the learning runs it: `auto` is bf16 on a CPU with native bfloat16
    products, fp32 elsewhere."""
    if compute == "auto":
        return "bf16" if native_bf16() else "fp32"
    return compute


def _step_precision(compute: str):
    """The context a learning step's forward runs in: as it is (fp32), or torch's CPU autocast to
    bfloat16 (bf16: matrix products and convolutions in bfloat16, accumulated in float32; the
    gradients flow back through the same casts). Only the steps: the losses that decide what is
    kept, and the targets, stay in float32."""
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if compute == "bf16" else contextlib.nullcontext()


def _as_float32(outputs: dict) -> dict:
    """A block's outputs in float32 (those a bf16 step computed in bfloat16), for the loss."""
    import torch

    return {k: v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 else v for k, v in outputs.items()}


HOLDOUT_CHECKS = 8  # held-out loss measurements over a learning run (besides the one before it)


def held_out_batches(count: int, every: int) -> list[int]:
    """The batches held out of learning: every `every`-th of `count` (none when `every` is 0 or there are fewer)."""
    return [b for b in range(every - 1, count, every)] if every and count >= every else []


class _HeldOutBest:
    """The parameters at the least loss on the held-out batches seen so far, and at which step."""

    def __init__(self, problem: BlockProblem, layers, params, held: list[int], learned: dict, weight_of):
        self.problem, self.layers, self.params, self.held = problem, layers, params, held
        self.learned, self.weight_of = learned, weight_of
        self.loss, self.values, self.step, self.losses = None, None, 0, []
        if held:
            self.measure(0)

    def measure(self, step: int) -> None:
        import torch

        p = self.problem
        with torch.no_grad():  # in float32, as every loss that decides what is kept
            for l in self.layers:
                self.learned[id(l.node)] = l.learned_weight().float()
            loss = float(sum(p.loss(p.forward(p.env_q[b], self.weight_of), p.targets[b], p.valid[b]) for b in self.held))
        self.losses.append((step, loss))
        if self.loss is None or loss < self.loss:
            self.loss, self.step, self.values = loss, step, [t.detach().clone() for t in self.params]

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            for t, v in zip(self.params, self.values):
                t.copy_(v)
        self.problem.held_out = {"batches": self.held, "best_step": self.step,
                                 "losses": [[s, round(v, 6)] for s, v in self.losses]}


class _Adam:
    """Adam (Kingma and Ba, 2015) with the usual constants, written out: torch.optim's first use
    imports its compiler stack, which costs more than learning a small block."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps=1e-8):
        import torch

        self.params, self.lr, self.betas, self.eps, self.t = params, lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        import torch

        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v):
                if p.grad is None:
                    continue
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)


def _rebatch(batches, size: int) -> list[dict[str, np.ndarray]]:
    """The calibration batches split into batches of at most `size` samples (first axis of every
    input), so that one learning step sees `size` samples; samples of different batches are never
    mixed (their padded lengths may differ)."""
    out = []
    for b in batches:
        arrays = {k: np.asarray(v) for k, v in b.items()}
        count = min(a.shape[0] for a in arrays.values()) if arrays else 0
        out += [{k: a[i:i + size] for k, a in arrays.items()} for i in range(0, count, size)]
    return out


def _token_positions(batch: dict[str, np.ndarray]):
    """The batch's non-padding [batch, sequence] positions as a bool tensor, or None (no mask)."""
    import torch

    mask = valid_positions(batch)
    return None if mask is None else torch.from_numpy(mask)


def _last_uses(blocks: list[Block]) -> dict[int, set[str]]:
    """Per block index: the names of values still read after that block (by later blocks)."""
    out = {}
    later: set[str] = set()
    for block in reversed(blocks):
        out[block.index] = set(later)
        later |= {v.name for v in block.inputs}
    return out


def _learn_block(block, layers, float_w, env_f, env_q, valid, constants, opts, rng, bar, start_all, blocks_left, run_nodes,
                 graph, keep, first, solve):
    import torch

    t_start = time.perf_counter()

    def block_loss(outputs, targets, names, valid):
        if opts.tile and opts.margin:
            outputs, targets = _interior(outputs, opts.tile, opts.margin), _interior(targets, opts.tile, opts.margin)
        return LOSSES[opts.loss](outputs, targets, names, valid)
    grids = _ActivationGrids(block.nodes, learn=opts.grids and opts.mode in LEARNED_MODES and solve is learn_with_adam)
    float_biases = _float_biases(block.nodes)
    out_names = [v.name for v in block.outputs]
    in_names = [v.name for v in block.inputs]
    # the loss and its scale count only the outputs the block's layers reach (not, say, an
    # attention mask or rotary tables computed alongside, which are the same in both streams)
    reached = {v.name for n in block.layers for v in n.outputs}
    for node in block.nodes:
        if any(v is not None and v.name in reached for v in node.inputs):
            reached |= {v.name for v in node.outputs}
    loss_names = [name for name in out_names if name in reached] or out_names

    def run_all(env, weight_of, scales=None, wanted=None):
        """The quantized stream: the activation grids as learned (`scales` None) or at `scales`;
        every value the block computes, or (`wanted`) those values, the block run only as far as they need."""
        local = {k: env[k] for k in in_names}
        return run_nodes(block.nodes, local, weight_of, constants, grids.quantize(scales), wanted=wanted)

    def forward(env, weight_of, scales=None):
        local = run_all(env, weight_of, scales, wanted=out_names)
        return {k: local[k] for k in out_names}

    def forward_float(env):
        local = run_nodes(block.nodes, {k: env[k] for k in in_names}, float_weight, constants, None, float_biases, wanted=out_names)
        return {k: local[k] for k in out_names}

    def float_weight(node):
        if id(node) in float_w:
            return float_w[id(node)]
        if node.domain == "qc" and node.op_type == "GatherQuantized":
            return constants.float_table(node)
        if is_int8_weight(node):
            return constants.dequantized_weight(node)
        if is_mixed_matmul(node):  # a layer not learned here (its stored arrays shared with another reader)
            return constants.float_mixed_matmul(node)
        return constants.get(node.inputs[1])

    def stored_weight(node):
        if node.domain == "qc" and node.op_type == "GatherQuantized":
            return constants.quantized_table(node)
        if is_int8_weight(node):
            return constants.dequantized_weight(node)
        if is_mixed_matmul(node):
            return constants.stored_mixed_matmul(node)
        return float_weight(node)

    targets = FloatTargets(forward_float, env_f, keep)  # also the next block's float inputs
    stored_scales: dict = {}  # scales given to the grids: none, each grid at its stored scale
    if not layers:
        with torch.no_grad():
            for e in env_q:
                e.update({k: v for k, v in forward(e, stored_weight, stored_scales).items() if k in keep})
        return None
    t_block = time.perf_counter()

    def rounded_to_nearest():  # the layers' weights as they came: made when needed, not held while the solver runs
        return {id(l.node): l.reference_weight(l.originals) for l in layers}

    def fixed(weights):
        return lambda node: weights[id(node)] if id(node) in weights else stored_weight(node)

    with torch.no_grad():
        nearest = fixed(rounded_to_nearest())
        before = float(sum(block_loss(forward(e, nearest, stored_scales), t, loss_names, m)
                           for e, t, m in zip(env_q, targets, valid))) / len(env_q)
        del nearest
    energy = 0.0  # the targets' mean square, the scale of relative errors (mse only)
    if opts.loss == "mse":
        energy = float(sum(block_loss({k: torch.zeros_like(v) for k, v in t.items()}, t, loss_names, m)
                           for t, m in zip(targets, valid))) / len(targets)
    problem = BlockProblem(layers, grids, env_q, targets, valid, loss_names,
                           lambda o, t, m: block_loss(o, t, loss_names, m), forward, run_all, float_weight, stored_weight, opts, rng,
                           bar, start_all, t_start, t_block, blocks_left, first)
    arrays, steps = solve(problem)
    learned_scales = grids.learned_scales()
    written = {id(l.node): l.reference_weight(arrays[id(l.node)]) for l in layers}

    def propagate(weights, scales):
        total, outs = 0.0, []
        for e, t, m in zip(env_q, targets, valid):
            o = forward(e, fixed(weights), scales)
            total += float(block_loss(o, t, loss_names, m))
            outs.append({k: v for k, v in o.items() if k in keep})
        return total / len(env_q), outs

    with torch.no_grad():
        after, outs = propagate(written, learned_scales)
        kept = "learned" if after < before else "round-to-nearest"
        if kept == "learned":
            for l in layers:
                l.write(graph, arrays[id(l.node)])
            grids.write(learned_scales)
        else:
            after, outs = propagate(rounded_to_nearest(), stored_scales)
    for e, o in zip(env_q, outs):
        e.update(o)
    return {
        "block": block.index,
        "layers": [l.name for l in layers],
        "steps": steps,
        "loss_before": before,
        "loss_after": after,
        "relative_error_before": round(float(np.sqrt(before / energy)), 6) if energy > 0 else None,
        "relative_error_after": round(float(np.sqrt(after / energy)), 6) if energy > 0 else None,
        "kept": kept,
        **({"activation_grids_learned": len(learned_scales) if kept == "learned" else 0} if grids.params else {}),
        **({"held_out": problem.held_out} if problem.held_out else {}),
        "seconds": round(time.perf_counter() - t_start, 2),
    }


class FloatTargets:
    """The float block's outputs per batch, `targets[b]`: held while all of them fit in
    `held_target_limit()`, else computed again each time one is read (the block that outputs a
    model's logits: 28 windows of 128 tokens over a 49152-token vocabulary are 0.7 GB; computing
    them again was a fifth of each end-to-end learning step on SmolLM2). Either way the same values.
    Computing them stores, in each batch's `env`, the outputs later blocks read (`keep`)."""

    def __init__(self, forward: Callable, envs: list[dict], keep: set[str]):
        import torch

        self.forward, self.envs = forward, envs
        self.held: list[dict] | None = []
        size, limit = 0, held_target_limit()
        with torch.no_grad():
            for env in envs:
                outputs = forward(env)
                env.update({k: v for k, v in outputs.items() if k in keep})
                if self.held is not None:
                    size += sum(v.nbytes for v in outputs.values())
                    if size <= limit:
                        self.held.append(outputs)
                    else:
                        self.held = None

    def __len__(self) -> int:
        return len(self.envs)

    def __getitem__(self, b: int) -> dict:
        import torch

        if self.held is not None:
            return self.held[b]
        with torch.no_grad():
            return self.forward(self.envs[b])

    def __iter__(self):
        return (self[b] for b in range(len(self)))


def held_target_limit() -> int:
    """How many bytes of float targets a block holds: `HELD_TARGET_BYTES`, or 1/`HELD_TARGET_SHARE`
    of the memory available now where that is more (0 when the first is 0: always recompute)."""
    if HELD_TARGET_BYTES <= 0:
        return 0
    return max(HELD_TARGET_BYTES, (memory.available_bytes() or 0) // HELD_TARGET_SHARE)


def _float_biases(nodes: list[ir.Node]) -> dict:
    """{bias value name: the bias before bias correction} for the block's layers whose bias `quantize`
    corrected (`FLOAT_BIAS_KEY` on the node that adds it: a Conv, or a MatMul's Add; None: the Conv had
    none), for the float stream."""
    import torch

    out = {}
    for node in nodes:
        if node.domain not in ("", "ai.onnx") or FLOAT_BIAS_KEY not in node.meta:
            continue
        if node.op_type in ("Conv", "ConvTranspose"):
            bias = node.inputs[2] if len(node.inputs) > 2 else None
        elif node.op_type == "Add":
            bias = next((v for v in node.inputs if v is not None and v.const_value is not None), None)
        else:
            continue
        if bias is None or bias.const_value is None:
            continue
        original = node.meta[FLOAT_BIAS_KEY]
        array = np.zeros(bias.const_value.shape, np.float32) if original is None else np.asarray(original, np.float32)
        out[bias.name] = torch.from_numpy(array.reshape(bias.const_value.shape))
    return out


def _interior(values: dict, tile: int, margin: int) -> dict:
    """Each 4-D/5-D value without a border of `margin` input pixels on every spatial side (scaled by
    the value's size over `tile`): a conv net computes the interior of a tile as it computes that
    part of the whole image, the border from padding it never sees there."""
    out = {}
    for name, t in values.items():
        if t.dim() in (4, 5) and t.is_floating_point():
            cut = [int(round(margin * d / tile)) for d in t.shape[2:]]
            if all(2 * c < d for c, d in zip(cut, t.shape[2:])):
                t = t[(slice(None), slice(None)) + tuple(slice(c, d - c) for c, d in zip(cut, t.shape[2:]))]
        out[name] = t
    return out


def _check_tile(graph: ir.Graph, opts: Options) -> None:
    """tile=N needs the image inputs' spatial sizes free (a fixed size cannot take a crop)."""
    for value in graph.inputs:
        shape = value.shape
        if shape is None or len(shape) not in (4, 5) or value.dtype is None or not value.dtype.is_floating_point():
            continue
        fixed = [d for d in list(shape)[2:] if isinstance(d, int)]
        if fixed and any(d != opts.tile for d in fixed):
            raise UserError(f"{opts.pass_name}: tile={opts.tile} crops input '{value.name}', whose spatial size the graph "
                            f"fixes at {' x '.join(str(d) for d in list(shape)[2:])}; use tile=0 (whole inputs)")


def _tiled(batch: dict, tile: int) -> dict:
    """A calibration batch's 4-D and 5-D float inputs cut into tile x tile (x tile) crops along their
    spatial axes, the crops stacked on the batch axis (the other inputs repeated to match); axes no
    longer than `tile` are kept whole, and a remainder shorter than `tile` is left out."""
    arrays = {k: np.asarray(v) for k, v in batch.items()}
    spatial = {k: a.shape[2:] for k, a in arrays.items() if a.ndim in (4, 5) and np.issubdtype(a.dtype, np.floating)}
    if not spatial:
        return arrays
    sizes = set(spatial.values())
    if len(sizes) != 1:
        raise UserError(f"tile: the image inputs of one calibration sample differ in size ({sorted(sizes)}); use tile=0")
    dims = sizes.pop()
    samples = next(arrays[k].shape[0] for k in spatial)
    for k, a in arrays.items():
        if k not in spatial and (a.ndim == 0 or a.shape[0] != samples or a.ndim in (4, 5)):
            raise UserError(f"tile: input '{k}' (shape {list(a.shape)}) is neither an image to crop nor one value per "
                            f"sample to repeat with each crop; use tile=0")
    starts = [[0] if d <= tile else range(0, d - tile + 1, tile) for d in dims]
    crops = [tuple(slice(s, s + tile) for s in corner) for corner in itertools.product(*starts)]
    out = {}
    for k, a in arrays.items():
        if k in spatial:
            out[k] = np.concatenate([a[(slice(None), slice(None)) + c] for c in crops], axis=0)
        else:
            out[k] = np.concatenate([a] * len(crops), axis=0)
    return out
