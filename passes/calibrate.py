"""`calibrate`: per-channel activation statistics of every quantizable MatMul / Gemm / Conv input.

Runs the float graph in ONNX Runtime over the calibration batches of the current compile
(`qcompiler.pipeline.context.current().calibration`) and attaches to each activation `X` read by a
MatMul/Gemm with a constant weight or a Conv with a constant kernel a `TensorStats`
(`value.meta["qc.stats"]`) holding, per input channel k (a column of `X` in `Y = X W`):

    absmax_k = max_t |x_tk|,   mean_abs_k = (1/T) sum_t |x_tk|,   E_k = mean_sq_k = (1/T) sum_t x_tk^2

over all T calibration rows (tokens, or pixels for NCHW Conv inputs), plus a per-tensor streaming
histogram and a small fixed-seed sample of rows. Memory is O(channels), never O(tokens). These feed
SmoothQuant's `s_j = max|X_j|^alpha / max|W_j|^(1-alpha)` (Xiao et al., arXiv 2211.10438), the
channel importance `E_k` of CMPQ-style bit allocation (Chen et al., arXiv 2410.13056) and the
activation clipping ranges: `minmax`, `percentile`, `entropy` (TensorRT's KL-divergence
calibration, Migacz 2017) and `mse` (the range minimising expected quantization error under the
histogram). The rules are in `qcompiler.analysis.calibration`.

`model.meta["qc.calibration"]` records the method, percentile, sample count and data source;
later passes read the range of a tensor with `stats.clip_range(method, percentile, bits, symmetric)`.

`modified` is False: the graph (its IR text) does not change; the statistics live in `.meta`, which
is scratch analysis state, and the `calibrated` property is recorded by the pass manager. A second
run on the same data attaches bit-for-bit identical statistics.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.calib_cache import collect_cached
from qcompiler.analysis.calibration import (HISTOGRAM_BINS, METHODS, MINMAX_BINS, batch_size_of, quantizable_inputs,
                                            samples_on_disk, summary)
from qcompiler.errors import UserError
from qcompiler.ir.meta import CALIBRATION_KEY, STATS_KEY, Prop
from qcompiler.pipeline import context
from qcompiler.pipeline.passbase import Pass, PassResult, option, register_pass
from qcompiler.support.progress import progress

log = logging.getLogger(__name__)

MAX_SAMPLE_ROWS = 1 << 20
MAX_BINS = 8192  # entropy and mse searches grow with the square of the bins: 8192 keeps them under a second a tensor


@register_pass
@dataclasses.dataclass(frozen=True)
class CalibratePass(Pass):
    """Collect per-channel activation statistics on calibration data (absmax, mean |x|, mean x^2, histogram)."""

    name = "calibrate"
    provided = frozenset({Prop.CALIBRATED, Prop.STATS_CURRENT})

    method: Literal["minmax", "percentile", "entropy", "mse"] = option(
        "minmax", "activation clipping rule later passes apply: minmax, percentile, entropy (KL) or mse"
    )
    percentile: float = option(99.99, "percentile of |x| kept by method=percentile, in (50, 100]")
    sample_rows: int = option(512, "rows (tokens) per tensor kept as a fixed-seed sample for alpha search")
    bins: int = option(HISTOGRAM_BINS, "histogram bins per tensor (a multiple of 4, 64 to 8192); method=minmax reads no histogram and keeps a coarse one")

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"option 'method' of pass 'calibrate' must be one of {', '.join(METHODS)}, got '{self.method}'")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) or not 50.0 < self.percentile <= 100.0:
            raise UserError(f"option 'percentile' of pass 'calibrate' must be in (50, 100], got {self.percentile}")
        if isinstance(self.sample_rows, bool) or not isinstance(self.sample_rows, int) or not 0 <= self.sample_rows <= MAX_SAMPLE_ROWS:
            raise UserError(f"option 'sample-rows' of pass 'calibrate' must be an integer from 0 to {MAX_SAMPLE_ROWS}, got {self.sample_rows}")
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or not 64 <= self.bins <= MAX_BINS or self.bins % 4:
            raise UserError(
                f"option 'bins' of pass 'calibrate' must be a multiple of 4 from 64 to {MAX_BINS}, got {self.bins}"
            )

    @property
    def histogram_bins(self) -> int:
        """`bins`, or a coarse histogram for `minmax`, whose ranges read none (it is the costliest statistic)."""
        return self.bins if self.method != "minmax" else MINMAX_BINS

    def call(self, model: ir.Model) -> PassResult:
        ctx = context.current()
        batches = ctx.require_calibration(self.name)
        tensors = quantizable_inputs(model)
        samples = batch_count = 0

        def on_batch(done: int, seen: int) -> None:
            nonlocal samples, batch_count
            samples, batch_count = seen, done
            bar.update(done)

        if tensors:
            total = len(batches) if hasattr(batches, "__len__") else None
            with progress("calibrate batches", total) as bar:
                found = collect_cached(
                    model, batches, tensors, cache_dir=ctx.cache_dir, sample_rows=self.sample_rows, bins=self.histogram_bins,
                    threads=ctx.threads, progress=on_batch, sequential=ctx.block_sequential, executor=ctx.executor,
                )
        else:
            log.warning("calibrate: the model has no MatMul/Gemm/Conv with constant weights; nothing to calibrate")
            from qcompiler.analysis.calib_data import validate_batches

            batches = list(batches)
            validate_batches(batches, model)
            samples, batch_count = sum(batch_size_of(b) for b in batches), len(batches)
            found = {}
        values = _values(model)
        samples_on_disk(list(found.values()))
        for name, stats in found.items():
            values[name].meta[STATS_KEY] = stats
        model.meta[CALIBRATION_KEY] = {
            "method": self.method,
            "percentile": self.percentile,
            "bins": self.histogram_bins,
            "samples": samples,
            "source": ctx.calibration_source or "api",
        }
        rows = {st.count for st in found.values()}
        stats = {
            "tensors": len(found),
            "samples": samples,
            "batches": batch_count,
            "rows": max(rows) if rows else 0,
            "stats_bytes": int(sum(st.nbytes for st in found.values())),
            "top_outliers": summary(found, self.method, self.percentile, top=10),
        }
        if found:
            ratios = [r for r in (st.outlier_ratio() for st in found.values()) if r is not None]
            stats["max_outlier_ratio"] = round(float(np.max(ratios)), 3) if ratios else None
        return PassResult(model, False, stats)


def _values(model: ir.Model) -> dict[str, ir.Value]:
    values = {v.name: v for v in model.graph.inputs}
    for node in model.graph:
        for v in node.outputs:
            values[v.name] = v
    return values
