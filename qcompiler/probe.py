"""The probe batch: a small, fixed set of inputs on which per-pass numeric drift is measured.

Bundled models bring real data (`BundledModel.probe_inputs`); a captured module uses its example
inputs; any other graph gets deterministic synthetic inputs built from its input types (symbolic
dimensions set to `SYMBOLIC_DIM`, floats standard normal, integers in [0, 2) so that they are
valid token ids, masks and indices alike).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

SYMBOLIC_DIM = 2
SEED = 0


def inputs_for(model: ir.Model, source) -> dict[str, np.ndarray]:
    if getattr(source, "bundled", None) is not None:
        return dict(source.bundled.probe_inputs())
    if getattr(source, "example_inputs", None):
        names = [v.name for v in model.graph.inputs]
        arrays = [_as_array(t) for t in source.example_inputs.values()]
        if len(arrays) == len(names):
            return dict(zip(names, arrays))
    return synthetic_inputs(model)


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
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[value.name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


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


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def mean_kl(log_p: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of KL(p || softmax(logits)) over the last axis (next-token distributions
    of an LM), `log_p` the reference's `log_softmax`."""
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_softmax(logits)), axis=-1)))
