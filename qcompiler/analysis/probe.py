"""The probe batch: a small, fixed set of inputs on which per-pass numeric drift, the report's
per-layer errors and the `output-cosine` gate are measured (`choose`), first match wins:

1. `probe_inputs` given to `compile` (API);
2. `--eval-data`: its first `PROBE_SAMPLES` samples;
3. a bundled model's own real data (`BundledModel.probe_inputs`);
4. a held-apart slice of the calibration data (`hold_apart`): the samples after the first
   `--calib-count` when the file has more, else the last quarter (at most `PROBE_SAMPLES`) of the
   calibration samples, which calibration then does not see; a single sample is shared, and said so;
5. a captured module's example inputs;
6. otherwise, deterministic synthetic inputs built from the input types (symbolic dimensions set
   to `SYMBOLIC_DIM`, floats standard normal, integers in [0, 2) so that they are valid token ids,
   masks and indices alike). Numbers measured on them say nothing about real inputs (a Relu after
   a negative bias can make every output zero, and any quantization then "exact"): the report
   says so, and the `output-cosine` gate refuses to run on them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qcompiler.errors import UserError, shown

log = logging.getLogger(__name__)

SYMBOLIC_DIM = 2
SEED = 0
SYNTHETIC_LIMIT = 1 << 24  # elements a synthetic probe input may have
PROBE_SAMPLES = 4  # samples measured on when they come from a data file

# Probe.source values
API, EVAL_DATA, BUNDLED, CALIBRATION_HELD_APART, CALIBRATION_SHARED, EXAMPLE_INPUTS, SYNTHETIC = (
    "api", "eval-data", "bundled", "calibration-held-apart", "calibration-shared", "example-inputs", "synthetic")
SYNTHETIC_NOTE = ("no data to measure on: drift and per-layer errors were measured on a synthetic input "
                  f"(standard normal floats, free dims {SYMBOLIC_DIM}) and say nothing about real inputs; "
                  "give --calib or --eval-data")


@dataclasses.dataclass
class Probe:
    """The batch measurements run on, where it came from, and what to say about it."""

    feeds: dict[str, np.ndarray]
    source: str
    note: str = ""

    @property
    def is_data(self) -> bool:
        return self.source != SYNTHETIC


def choose(model: ir.Model, source, given=None, eval_batches=None, held_apart=None) -> Probe:
    """The probe for a compile (see the module docstring for the order)."""
    if given is not None:
        return Probe(dict(given), API)
    if eval_batches:
        return Probe(fit_batch(model, join(eval_batches, PROBE_SAMPLES)), EVAL_DATA)
    if getattr(source, "bundled", None) is not None:
        return Probe(dict(source.bundled.probe_inputs()), BUNDLED)
    if held_apart is not None:
        return dataclasses.replace(held_apart, feeds=fit_batch(model, held_apart.feeds))
    examples = example_inputs(model, source)
    if examples is not None:
        return Probe(examples, EXAMPLE_INPUTS)
    return Probe(synthetic_inputs(model), SYNTHETIC, SYNTHETIC_NOTE)


def hold_apart(batches: list[dict[str, np.ndarray]], count: int | None) -> tuple[list[dict[str, np.ndarray]], Probe]:
    """Split loaded calibration batches into (calibration, probe). Samples past the first `count`
    (None: all are calibration samples) are the probe (calibration unchanged); else the last
    quarter of the samples, at most `PROBE_SAMPLES` (calibration shrinks); one sample is both, and
    the probe says so."""
    total = sum(_rows(b) for b in batches)
    if count is not None and total > count:
        calibration, probe = _split_rows(batches, count)
        return calibration, Probe(join(probe, PROBE_SAMPLES), CALIBRATION_HELD_APART,
                                  f"{min(total - count, PROBE_SAMPLES)} calibration samples after the first {count}")
    if total < 2:
        return batches, Probe(join(batches, PROBE_SAMPLES), CALIBRATION_SHARED,
                              "the only calibration sample, also used to calibrate: give --eval-data to measure on unseen data")
    held = min(PROBE_SAMPLES, max(1, total // 4))
    calibration, probe = _split_rows(batches, total - held)
    log.info("measurement: %d of %d calibration samples held apart (not calibrated on)", held, total)
    return calibration, Probe(join(probe, PROBE_SAMPLES), CALIBRATION_HELD_APART,
                              f"the last {held} of {total} calibration samples, not calibrated on")


def join(batches: Sequence[Mapping[str, np.ndarray]], limit: int) -> dict[str, np.ndarray]:
    """Up to `limit` samples of `batches` as one batch (only batches whose shapes agree with the first)."""
    first = batches[0]
    parts = [b for b in batches if all(np.shape(b[k])[1:] == np.shape(first[k])[1:] for k in first)]
    feeds = {k: np.concatenate([np.asarray(b[k]) for b in parts], axis=0)[:limit] for k in first}
    return feeds


def fit_batch(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`feeds` cut to the batch size the model fixes (a first dim stored as a number), if any."""
    fixed = [v.shape[0] for v in model.graph.inputs if v.name in feeds and v.shape is not None
             and len(v.shape) and isinstance(v.shape[0], int) and v.shape[0] > 0]
    if not fixed:
        return feeds
    return {k: np.asarray(v)[: min(fixed)] for k, v in feeds.items()}


def _rows(batch: Mapping[str, np.ndarray]) -> int:
    from qcompiler.analysis.calibration import batch_size_of

    return batch_size_of(batch)


def _split_rows(batches, keep: int):
    """(the first `keep` samples, the rest), as batches, keeping batch boundaries."""
    head, tail, seen = [], [], 0
    for batch in batches:
        n = _rows(batch)
        if seen + n <= keep:
            head.append(batch)
        elif seen >= keep:
            tail.append(batch)
        else:
            cut = keep - seen
            head.append({k: v[:cut] for k, v in batch.items()})
            tail.append({k: v[cut:] for k, v in batch.items()})
        seen += n
    return head, tail


def example_inputs(model: ir.Model, source) -> dict[str, np.ndarray] | None:
    if getattr(source, "example_inputs", None):
        names = [v.name for v in model.graph.inputs]
        arrays = [_as_array(t) for t in source.example_inputs.values()]
        if len(arrays) == len(names):
            return dict(zip(names, arrays))
    return None


def inputs_for(model: ir.Model, source) -> dict[str, np.ndarray]:
    """The source's own probe: bundled data, example inputs, else synthetic (no data files)."""
    if getattr(source, "bundled", None) is not None:
        return dict(source.bundled.probe_inputs())
    examples = example_inputs(model, source)
    return examples if examples is not None else synthetic_inputs(model)


def _as_array(t) -> np.ndarray:
    """A torch tensor (bfloat16 ones as float32, numpy has no bfloat16) or array as numpy."""
    if hasattr(t, "detach"):
        t = t.detach()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return np.asarray(t.numpy())
    return np.asarray(t)


def synthetic_inputs(model: ir.Model, seed: int = SEED) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        shape = [d if isinstance(d, int) else SYMBOLIC_DIM for d in (value.shape or [])]
        _check_synthetic_shape(value.name, shape)
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[value.name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


def _check_synthetic_shape(name: str, shape: list[int]) -> None:
    """A declared shape a synthetic input can be built for: no negative dimension, at most
    `SYNTHETIC_LIMIT` elements."""
    if any(d < 0 for d in shape):
        raise UserError(f"input '{shown(name)}' declares shape {shape} with a negative dimension; re-export the model")
    elements = math.prod(shape)
    if elements > SYNTHETIC_LIMIT:
        raise UserError(
            f"input '{shown(name)}' declares shape {shape} ({elements} elements), more than the {SYNTHETIC_LIMIT} "
            "a synthetic probe input may have; give the large dimensions names (symbolic) in the model"
        )


def valid_positions(probe: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The [batch, sequence] positions that hold tokens, from a 0/1 `attention_mask` input; None
    when the inputs have none or it masks nothing. Errors against the float model leave padding
    positions out (the report's per-layer errors, learned rounding's block loss): the model never
    reads them, and quantization moves their values arbitrarily."""
    mask = probe.get("attention_mask")
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.isin(mask, (0, 1)).all() or mask.all():
        return None
    return mask.astype(bool)


def leads_with_tokens(shape, valid) -> bool:
    """Whether a tensor of `shape` holds one feature vector per [batch, sequence] position of `valid`
    (its two leading axes, and at least one feature axis after them): a [batch, hidden] tensor whose
    width happens to equal the sequence length is not masked."""
    return valid is not None and len(shape) >= 3 and tuple(shape[:2]) == tuple(valid.shape)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def mean_kl(log_p: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of KL(p || softmax(logits)) over the last axis (next-token distributions
    of an LM), `log_p` the reference's `log_softmax`."""
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_softmax(logits)), axis=-1)))
