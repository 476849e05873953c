"""Calibration statistics: run the float graph on calibration data and summarise, per input channel,
every activation that a quantized MatMul / Gemm / Conv will read.

What is kept for one activation tensor (`TensorStats`), all O(channels) in memory, never
O(tokens): per channel min, max, absmax, mean |x| and mean x^2 (the channel energy `E_k` of
METHODS.md); per tensor min, max and a streaming histogram; and a small deterministic sample of rows (channel
vectors) for later per-layer searches (SmoothQuant's alpha, error estimates).

`collect` runs the graph in ONNX Runtime on a copy of the model whose wanted intermediate values
are extra graph outputs, one batch at a time: a batch's activations are folded into the running
statistics and dropped before the next batch runs (peak memory: one batch's wanted activations,
which ONNX Runtime returns together). Every row counts, padding tokens included: the graph does
not say which positions are padding, and the deployed graph sees them too. Large models (and any
with `sequential=True`) run one block at a time instead (`qcompiler.analysis.calib_sequential`), with the
same statistics and one block's weights in a session.

Rules that make the statistics deterministic (the same data gives bit-for-bit the same stats, as
long as ONNX Runtime computes the same activations for the same inputs, which its CPU kernels do
run to run at a fixed thread count):

Histogram (`Histogram`). Bins have a width `w = 2**k` (a power of two) and cover the symmetric
range `[-w*B/2, w*B/2)`, `B` bins (a multiple of 4); bin `i` holds `floor(x / w) + B/2 == i`,
which is exact in floating point because `w` is a power of two. `k` is the smallest integer such
that every value seen satisfies `|x| < w*B/2`. When a batch needs a larger range, `k` grows by one
step at a time and each step merges bin pairs (`2j, 2j+1` -> `j + B/4`), which is exactly the
binning the coarser width would have given. So the final histogram depends only on the multiset of
values seen: not on batch order, batch size or how often the range grew. The price is resolution:
the data's range spans between B/4 and B/2 bins on its larger side.

Sample (`sample`). Bottom-k sampling by a fixed hash: each row (a token, or one pixel of an NCHW
map, as a channel vector) has the id `(s << 32) | j`, `s` the sample it belongs to (samples
counted over all batches in data order; a batch's rows are divided evenly among its samples, or
all belong to its first when they do not divide) and `j` its place within that sample; its key is
`splitmix64(id)`, and the sample is the `sample_rows` rows with the smallest keys, stored in data
order. It is a uniform sample without replacement that depends only on the data, never on
timing, threads, or how the batches are grouped into shards (`Accumulator.merge`).

Shards. The statistics of contiguous shards of the batches merge exactly into those of one
stream: min and max are exact, the histogram is merged bin for bin, the sample is the bottom-k
of the shards' bottom-ks, and the float64 channel sums are added batch by batch in batch order.

Clipping ranges (`TensorStats.clip_range`): every range contains 0 (an integer grid represents 0
exactly, as the zero point of ONNX's QuantizeLinear does). Symmetric ranges are `(-t, t)`.
- `minmax`: the observed range.
- `percentile`: the `p`-th percentile of |x| (symmetric), or the `(100-p)`-th and `p`-th
  percentiles of x (asymmetric), interpolated linearly inside a histogram bin.
- `entropy`: TensorRT's KL-divergence calibration (Migacz, "8-bit Inference with TensorRT", GTC
  2017). Symmetric: on the |x| histogram, for each candidate threshold of `i >= 2**(bits-1)` bins
  the reference P is the first `i` bins with the clipped tail added to the last one, Q is those
  bins merged into `2**(bits-1)` levels and spread back over each level's non-empty bins; the
  threshold minimising KL(P || Q) wins (counts smoothed by 1e-4 so empty bins stay finite).
  Asymmetric: the same over windows `[max(min, -t), min(max, t))` of the signed histogram with
  `2**bits` levels, so a one-sided tensor does not spend levels on empty space.
- `mse`: the range minimising the expected squared quantization error under the histogram, values
  taken as uniform inside each bin (the error integrals are computed in closed form, so the curve
  has no aliasing between bin and grid). Symmetric grid: `t / (2**(bits-1) - 1)` steps, codes
  `+-(2**(bits-1) - 1)`; asymmetric: `2**bits` codes over `[lo, hi]` with a rounded zero point, as
  ONNX Runtime quantizes. The search is a coarse grid over the range then a finer one around the best.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from qcompiler.analysis.calib_data import BatchChecker, batch_size_of  # noqa: F401  (batch_size_of: part of this API)
from qcompiler.errors import UserError, first_line
from qcompiler.ir import spill
from qcompiler.ir.meta import CALIBRATION_KEY, STATS_KEY  # noqa: F401  (part of this API)

log = logging.getLogger(__name__)

MINMAX_BINS = 64  # the histogram size when only min-max ranges are read (no clipping search needs bins)
HISTOGRAM_BINS = 2048  # the histogram size of the clipping searches (percentile, entropy, mse) by default
METHODS = ("minmax", "percentile", "entropy", "mse")

_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})


# --------------------------------------------------------------------------------------------
# Histogram


class Histogram:
    """A streaming histogram of values with power-of-two bin width (see the module docstring).

    `counts[i]` counts values in `[edges[i], edges[i+1])`, `edges[i] = (i - bins/2) * width`.
    Before any non-zero value arrives the width is undetermined (`exponent is None`) and zeros
    are only counted."""

    def __init__(self, bins: int = 2048):
        if bins < 8 or bins % 4:
            raise ValueError(f"histogram bins must be a multiple of 4 and at least 8, got {bins}")
        self.bins = int(bins)
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.exponent: int | None = None
        self._pending_zeros = 0

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.exponent) if self.exponent is not None else 0.0

    @property
    def half(self) -> int:
        return self.bins // 2

    @property
    def edges(self) -> np.ndarray:
        return (np.arange(self.bins + 1, dtype=np.float64) - self.half) * self.width

    @property
    def total(self) -> int:
        return int(self.counts.sum()) + self._pending_zeros

    @property
    def nbytes(self) -> int:
        return self.counts.nbytes

    def add(self, values: np.ndarray, absmax: float | None = None) -> None:
        """Count finite `values` (any shape, any float dtype); `absmax` if the caller knows it."""
        x = np.asarray(values)
        x = (x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)).ravel()
        if x.size == 0:
            return
        if absmax is None:
            absmax = float(np.max(np.abs(x)))
        if absmax == 0.0:
            if self.exponent is None:
                self._pending_zeros += x.size
            else:
                self.counts[self.half] += x.size
            return
        needed = self._exponent_for(absmax)
        if self.exponent is None:
            self.exponent = needed
            self.counts[self.half] += self._pending_zeros
            self._pending_zeros = 0
        while self.exponent < needed:
            self._coarsen()
        # Multiplying by a power of two is exact, so floor() puts every value in its true bin
        # (float32 values are scaled in float32 while the factor is a normal float32 and the
        # scaled values stay within a few bins; below 2**-126 of the width a value could round).
        if x.dtype == np.float32 and abs(self.exponent) < 100:
            scaled = x * np.float32(math.ldexp(1.0, -self.exponent))
        else:
            scaled = x.astype(np.float64) * math.ldexp(1.0, -self.exponent)
        np.floor(scaled, out=scaled)
        index = scaled.astype(np.intp)
        index += self.half
        self.counts += np.bincount(index, minlength=self.bins)

    def _exponent_for(self, absmax: float) -> int:
        """The smallest k with absmax < 2**k * bins/2."""
        _, e = math.frexp(absmax)  # 2**(e-1) <= absmax < 2**e
        # half * 2**k is at most 2**(e-1) <= absmax here, so the loop ends at the smallest k.
        k = e - (self.half.bit_length() - 1) - 2
        while absmax >= math.ldexp(self.half, k):
            k += 1
        return k

    def _coarsen(self) -> None:
        """Double the width: bins 2j and 2j+1 become bin j + bins/4 (exact)."""
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        self.counts = np.zeros(self.bins, dtype=np.int64)
        quarter = self.bins // 4
        self.counts[quarter : quarter + self.half] = merged
        self.exponent += 1

    def folded(self) -> np.ndarray:
        """Counts of |x|: bin j covers [j*width, (j+1)*width), `bins/2` bins (a negative value
        exactly on a bin edge, -j*width, is counted in bin j-1)."""
        pos = self.counts[self.half :]
        neg = self.counts[: self.half][::-1]
        return pos + neg

    def merge(self, other: Histogram) -> None:
        """Add `other`'s counts: the histogram of both value sets, exactly (the finer of the two is
        coarsened to the wider width first, as streaming both sets through one would have done)."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge a {other.bins}-bin histogram into a {self.bins}-bin one")
        # new arrays, never in place: an accumulator from Ray's object store holds read-only ones
        if other.exponent is None:  # zeros only
            if self.exponent is None:
                self._pending_zeros += other._pending_zeros
            else:
                self.counts = self.counts.copy()
                self.counts[self.half] += other._pending_zeros
            return
        other = other.copy()
        if self.exponent is None:
            other.counts[other.half] += self._pending_zeros
            self.counts, self.exponent, self._pending_zeros = other.counts, other.exponent, 0
            return
        while self.exponent < other.exponent:
            self._coarsen()
        while other.exponent < self.exponent:
            other._coarsen()
        self.counts = self.counts + other.counts

    def copy(self) -> Histogram:
        other = Histogram(self.bins)
        other.counts = self.counts.copy()
        other.exponent = self.exponent
        other._pending_zeros = self._pending_zeros
        return other

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return (
            self.bins == other.bins
            and self.exponent == other.exponent
            and self._pending_zeros == other._pending_zeros
            and np.array_equal(self.counts, other.counts)
        )

    def __repr__(self) -> str:
        return f"Histogram(bins={self.bins}, width=2**{self.exponent}, total={self.total})"


# --------------------------------------------------------------------------------------------
# Statistics of one tensor


@dataclasses.dataclass(eq=False)
class TensorStats:
    """Statistics of one activation tensor, O(channels) memory (see the module docstring)."""

    channel_axis: int  # -1 for MatMul/Gemm inputs (channel = last axis), 1 for Conv inputs (NCHW)
    absmax: np.ndarray  # [C] float64, max |x| per channel
    channel_min: np.ndarray  # [C] float64, min x per channel
    channel_max: np.ndarray  # [C] float64, max x per channel
    mean_abs: np.ndarray  # [C] float64, mean |x| per channel
    mean_sq: np.ndarray  # [C] float64, mean x^2 per channel (channel energy E_k)
    count: int  # elements seen per channel (rows)
    min: float
    max: float
    histogram: Histogram | None  # None for statistics derived by `scaled` (a histogram does not rescale per channel)
    sample: np.ndarray  # [S, C] float32, deterministic subsample of rows
    _ranges: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def channels(self) -> int:
        return int(self.absmax.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (what grows with channels; nothing grows with tokens)."""
        arrays = (self.absmax, self.channel_min, self.channel_max, self.mean_abs, self.mean_sq, self.sample)
        return sum(a.nbytes for a in arrays) + (self.histogram.nbytes if self.histogram is not None else 0)

    def scaled(self, factor: np.ndarray) -> TensorStats:
        """The statistics of this tensor times a positive per-channel `factor`, derived exactly
        (what `smooth` does to a tensor): everything but the histogram, so only the `minmax`
        range can be taken from the result."""
        c = np.asarray(factor, np.float64).reshape(-1)
        if c.shape != self.absmax.shape or not np.all(c > 0):
            raise ValueError(f"scaled: need {self.channels} positive factors, got shape {c.shape}")
        lo, hi = self.channel_min * c, self.channel_max * c
        return TensorStats(
            channel_axis=self.channel_axis, absmax=self.absmax * c, channel_min=lo, channel_max=hi,
            mean_abs=self.mean_abs * c, mean_sq=self.mean_sq * c * c, count=self.count,
            min=float(lo.min()), max=float(hi.max()), histogram=None,
            sample=(self.sample * c.astype(np.float32)).astype(np.float32),
        )

    def outlier_ratio(self) -> float | None:
        """max channel absmax / median channel absmax (None when the median is 0)."""
        median = float(np.median(self.absmax)) if self.absmax.size else 0.0
        return float(np.max(self.absmax)) / median if median > 0 else None

    def equals(self, other: TensorStats) -> bool:
        """Bit-for-bit equality of every statistic."""
        return (
            self.channel_axis == other.channel_axis
            and self.count == other.count
            and _same(self.min, other.min)
            and _same(self.max, other.max)
            and all(
                a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
                for a, b in (
                    (self.absmax, other.absmax),
                    (self.channel_min, other.channel_min),
                    (self.channel_max, other.channel_max),
                    (self.mean_abs, other.mean_abs),
                    (self.mean_sq, other.mean_sq),
                    (self.sample, other.sample),
                )
            )
            and self.histogram == other.histogram
        )

    def clip_range(self, method: str, percentile: float = 99.99, bits: int = 8, symmetric: bool = False) -> tuple[float, float]:
        """The (lo, hi) clipping range by `method` (minmax, percentile, entropy, mse); contains 0."""
        if method not in METHODS:
            raise UserError(f"unknown calibration method '{method}'; choose one of {', '.join(METHODS)}")
        if not 50.0 < percentile <= 100.0:
            raise UserError(f"percentile must be in (50, 100], got {percentile}")
        if not 2 <= bits <= 16:
            raise UserError(f"bits must be from 2 to 16, got {bits}")
        key = (method, float(percentile), int(bits), bool(symmetric))
        if key not in self._ranges:
            self._ranges[key] = self._compute_range(method, percentile, bits, symmetric)
        return self._ranges[key]

    def _compute_range(self, method: str, percentile: float, bits: int, symmetric: bool) -> tuple[float, float]:
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        absmax = max(-lo, hi)
        if absmax == 0.0:
            return (0.0, 0.0)
        if method == "minmax":
            return (-absmax, absmax) if symmetric else (lo, hi)
        if self.histogram is None:
            raise ValueError(f"the {method} range needs a histogram, and derived statistics have none; collect them again")
        if method == "percentile":
            if symmetric:
                t = _quantile(self.histogram.folded(), self.histogram.width, 0.0, percentile / 100.0)
                t = min(t, absmax)
                return (-t, t)
            h = self.histogram
            start = -h.half * h.width
            a = _quantile(h.counts, h.width, start, 1.0 - percentile / 100.0)
            b = _quantile(h.counts, h.width, start, percentile / 100.0)
            return (min(max(a, self.min), 0.0), max(min(b, self.max), 0.0))
        if method == "entropy":
            if symmetric:
                t = _entropy_symmetric(self.histogram, 2 ** (bits - 1), absmax)
                return (-t, t)
            return _entropy_asymmetric(self.histogram, 2**bits, self.min, self.max)
        if symmetric:
            t = _mse_symmetric(self.histogram, self.min, self.max, bits, absmax)
            return (-t, t)
        return _mse_asymmetric(self.histogram, self.min, self.max, bits, lo, hi)


def _same(a: float, b: float) -> bool:
    return np.float64(a).tobytes() == np.float64(b).tobytes()


# --------------------------------------------------------------------------------------------
# Range methods


def _quantile(counts: np.ndarray, width: float, start: float, q: float) -> float:
    """The q-quantile of a histogram whose bin i covers [start + i*width, start + (i+1)*width)."""
    total = counts.sum()
    cdf = np.cumsum(counts)
    target = q * total
    i = int(np.searchsorted(cdf, target, side="left"))
    i = min(i, len(counts) - 1)
    before = cdf[i - 1] if i > 0 else 0
    inside = counts[i]
    frac = (target - before) / inside if inside > 0 else 0.0
    return float(start + (i + min(max(frac, 0.0), 1.0)) * width)


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """Move eps of mass onto empty bins (MXNet's `_smooth_distribution`); None if p is all zero."""
    zero = p == 0
    n_zero = int(zero.sum())
    n_nonzero = p.size - n_zero
    if n_nonzero == 0:
        return None
    eps1 = eps * n_zero / n_nonzero
    out = p.astype(np.float64).copy()
    out[zero] = eps
    out[~zero] -= eps1
    if np.any(out <= 0):
        return None
    return out


def _kl(window: np.ndarray, left_out: float, right_out: float, levels: int) -> float:
    """KL(P || Q) for one candidate window of histogram bins (TensorRT's calibration)."""
    n = window.size
    p = window.astype(np.float64).copy()
    p[0] += left_out
    p[-1] += right_out
    # Merge the window into `levels` groups of (nearly) equal bin counts, then spread each
    # group's mass evenly over the group's non-empty bins.
    bounds = (np.arange(levels + 1) * n) // levels
    starts = bounds[:-1]
    nonzero = (window != 0).astype(np.float64)
    sums = np.add.reduceat(window.astype(np.float64), starts)
    nz = np.add.reduceat(nonzero, starts)
    per_bin = np.divide(sums, nz, out=np.zeros_like(sums), where=nz > 0)
    q = np.repeat(per_bin, np.diff(bounds)) * nonzero
    # Smoothing acts on counts (as MXNet's calibration does), then both are normalised.
    p, q = _smooth(p), _smooth(q)
    if p is None or q is None:
        return math.inf
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def _entropy_symmetric(hist: Histogram, levels: int, absmax: float) -> float:
    folded = hist.folded()
    nonzero = np.flatnonzero(folded)
    last = int(nonzero[-1]) + 1
    if last <= levels:
        return absmax
    best, best_i = math.inf, last
    tail = np.concatenate([np.cumsum(folded[::-1])[::-1], [0]])  # tail[i] = sum(folded[i:])
    for i in range(levels, last + 1):
        kl = _kl(folded[:i], 0.0, float(tail[i]), levels)
        if kl < best:
            best, best_i = kl, i
    return min(best_i * hist.width, absmax)


def _entropy_asymmetric(hist: Histogram, levels: int, vmin: float, vmax: float) -> tuple[float, float]:
    counts = hist.counts
    nonzero = np.flatnonzero(counts)
    first, last = int(nonzero[0]), int(nonzero[-1]) + 1
    first, last = min(first, hist.half), max(last, hist.half + 1)  # keep the zero bin in
    lo0, hi0 = min(vmin, 0.0), max(vmax, 0.0)
    if last - first <= levels:
        return (lo0, hi0)
    cum = np.concatenate([[0], np.cumsum(counts)])
    total = float(cum[-1])
    best, best_window = math.inf, (first, last)
    reach = max(hist.half - first, last - hist.half)
    for i in range(1, reach + 1):
        a, b = max(first, hist.half - i), min(last, hist.half + i)
        if b - a < levels:
            continue
        kl = _kl(counts[a:b], float(cum[a]), total - float(cum[b]), levels)
        if kl < best:
            best, best_window = kl, (a, b)
    a, b = best_window
    lo = max(vmin, (a - hist.half) * hist.width)
    hi = min(vmax, (b - hist.half) * hist.width)
    return (min(lo, 0.0), max(hi, 0.0))


def _bins_as_intervals(hist: Histogram, vmin: float, vmax: float, max_intervals: int | None = None):
    """Non-empty bins as (left, right, count), the outer ones trimmed to the observed [min, max].

    With `max_intervals`, groups of adjacent bins are merged first so that at most that many
    intervals span the data (a cheaper, coarser density for a first search)."""
    counts = hist.counts
    nonzero = np.flatnonzero(counts)
    first, last = int(nonzero[0]), int(nonzero[-1]) + 1
    group = 1
    if max_intervals is not None and last - first > max_intervals:
        group = -(-(last - first) // max_intervals)
    span = counts[first:last]
    pad = (-len(span)) % group
    merged = np.concatenate([span, np.zeros(pad, dtype=span.dtype)]).reshape(-1, group).sum(axis=1)
    idx = np.flatnonzero(merged)
    left = (first + idx * group - hist.half).astype(np.float64) * hist.width
    right = left + group * hist.width
    left = np.maximum(left, vmin)
    right = np.minimum(right, vmax)
    right = np.maximum(right, left)
    return left, right, merged[idx].astype(np.float64)


def _saw(v: np.ndarray) -> np.ndarray:
    """Antiderivative of (t - round(t))^2 with value 0 at t = 0: k/12 + (r^3 + 1/8)/3 - 1/24
    for t = k + r, k = floor(t + 1/2)."""
    k = np.floor(v + 0.5)
    r = v - k
    return k * (1.0 / 12.0) + r * r * r * (1.0 / 3.0)


def _cube(x: np.ndarray) -> np.ndarray:
    return x * x * x


def _err_antiderivative(x: np.ndarray, s: np.ndarray, mlo: np.ndarray, mhi: np.ndarray) -> np.ndarray:
    """A continuous antiderivative of e(x) = (x - Q(x))^2 for Q(x) = s * clip(round(x/s), mlo, mhi).

    Inside the grid's reach [(mlo - 1/2) s, (mhi + 1/2) s] it is the rounding sawtooth
    s^3 saw(x/s); beyond it the clipping error (x - mlo s)^2 or (x - mhi s)^2 integrates to a
    cube. Shapes broadcast: x [1, bins], the grid parameters [candidates, 1]."""
    lower = (mlo - 0.5) * s
    upper = (mhi + 0.5) * s
    xc = np.clip(x, lower, upper)
    out = _saw(xc / s) * _cube(s)
    # Clipped parts: from the grid's reach to x; (x - m s)^3 / 3 less its value at the reach,
    # which is (-s/2)^3/3 below and (s/2)^3/3 above.
    low = np.minimum(x, lower) - mlo * s
    out += (_cube(low) + _cube(0.5 * s)) * (1.0 / 3.0)
    high = np.maximum(x, upper) - mhi * s
    out += (_cube(high) - _cube(0.5 * s)) * (1.0 / 3.0)
    return out


def _expected_mse(bins, s: np.ndarray, mlo: np.ndarray, mhi: np.ndarray, chunk: int = 128) -> np.ndarray:
    """Expected squared error per candidate grid, values uniform inside each bin."""
    if len(s) > chunk:
        return np.concatenate([
            _expected_mse(bins, s[i : i + chunk], mlo[i : i + chunk], mhi[i : i + chunk], chunk)
            for i in range(0, len(s), chunk)
        ])
    left, right, count = bins
    s, mlo, mhi = (np.asarray(a, np.float64)[:, None] for a in (s, mlo, mhi))
    width = right - left
    wide = width > 0
    integral = _err_antiderivative(right[None], s, mlo, mhi) - _err_antiderivative(left[None], s, mlo, mhi)
    per_bin = np.where(wide, integral / np.where(wide, width, 1.0), 0.0)
    if not wide.all():  # point masses (a bin trimmed to one value)
        x = left[None]
        q = s * np.clip(np.round(x / s), mlo, mhi)
        per_bin = np.where(wide, per_bin, (x - q) ** 2)
    return (per_bin * count).sum(axis=1) / count.sum()


def _mse_symmetric(hist: Histogram, vmin: float, vmax: float, bits: int, absmax: float) -> float:
    qmax = 2 ** (bits - 1) - 1

    def evaluate(bins, t: np.ndarray) -> np.ndarray:
        return _expected_mse(bins, t / qmax, np.full_like(t, -qmax), np.full_like(t, qmax))

    # Coarse: 256 thresholds on a density of at most 256 intervals; fine: 65 thresholds between
    # the best coarse one's neighbours on the full histogram.
    fractions = np.linspace(1.0 / 256, 1.0, 256)
    err = evaluate(_bins_as_intervals(hist, vmin, vmax, 256), fractions * absmax)
    best = int(np.argmin(err))
    fine = np.linspace(fractions[max(best - 1, 0)], fractions[min(best + 1, len(fractions) - 1)], 65)
    fine_err = evaluate(_bins_as_intervals(hist, vmin, vmax), fine * absmax)
    return float(fine[int(np.argmin(fine_err))] * absmax)


def _asym_grid(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step, lowest and highest multiple of the step for `2**bits` codes over [lo, hi]
    with a rounded zero point (as ONNX Runtime computes them)."""
    qmax = 2**bits - 1
    s = (hi - lo) / qmax
    zp = np.clip(np.round(-lo / s), 0, qmax)
    return s, -zp, qmax - zp


def _mse_asymmetric(hist: Histogram, vmin: float, vmax: float, bits: int, lo: float, hi: float) -> tuple[float, float]:
    def evaluate(bins, fa: np.ndarray, fb: np.ndarray) -> np.ndarray:
        return _expected_mse(bins, *_asym_grid(fa * lo, fb * hi, bits))

    def search(bins, fa_values: np.ndarray, fb_values: np.ndarray) -> tuple[int, int]:
        fa, fb = np.meshgrid(fa_values, fb_values, indexing="ij")
        err = evaluate(bins, fa.ravel(), fb.ravel())
        return divmod(int(np.argmin(err)), len(fb_values))

    def refine(grid: np.ndarray, k: int) -> np.ndarray:
        if len(grid) == 1:
            return grid
        return np.linspace(grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)], 9)

    # Scale factors of the lower and upper end (a one-sided tensor keeps its zero end). Coarse:
    # 32 x 32 on a density of at most 256 intervals; fine: 9 x 9 around the best, full histogram.
    one = np.array([1.0])
    coarse = np.linspace(1.0 / 32, 1.0, 32)
    fa_grid = coarse if lo < 0 else one
    fb_grid = coarse if hi > 0 else one
    i, j = search(_bins_as_intervals(hist, vmin, vmax, 256), fa_grid, fb_grid)
    fa_grid, fb_grid = refine(fa_grid, i), refine(fb_grid, j)
    i, j = search(_bins_as_intervals(hist, vmin, vmax), fa_grid, fb_grid)
    return (float(fa_grid[i] * lo), float(fb_grid[j] * hi))


# --------------------------------------------------------------------------------------------
# Streaming accumulation


_SAMPLE_SEED = np.uint64(0x9E3779B97F4A7C15)
_ROW_BITS = 32  # a row id is (sample << 32) | row within the sample


def _splitmix64(ids: np.ndarray) -> np.ndarray:
    """splitmix64 of unsigned 64-bit ids (a bijection: distinct ids, distinct keys)."""
    z = ids.astype(np.uint64) + _SAMPLE_SEED
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _row_ids(first_sample: int, samples: int | None, rows: int) -> np.ndarray:
    """The ids of a batch's `rows` rows: `(sample << 32) | row within the sample`, the batch holding
    samples `first_sample ..` (`samples` of them, each `rows / samples` rows in a row; None: one
    sample per row). Rows that do not divide among the samples count as one sample's."""
    if samples is None:
        samples = rows
    per = rows // samples if samples and rows % samples == 0 else rows
    if per >= 1 << _ROW_BITS or first_sample + rows // max(per, 1) >= 1 << (63 - _ROW_BITS):
        raise ValueError(f"calibration batch too large for row ids: {rows} rows from sample {first_sample}")
    r = np.arange(rows, dtype=np.int64)
    sample, within = np.divmod(r, max(per, 1))
    return ((sample + first_sample) << _ROW_BITS) | within


def _row_keys(first_sample: int, samples: int | None, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys, ids) of a batch's rows (`_row_ids`); the sample keeps the rows of smallest key."""
    ids = _row_ids(first_sample, samples, rows)
    return _splitmix64(ids), ids


class Accumulator:
    """Running statistics of one tensor; `add` batches of activations, `finish` for TensorStats.

    Shards: the batches may be cut into contiguous shards, each with its own accumulator, and the
    shards' accumulators merged in batch order (`merge`) into the statistics of one stream, bit for
    bit. Everything but the channel sums is exact under any grouping (min, max, counts, histogram,
    the bottom-k sample by row id). The float64 sums are added batch by batch in batch order: the
    first shard's accumulator folds them as it goes (`folds=True`, what one stream does), a later
    shard's keeps each batch's sums (`folds=False`, O(batches x channels)) for `merge` to add in order."""

    def __init__(self, channel_axis: int, *, sample_rows: int = 512, bins: int = 2048, name: str = "", folds: bool = True):
        self.channel_axis = channel_axis
        self.sample_rows = int(sample_rows)
        self.name = name
        self.folds = folds
        self.histogram = Histogram(bins)
        self.channels: int | None = None
        self.rows = 0
        self.absmax = self.channel_min = self.channel_max = self.sum_abs = self.sum_sq = None
        self.min, self.max = math.inf, -math.inf
        self._batch_sums: list[tuple[np.ndarray, np.ndarray]] = []  # (sum |x|, sum x^2) per batch, when not folding
        self._next_sample = 0  # the first sample of a batch added without saying it
        # The sample: `filled` slots of fixed buffers, in no particular order (sorted at finish).
        self._filled = 0
        self._keys = np.zeros(self.sample_rows, dtype=np.uint64)
        self._index = np.zeros(self.sample_rows, dtype=np.int64)
        self._sample: np.ndarray | None = None

    def _start(self, channels: int) -> None:
        self.channels = channels
        self.absmax = np.zeros(channels, dtype=np.float64)
        self.channel_min = np.full(channels, np.inf)
        self.channel_max = np.full(channels, -np.inf)
        self.sum_abs = np.zeros(channels, dtype=np.float64)
        self.sum_sq = np.zeros(channels, dtype=np.float64)
        self._sample = np.zeros((self.sample_rows, channels), dtype=np.float32)

    def _check_channels(self, channels: int) -> None:
        if self.channels is None:
            self._start(channels)
        elif channels != self.channels:
            raise UserError(
                f"activation '{self.name}' has {channels} channels on this batch but {self.channels} before; "
                "calibration batches must give the model consistent shapes"
            )

    def add(self, array: np.ndarray, first_sample: int | None = None, samples: int | None = None) -> None:
        """Fold in one batch's activations. The batch holds samples `first_sample ..` of the data
        (`samples` of them; they number the sampled rows). Without them, every row is one sample
        and the batch follows the previous one."""
        x = np.asarray(array)
        if x.ndim == 0:
            x = x.reshape(1)
        axis = self.channel_axis
        if not -x.ndim <= axis < x.ndim:
            raise UserError(f"activation '{self.name}' has shape {x.shape}, without channel axis {self.channel_axis}")
        axis %= x.ndim
        channels = x.shape[axis]
        self._check_channels(channels)
        if x.size == 0:
            return
        rows = x.size // channels
        if first_sample is None:
            first_sample, samples = self._next_sample, None
        self._next_sample = first_sample + (rows if samples is None else samples)
        # Reductions in the input's float type (min, max and |x| are exact in it); sums in float64.
        xf = x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)
        others = tuple(i for i in range(x.ndim) if i != axis)
        batch_min, batch_max = xf.min(axis=others), xf.max(axis=others)
        lo, hi = float(batch_min.min()), float(batch_max.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):  # min/max propagate NaN and see Inf
            raise UserError(
                f"activation '{self.name}' is NaN or Inf on calibration data; the float model overflows "
                "on these inputs: check the calibration data"
            )
        np.minimum(self.channel_min, batch_min, out=self.channel_min)
        np.maximum(self.channel_max, batch_max, out=self.channel_max)
        ax = np.abs(xf)
        np.maximum(self.absmax, ax.max(axis=others), out=self.absmax)
        sum_abs = ax.sum(axis=others, dtype=np.float64)
        sq = ax.astype(np.float64)  # squares of float32 values are exact in float64
        np.multiply(sq, sq, out=sq)
        self._add_sums(sum_abs, sq.sum(axis=others))
        del sq
        del ax
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.histogram.add(xf, absmax=max(-lo, hi))
        self._add_sample(x, axis, first_sample, samples, rows)
        self.rows += rows

    def _add_sums(self, sum_abs: np.ndarray, sum_sq: np.ndarray) -> None:
        if self.folds:
            self.sum_abs = self.sum_abs + sum_abs
            self.sum_sq = self.sum_sq + sum_sq
        else:
            self._batch_sums.append((sum_abs, sum_sq))

    def _add_sample(self, x: np.ndarray, axis: int, first_sample: int, samples: int | None, rows: int) -> None:
        """Bottom-k by row key: keep the `sample_rows` rows with the smallest keys seen so far."""
        size, filled = self.sample_rows, self._filled
        if size <= 0:
            return
        keys, ids = _row_keys(first_sample, samples, rows)
        if filled == size:
            candidates = np.flatnonzero(keys < self._keys.max())
        else:
            candidates = np.arange(rows)
        if candidates.size == 0:
            return
        if candidates.size > size:  # only the smallest keys of this batch can survive
            candidates = candidates[np.argpartition(keys[candidates], size - 1)[:size]]
        merged = np.concatenate([self._keys[:filled], keys[candidates]])
        keep = np.argpartition(merged, size - 1)[:size] if merged.size > size else np.arange(merged.size)
        kept_old = np.zeros(filled, dtype=bool)
        kept_old[keep[keep < filled]] = True
        entering = candidates[keep[keep >= filled] - filled]
        # New rows go into evicted slots first, then into free ones.
        slots = np.concatenate([np.flatnonzero(~kept_old), np.arange(filled, size)])[: entering.size]
        moved = np.moveaxis(x, axis, -1)
        if moved.ndim == 1:
            gathered = moved[None]
        else:
            gathered = moved[np.unravel_index(entering, moved.shape[:-1])]
        self._sample[slots] = gathered
        self._keys[slots] = keys[entering]
        self._index[slots] = ids[entering]
        self._filled = int(keep.size)

    def merge(self, later: Accumulator) -> None:
        """Fold in the statistics of a later shard (batches that all come after this one's),
        which kept its batch sums (`folds=False`); the result is that of one stream over both."""
        if later.folds:
            raise ValueError("merge: a later shard's accumulator must keep its batch sums (folds=False)")
        if later.channels is None:
            return
        self._check_channels(later.channels)
        # new arrays, not in place: a shard's arrays that came through Ray's object store are read-only
        self.channel_min = np.minimum(self.channel_min, later.channel_min)
        self.channel_max = np.maximum(self.channel_max, later.channel_max)
        self.absmax = np.maximum(self.absmax, later.absmax)
        for sum_abs, sum_sq in later._batch_sums:
            self._add_sums(sum_abs, sum_sq)
        self.min, self.max = min(self.min, later.min), max(self.max, later.max)
        self.histogram.merge(later.histogram)
        self._merge_sample(later)
        self.rows += later.rows
        self._next_sample = max(self._next_sample, later._next_sample)

    def _merge_sample(self, later: Accumulator) -> None:
        """The bottom-k of both samples' rows (the bottom-k of a union is that of the parts' bottom-ks)."""
        size, mine, theirs = self.sample_rows, self._filled, later._filled
        if size <= 0 or theirs == 0:
            return
        keys = np.concatenate([self._keys[:mine], later._keys[:theirs]])
        ids = np.concatenate([self._index[:mine], later._index[:theirs]])
        rows = np.concatenate([self._sample[:mine], later._sample[:theirs]])
        keep = np.argpartition(keys, size - 1)[:size] if keys.size > size else np.arange(keys.size)
        self._keys, self._index, self._sample = (np.resize(part, (size, *part.shape[1:])) for part in (keys, ids, rows))
        self._keys[: keep.size], self._index[: keep.size], self._sample[: keep.size] = keys[keep], ids[keep], rows[keep]
        self._filled = int(keep.size)

    def finish(self) -> TensorStats:
        if self.channels is None or self.rows == 0:
            raise UserError(f"activation '{self.name}' saw no data; the calibration set is empty")
        if not self.folds:
            raise ValueError("finish: merge a later shard's accumulator into the first shard's")
        order = np.argsort(self._index[: self._filled], kind="stable")
        return TensorStats(
            channel_axis=self.channel_axis,
            absmax=self.absmax.copy(),
            channel_min=self.channel_min.copy(),
            channel_max=self.channel_max.copy(),
            mean_abs=self.sum_abs / self.rows,
            mean_sq=self.sum_sq / self.rows,
            count=self.rows,
            min=float(self.min),
            max=float(self.max),
            histogram=self.histogram.copy(),
            sample=np.ascontiguousarray(self._sample[: self._filled][order]),
        )


def samples_on_disk(stats: list[TensorStats]) -> None:
    """A large model's row samples of `stats` moved to the compile's scratch file and mapped back
    read-only (`qcompiler.ir.spill.mapped`): few passes read them, and none writes."""
    for one, sample in zip(stats, spill.mapped([s.sample for s in stats])):
        one.sample = sample


def stats_of(arrays: Iterable[np.ndarray], channel_axis: int = -1, *, sample_rows: int = 512, bins: int = 2048) -> TensorStats:
    """TensorStats of activation batches given directly (tests, and passes that have the arrays)."""
    acc = Accumulator(channel_axis, sample_rows=sample_rows, bins=bins)
    for array in arrays:
        acc.add(array)
    return acc.finish()


# --------------------------------------------------------------------------------------------
# Finding the tensors and running the model


def _is_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.is_initializer()


def quantizable_inputs(model: ir.Model) -> dict[str, int]:
    """Value name -> channel axis of the activation input of every MatMul whose second input is a
    constant initializer (axis -1), every Gemm with constant B (axis -1, or 0 with transA=1) and
    every Conv with a constant weight (axis 1, NCHW). Main graph only, in graph order; floating
    activations only; constants are skipped."""
    found: dict[str, int] = {}
    for node in model.graph:
        # narrower than `ir.is_weighted_layer` on purpose: the layers `quantize` gives int8 activations
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        if len(node.inputs) < 2 or not _is_constant(node.inputs[1]):
            continue
        x = node.inputs[0]
        if x is None or not x.name or _is_constant(x):
            continue
        if x.type is not None and getattr(x.type, "dtype", None) not in _FLOAT_TYPES:
            continue
        if node.op_type == "Conv":
            axis = 1
        elif node.op_type == "Gemm":
            trans_a = node.attributes.get("transA")
            axis = 0 if trans_a is not None and trans_a.value else -1
        else:
            axis = -1
        if x.name in found and found[x.name] != axis:
            log.warning("'%s' is read with channel axis %d and %d; keeping %d", x.name, found[x.name], axis, found[x.name])
            continue
        found.setdefault(x.name, axis)
    return found


def _value_by_name(model: ir.Model) -> dict[str, ir.Value]:
    values = {v.name: v for v in model.graph.inputs}
    for node in model.graph:
        for v in node.outputs:
            if v.name:
                values[v.name] = v
    return values


def _instrumented_proto(model: ir.Model, names: list[str]) -> onnx.ModelProto:
    """A serialized copy of `model` with `names` added as graph outputs (the model is untouched)."""
    values = _value_by_name(model)
    proto = ir.serde.serialize_model(model)
    present = {o.name for o in proto.graph.output}
    for name in names:
        if name in present:
            continue
        value = values[name]
        if value.type is not None:
            info = ir.serde.serialize_value(value)
        else:
            info = onnx.ValueInfoProto(name=name)
        proto.graph.output.append(info)
    return proto


def _instrumented_session(model: ir.Model, names: list[str], threads: int | None):
    """A session of a large `model` with `names` added as graph outputs, loaded from a file with
    external data (the model's outputs are restored afterwards)."""
    from qcompiler.analysis.execute import ort_session

    values = _value_by_name(model)
    present = {o.name for o in model.graph.outputs}
    added = [values[name] for name in dict.fromkeys(names) if name not in present]
    model.graph.outputs.extend(added)
    try:
        return ort_session(model, threads)
    finally:
        for _ in added:
            model.graph.outputs.pop()


def collect(
    model: ir.Model,
    batches: Iterable[dict[str, np.ndarray]],
    tensors: dict[str, int],
    *,
    sample_rows: int = 512,
    bins: int = 2048,
    threads: int | None = None,
    progress: Callable | None = None,
    sequential: bool | None = None,
    executor: Any = None,
) -> dict[str, TensorStats]:
    """Run the float graph in ONNX Runtime over `batches` and return the statistics of `tensors`
    (value name -> channel axis), streaming: one batch's activations at a time.

    Each batch is checked first (`calib_data.check_batch`: names, dtypes, shapes, NaN/Inf).
    `progress(batches_done, samples_done)` is called after each batch (after each shard on Ray).

    `executor` (`qcompiler.support.parallel`; None or `InProcess`: one stream in this process):
    on Ray, the batches are cut into contiguous shards of at least `SHARD_MIN_BATCHES` batches, at
    most one a worker (fewer than two such shards run in this process); each runs the graph in its own
    session (the instrumented graph goes to the workers once, through the object store) and the
    shards' statistics are merged in batch order, bit for bit those of one stream
    (`Accumulator.merge`). Large models run in this process.

    `sequential`: run the graph one block at a time (`qcompiler.analysis.calib_sequential`; the same
    statistics, one block's weights in memory); None (default) does so for large models
    (`qcompiler.ir.is_large`). A graph that cannot be cut into blocks runs whole. Block by block
    runs in this process."""
    from qcompiler import ir as qir
    from qcompiler.analysis.calib_sequential import cut_segments
    from qcompiler.analysis.execute import ort_session

    if qir.qc_nodes(model):
        raise UserError("calibration runs the float graph in ONNX Runtime; put 'calibrate' before the passes that add qc ops")
    values = _value_by_name(model)
    unknown = [name for name in tensors if name not in values]
    if unknown:
        raise KeyError(f"no value named {unknown[0]!r} in the model's main graph")
    graph_inputs = {v.name for v in model.graph.inputs}
    fetched = [name for name in tensors if name not in graph_inputs]
    direct = [name for name in tensors if name in graph_inputs]
    accs = {name: Accumulator(axis, sample_rows=sample_rows, bins=bins, name=name) for name, axis in tensors.items()}
    checker = BatchChecker(model)
    if sequential is None:
        sequential = qir.is_large(model)
    segments = cut_segments(model, fetched) if sequential and fetched else None
    if sequential and fetched and segments is None:
        log.info("calibration: the graph has no blocks to cut it at; running it whole")
    if segments is not None:
        return _collect_by_segments(model, segments, batches, tensors, accs, checker, threads, progress)
    start = time.perf_counter()
    checked = _checked_batches(batches, checker, accs, direct)
    shards = 0
    if fetched and _fans_out(executor) and executor.workers >= 2 and not qir.is_large(model):
        checked = list(checked)  # listed to be counted; on one worker they stream as in-process
        shards = min(executor.workers, len(checked) // SHARD_MIN_BATCHES)
    if shards >= 2:
        job = ShardJob(_instrumented_proto(model, fetched).SerializeToString(), tuple(fetched),
                       {name: tensors[name] for name in fetched}, sample_rows, bins, threads)
        done = _collect_sharded(job, checked, accs, executor, progress, shards)
    else:
        session = None
        if fetched and qir.is_large(model):
            session = _instrumented_session(model, fetched, threads)
        elif fetched:
            data = _instrumented_proto(model, fetched).SerializeToString()
            session = ort_session(data, threads)
            del data
        done = _run_batches(session, fetched, checked, accs, progress)
    log.info("calibration: %d samples, %d tensors, %.2f s", done, len(tensors), time.perf_counter() - start)
    return {name: acc.finish() for name, acc in accs.items()}


# The fewest batches a calibration shard on a worker takes: each worker builds its own session of the model
# first, which on SmolLM2-135M costs more than a few batches (4 calibration windows: 7 s in this
# process, 12 s over 2 workers; 32 windows: 19.3 s and 16.7 s; docs/parallel.md, "Calibration over shards").
SHARD_MIN_BATCHES = 8


def _fans_out(executor: Any) -> bool:
    from qcompiler.support.parallel import InProcess

    return executor is not None and not isinstance(executor, InProcess)


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """What every calibration shard reads (shared through the executor): the float graph with the
    calibrated tensors as outputs (serialized), their channel axes and the collection options."""

    model: bytes
    fetched: tuple[str, ...]
    axes: dict[str, int]
    sample_rows: int
    bins: int
    threads: int | None


def collect_shard(job: ShardJob, shard: tuple[bool, list]) -> dict[str, Accumulator]:
    """One shard's statistics: `shard` is (first, batches), `batches` a contiguous run of
    `(index, first_sample, feeds)`; `first` says whether it is the first shard (whose accumulators
    fold their sums, `Accumulator.merge`)."""
    from qcompiler.analysis.execute import ort_session

    first, batches = shard
    accs = {name: Accumulator(job.axes[name], sample_rows=job.sample_rows, bins=job.bins, name=name, folds=first)
            for name in job.fetched}
    _run_batches(ort_session(job.model, job.threads), list(job.fetched), batches, accs, None)
    return accs


def _collect_sharded(job: ShardJob, batches: list, accs: dict[str, Accumulator], executor, progress,
                     shards: int) -> int:
    """Map `shards` contiguous shards of `batches` over `executor` and merge their accumulators
    into `accs` in batch order; the samples seen."""
    from qcompiler.support.parallel import chunks

    parts = chunks(batches, shards)
    total = len(batches)
    names, at = [], 0
    for part in parts:
        names.append(f"calibrate: batches {at + 1}-{at + len(part)} of {total}")
        at += len(part)
    shards = executor.map(collect_shard, [(i == 0, part) for i, part in enumerate(parts)], shared=job, names=names)
    done = 0
    for part, shard in zip(parts, shards):
        for name, acc in shard.items():
            if acc.folds:
                accs[name] = acc
            else:
                accs[name].merge(acc)
        done += sum(batch_size_of(feeds) for _, _, feeds in part)
        if progress is not None:
            progress(part[-1][0] + 1, done)
    return done


def _run_batches(session, fetched: list[str], batches, accs: dict[str, Accumulator], progress) -> int:
    """Run `session` over `(index, first_sample, feeds)` in order, folding each fetched activation
    into its accumulator and dropping it; the samples seen."""
    done = 0
    for index, first_sample, feeds in batches:
        samples = batch_size_of(feeds)
        if session is not None:
            try:
                outputs = session.run(fetched, feeds)
            except Exception as exc:
                raise UserError(
                    f"ONNX Runtime could not run the float model on calibration batch {index} "
                    f"({first_line(str(exc))}); check the calibration inputs' shapes"
                ) from None
            for i, name in enumerate(fetched):
                accs[name].add(outputs[i], first_sample, samples)
                outputs[i] = None  # drop each activation as soon as it is folded in
            del outputs
        done += samples
        if progress is not None:
            progress(index + 1, done)
    return done


def _checked_batches(batches, checker: BatchChecker, accs: dict[str, Accumulator], direct: list[str]):
    """(index, first_sample, feeds) of every non-empty batch, checked, with the calibrated graph
    inputs (`direct`) folded into their accumulators; the checker is finished after the last batch.
    `first_sample` counts the samples of the batches before (it numbers the sampled rows)."""
    first_sample = 0
    for index, batch in enumerate(batches):
        feeds = checker.check(batch, index)
        samples = batch_size_of(feeds)
        if samples == 0:
            continue
        for name in direct:
            accs[name].add(feeds[name], first_sample, samples)
        yield index, first_sample, feeds
        first_sample += samples
    checker.finish()


def _collect_by_segments(model, segments, batches, tensors, accs, checker, threads, progress) -> dict[str, TensorStats]:
    """`collect` one segment at a time: the batches are checked (and graph inputs that are
    calibrated folded in) first, then `calib_sequential.collect_sequential` runs the segments."""
    from qcompiler.analysis.calib_sequential import collect_sequential

    start = time.perf_counter()
    feeds, positions, first_samples, done = [], [], [], 0
    inputs = {v.name for v in model.graph.inputs}
    for index, first_sample, checked in _checked_batches(batches, checker, accs, [name for name in tensors if name in inputs]):
        feeds.append(checked)
        positions.append(index)
        first_samples.append(first_sample)
        done += batch_size_of(checked)

    def report(kept: int, samples: int) -> None:
        if progress is not None:
            progress(positions[kept - 1] + 1, samples)

    collect_sequential(model, segments, feeds, accs, threads=threads, progress=report, first_samples=first_samples)
    log.info("calibration: %d samples, %d tensors, %d blocks one at a time, %.2f s", done, len(tensors), len(segments),
             time.perf_counter() - start)
    return {name: acc.finish() for name, acc in accs.items()}


def summary(stats: Mapping[str, TensorStats], method: str = "minmax", percentile: float = 99.99, top: int = 10) -> list[dict[str, Any]]:
    """JSON-friendly lines for the `top` tensors with the largest outlier ratio."""

    def ratio(item):
        r = item[1].outlier_ratio()
        return math.inf if r is None else r

    ranked = sorted(stats.items(), key=lambda item: (-ratio(item), item[0]))[:top]
    lines = []
    for name, st in ranked:
        lo, hi = st.clip_range(method, percentile)
        r = st.outlier_ratio()
        lines.append(
            {
                "tensor": name,
                "channels": st.channels,
                "absmax": round(float(np.max(st.absmax)), 6),
                "outlier_ratio": None if r is None else round(r, 3),
                "range": [round(lo, 6), round(hi, 6)],
            }
        )
    return lines
