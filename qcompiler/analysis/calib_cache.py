"""A cache of calibration statistics, so that a rebuild with a changed later pass does not recalibrate.

An entry is keyed by the sha256 of everything the statistics depend on:

- the model as the collecting pass sees it (its IR text, in which every large tensor appears as
  dtype, shape and sha256, so weights count too);
- the calibration data (every batch's input names, dtypes, shapes and bytes);
- the collection options (tensors and channel axes, sample rows, histogram bins) and
  `CACHE_VERSION`.

An entry is two files named after the key: `KEY.npz` (the arrays, stored uncompressed; read with
pickling disabled) and `KEY.json` (its own key, the scalars, the array file's sha256 and the batch
and sample counts, sealed by the sha256 of all of them). A missing entry is computed and written;
an entry that cannot be read, is not a regular file, is larger than `MAX_ENTRY_BYTES`, records
another key (a copied entry), or whose seal or array sha256 does not match (an edited one) is
recomputed with a warning and overwritten, never trusted. Entries are written atomically, so an
interrupted build leaves no half entry. A cache folder that cannot be read or created is a
warning: the build goes on without the cache.

The directory: `CompileContext.cache_dir` (the CLI's `--cache-dir`, default `$QCOMPILER_CACHE`,
else `$XDG_CACHE_HOME/qcompiler`, else `~/.cache/qcompiler`; `--no-cache` turns it off).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.calibration import Histogram, TensorStats, collect
from qcompiler.errors import first_line, shown
from qcompiler.support.fileio import write_atomic

log = logging.getLogger(__name__)

CACHE_VERSION = "qcompiler.analysis.calibration-cache/4"  # 4: sampled rows keyed by (sample, row)
MAX_ENTRY_BYTES = 4 << 30  # an array file larger than this is not read (a cache must not exhaust memory)
MAX_META_BYTES = 64 << 20
_ARRAYS = ("absmax", "channel_min", "channel_max", "mean_abs", "mean_sq", "sample")


def default_dir() -> Path:
    if os.environ.get("QCOMPILER_CACHE"):
        return Path(os.environ["QCOMPILER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qcompiler"


def collect_cached(
    model: ir.Model,
    batches: Iterable[dict[str, np.ndarray]],
    tensors: dict[str, int],
    *,
    cache_dir: str | os.PathLike | None,
    sample_rows: int = 512,
    bins: int = 2048,
    threads: int | None = None,
    progress: Callable | None = None,
    sequential: bool | None = None,
    executor=None,
) -> dict[str, TensorStats]:
    """`calibration.collect`, answered from `cache_dir` when an entry for the same model, data and
    options exists (`progress` is then called once with the recorded counts). `executor` is not
    part of the key: the statistics are the same on any."""
    if cache_dir is None:
        return collect(model, batches, tensors, sample_rows=sample_rows, bins=bins, threads=threads, progress=progress, sequential=sequential,
                       executor=executor)
    batches = list(batches)
    folder = Path(cache_dir) / "calibration"
    if not _usable(folder):
        return collect(model, batches, tensors, sample_rows=sample_rows, bins=bins, threads=threads, progress=progress, sequential=sequential,
                       executor=executor)
    key = cache_key(model, batches, tensors, sample_rows=sample_rows, bins=bins)
    entry = _read(folder, key)
    if entry is not None:
        stats, counts = entry
        log.info("calibration statistics reused from the cache (%s, key %s); not recalibrating", shown(folder), key[:12])
        if progress is not None:
            progress(counts["batches"], counts["samples"])
        return stats
    counts = {"batches": 0, "samples": 0}

    def record(done: int, seen: int) -> None:
        counts.update(batches=done, samples=seen)
        if progress is not None:
            progress(done, seen)

    stats = collect(model, batches, tensors, sample_rows=sample_rows, bins=bins, threads=threads, progress=record, sequential=sequential,
                    executor=executor)
    _write(folder, key, stats, counts)
    return stats


def cache_key(model: ir.Model, batches: list[dict[str, np.ndarray]], tensors: dict[str, int], *, sample_rows: int, bins: int) -> str:
    from qcompiler.ir import to_text

    digest = hashlib.sha256()
    options = {"version": CACHE_VERSION, "tensors": sorted(tensors.items()), "sample_rows": sample_rows, "bins": bins}
    digest.update(json.dumps(options, sort_keys=True).encode())
    digest.update(hashlib.sha256(to_text(model).encode()).digest())
    for batch in batches:
        for name in sorted(batch):
            array = np.ascontiguousarray(batch[name])
            digest.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def _write(folder: Path, key: str, stats: dict[str, TensorStats], counts: dict[str, int]) -> None:
    arrays: dict[str, np.ndarray] = {}
    scalars = {}
    for index, (name, st) in enumerate(sorted(stats.items())):
        for field in _ARRAYS:
            arrays[f"t{index}_{field}"] = getattr(st, field)
        arrays[f"t{index}_histogram"] = st.histogram.counts
        scalars[name] = {
            "index": index, "channel_axis": st.channel_axis, "count": st.count, "min": st.min, "max": st.max,
            "bins": st.histogram.bins, "exponent": st.histogram.exponent, "pending_zeros": st.histogram._pending_zeros,
        }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    meta = {"version": CACHE_VERSION, "key": key, "sha256": hashlib.sha256(data).hexdigest(), "counts": counts, "tensors": scalars}
    meta["seal"] = _seal(meta)
    try:
        write_atomic(folder / f"{key}.npz", data)
        write_atomic(folder / f"{key}.json", json.dumps(meta, sort_keys=True))
    except Exception as exc:  # a cache that cannot be written only costs the next build time
        log.warning("calibration cache: could not write an entry in %s (%s); continuing without it", shown(folder), shown(exc))


def _usable(folder: Path) -> bool:
    """Whether the cache folder exists (it is made when missing) and can be listed; a warning if not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with os.scandir(folder):
            pass
    except OSError as exc:
        log.warning("calibration cache folder %s cannot be used (%s); continuing without the cache", shown(folder), shown(exc.strerror or exc))
        return False
    return True


def _seal(meta: dict) -> str:
    """The sha256 of an entry's JSON (all but the seal): its key, scalars, counts and array sha256."""
    body = {k: v for k, v in meta.items() if k != "seal"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of regular file `path` (not a link, device or pipe), refused past `limit` bytes
    before anything is read."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path.name} is not a regular file")
        if info.st_size > limit:
            raise ValueError(f"{path.name} holds {info.st_size} bytes, more than the {limit} an entry may")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"{path.name} grew past {limit} bytes while read")
    return data


def _read(folder: Path, key: str) -> tuple[dict[str, TensorStats], dict[str, int]] | None:
    meta_path, data_path = folder / f"{key}.json", folder / f"{key}.npz"
    if not os.path.lexists(meta_path) and not os.path.lexists(data_path):
        return None
    try:
        meta = json.loads(read_bounded(meta_path, MAX_META_BYTES))
        if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION:
            raise ValueError("it was written by another version")
        if meta.get("key") != key:
            raise ValueError("it records another key (a copied entry)")
        if meta.get("seal") != _seal(meta):
            raise ValueError("its recorded values do not match their seal (an edited entry)")
        data = read_bounded(data_path, MAX_ENTRY_BYTES)
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ValueError("its array file does not match the recorded sha256")
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            if any(info.compress_type != zipfile.ZIP_STORED for info in archive.infolist()):
                raise ValueError("its array file is compressed; entries are written uncompressed")
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            stats = {name: _stats(arrays, s) for name, s in meta["tensors"].items()}
        counts = {"batches": int(meta["counts"]["batches"]), "samples": int(meta["counts"]["samples"])}
    except Exception as exc:
        log.warning("calibration cache: entry %s in %s is unreadable (%s); recalibrating", key[:12], shown(folder), first_line(str(exc)) or type(exc).__name__)
        return None
    return stats, counts


def _stats(arrays, s: dict) -> TensorStats:
    prefix = f"t{int(s['index'])}_"
    histogram = Histogram(int(s["bins"]))
    counts = arrays[prefix + "histogram"]
    if counts.shape != histogram.counts.shape or counts.dtype != np.int64:
        raise ValueError("a histogram has the wrong shape")
    histogram.counts = counts.copy()
    histogram.exponent = None if s["exponent"] is None else int(s["exponent"])
    histogram._pending_zeros = int(s["pending_zeros"])
    fields = {field: arrays[prefix + field].copy() for field in _ARRAYS}
    return TensorStats(
        channel_axis=int(s["channel_axis"]), count=int(s["count"]), min=float(s["min"]), max=float(s["max"]),
        histogram=histogram, **fields,
    )
