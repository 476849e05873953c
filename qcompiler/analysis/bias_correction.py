"""Bias correction (Nagel et al. 2019, "Data-Free Quantization"): the mean change a quantized Conv kernel
makes on its calibration inputs, and the bias that absorbs it. Shared by `quantize` (int8 kernels),
`quantize-weights` (mixed kernels) and `gptq` (kernels rounded again)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.ir.layers import new_initializer, set_constant


def conv_bias_shift(error: np.ndarray, mean_in: np.ndarray) -> np.ndarray:
    """E[(W_q - W) x] per output channel of a Conv whose kernel error is `error` [O, I/groups, k...],
    for inputs of mean `mean_in` [I]: the sum over its taps and its group's input channels (borders,
    where padding reads zeros, are ignored)."""
    out_channels, per_group = error.shape[:2]
    groups = max(1, int(mean_in.shape[0]) // per_group)
    taps = error.reshape(out_channels, per_group, -1).sum(axis=2)
    group_of = np.arange(out_channels) // (out_channels // groups)
    means = mean_in.reshape(groups, per_group)[group_of]
    return (taps * means).sum(axis=1)


def subtract_from_bias(graph: ir.Graph, node: ir.Node, bias: ir.Value | None, shift: np.ndarray, name: str,
                       suffix: str = "corrected") -> None:
    """Subtract `shift` from `node`'s constant bias `bias` (None: a Conv without a bias gets one, named `name`)."""
    if bias is None:
        node.resize_inputs(3)
        node.replace_input_with(2, new_initializer(graph, name, (-shift).astype(np.float32)))
        return
    array = bias.const_value.numpy()
    set_constant(graph, bias, (array - shift.reshape(array.shape)).astype(array.dtype), node, suffix)
