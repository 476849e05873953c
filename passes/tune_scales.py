"""`tune-scales`: PEQA-style scale tuning, block by block.

The integer codes `quantize-weights` chose stay frozen; the fp16 scale of every group (one per
group of rows and output column) is learned, as `s1 * exp(t)`, to minimise each block's output
error against the float block on the calibration data, with the inputs of each block taken from
the already-quantized preceding blocks (the same machinery as `flexround`: `qcompiler.reconstruct`).
Codebook classes get their entries tuned; fp16 classes and sparse outliers stay.
"""

from __future__ import annotations

import dataclasses

from qcompiler.passbase import option, register_pass
from qcompiler.passes.flexround import BlockLearningPass


@register_pass
@dataclasses.dataclass(frozen=True)
class TuneScalesPass(BlockLearningPass):
    """Learn the group scales of quantized weights block by block, integer codes frozen (PEQA style)."""

    name = "tune-scales"
    required = frozenset({"weights-quantized", "calibrated"})
    provided = frozenset({"scales-tuned"})
    mode = "scales"

    lr: float = option(0.001, "Adam learning rate of the log scales (0 < lr <= 1)")
