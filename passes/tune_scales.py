"""`tune-scales`: PEQA-style scale tuning, block by block.

The integer codes `quantize-weights` chose stay frozen; the fp16 scale of every group (one per
group of rows and output column) is learned, as `s1 * exp(t)`, to minimise each block's output
error against the float block on the calibration data, with the inputs of each block taken from
the already-quantized preceding blocks (the same machinery as `flexround`: `qcompiler.reconstruct`).
Codebook classes get their entries tuned; fp16 classes and sparse outliers stay.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from qcompiler.passbase import Pass, PassResult, option, register_pass
from qcompiler.passes.flexround import check_learning_options
from qcompiler.reconstruct import Options, reconstruct


@register_pass
@dataclasses.dataclass(frozen=True)
class TuneScalesPass(Pass):
    """Learn the group scales of quantized weights block by block, integer codes frozen (PEQA style)."""

    name = "tune-scales"
    required = frozenset({"weights-quantized", "calibrated"})
    provided = frozenset({"scales-tuned"})

    steps: int = option(200, "learning steps per block (each on `batch` calibration samples)")
    lr: float = option(0.001, "Adam learning rate of the log scales (0 < lr <= 1)")
    seed: int = option(0, "seed of the batch order")
    time_budget: float = option(0.0, "seconds for the whole pass, shared evenly by the blocks; 0: no limit")
    regions: int = option(2, "residual regions per block (2: attention + MLP of one transformer layer)")
    batch: int = option(1, "calibration samples per learning step")

    def __post_init__(self):
        check_learning_options(self.name, self.steps, self.lr, self.seed, self.time_budget, self.regions, self.batch)

    def call(self, model: ir.Model) -> PassResult:
        stats = reconstruct(model, Options("scales", self.steps, float(self.lr), self.seed, float(self.time_budget),
                                           self.regions, self.name, self.batch))
        return PassResult(model, bool(stats.get("blocks_improved")), stats)
