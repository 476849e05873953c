"""Runs a pipeline: passes in the given order, instruments around each.

The manager never reorders passes. It checks the pipeline's property order before running
anything, times every pass, records its `modified` flag and statistics in a `PassRecord`, and
hands each step to the instruments (printing, dumping, verification, numeric drift), which are
where observability lives: passes themselves only transform and count.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import onnx_ir as ir

from qcompiler.errors import PassFailure, UserError, VerificationError, disk_full
from qcompiler.ir.meta import require_statistics
from qcompiler.pipeline.passbase import Pass, model_properties
from qcompiler.pipeline.spec import check_order, format_pass

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PassRecord:
    """What one pass did: its place, spec, time, `modified` flag, statistics and output drift."""

    index: int
    name: str
    spec: str
    seconds: float = 0.0
    modified: bool = False
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    drift: dict[str, float] | None = None
    measure_error: str | None = None  # why drift could not be measured after this pass

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Instrument:
    """Hooks around a pipeline run; override what you need."""

    def run_begin(self, model: ir.Model) -> None:
        pass

    def after_pass(self, pass_: Pass, model: ir.Model, record: PassRecord) -> None:
        pass

    def run_end(self, model: ir.Model, records: list[PassRecord], failed: str | None) -> None:
        pass


def run_pipeline(model: ir.Model, passes: list[Pass], instruments: list[Instrument] = ()) -> list[PassRecord]:
    """Run `passes` over `model` in place; returns one record per pass."""
    check_order(passes, model_properties(model))
    for instrument in instruments:
        instrument.run_begin(model)
    records: list[PassRecord] = []
    failed = None
    try:
        for index, pass_ in enumerate(passes, start=1):
            record = PassRecord(index=index, name=pass_.name, spec=format_pass(pass_))
            failed = pass_.name
            if pass_.reads_statistics:
                require_statistics(model, pass_.name)
            start = time.perf_counter()
            try:
                result = pass_(model)
            except UserError:
                raise
            except Exception as exc:
                full = disk_full(exc)  # bad input of a kind: the machine's, not the pass's
                if full is not None:
                    raise full from exc
                raise PassFailure(pass_.name, [r.name for r in records], exc) from exc
            record.seconds = round(time.perf_counter() - start, 4)
            record.modified = bool(result.modified)
            record.stats = dict(getattr(result, "stats", {}) or {})
            records.append(record)
            for instrument in instruments:
                try:
                    instrument.after_pass(pass_, model, record)
                except VerificationError as exc:  # the pass left an invalid IR (instruments.Verify)
                    raise PassFailure(pass_.name, [r.name for r in records[:-1]], exc) from exc
            log.info(
                "[%d/%d] %s: %.2f s, %s", index, len(passes), pass_.name, record.seconds,
                "modified" if record.modified else "unchanged",
            )
            failed = None
    finally:
        for instrument in instruments:
            instrument.run_end(model, records, failed)
    return records
