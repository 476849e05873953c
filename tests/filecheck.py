"""Golden IR tests, FileCheck style.

A golden file is ONNX textual syntax with directives in comments:

    # RUN: qcompiler opt %s --elide -p 'canonicalize'   a command; its output is checked (several allowed)
    # RUN: qcompiler opt %s -p 'a' | qcompiler opt - --elide -p 'b' | filecheck --check-prefix=PIPED
    # CHECK: text                     the next matching output line, after the previous match
    # CHECK-NEXT: text                the line right after the previous match
    # CHECK-NOT: text                 no line between the previous and next match contains it
    # TOLERANCE: 0.05                 a lossy pipeline: relative L2 error allowed (default: exact)

A RUN line is one `qcompiler opt` (`%s`: this file) or several joined by `|` (`-` reads the
previous one's output; `--elide` prints tensors over 64 elements, and float16/bfloat16 ones, as a
hash line, as the checks expect; `--elide-over=N` those over N elements), run in
this process through `qcompiler.tools.cli.main`; an optional last
`filecheck --check-prefix=P` stage checks its output against the `P:` lines instead of `CHECK:`.
`qcompiler opt` gives pipelines that calibrate deterministic synthetic batches.

Lines holding only a brace are skipped, so CHECK-NEXT can go from initializers to nodes.

`python tests/filecheck.py FILE...` rewrites each file's check lines from the current output of its
RUN lines (the graph's signature, initializers and nodes), for a reviewer to read in the diff.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import shlex
import sys
from pathlib import Path

RUN = re.compile(r"^#\s*RUN:\s?(.*)$")
CHECK = re.compile(r"^#\s*([A-Z][A-Z0-9_]*?)(-NEXT|-NOT)?:\s?(.*)$")
TOLERANCE = re.compile(r"^#\s*TOLERANCE:\s?(.*)$")


@dataclasses.dataclass(frozen=True)
class RunLine:
    stages: list[list[str]]  # each: the arguments of one `qcompiler opt`
    prefix: str  # the check prefix its output is matched against
    command: str


def run_lines(text: str) -> list[RunLine]:
    found = []
    for line in text.splitlines():
        match = RUN.match(line.strip())
        if match:
            found.append(parse_run(match.group(1).strip()))
    return found


def parse_run(command: str) -> RunLine:
    """`qcompiler opt ARGS [| qcompiler opt - ARGS]... [| filecheck --check-prefix=P]`."""
    stages, prefix = [], "CHECK"
    parts = [shlex.split(part) for part in command.split("|")]
    if parts and parts[-1][:1] == ["filecheck"]:
        options = parts.pop()[1:]
        if len(options) != 1 or not options[0].startswith("--check-prefix="):
            raise ValueError(f"RUN: filecheck takes only --check-prefix=P, got {options}")
        prefix = options[0].split("=", 1)[1]
    for argv in parts:
        if argv[:2] != ["qcompiler", "opt"]:
            raise ValueError(f"RUN: each stage must be `qcompiler opt ...`, got '{' '.join(argv)}'")
        stages.append(argv[2:])
    if not stages:
        raise ValueError(f"RUN: no `qcompiler opt` in '{command}'")
    return RunLine(stages, prefix, command)


def checks(text: str, prefix: str = "CHECK") -> list[tuple[str, str]]:
    """The (CHECK | CHECK-NEXT | CHECK-NOT, pattern) lines of `prefix`, kinds spelled with CHECK."""
    found = []
    for line in text.splitlines():
        match = CHECK.match(line.strip())
        if match and match.group(1) == prefix:
            found.append(("CHECK" + (match.group(2) or ""), match.group(3).strip()))
    return found


def tolerance(text: str) -> float | None:
    """`# TOLERANCE: 0.05`: the relative L2 error a lossy pipeline may add; None: exact."""
    for line in text.splitlines():
        match = TOLERANCE.match(line.strip())
        if match:
            return float(match.group(1))
    return None


def execute(run: RunLine, path: Path) -> str:
    """The output of a RUN line's `qcompiler opt` stages on `path`."""
    from qcompiler.tools.cli import main

    output = None
    for argv in run.stages:
        argv = [str(path) if arg == "%s" else arg for arg in argv]
        stdout = io.StringIO()
        stdin = io.StringIO(output if output is not None else "")
        with contextlib.redirect_stdout(stdout), _stdin(stdin):
            code = main(["-q", "opt", *argv])
        if code != 0:
            raise AssertionError(f"`qcompiler opt {' '.join(argv)}` exited {code} (RUN: {run.command})")
        output = stdout.getvalue()
    return output


@contextlib.contextmanager
def _stdin(stream):
    saved, sys.stdin = sys.stdin, stream
    try:
        yield
    finally:
        sys.stdin = saved


def filecheck(output: str, checks: list[tuple[str, str]]) -> None:
    """Raise AssertionError describing the first check that fails."""
    lines = [line.strip() for line in output.splitlines() if line.strip() not in ("{", "}")]
    pos = -1  # index of the last matched line
    pending_not: list[str] = []
    for kind, pattern in checks:
        if kind == "CHECK-NOT":
            pending_not.append(pattern)
            continue
        if kind == "CHECK-NEXT":
            candidates = [pos + 1] if pos + 1 < len(lines) else []
        else:
            candidates = range(pos + 1, len(lines))
        found = next((i for i in candidates if pattern in lines[i]), None)
        if found is None:
            raise AssertionError(f"{kind}: '{pattern}' not found after line {pos + 1} in:\n{output}")
        _check_not(lines[pos + 1 : found], pending_not, output)
        pending_not = []
        pos = found
    _check_not(lines[pos + 1 :], pending_not, output)


def _check_not(span: list[str], patterns: list[str], output: str) -> None:
    for pattern in patterns:
        for line in span:
            if pattern in line:
                raise AssertionError(f"CHECK-NOT: '{pattern}' found in line '{line}' of:\n{output}")


def update(path: Path) -> None:
    """Rewrite the check lines of every prefix from the first RUN line that uses it."""
    text = path.read_text()
    firsts: dict[str, RunLine] = {}
    for run in run_lines(text):
        firsts.setdefault(run.prefix, run)
    blocks = []
    for run in firsts.values():
        body = [line.strip() for line in execute(run, path).splitlines()]
        start = body.index(">") + 1  # the graph: signature, initializers, nodes
        lines = [line for line in body[start:] if line and line not in ("{", "}")]
        blocks += [f"# {run.prefix}-NEXT: {line}" if i else f"# {run.prefix}: {line}" for i, line in enumerate(lines)]
    kept = [line for line in text.splitlines() if not ((m := CHECK.match(line.strip())) and m.group(1) in firsts)]
    last_run = max((i for i, line in enumerate(kept) if RUN.match(line.strip())), default=-1)
    path.write_text("\n".join(kept[: last_run + 1] + blocks + kept[last_run + 1 :]) + "\n")


if __name__ == "__main__":
    for name in sys.argv[1:]:
        update(Path(name))
