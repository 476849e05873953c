"""Weights that stay on disk until a pass reads them.

A large source keeps its weights memory-mapped (`onnx_ir.ExternalTensor`, see `qcompiler.ir.load`).
Two rewrites would otherwise bring every weight into memory at once, as float32:

- a float16 or bfloat16 source is computed in float32 (`qcompiler.ir.float_types.to_float32`);
  a float32 weight read straight from its mapping would keep the pages read in memory;
- `smooth` and `fold-scales` multiply weights by per-channel factors.

For a weight still on disk both become *deferred*: an `onnx_ir.LazyTensor` that reads the file,
applies the conversion (`as_float32`) or the factor (`scaled`) and returns a new float32 array each
time it is read, keeping nothing. The file's mapping is closed after each read, so the pages read
do not stay in the process's memory. A pass that quantizes the weight reads it once and keeps only
its codes; a weight nothing rewrites is read again when the artifact is written. Reading twice
gives the same bytes as reading once: deferral changes memory, never results.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import onnx_ir as ir


class Deferred(ir.LazyTensor):
    """A weight computed from bytes still on disk each time it is read: a float32 view of a mapped
    weight here, a constant a pass wrote to disk in `qcompiler.ir.spill`."""


def is_on_disk(tensor: ir.TensorProtocol | None) -> bool:
    """Whether `tensor` is still read from a file: memory-mapped, or deferred on one that is."""
    return isinstance(tensor, (ir.ExternalTensor, Deferred))


def as_float32(tensor: ir.TensorProtocol) -> Deferred:
    """`tensor` (a floating weight on disk) as float32, computed when read."""
    return _deferred(tensor, lambda array: array.astype(np.float32))


def scaled(tensor: ir.TensorProtocol, factor: np.ndarray) -> Deferred:
    """`tensor * factor` (broadcast, float32 kept), computed when read."""
    factor = np.array(factor, dtype=np.float32)  # a private copy: the caller may reuse its array
    fresh = isinstance(tensor, Deferred)  # each read of a deferred weight is a new array: scaled in place

    def times_factor(array: np.ndarray) -> np.ndarray:
        out = array if fresh else array.astype(np.float32)
        out *= factor
        return out

    return _deferred(tensor, times_factor)


def _deferred(source: ir.TensorProtocol, transform: Callable[[np.ndarray], np.ndarray]) -> Deferred:
    def compute() -> ir.TensorProtocol:
        return ir.tensor(read(source, transform), name=source.name)

    return Deferred(compute, ir.DataType.FLOAT, source.shape, name=source.name)


def read(tensor: ir.TensorProtocol, transform: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`transform(tensor.numpy())` (a new array), closing the file mapping of a memory-mapped
    `tensor` afterwards so that the pages read leave the process's memory."""
    view = tensor.numpy()
    array = transform(view)
    del view
    release(tensor)
    return array


def release(tensor: ir.TensorProtocol) -> None:
    """Close `tensor`'s file mapping if it has one (a mapping something still reads stays open)."""
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):
            tensor.release()
