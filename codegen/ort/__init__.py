"""The ONNX Runtime target: an ONNX Runtime model folder. The pipeline ends with `lower-ort`
(`passes/lower_ort/`); `emit.py` writes `model.onnx` and the manifest; `allocate-bits` prices
`lower-ort`'s storage (`qcompiler.analysis.bitcost`) and the kernel costs in `kernel_costs.json`
(measured by `benchmarks/kernel_costs.py`)."""

from __future__ import annotations

import functools
from pathlib import Path

from qcompiler.analysis import bitcost
from qcompiler.codegen import Target

HERE = Path(__file__).resolve().parent


class OrtTarget(Target):
    """An ONNX Runtime model folder (`emit.py`): the pipeline ends with `lower-ort`; a causal LM
    also gets its tokenizer and ORT GenAI's config."""

    name = "ort"
    keeps_source_float_type = True

    @property
    def cost_model(self) -> bitcost.StorageCost:
        """`lower-ort`'s storage (`bitcost`) and the kernel costs measured by benchmarks/kernel_costs.py."""
        return ort_cost_model()

    def complete(self, passes: list) -> list:
        from qcompiler.passes.lower_ort import LowerOrtPass

        if LowerOrtPass.name in [p.name for p in passes]:
            return passes
        return passes + [LowerOrtPass()]

    def emit(self, model, staging, manifest, bundled, layout):
        from qcompiler.codegen.ort import emit

        if layout is None:
            return emit.emit(model, staging, manifest)
        from qcompiler.codegen.lm_artifact import write_lm_files

        lm_files = write_lm_files(staging, bundled, layout)
        return emit.emit(model, staging, manifest, tuple(lm_files)) + lm_files


@functools.cache
def ort_cost_model() -> bitcost.StorageCost:
    return bitcost.StorageCost(bitcost.KernelCosts.load(HERE / "kernel_costs.json"))
