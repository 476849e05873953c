"""Pass-manager instruments: print the IR, dump it, verify it, measure numeric drift.

- `PrintIR`: logs the IR text after every pass, or only after passes that changed it.
- `DumpIR`: writes `000-input.onnxtxt`, `001-<pass>.onnxtxt`, ... and `stats.json` (per pass:
  time, modified, statistics, drift) into a directory, atomically at the end of the run.
- `Verify`: runs `qcompiler.ir.verify` after every pass.
- `Drift`: runs the model on a probe batch before the pipeline and after every pass, in ONNX
  Runtime with the `qc` ops expanded (`qcompiler.analysis.execute.run_expanded`), and records how far the
  output moved from the float model's (`qcompiler.analysis.execute.drift`). A run that fails is a warning
  naming the pass and the reason (and the record's `measure_error`), never a failed compile.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompiler.analysis import execute
from qcompiler.ir import VerificationError, to_text, verify
from qcompiler.pipeline.pass_manager import Instrument, PassRecord
from qcompiler.pipeline.passbase import Pass
from qcompiler.support.fileio import AtomicDir

log = logging.getLogger(__name__)


class PrintIR(Instrument):
    def __init__(self, only_changed: bool = False):
        self.only_changed = only_changed

    def run_begin(self, model: ir.Model) -> None:
        log.info("IR before the pipeline:\n%s", to_text(model))

    def after_pass(self, pass_: Pass, model: ir.Model, record: PassRecord) -> None:
        if record.modified or not self.only_changed:
            log.info("IR after %s:\n%s", record.spec, to_text(model))


class Verify(Instrument):
    def run_begin(self, model: ir.Model) -> None:
        verify(model)

    def after_pass(self, pass_: Pass, model: ir.Model, record: PassRecord) -> None:
        try:
            verify(model)
        except VerificationError as exc:
            raise VerificationError(f"IR invalid after this pass: {exc}") from exc  # the pass manager names the passes


class Drift(Instrument):
    """Output drift against the model as it entered the pipeline, on a fixed probe batch."""

    def __init__(self, probe: Mapping[str, np.ndarray]):
        self.probe = dict(probe)
        self.reference: dict[str, np.ndarray] | None = None
        self.warnings: list[str] = []  # measurements that failed, each naming the pass and the reason

    def run_begin(self, model: ir.Model) -> None:
        self.reference = self.measure(model, "input", lambda: execute.run_expanded(model, self.probe))

    def after_pass(self, pass_: Pass, model: ir.Model, record: PassRecord) -> None:
        if self.reference is None:
            record.measure_error = "the model before the pipeline could not be run on the probe"
            return
        outputs = self.measure(model, record.name, lambda: execute.run_expanded(model, self.probe), record)
        if outputs is not None:
            record.drift = execute.drift(self.reference, outputs)

    def measure(self, model: ir.Model, stage: str, run, record: PassRecord | None = None):
        """`run()`, or None with a warning naming `stage` and the reason when it fails."""
        try:
            return run()
        except Exception as exc:  # a measurement never fails the compile
            reason = str(exc) if isinstance(exc, execute.MeasurementError) else f"{type(exc).__name__}: {execute.first_line(exc)}"
            where = "before the pipeline" if stage == "input" else f"after pass '{stage}'"
            text = f"not measured {where}: {reason}"
            log.warning("%s", text)
            self.warnings.append(text)
            if record is not None:
                record.measure_error = reason
            return None


class DumpIR(Instrument):
    def __init__(self, directory: str | Path, pipeline: str = "", keep: tuple[str, ...] = ()):
        self.target = AtomicDir(directory)
        self.pipeline = pipeline
        self.keep = keep  # entries of the replaced folder kept: the artifact nested inside it

    def run_begin(self, model: ir.Model) -> None:
        self.path = self.target.begin()
        (self.path / "000-input.onnxtxt").write_text(to_text(model))

    def after_pass(self, pass_: Pass, model: ir.Model, record: PassRecord) -> None:
        (self.path / f"{record.index:03d}-{record.name}.onnxtxt").write_text(to_text(model))

    def run_end(self, model: ir.Model, records: list[PassRecord], failed: str | None) -> None:
        stats = {
            "schema": "qcompiler.dump-stats/1",
            "pipeline": self.pipeline,
            "failed": failed,
            "passes": [r.to_json() for r in records],
        }
        (self.path / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True, default=_json_default) + "\n")
        self.target.commit(keep=self.keep)
        log.info("IR dumps in %s", self.target.final)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
