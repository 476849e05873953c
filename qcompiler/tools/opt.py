"""`qcompiler opt`: IR text in, IR text out (as `mlir-opt`).

The text is parsed and verified, exactly the passes of the pipeline spec run (nothing is implied:
no `canonicalize` first, no `lower-ort` last), the result is verified and printed. Passes that read
calibration data get `batches` deterministic synthetic batches (`probe.synthetic_inputs`, seeds 0 to
batches - 1), so the same text and spec give the same output; `allocate-bits` prices ONNX Runtime's
cost model (as `compile` without `--target`). The golden IR tests run their
`# RUN:` lines through this command.
"""

from __future__ import annotations

from qcompiler.analysis.probe import synthetic_inputs
from qcompiler.codegen.targets import get_target
from qcompiler.errors import UserError
from qcompiler.ir import ELIDE_ELEMENTS, parse, to_text, verify
from qcompiler.pipeline.context import CompileContext, using
from qcompiler.pipeline.pass_manager import PassRecord, run_pipeline
from qcompiler.pipeline.spec import parse_pipeline

SYNTHETIC_BATCHES = 4


def optimize(model, spec: str, batches: int = SYNTHETIC_BATCHES) -> list[PassRecord]:
    """Run the passes of `spec` over `model` in place, verifying before and after."""
    if batches < 1:
        raise UserError(f"opt: --calib-batches must be at least 1, got {batches}")
    passes = parse_pipeline(spec) if spec.strip() else []
    verify(model)
    if not passes:
        return []
    data = [synthetic_inputs(model, seed=seed) for seed in range(batches)]
    cost_model = get_target("ort").cost_model  # no target here: ONNX Runtime's, as a compile without --target
    with using(CompileContext(calibration=data, calibration_source=f"synthetic:{batches}", cost_model=cost_model)):
        records = run_pipeline(model, passes)
    verify(model)
    return records


def optimize_text(text: str, spec: str, batches: int = SYNTHETIC_BATCHES, elide: bool = False) -> str:
    """IR text -> IR text after `spec`; every tensor printed unless `elide` (then large ones as a hash)."""
    model = parse(text)
    optimize(model, spec, batches)
    return to_text(model, elide_over=ELIDE_ELEMENTS if elide else 2**62)
