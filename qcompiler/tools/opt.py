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
from qcompiler.driver.options import CompileOptions
from qcompiler.driver.session import Session
from qcompiler.errors import UserError
from qcompiler.ir import parse, to_text, verify
from qcompiler.pipeline.pass_manager import PassRecord

SYNTHETIC_BATCHES = 4


def optimize(model, spec: str, batches: int = SYNTHETIC_BATCHES) -> list[PassRecord]:
    """Run the passes of `spec` over `model` in place, verifying before and after."""
    if batches < 1:
        raise UserError(f"opt: --calib-batches must be at least 1, got {batches}")
    # no target here: ONNX Runtime's cost model, as a compile without --target
    session = Session(CompileOptions(pipeline=spec), complete=False, calibration_label=f"synthetic:{batches}")
    verify(model)
    if not session.passes:
        return []
    session.use(model)
    session.calibration = [synthetic_inputs(model, seed=seed) for seed in range(batches)]
    records = session.run(model)
    verify(model)
    return records


def optimize_text(text: str, spec: str, batches: int = SYNTHETIC_BATCHES, elide_over: int | None = None) -> str:
    """IR text -> IR text after `spec`; every tensor printed, or with `elide_over` those over that
    many elements and the float16/bfloat16 ones as a hash (`qcompiler.ir.to_text`)."""
    model = parse(text)
    optimize(model, spec, batches)
    return to_text(model, elide_over=elide_over)
