"""`tune-scales`: PEQA-style scale tuning, block by block.

The integer codes `quantize-weights` chose stay frozen; the fp16 scale of every group (one per
group of rows and output column) is learned, as `s1 * exp(t)`, to minimise each block's output
error against the float block on the calibration data, with the inputs of each block taken from
the already-quantized preceding blocks (the same machinery as `flexround`: `qcompiler.analysis.reconstruct`).
Codebook classes get their entries tuned; fp16 classes and sparse outliers stay. Where a class
stores fractional (fp16) zero points, they are learned too (`z + delta`).

End to end (`regions=0 loss=kl`): the whole model is one block and every layer's scales are learned
at once against the float model's output distribution, the KL divergence of the first output's
softmax (an LM's next-token distribution), so that the errors left by the layers are weighed by what
reaches the predictions, not by each block's output error. (The second stage of EfficientQAT, Chen
et al. 2024, arXiv 2407.11062, also trains only the step sizes end to end, there on the
language-modelling loss of training text.)
"""

from __future__ import annotations

import dataclasses

from qcompiler.ir.meta import Prop
from qcompiler.passes.flexround import BlockLearningPass
from qcompiler.pipeline.passbase import option, register_pass


@register_pass
@dataclasses.dataclass(frozen=True)
class TuneScalesPass(BlockLearningPass):
    """Learn the group scales of quantized weights block by block, integer codes frozen (PEQA style)."""

    name = "tune-scales"
    required = frozenset({Prop.CALIBRATED})
    required_one_of = frozenset({Prop.WEIGHTS_QUANTIZED, Prop.QUANTIZED})
    provided = frozenset({Prop.SCALES_TUNED})
    mode = "scales"

    lr: float = option(0.001, "Adam learning rate of the log scales (0 < lr <= 1)")
