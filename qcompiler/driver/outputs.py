"""Where a compile may write, checked before any work: no run deletes what it did not make.

`compile` replaces its artifact folder and its `--dump-ir` folder wholesale and overwrites its
report, so before anything slow `check_outputs` refuses, with one line:

- an empty path, `.` or `..` (or any folder that is or holds the working directory), a dangling
  symbolic link, a file where a folder goes, a folder where the report goes;
- an output that is or contains a protected path: the source model, the calibration data, the
  config file, the working directory, the home folder;
- an existing output that is not ours, unless `force`: a folder is ours when it is empty, holds
  our `manifest.json` (an artifact) or our `stats.json` (a dump), or holds nothing but this
  command's other outputs and our temporaries; a report file is ours when it carries our schema;
- the artifact and the dump folder being the same folder, or overlapping by name.

The artifact and the dump folder may nest either way (`-o D/out --dump-ir D`, `-o E --dump-ir
E/ir`): `nested_entry` names the entry the outer folder keeps when it is replaced.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from qcompiler.errors import UserError, shown
from qcompiler.support.fileio import is_our_temporary

MARKER_BYTES = 16 << 20  # a manifest, dump stats or report larger than this is not read to tell whose it is
ARTIFACT_NAMES = re.compile(r"manifest\.json|model\.onnx.*|weights\.safetensors|.*\.py|README.*")
DUMP_NAMES = re.compile(r"stats\.json|\d{3}-.*\.onnxtxt")


def check_outputs(
    output: str | os.PathLike,
    *,
    dump_ir: str | os.PathLike | None = None,
    report: tuple[Path, Path | None] | None = None,
    protected: Iterable[tuple[str, str | os.PathLike | None]] = (),
    force: bool = False,
) -> None:
    """Refuse outputs that would delete or overwrite what this compiler did not write (see the
    module doc). `report`: the (JSON, HTML or None) paths of `report_paths`. `protected`:
    (what it is, path) pairs besides the working directory and the home folder."""
    guarded = _guarded(protected)
    out = _folder_path(output, "output")
    dump = _folder_path(dump_ir, "--dump-ir folder") if dump_ir is not None else None
    if dump is not None and dump == out:
        raise UserError(f"the artifact and the IR dumps would both replace '{shown(output)}'; give --dump-ir another folder")
    for label, path, given in (("output", out, output), ("--dump-ir folder", dump, dump_ir)):
        if path is not None:
            _check_not_protected(label, path, given, guarded)
    reports = [p for p in (report or ()) if p is not None]
    for path in reports:
        _check_report(path, out, guarded, force)
    if dump is not None:
        nested = _inside(dump, out) or _inside(out, dump)
        if nested and any(os.path.islink(p) for p in (output, dump_ir)):
            raise UserError("the output and the --dump-ir folder nest, so neither may be a symbolic link; give the folders themselves")
        if _inside(dump, out) and dump != out:
            _check_nested_name(nested_entry(out, dump), ARTIFACT_NAMES, "--dump-ir", "an artifact file")
            if any(_inside(_absolute(p), dump) for p in reports):
                raise UserError("the report lies inside the --dump-ir folder that lies inside the output; put the report elsewhere")
        if _inside(out, dump) and out != dump:
            _check_nested_name(nested_entry(dump, out), DUMP_NAMES, "the output", "a dump file")
    _check_ours(out, output, "manifest.json", "manifest", [dump, *map(_absolute, reports)], force, "an artifact")
    if dump is not None:
        _check_ours(dump, dump_ir, "stats.json", "qcompiler.dump-stats/", [out, *map(_absolute, reports)], force, "IR dumps")


SUGGESTION_MARKER = "# suggested by qcompiler doctor"  # the first line of a pipeline file `doctor --apply` writes


def check_suggestion_file(path, protected, force: bool) -> None:
    """Where `doctor --apply` may write its pipeline file, checked before the diagnosis: not a
    protected path (the source model, the calibration data, the working directory, the home
    folder) or a folder holding one, not a folder, and, unless `force`, not an existing file that a
    previous `doctor --apply` did not write."""
    text = os.fspath(path)
    if not str(text).strip():
        raise UserError("the --apply path is empty; name a file for the suggested pipeline")
    absolute = _absolute(text)
    for what, guarded in _guarded(protected):
        if _inside(guarded, absolute):
            raise UserError(f"--apply '{shown(text)}' is the {what}, which writing it would destroy; name another file")
    if os.path.isdir(text):
        raise UserError(f"--apply '{shown(text)}' is a folder; name a file for the suggested pipeline")
    if os.path.lexists(text) and not force and not _carries(Path(text), SUGGESTION_MARKER, parse_json=False):
        raise UserError(
            f"--apply '{shown(text)}' exists and was not written by qcompiler doctor; it would be overwritten: "
            "choose another name or pass --force"
        )


def nested_entry(outer: str | os.PathLike, inner: str | os.PathLike) -> str | None:
    """The entry of folder `outer` that holds `inner` (None when `inner` is not strictly inside)."""
    outer_path, inner_path = _absolute(outer), _absolute(inner)
    if inner_path == outer_path or not _inside(inner_path, outer_path):
        return None
    return inner_path.relative_to(outer_path).parts[0]


def protected_sources(source, calibration, eval_data=None) -> list[tuple[str, object]]:
    """The (what, path) pairs of `compile`'s own inputs that are files or folders."""
    pairs = []
    for label, value in (("source model", source), ("calibration data", calibration), ("evaluation data", eval_data)):
        if isinstance(value, (str, os.PathLike)) and str(value) and os.path.lexists(os.path.expanduser(value)):
            pairs.append((label, value))
    return pairs


# --------------------------------------------------------------------------------------------


def _absolute(path: str | os.PathLike) -> Path:
    """The path with symbolic links resolved (a path that does not exist yet is kept as written)."""
    return Path(os.path.expanduser(path)).resolve(strict=False)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _guarded(protected) -> list[tuple[str, Path]]:
    guarded = [("working directory", Path.cwd().resolve())]
    try:
        guarded.append(("home folder", Path.home().resolve()))
    except RuntimeError:  # no home folder known
        pass
    for label, path in protected:
        if path is not None and str(path):
            guarded.append((label, _absolute(path)))
    return guarded


def _folder_path(given, label: str) -> Path:
    text = os.fspath(given) if given is not None else ""
    if not str(text).strip():
        raise UserError(f"the {label} path is empty; name a new folder for it")
    if os.path.islink(text) and not os.path.exists(text):  # os.path: no error on a name too long for a path
        raise UserError(f"{label} '{shown(text)}' is a symbolic link to nothing; remove the link or choose another path")
    if os.path.exists(text) and not os.path.isdir(text):
        raise UserError(f"{label} '{shown(text)}' exists and is not a folder; choose another path")
    return _absolute(text)


def _check_not_protected(label: str, path: Path, given, guarded: list[tuple[str, Path]]) -> None:
    for what, protected in guarded:
        if _inside(protected, path):
            relation = "is" if protected == path else "contains"
            raise UserError(
                f"{label} '{shown(given)}' {relation} the {what} ('{shown(protected)}'), which writing it would delete; "
                "name a new folder for it"
            )


def _check_report(path: Path, out: Path, guarded: list[tuple[str, Path]], force: bool) -> None:
    absolute = _absolute(path)
    for what, protected in guarded:
        if absolute == protected or _inside(protected, absolute):
            raise UserError(f"report '{shown(path)}' is the {what}; name another report file")
    if not os.path.lexists(path) or _inside(absolute, out):  # inside the artifact: replaced with it
        return
    if os.path.isdir(path):
        raise UserError(f"report '{shown(path)}' is a folder; name a report file")
    if not force and not _carries(path, "qcompiler.tools.report/", parse_json=path.suffix.lower() == ".json"):
        raise UserError(
            f"report '{shown(path)}' exists and was not written by qcompiler; it would be overwritten: "
            "choose another name or pass --force"
        )


def _check_nested_name(entry: str | None, reserved: re.Pattern, what: str, kind: str) -> None:
    if entry is not None and reserved.fullmatch(entry):
        raise UserError(f"{what} would be written as '{shown(entry)}', the name of {kind}; choose another name for it")


def _check_ours(folder: Path, given, marker: str, schema: str, others: list[Path | None], force: bool, kind: str) -> None:
    try:
        entries = [e.name for e in os.scandir(folder)]
    except (FileNotFoundError, NotADirectoryError):  # not there yet (an unwritable parent is reported on writing)
        return
    except OSError as exc:
        raise UserError(f"cannot use the folder '{shown(given)}' ({exc.strerror}); choose another path") from None
    if force or not entries or (marker in entries and _carries(folder / marker, schema, parse_json=True)):
        return
    allowed = {nested_entry(folder, other) for other in others if other is not None} - {None}
    if all(name in allowed or is_our_temporary(name) for name in entries):
        return
    raise UserError(
        f"'{shown(given)}' exists and does not hold {kind} of qcompiler (no {marker} of ours); it would be replaced "
        "with everything in it: empty it, name a new folder, or pass --force"
    )


def _carries(path: Path, schema: str, parse_json: bool) -> bool:
    """Whether the regular file `path` (at most MARKER_BYTES) carries our `schema` string."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MARKER_BYTES:
            return False
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(MARKER_BYTES + 1)
    except OSError:
        return False
    finally:
        os.close(fd)
    if not parse_json:
        return schema.encode() in data
    try:
        body = json.loads(data)
    except ValueError:
        return False
    found = str(body.get("schema", "")) if isinstance(body, dict) else ""
    return found.startswith("qcompiler.") and schema in found
