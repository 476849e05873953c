"""Outputs that appear whole or not at all: write to a temporary sibling, rename at the end.

Temporaries are named `.NAME.tmp-PID-XXXXXXXX` (and `.NAME.old-PID-XXXXXXXX` for the folder an
output replaces), PID being the writing process. A process killed before it could clean up
(SIGKILL, power loss) leaves them behind; the next write of the same NAME removes those whose
process is gone. Nothing that does not match this naming is ever removed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from qcompiler.errors import UserError, shown

log = logging.getLogger(__name__)


def temp_prefix(name: str, kind: str = "tmp") -> str:
    """The name prefix of our temporaries for an output called `name` (`kind`: tmp, old, or spill:
    constants kept on disk while a large model compiles)."""
    return f".{name}.{kind}-{os.getpid()}-"


def is_our_temporary(entry: str, name: str | None = None) -> bool:
    """Whether `entry` (a file name) is one of our temporaries (for an output called `name`)."""
    return _owner_pid(entry, name) is not None


def _owner_pid(entry: str, name: str | None) -> int | None:
    stem = re.escape(name) if name is not None else r".+"
    match = re.fullmatch(rf"\.{stem}\.(?:tmp|old|spill)-(\d{{1,10}})-[A-Za-z0-9_]{{1,32}}", entry)
    return int(match.group(1)) if match else None


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # another user's process: alive
    return True


def remove_stale_temporaries(folder: Path, name: str) -> list[Path]:
    """Remove the temporaries for output `name` in `folder` whose writing process is gone."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        pid = _owner_pid(entry.name, name)
        if pid is None or process_alive(pid):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:
            log.warning("could not remove the stale temporary %s (%s)", shown(path), exc.strerror)
            continue
        log.info("removed %s, left by process %d, which is gone", shown(path), pid)
        removed.append(path)
    return removed


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
            remove_stale_temporaries(parent, self.final.name)
            self.path = Path(tempfile.mkdtemp(prefix=temp_prefix(self.final.name), dir=parent))
            self.path.chmod(0o777 & ~_umask())  # mkdtemp makes it private; outputs are ordinary folders
        except OSError as exc:
            raise UserError(f"cannot write to '{parent}': {exc.strerror}; choose a writable output directory") from None
        return self.path

    def commit(self, keep: tuple[str, ...] = ()) -> Path:
        """Put the new folder in place. `keep`: names of entries of the folder being replaced that
        move into the new one (another output nested inside this one)."""
        assert self.path is not None, "begin() first"
        old = None
        if self.final.exists():
            moved = _move_entries(self.final, self.path, keep)
            try:
                old = Path(tempfile.mkdtemp(prefix=temp_prefix(self.final.name, "old"), dir=self.final.parent))
                os.rename(self.final, old / "x")
            except BaseException:
                _move_back(moved, self.path, self.final)
                raise
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


def _move_entries(source: Path, target: Path, names: tuple[str, ...]) -> list[str]:
    moved: list[str] = []
    try:
        for name in names:
            if os.path.lexists(source / name):
                if os.path.lexists(target / name):
                    raise UserError(f"'{source / name}' would be replaced by a new '{name}'; choose outputs that do not overlap")
                os.rename(source / name, target / name)
                moved.append(name)
    except BaseException:
        _move_back(moved, target, source)
        raise
    return moved


def _move_back(names: list[str], moved_to: Path, home: Path) -> None:
    for name in names:
        os.rename(moved_to / name, home / name)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write a file under a temporary name in its folder, then rename it into place."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent, path.name)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
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


def read_small_text(path: Path, what: str, limit: int) -> str:
    """A UTF-8 text file of at most `limit` bytes (a config, a pipeline file), or a one-line UserError."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise UserError(f"cannot read {what} '{path}': {exc.strerror}; give an existing file") from None
    if len(data) > limit:
        raise UserError(f"{what} '{path}' is larger than {limit} bytes; give a small text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} '{path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
