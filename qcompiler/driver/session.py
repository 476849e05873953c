"""One session: what `compile`, `doctor` and `opt` share between their options and the passes.

    session = Session(options)            # checks that fail before any slow step; the pipeline
    model = session.load()                # the source as IR (or session.use(model): a model as given)
    session.to_float32()                  # a float16/bfloat16 source computes in float32 inside
    session.load_data()                   # calibration batches (a slice held apart) and the probe batch
    records = session.run(model, passes, instruments)   # in a CompileContext, with its executor

`compile` (`qcompiler.driver.compiler`) writes the artifact around it, `doctor`
(`qcompiler.tools.doctor`) measures the layers around it, and `opt` (`qcompiler.tools.opt`, which
the golden tests run) runs exactly the passes of a spec on IR text with synthetic calibration.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from qcompiler.analysis import probe
from qcompiler.codegen.targets import get_target
from qcompiler.driver.capture import Source, resolve
from qcompiler.driver.options import CompileOptions, check_choices
from qcompiler.errors import UserError, shown
from qcompiler.ir import float_types
from qcompiler.passes.canonicalize import CanonicalizePass
from qcompiler.passes.lower_ort import LowerOrtPass
from qcompiler.pipeline.context import CompileContext, using
from qcompiler.pipeline.pass_manager import Instrument, PassRecord, run_pipeline
from qcompiler.pipeline.passbase import model_properties
from qcompiler.pipeline.spec import check_order, format_pipeline, parse_pipeline
from qcompiler.support import parallel


class Session:
    """A pipeline over one source with one set of `CompileOptions`. `complete`: the pipeline starts
    with `canonicalize` and gets the target's ends (`compile`, `doctor`); false: exactly its passes
    (`opt`). `calibration_label`: what the calibration is called in the model's calibration record
    (default: the data file, or `api` for batches given in Python). `host_checks`: false for a dry
    run, which checks every option's value but not what this machine has installed (Ray, triton)."""

    def __init__(self, options: CompileOptions, *, complete: bool = True, calibration_label: str | None = None,
                 host_checks: bool = True):
        self.options = options
        self.target = get_target(options.target)
        threads = options.threads
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1):
            raise UserError(f"threads must be a positive integer, got {shown(repr(threads))}")
        parallel.check_options(options.workers, options.ray_address, host=host_checks)
        if not isinstance(options.block_sequential, bool):
            raise UserError(f"block_sequential must be true or false, got {shown(repr(options.block_sequential))}")
        if host_checks:
            self.target.check_host()  # e.g. a missing triton fails before any slow step
        self.float_type = float_types.check_float_type_option(options.float_type)
        check_choices(options)
        passes = parse_pipeline(options.pipeline) if complete or options.pipeline.strip() else []
        if complete:  # a bad pipeline fails before any slow step (a given model may bring properties: checked in `use`)
            passes = complete_pipeline(passes, options.target)
            check_order(passes)
        for p in passes:  # and so do options the target cannot honour
            p.check_target(self.target.cost_model)
        self.passes = passes
        self.spec = format_pipeline(self.passes)
        self.calibration_label = calibration_label
        self.model: ir.Model | None = None
        self.source: Source | None = None
        self.source_type = ir.DataType.FLOAT
        self.capture_seconds = 0.0
        self.calibration: list[dict[str, np.ndarray]] | None = None
        self.probe: probe.Probe | None = None

    def load(self) -> ir.Model:
        """The source as IR (captured, read or copied: never the caller's model), timed; its float type."""
        o = self.options
        start = time.perf_counter()
        model, source_info = resolve(o.source, o.example_inputs, o.dynamic_shapes, dtype=o.dtype)
        self.capture_seconds = time.perf_counter() - start
        self.use(model, source_info)
        quantizes = any(p.name not in (CanonicalizePass.name, LowerOrtPass.name) for p in self.passes)
        self.source_type = float_types.source_float_type(model, quantizes=quantizes)
        return model

    def use(self, model: ir.Model, source_info: Source | None = None) -> ir.Model:
        """Run on `model` as given (rewritten in place, its float types as they are)."""
        self.model, self.source = model, source_info
        check_order(self.passes, model_properties(model))
        return model

    def to_float32(self) -> None:
        """A float16/bfloat16 source computes in float32 from here on (`qcompiler.ir.float_types`)."""
        model, source_type = self.model, self.source_type
        float_types.to_float32(model, source_type)

    def load_data(self, hold_apart: bool = True) -> probe.Probe:
        """The calibration batches and the probe batch drift and the report measure on
        (`qcompiler.analysis.probe.choose`). `hold_apart`: without probe inputs, evaluation data or
        a bundled model's data, a slice of a calibration file is held apart as the probe."""
        o, model, source_info = self.options, self.model, self.source
        eval_batches = calibration_batches(o.eval_data, probe.PROBE_SAMPLES, model, source_info)
        holds_apart = hold_apart and o.probe_inputs is None and not eval_batches and getattr(source_info, "bundled", None) is None
        batches = calibration_batches(o.calibration, o.calib_count, model, source_info, probe.PROBE_SAMPLES if holds_apart else 0)
        held = None
        if holds_apart and batches:
            batches, held = probe.hold_apart(batches, o.calib_count if isinstance(o.calibration, (str, os.PathLike)) else None)
        measured_on = probe.choose(model, source_info, o.probe_inputs, eval_batches, held)
        if o.require_data_probe and not measured_on.is_data:
            raise UserError("the output-cosine gate needs data to measure on and this model brings none; "
                            "give --calib FILE or --eval-data FILE (a synthetic input would give a meaningless number)")
        self.calibration, self.probe = batches, measured_on
        return measured_on

    def described_calibration(self) -> str:
        calibration = self.options.calibration
        if self.calibration_label is not None:
            return self.calibration_label
        return str(calibration) if isinstance(calibration, (str, os.PathLike)) else ("api" if calibration is not None else "")

    @contextlib.contextmanager
    def context(self) -> Iterator[CompileContext]:
        """What the passes read besides the IR, with the executor the options ask for (closed after)."""
        o = self.options
        executor = parallel.executor_for(o.workers, o.ray_address)
        try:
            yield CompileContext(
                calibration=self.calibration, calibration_source=self.described_calibration(), source=self.source, threads=o.threads,
                cache_dir=o.cache_dir, executor=executor, block_sequential=True if o.block_sequential else None,
                cost_model=self.target.cost_model,
            )
        finally:
            executor.close()

    def run(self, model: ir.Model, passes: list | None = None, instruments: list[Instrument] = ()) -> list[PassRecord]:
        """`passes` (default: the session's) over `model` in place, in the session's context."""
        with self.context() as ctx, using(ctx):
            return run_pipeline(model, self.passes if passes is None else passes, instruments)


def complete_pipeline(passes: list, target: str) -> list:
    """Start with `canonicalize`, then what the target needs at the end (`codegen.targets`: ort
    ends with `lower-ort`, triton drops it and ends with `fuse`)."""
    if CanonicalizePass.name not in [p.name for p in passes]:
        passes = [CanonicalizePass()] + passes
    return get_target(target).complete(passes)


def calibration_batches(calibration, count: int, model, source_info, extra: int = 0):
    """Batches of a data file (its first `count` samples, `extra` more when it has them) or of an
    iterable of input dicts (all of them), checked against the model's inputs; None for None."""
    if calibration is None:
        return None
    from qcompiler.analysis.calib_data import load_calibration, validate_batches

    if isinstance(calibration, (str, os.PathLike)):
        return load_calibration(calibration, count, model, bundled=source_info.bundled, extra=extra)
    batches = [dict(b) for b in calibration]
    return validate_batches(batches, model)

