"""Errors and the exit codes they map to.

0 ok; 1 internal error; 2 bad input or usage; 3 a failed quality gate.
Every message is one line that names the problem and, where there is one, the fix.
"""

from __future__ import annotations

import errno
import os


class QCompilerError(Exception):
    """Base class; `exit_code` is what the CLI returns."""

    exit_code = 1


class UserError(QCompilerError):
    """Bad input or usage: a missing file, an invalid pipeline, an unwritable directory."""

    exit_code = 2


class PassFailure(QCompilerError):
    """A pass raised: an internal error that names the pass and the passes run before it."""

    exit_code = 1

    def __init__(self, pass_name: str, previous: list[str], cause: BaseException):
        before = ", ".join(previous) if previous else "none"
        super().__init__(
            f"pass '{pass_name}' failed: {type(cause).__name__}: {first_line(str(cause))} "
            f"(passes run before it: {before}); rerun with --debug for the traceback"
        )
        self.pass_name = pass_name


def disk_full(exc: BaseException) -> UserError | None:
    """The one-line error for an `OSError` of a full disk (or an exhausted quota), raised or behind
    the raised error; None for any other exception. The compiler's outputs are written to temporaries first, so nothing is left."""
    seen = set()
    while exc is not None and id(exc) not in seen and not (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)):
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__  # a full disk inside another error (an emitted model's check, a worker)
    if exc is None or id(exc) in seen:
        return None
    where = f" holding {shown(os.path.dirname(os.fspath(exc.filename)))}" if exc.filename else ""
    return UserError(f"the disk{where} is full ({exc.strerror}); free space there or write the output to another disk "
                     "(temporaries were removed, no output was written)")


class QualityGateError(QCompilerError):
    """The artifact missed a --fail-under threshold."""

    exit_code = 3


def first_line(text: str) -> str:
    """The first non-empty line of a message, for one-line errors."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


SHOWN_CHARS = 80  # user text echoed in a message is cut to about this many characters
MESSAGE_CHARS = 1000  # a whole error message is cut to this many characters


def escaped(text: str) -> str:
    """`text` with control, line-separator and other unprintable characters written as escapes
    (`\\n`, `\\x00`, `\\u2028`), so that it cannot break a one-line message or a terminal."""
    out = []
    for ch in str(text):
        if ch.isprintable() or ch == " ":
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1] if ch not in "'\"" else ch)
    return "".join(out)


def shown(text, limit: int = SHOWN_CHARS) -> str:
    """User-supplied text as a message may echo it: escaped, and cut to `limit` characters with
    an ellipsis and the full length when longer."""
    text = str(text)
    if len(text) > limit:
        return f"{escaped(text[:limit])}… ({len(text)} characters)"
    return escaped(text)


def one_line(message: str, limit: int = MESSAGE_CHARS) -> str:
    """An error message as one bounded line (the CLI's last defence; sites shorten what they echo)."""
    text = escaped(message)
    return text if len(text) <= limit else text[:limit] + "…"


class VerificationError(Exception):
    """The IR broke an invariant; raised by `qcompiler.ir.verify` and the `qc` op checks."""
