"""Calibration data: read it from files into input batches, and check batches against the model.

Accepted sources (`load_calibration`):
- `.npz`: graph input name -> array, first axis = samples; only the first `count` rows of each
  array are read (`read_npz_head`), so a large file costs what is used.
- `.txt`: one text sample per line; empty lines are skipped.
- `.tsv`: a header row, tab-separated, no quoting (`csv.QUOTE_NONE`, as `sts-pairs-dev.tsv` is
  written). The text columns are every column whose header starts with `sent` or is `text`;
  samples are read row by row, left to right (`sent1, sent2` of row 1, then row 2, ...).
- images (`.png`, `.jpg`, `.jpeg`, `.bmp`, `.tif`, `.tiff`): one file, or a directory whose image
  files are taken in name order. Read as uint8 arrays (Pillow).
Text and images become inputs through the bundled model's own preprocessing
(`bundled.inputs_from_raw(samples)`, one call per batch, so text is padded per batch); a model
may turn each batch of samples into several (`bundled.batches_from_raw`): a model with a KV cache
into a prefill with an empty past, then decode steps with a past; an image model into one batch
per image size.

The first `count` samples are used, in file order, grouped into batches of `batch_size`. Every
problem is a `UserError` with one line that names it and the fix.
"""

from __future__ import annotations

import csv
import logging
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.errors import UserError, first_line, shown
from qcompiler.ir.float_types import cast_float_feeds

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".tsv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NO_TOKENIZER = "text calibration data needs a bundled model with a tokenizer; give an .npz of input arrays instead"
NO_IMAGE_PREPROCESSING = "image calibration data needs a bundled image model; give an .npz of input arrays instead"


def load_calibration(
    path: str | Path, count: int, model: ir.Model, bundled: Any = None, batch_size: int = 8, extra: int = 0
) -> list[dict[str, np.ndarray]]:
    """The first `count` samples of the file (or image folder) at `path`, as checked input batches;
    `extra` more when the file has them (held apart for measurement, `qcompiler.analysis.probe.hold_apart`)."""
    path = Path(path)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise UserError(f"calibration count must be a positive integer, got {count!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise UserError(f"calibration batch size must be a positive integer, got {batch_size!r}")
    if not path.exists():
        raise UserError(f"calibration data '{path}' not found; check the path")
    suffix = path.suffix.lower()
    wanted, count = count, count + extra
    if path.is_dir():
        batches = _from_raw(_image_files(path), count, bundled, batch_size, path, image=True)
    elif suffix == ".npz":
        batches = _from_npz(path, count, batch_size)
    elif suffix == ".txt":
        batches = _from_raw(_read_lines(path), count, bundled, batch_size, path, image=False)
    elif suffix == ".tsv":
        batches = _from_raw(_read_tsv(path), count, bundled, batch_size, path, image=False)
    elif suffix in IMAGE_SUFFIXES:
        batches = _from_raw([path], count, bundled, batch_size, path, image=True)
    else:
        raise UserError(
            f"calibration data '{path}' has an unknown type '{suffix or '(none)'}'; give .npz, .txt, .tsv, "
            f"an image ({', '.join(IMAGE_SUFFIXES)}) or a folder of images"
        )
    batches = validate_batches(batches, model)
    samples = sum(batch_size_of(b) for b in batches if not _continues_earlier_samples(b))
    if samples < wanted:
        log.warning("calibration data '%s' holds %d samples, fewer than the %d asked for; using them all", shown(path), samples, wanted)
    log.info("calibration data: %d samples in %d batches from %s", samples, len(batches), shown(path))
    return batches


def _continues_earlier_samples(batch: Mapping[str, Any]) -> bool:
    """A decode step of a causal LM: its inputs carry a non-empty past of earlier samples' tokens."""
    return any(name.startswith("past_key_values.") and np.ndim(a) == 4 and np.shape(a)[2] > 0 for name, a in batch.items())


def batch_size_of(batch: Mapping[str, Any]) -> int:
    """Samples in a batch: the first axis of its first input with a rank (1 for scalars only)."""
    for array in batch.values():
        shape = np.shape(array)
        if len(shape):
            return int(shape[0])
    return 1 if batch else 0


# --------------------------------------------------------------------------------------------
# Readers


def _from_npz(path: Path, count: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    try:
        arrays, sizes = read_npz_head(path, count)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot read '{path}' as .npz ({first_line(str(exc)) or type(exc).__name__}); save it with numpy.savez") from None
    if not arrays:
        raise UserError(f"calibration set is empty: '{path}' holds no arrays; save input name -> array with numpy.savez")
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{shown(k)}: {v}" for k, v in sizes.items())
        raise UserError(f"arrays in '{path}' disagree on the number of samples (first axis: {listed}); give each input one row per sample")
    total = min(next(iter(sizes.values())), count)
    return [
        {name: np.ascontiguousarray(array[start : min(start + batch_size, total)]) for name, array in arrays.items()}
        for start in range(0, total, batch_size)
    ]


def read_npz_head(path: Path, count: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The first `count` rows (first axis) of every array in the .npz at `path`, and each array's
    full row count, reading no more of the file than those rows (headers first; a compressed
    member is inflated only as far as needed). Arrays stored in Fortran order are read whole."""
    arrays, sizes = {}, {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            with archive.open(info) as member:
                shape, fortran, dtype = _npy_header(member)
                if dtype.hasobject:
                    raise UserError(f"array '{shown(name)}' in '{path}' holds Python objects; save numeric arrays")
                if not shape:
                    raise UserError(f"array '{shown(name)}' in '{path}' is a scalar; the first axis must count samples")
                sizes[name] = shape[0]
                rows = min(shape[0], count)
                if fortran and len(shape) > 1:
                    full = _read_rows(member, dtype, tuple(reversed(shape)), name).T  # rows are not contiguous
                    arrays[name] = np.ascontiguousarray(full[:rows])
                    continue
                arrays[name] = _read_rows(member, dtype, (rows, *shape[1:]), name)
    return arrays, sizes


def _npy_header(member) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    return np.lib.format._read_array_header(member, version)  # 3.0: as numpy reads it


def _read_rows(member, dtype: np.dtype, shape: tuple[int, ...], name: str) -> np.ndarray:
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffer = bytearray(size)
    view, done = memoryview(buffer), 0
    while done < size:
        got = member.readinto(view[done:])
        if not got:
            raise ValueError(f"array '{shown(name)}' is truncated")
        done += got
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"calibration data '{path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"cannot read calibration data '{path}': {exc.strerror}") from None


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in _read_text(path).splitlines() if line.strip()]


def _read_tsv(path: Path) -> list[str]:
    rows = list(csv.reader(_read_text(path).splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise UserError(f"calibration set is empty: '{path}' has no header row; the first row must name the columns")
    header = [h.strip() for h in rows[0]]
    columns = [i for i, h in enumerate(header) if h.lower().startswith("sent") or h.lower() == "text"]
    if not columns:
        raise UserError(
            f"'{path}' has no text column (header: {', '.join(header)}); name sentence columns 'sent...' or 'text'"
        )
    samples = []
    for line_number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise UserError(
                f"'{path}' line {line_number} has {len(row)} fields but the header has {len(header)}; "
                "fields are separated by tabs, without quoting"
            )
        samples.extend(row[i].strip() for i in columns if row[i].strip())
    return samples


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"calibration set is empty: folder '{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_image(path: Path) -> np.ndarray:
    """An image file as a uint8 array: HxW (grey), HxWx3 or HxWx4 (RGBA); other modes as RGB."""
    try:
        from PIL import Image
    except ImportError:
        raise UserError("reading images needs Pillow; install it with: pip install 'qcompiler[models]'") from None
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "RGB", "RGBA"):
                image = image.convert("RGB")
            return np.asarray(image, dtype=np.uint8).copy()
    except Exception as exc:
        raise UserError(f"cannot read image '{path}' ({first_line(str(exc)) or type(exc).__name__}); give PNG or JPEG files") from None


def _from_raw(samples: Sequence, count: int, bundled: Any, batch_size: int, path: Path, image: bool) -> list[dict[str, np.ndarray]]:
    if bundled is None or not callable(getattr(bundled, "inputs_from_raw", None)):
        raise UserError(NO_IMAGE_PREPROCESSING if image else NO_TOKENIZER)
    samples = list(samples)[:count]
    if not samples:
        raise UserError(f"calibration set is empty: '{path}' holds no samples")
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        if image:
            chunk = [read_image(p) for p in chunk]
        try:
            if callable(getattr(bundled, "batches_from_raw", None)):  # several batches per chunk (decode steps, or one per image size)
                batches.extend({name: np.asarray(a) for name, a in b.items()} for b in bundled.batches_from_raw(chunk))
                continue
            inputs = bundled.inputs_from_raw(chunk)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(
                f"the model's preprocessing failed on calibration samples {start}..{start + len(chunk) - 1} of '{path}' "
                f"({type(exc).__name__}: {first_line(str(exc))}); check the data"
            ) from None
        batches.append({name: np.asarray(array) for name, array in inputs.items()})
    return batches


# --------------------------------------------------------------------------------------------
# Checks


def _dims(value: ir.Value) -> list[int | str | None] | None:
    if value.shape is None:
        return None
    out = []
    for d in value.shape:
        if isinstance(d, int):
            out.append(d)
        else:
            out.append(getattr(d, "value", None))
    return out


def _shape_text(dims: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


class BatchChecker:
    """Checks batches one at a time against the graph inputs (used while streaming in `collect`)."""

    def __init__(self, model: ir.Model):
        self.inputs = [v for v in model.graph.inputs]
        # Inputs with an initializer of the same name are optional (they have a default).
        self.required = [v.name for v in self.inputs if not v.is_initializer()]
        self.expected = ", ".join(v.name for v in self.inputs)
        self.samples = 0
        self.batches = 0
        self.model = model

    def check(self, batch: Any, index: int) -> dict[str, np.ndarray]:
        """The batch as a dict of arrays, or a UserError naming what is wrong."""
        if not isinstance(batch, Mapping):
            raise UserError(
                f"calibration batch {index} is a {type(batch).__name__}; each batch must be a dict of input name -> array "
                f"(inputs: {self.expected})"
            )
        by_name = {v.name: v for v in self.inputs}
        for name in batch:
            if name not in by_name:
                raise UserError(
                    f"calibration batch {index} has input '{name}' that the model does not take; the model's inputs are {self.expected}"
                )
        for name in self.required:
            if name not in batch:
                raise UserError(
                    f"calibration batch {index} lacks input '{name}'; the model's inputs are {self.expected}"
                )
        batch = cast_float_feeds(batch, self.model)  # a float16/bfloat16 source computes in float32
        feeds: dict[str, np.ndarray] = {}
        symbols: dict[str, tuple[str, int]] = {}
        size = None
        for name, raw in batch.items():
            value = by_name[name]
            array = np.asarray(raw)
            if array.dtype == object:
                raise UserError(f"calibration input '{name}' is not a numeric array; give a numpy array")
            want = value.type.dtype if value.type is not None and hasattr(value.type, "dtype") else None
            if want is not None:
                try:
                    want_np = want.numpy()
                except Exception:
                    want_np = None
                if want_np is not None and array.dtype != want_np:
                    raise UserError(
                        f"calibration input '{name}' is {array.dtype} but the model takes {np.dtype(want_np)}; "
                        f"convert it (e.g. .astype(np.{np.dtype(want_np).name}))"
                    )
            dims = _dims(value)
            if dims is not None:
                if array.ndim != len(dims):
                    raise UserError(
                        f"calibration input '{name}' has rank {array.ndim} (shape {tuple(array.shape)}) "
                        f"but the model takes rank {len(dims)} {_shape_text(dims)}"
                    )
                for axis, (want_dim, got) in enumerate(zip(dims, array.shape)):
                    if isinstance(want_dim, int) and want_dim != got:
                        raise UserError(
                            f"calibration input '{name}' has size {got} on axis {axis} (shape {tuple(array.shape)}) "
                            f"but the model needs {want_dim} there {_shape_text(dims)}"
                        )
                    if isinstance(want_dim, str):
                        if want_dim in symbols and symbols[want_dim][1] != got:
                            other, other_size = symbols[want_dim]
                            raise UserError(
                                f"calibration inputs '{other}' and '{name}' disagree on dimension '{want_dim}' "
                                f"({other_size} vs {got}) in batch {index}; give them matching shapes"
                            )
                        symbols.setdefault(want_dim, (name, got))
            if array.ndim and size is None:
                size = array.shape[0]
            if np.issubdtype(array.dtype, np.inexact):
                finite = np.isfinite(array)
                if not finite.all():
                    bad = np.argwhere(~finite)[0]
                    row = int(bad[0]) if array.ndim else 0
                    kind = "NaN" if np.isnan(array[tuple(bad)]) else "Inf"
                    raise UserError(
                        f"calibration input '{name}' has {kind} at sample {self.samples + row} "
                        f"(batch {index}, row {row}); remove or fix that sample"
                    )
            feeds[name] = array
        self.samples += size if size is not None else (1 if feeds else 0)
        self.batches += 1
        return feeds

    def finish(self) -> None:
        if self.samples == 0:
            raise UserError("calibration set is empty; give at least one sample")


def validate_batches(batches: Iterable[Mapping[str, np.ndarray]], model: ir.Model) -> list[dict[str, np.ndarray]]:
    """Check every batch: exactly the graph's input names, matching dtypes, ranks and static dims,
    consistent symbolic dims, no NaN or Inf, and at least one sample in all. Returns the checked
    batches as arrays (float arrays of a float16/bfloat16 source cast to float32)."""
    if batches is None:
        raise UserError("calibration set is empty; give at least one sample")
    checker = BatchChecker(model)
    checked = [checker.check(batch, index) for index, batch in enumerate(batches)]
    checker.finish()
    return checked
