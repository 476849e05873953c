"""The int8 KV cache format (`kv-cache{dtype=int8}`): names, the numpy reference, and float feeds.

A cache tensor `past_key_values.{i}.key` [batch, kv_heads, past, head_dim] is stored as int8
codes with one float32 scale per token and head, `past_key_values.{i}.key_scale`
[batch, kv_heads, past, 1]; the step's outputs are `present.{i}.key` (int8) and
`present.{i}.key_scale`, and likewise for values. Symmetric, no zero point:

    scale = max(max_d |x[..., d]|, EPS) / 127        q = round_half_even(x / scale)      x ~ q * scale

so |q| <= 127 and the error of each element is at most scale / 2. The scale inputs and outputs
follow all the cache tensors, in the same layer order (`scale_name`).

`float_cache_feeds` and `float_cache_outputs` let the measurements that drive a graph with float
caches (the drift probe, the report, golden numerics) run a graph whose cache is int8: float
pasts are quantized on the way in and int8 presents dequantized on the way out, so the figures
include the cache's rounding.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

EPS = 1e-8  # the smallest absolute maximum a scale is computed from (an all-zero row gets codes 0)
QMAX = 127
SCALE_SUFFIX = "_scale"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


def scale_name(cache_name: str) -> str:
    """`past_key_values.0.key` -> `past_key_values.0.key_scale` (and `present.*` likewise)."""
    return cache_name + SCALE_SUFFIX


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes and float32 scales [..., 1] of a float cache tensor [..., head_dim]."""
    x = np.asarray(x, np.float32)
    scale = (np.maximum(np.abs(x).max(axis=-1, keepdims=True, initial=0.0), np.float32(EPS)) / np.float32(QMAX)).astype(np.float32)
    return np.rint(x / scale).astype(np.int8), scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float cache tensor the codes and scales stand for."""
    return q.astype(np.float32) * scale


def int8_cache_inputs(model: ir.Model) -> list[str]:
    """The graph's int8 cache inputs (`past_key_values.*` of type int8), in graph order."""
    return [v.name for v in model.graph.inputs
            if v.name and v.name.startswith(PAST_PREFIX) and not v.name.endswith(SCALE_SUFFIX) and v.dtype == ir.DataType.INT8]


def float_cache_feeds(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`feeds` for a graph with an int8 cache: each float past it holds becomes codes plus its
    scale input; feeds already int8, and every feed of a graph with a float cache, pass as given."""
    feeds = dict(feeds)
    for name in int8_cache_inputs(model):
        if name in feeds and np.issubdtype(np.asarray(feeds[name]).dtype, np.floating):
            feeds[name], feeds[scale_name(name)] = quantize(feeds[name])
    return feeds


def float_cache_outputs(outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The outputs with each int8 present and its scale replaced by the float present they stand for."""
    result = {}
    for name, value in outputs.items():
        scale = outputs.get(scale_name(name))
        if not name.startswith(PRESENT_PREFIX):
            result[name] = value
            continue
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in outputs:
            continue
        if scale is not None and np.asarray(value).dtype == np.int8:
            value = dequantize(value, scale)
        result[name] = value
    return result
