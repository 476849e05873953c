"""`flexround`: learned rounding of the chosen uniform grids, block by block (FlexRound, Lee et al.,
ICML 2023, arXiv 2306.00317).

Runs after `quantize-weights`, on its `qc.MixedMatMul` ops, or after `quantize`, on its int8
`qc.DequantizeWeight` ops: for each block of the graph (one transformer layer, or one conv stage;
found in the IR by `qcompiler.analysis.blocks`) the division factors of `W_hat = s1 * round(W / (s1 *
S2 * s3 * s4))` are learned with a straight-through estimator to minimise the block's output error
against the float block on the calibration data, the block's inputs coming from the
already-quantized preceding blocks. Codebook classes get their entries tuned; fp16 classes and
sparse outliers stay. After `quantize`, the block runs with its int8 activation grids, whose scales
are learned too (`act-grids`); `tile` learns on crops of the calibration images, which makes a
step of a conv net at photo size affordable. The learned codes and scales are written back into
the same ops, so the lowering is unchanged. The mechanics are in `qcompiler.analysis.reconstruct`.

Deterministic for a fixed seed and thread count when `time-budget` is 0 (with a budget that binds,
the number of steps a block gets depends on the machine's speed; the statistics record it).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import onnx_ir as ir

from qcompiler.analysis.reconstruct import Options, reconstruct, step_compute
from qcompiler.errors import UserError
from qcompiler.ir.meta import Prop
from qcompiler.pipeline import context
from qcompiler.pipeline.passbase import Pass, PassResult, option, register_pass

MAX_STEPS = 100_000
MAX_TIME_BUDGET = 7 * 24 * 3600.0


def check_learning_options(name: str, steps, lr, seed, time_budget, regions, batch, loss="mse") -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise UserError(f"{name}: steps must be an integer from 1 to {MAX_STEPS}, got {steps}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0.0 < lr <= 1.0:
        raise UserError(f"{name}: lr must be in (0, 1], got {lr}; the method's usual values are 1e-3 to 5e-3")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"{name}: seed must be a non-negative integer, got {seed}")
    if isinstance(time_budget, bool) or not isinstance(time_budget, (int, float)) or not 0 <= time_budget <= MAX_TIME_BUDGET:
        raise UserError(f"{name}: time-budget must be seconds from 0 (no limit) to {MAX_TIME_BUDGET:g}, got {time_budget}")
    if isinstance(regions, bool) or not isinstance(regions, int) or not 0 <= regions <= 64:
        raise UserError(f"{name}: regions must be an integer from 0 (the whole model as one block) to 64, got {regions}")
    if loss == "kl" and regions != 0:
        raise UserError(f"{name}: loss=kl compares the model's output distributions, so it needs regions=0 (the whole "
                        f"model as one block); got regions={regions}")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 4096:
        raise UserError(f"{name}: batch must be an integer from 1 to 4096, got {batch}")


@dataclasses.dataclass(frozen=True)
class BlockLearningPass(Pass):
    """Block-wise learning against the float block (`qcompiler.analysis.reconstruct`); subclasses name what is learned."""

    mode = ""  # what `reconstruct` learns: "flexround" or "scales"
    rerun_changes = ("a second run learns again against the same float block, starting from the first run's weights, "
                     "and keeps what it learns whenever the block's error falls further")

    steps: int = option(200, "learning steps per block (each on `batch` calibration samples)")
    lr: float = option(0.003, "Adam learning rate of the log division factors (0 < lr <= 1)")
    seed: int = option(0, "seed of the batch order")
    time_budget: float = option(0.0, "seconds for the whole pass, shared evenly by the blocks; 0: no limit")
    regions: int = option(2, "residual regions per block (2: attention + MLP of one transformer layer; 0: the whole model, end to end)")
    batch: int = option(1, "calibration samples per learning step")
    loss: Literal["mse", "kl"] = option(
        "mse", "what a block's outputs are compared by: mean squared error, or (regions=0, LMs) the KL divergence "
        "of the first output's softmax from the float model's")
    act_grids: bool = option(True, "int8 weights (quantize): also learn the scale of each static int8 activation grid "
                                   "in the block (its zero point stays)")
    tile: int = option(0, "learn on tile x tile crops of the calibration images (conv nets with free spatial sizes; "
                          "0: whole inputs)")
    tile_margin: int = option(-1, "with tile: the border (input pixels) each crop's loss leaves out, where the "
                                  "convolutions read padding the whole image does not have; -1: tile / 4")
    holdout: int = option(0, "hold every holdout-th calibration batch out of the steps (when there are that many) and keep "
                             "the parameters of least loss on them, measured before learning and 8 times during it "
                             "(early stopping); 0: learn on every batch, keep the last step's")
    schedule: Literal["constant", "cosine"] = option(
        "constant", "the learning rate over the steps: lr throughout (constant), or lr * (1 + cos(pi * step / steps)) / 2, "
                    "from lr toward 0 (cosine)")
    compute: Literal["fp32", "bf16", "auto"] = option(
        "fp32", "the learning steps' matrix products in float32, or in bfloat16 with float32 accumulation (torch's CPU "
                "autocast), or auto: bf16 where the CPU multiplies bfloat16 natively (AVX-512 BF16, AMX, Arm BF16), "
                "fp32 elsewhere; the losses that decide what is kept, and the targets, stay float32")

    def __post_init__(self):
        check_learning_options(self.name, self.steps, self.lr, self.seed, self.time_budget, self.regions, self.batch, self.loss)
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or not (self.tile == 0 or 8 <= self.tile <= 4096):
            raise UserError(f"{self.name}: tile must be 0 (whole inputs) or a crop size from 8 to 4096, got {self.tile}")
        margin = self.tile_margin
        if isinstance(margin, bool) or not isinstance(margin, int) or margin < -1 or (self.tile and 2 * margin >= self.tile):
            raise UserError(f"{self.name}: tile-margin must be -1 (tile / 4) or from 0 to under half the tile, got {margin}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, int) or not (self.holdout == 0 or 2 <= self.holdout <= 64):
            raise UserError(f"{self.name}: holdout must be 0 (off) or from 2 to 64 (every holdout-th batch held out), got {self.holdout}")

    def _options(self) -> Options:
        return Options(self.mode, self.steps, float(self.lr), self.seed, float(self.time_budget), self.regions, self.name,
                       self.batch, self.loss, bool(self.act_grids), self.tile,
                       self.tile // 4 if self.tile_margin == -1 else self.tile_margin, self.holdout, step_compute(self.compute),
                       self.schedule)

    def call(self, model: ir.Model) -> PassResult:
        ctx = context.current()
        stats = reconstruct(model, self._options(), ctx.require_calibration(self.name), ctx.threads)
        return PassResult(model, bool(stats.get("blocks_improved")), stats)


@register_pass
@dataclasses.dataclass(frozen=True)
class FlexRoundPass(BlockLearningPass):
    """Learn the rounding of quantized weights block by block (FlexRound), against the float block."""

    name = "flexround"
    required = frozenset({Prop.CALIBRATED})
    required_one_of = frozenset({Prop.WEIGHTS_QUANTIZED, Prop.QUANTIZED})
    provided = frozenset({Prop.ROUNDING_LEARNED})
    mode = "flexround"
