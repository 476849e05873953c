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
language-modelling loss of training text.) `first-output=token-logits` learns only where that output
is an LM's logits over its vocabulary (the `mixed` preset's `tuning=auto`); `max-weights` bounds the
model size it learns in, as `gptq`'s does.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import onnx_ir as ir

from qcompiler.analysis.reconstruct import unsupported_block_ops
from qcompiler.dialect.mixed_ops import mixed_weights_over
from qcompiler.errors import UserError
from qcompiler.ir.layers import outputs_token_logits
from qcompiler.ir.meta import Prop
from qcompiler.passes.flexround import BlockLearningPass
from qcompiler.pipeline.passbase import PassResult, option, register_pass

log = logging.getLogger(__name__)


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
    first_output: Literal["any", "token-logits"] = option(
        "any", "learn in any model (any), or only where the first output is token logits (token-logits: its last axis "
               "as long as an embedding table's vocabulary, an LM); elsewhere the pass leaves the model as it is and says so")
    max_weights: int = option(
        0, "learn only in models whose mixed linear layers hold at most this many weights; above it the pass leaves "
           "the model as it is and says so (0: no limit; the mixed preset's tuning=auto sets it)")
    unsupported: Literal["error", "skip"] = option(
        "error", "a model with ops the block interpreter cannot run: refuse it (error), or leave the scales as they are "
                 "and say which ops (skip; the mixed preset's tuning=auto)")

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.max_weights, bool) or not isinstance(self.max_weights, int) or self.max_weights < 0:
            raise UserError(f"tune-scales: max-weights must be a whole number of weights, 0 for no limit, got {self.max_weights}")

    def _why_skipped(self, model: ir.Model) -> tuple[str, int] | None:
        """Why this model is left as it is (first-output, max-weights, unsupported=skip) and how loudly to say it, or None: learn."""
        if self.first_output == "token-logits" and not outputs_token_logits(model.graph):
            return "the first output is not token logits (first-output=token-logits)", logging.INFO
        weights = mixed_weights_over(model, self.max_weights)
        if weights:
            return f"{weights} weights in mixed layers, over max-weights={self.max_weights}", logging.WARNING
        missing = unsupported_block_ops(model, self._options()) if self.unsupported == "skip" else []
        if missing:
            return f"the block interpreter cannot run {', '.join(missing)}", logging.WARNING
        return None

    def ensures(self, model: ir.Model) -> None:
        if self._why_skipped(model) is None:  # skipped, the model is as the passes before left it, properties included
            super().ensures(model)

    def call(self, model: ir.Model) -> PassResult:
        skipped = self._why_skipped(model)
        if skipped is None:
            return super().call(model)
        reason, level = skipped
        log.log(level, "tune-scales: %s: scales left as they are", reason)
        return PassResult(model, False, {"skipped": reason})
