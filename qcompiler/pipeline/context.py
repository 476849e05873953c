"""What a pipeline run knows besides the IR: calibration data, where the model came from, and the
executor independent measurements fan out on.

Pass options are what a pipeline string says; data too large or too live for a string (the
calibration batches) reaches passes through the context of the current compile:

    with using(CompileContext(calibration=batches)):
        run_pipeline(model, passes)

and inside a pass: `current().calibration`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from qcompiler.errors import UserError
from qcompiler.support.parallel import InProcess, RayExecutor


@dataclasses.dataclass
class CompileContext:
    # Calibration batches: each a dict of graph input name -> array (first axis: batch).
    calibration: Sequence[dict[str, np.ndarray]] | None = None
    calibration_source: str = ""
    source: Any = None  # qcompiler.driver.capture.Source
    threads: int | None = None  # ONNX Runtime intra-op threads for passes that run the model
    cache_dir: Any = None  # calibration statistics cache (`qcompiler.analysis.calib_cache`); None: no cache
    # run the float model one block at a time where a pass runs it (`qcompiler.analysis.calib_sequential`);
    # None: only large models (`qcompiler.ir.is_large`)
    block_sequential: bool | None = None
    # where independent measurements fan out (`qcompiler.support.parallel`): in-process unless --workers/--ray-address
    executor: InProcess | RayExecutor = dataclasses.field(default_factory=InProcess)
    # what `allocate-bits` prices: the target's cost model (`qcompiler.codegen.Target.cost_model`);
    # None: ONNX Runtime's storage without a kernel-cost table (`qcompiler.analysis.bitcost.ORT`)
    cost_model: Any = None

    def require_calibration(self, pass_name: str) -> Sequence[dict[str, np.ndarray]]:
        if not self.calibration:
            raise UserError(f"{pass_name} needs calibration data; give --calib FILE (or calibration=... in the API)")
        return self.calibration


_CURRENT: contextvars.ContextVar[CompileContext] = contextvars.ContextVar("qcompiler_context", default=CompileContext())


def current() -> CompileContext:
    return _CURRENT.get()


@contextlib.contextmanager
def using(ctx: CompileContext) -> Iterator[CompileContext]:
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)
