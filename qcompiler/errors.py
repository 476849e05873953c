"""Errors and the exit codes they map to.

0 ok; 1 internal error; 2 bad input or usage; 3 a failed quality gate.
Every message is one line that names the problem and, where there is one, the fix.
"""

from __future__ import annotations


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


class QualityGateError(QCompilerError):
    """The artifact missed a --fail-under threshold."""

    exit_code = 3


def first_line(text: str) -> str:
    """The first non-empty line of a message, for one-line errors."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def shown(name: str, limit: int = 80) -> str:
    """A name from a model as it may appear in a one-line message: control and line-breaking
    characters escaped, long names cut with an ellipsis."""
    text = str(name).encode("unicode_escape").decode("ascii") if not str(name).isprintable() else str(name)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class VerificationError(Exception):
    """The IR broke an invariant; raised by `qcompiler.ir.verify` and the `qc` op checks."""
