"""Constants a pass makes, kept on disk while a large model compiles.

A model whose weights stay on disk (`qcompiler.ir.is_large`) would otherwise gather every weight's
replacement in memory: `quantize`'s int8 codes are half a float16 source's bytes (6.9 GB for a 7B
model), `quantize-weights`' codes a byte each until `lower-ort` packs them. While `spilling` is
active (the compiler turns it on for such a model), each constant of `SPILL_MIN_BYTES` or more that
`qcompiler.ir.layers` creates is appended to one scratch file and replaced by a `Spilled` tensor,
which reads its bytes back each time it is read and keeps nothing: the same values, the same
artifact bytes, one constant in memory at a time. Calibration's row samples (`mapped`), which only
a few passes read, wait there too, mapped back read-only.

The scratch file lives in a private folder (the compiler makes it beside the output, on the disk
that must hold the output anyway, named as its other temporaries so that a later compile removes
it if this process is killed) that is removed when no tensor reads it any more, or when the
process exits.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompiler.ir.deferred import Deferred

SPILL_MIN_BYTES = 1 << 20  # smaller constants stay in memory
MAP_ALIGNMENT = 64  # each mapped array starts at a multiple of this many bytes

_active: contextvars.ContextVar[SpillFile | None] = contextvars.ContextVar("qcompiler_spill", default=None)


class SpillFile:
    """One append-only scratch file in a private folder, removed with the last tensor that reads it."""

    def __init__(self, folder: str | os.PathLike | None = None, prefix: str = "qcompiler-spill-"):
        self.folder = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
        self.path = self.folder / "constants.bin"
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close() or with the folder)
        self._remove = weakref.finalize(self, _remove_folder, self._file, self.folder)

    def add(self, array: np.ndarray, name: str) -> Spilled:
        """Write `array` at the end of the file; a tensor that reads it back."""
        array = np.ascontiguousarray(array)
        return Spilled(self, self._append(array), array.dtype, array.shape, name)

    def mapped(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Write `arrays` at the end of the file, each from a 64-byte boundary; the file's bytes
        mapped back read-only, all through one mapping (one open file, however many arrays), each
        array a view of it. Its pages are read when used, and the kernel may drop them again."""
        arrays = [np.ascontiguousarray(a) for a in arrays]
        offsets = []
        for array in arrays:
            self._pad_to(MAP_ALIGNMENT)
            offsets.append(self._append(array))
        start = offsets[0]
        whole = np.memmap(self.path, dtype=np.uint8, mode="r", offset=start, shape=(self._file.tell() - start,))
        return [whole[o - start:o - start + a.nbytes].view(a.dtype).reshape(a.shape) for o, a in zip(offsets, arrays)]

    def _pad_to(self, alignment: int) -> None:
        if self._file.tell() % alignment:
            self._append(np.zeros(-self._file.tell() % alignment, np.uint8))

    def _append(self, array: np.ndarray) -> int:
        offset = self._file.tell()
        try:
            self._file.write(array.tobytes() if array.dtype.kind == "V" else memoryview(array).cast("B"))
            self._file.flush()
        except OSError as exc:  # a full disk: name the file (a failed write names none)
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
        return offset

    def read(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64))
        return np.fromfile(self.path, dtype=dtype, count=count, offset=offset).reshape(shape)

    def close(self) -> None:
        """Remove the folder now (tensors that read it then fail)."""
        self._remove()


def _remove_folder(file, folder: Path) -> None:
    file.close()
    shutil.rmtree(folder, ignore_errors=True)


class Spilled(Deferred):
    """A constant whose bytes are in a `SpillFile`: read back (a new array) each time it is read."""

    def __init__(self, spill: SpillFile, offset: int, dtype: np.dtype, shape: tuple[int, ...], name: str):
        self._spill = spill  # keeps the file's folder while this tensor can be read

        def compute() -> ir.TensorProtocol:
            return ir.tensor(spill.read(offset, dtype, shape), name=name)

        super().__init__(compute, ir.DataType.from_numpy(dtype), ir.Shape(shape), name=name)


@contextlib.contextmanager
def spilling(spill: SpillFile | None) -> Iterator[None]:
    """Within the block, `layers`' new constants of `SPILL_MIN_BYTES` or more go to `spill`
    (nothing changes when it is None)."""
    token = _active.set(spill)
    try:
        yield
    finally:
        _active.reset(token)


def kept(array: np.ndarray, name: str) -> ir.TensorProtocol | None:
    """`array` as a `Spilled` tensor when spilling is active and it is large enough; else None."""
    spill = _active.get()
    if spill is None or not isinstance(array, np.ndarray) or array.nbytes < SPILL_MIN_BYTES or array.ndim == 0:
        return None
    if array.dtype.kind not in "biuf" and not _is_bfloat16(array.dtype):
        return None
    return spill.add(array, name)


def mapped(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """`arrays`, those of `SPILL_MIN_BYTES` or more moved to the scratch file and mapped back
    read-only through one mapping when spilling is active (a large model's calibration row
    samples, which few passes read); the others as given."""
    spill = _active.get()
    moved = [i for i, a in enumerate(arrays) if spill is not None and a.size and a.nbytes >= SPILL_MIN_BYTES
             and a.dtype.kind in "biuf"]
    out = list(arrays)
    if moved:
        for i, view in zip(moved, spill.mapped([arrays[i] for i in moved])):
            out[i] = view
    return out


def _is_bfloat16(dtype: np.dtype) -> bool:
    try:
        return ir.DataType.from_numpy(dtype) == ir.DataType.BFLOAT16
    except TypeError:
        return False
