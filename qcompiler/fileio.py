"""Outputs that appear whole or not at all: write to a temporary sibling, rename at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from qcompiler.errors import UserError


class AtomicDir:
    """A directory built under a temporary name beside `final` and renamed into place by
    `commit()`; `abort()` (or an exception inside `with`) removes it. An existing `final` is
    replaced only once the new one is complete."""

    def __init__(self, final: str | os.PathLike):
        self.final = Path(final)
        self.path: Path | None = None

    def begin(self) -> Path:
        parent = self.final.parent.resolve()
        if self.final.exists() and not self.final.is_dir():
            raise UserError(f"output '{self.final}' exists and is not a directory; choose another path")
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=parent))
            self.path.chmod(0o777 & ~_umask())  # mkdtemp makes it private; outputs are ordinary folders
        except OSError as exc:
            raise UserError(f"cannot write to '{parent}': {exc.strerror}; choose a writable output directory") from None
        return self.path

    def commit(self) -> Path:
        assert self.path is not None, "begin() first"
        old = None
        if self.final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.old-", dir=self.final.parent))
            os.rename(self.final, old / "x")
        os.rename(self.path, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.path = None
        return self.final

    def abort(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None

    def __enter__(self) -> Path:
        return self.begin()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write a file under a temporary name in its folder, then rename it into place."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as exc:
        raise UserError(f"cannot write '{path}': {exc.strerror}; choose a writable path") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
