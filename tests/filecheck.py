"""Golden IR tests, FileCheck style.

A golden file is ONNX textual syntax with directives in comments:

    # RUN: canonicalize               the pipeline to run (empty: print only)
    # CHECK: text                     the next matching output line, after the previous match
    # CHECK-NEXT: text                the line right after the previous match
    # CHECK-NOT: text                 no line between the previous and next match contains it
    # TOLERANCE: 0.05                 a lossy pipeline: relative L2 error allowed (default: exact)

Pipelines that calibrate get `CALIBRATION_BATCHES` deterministic synthetic batches as data.

Lines holding only a brace are skipped, so CHECK-NEXT can go from initializers to nodes.

`python tests/filecheck.py FILE...` rewrites each file's CHECK lines from the current output
(the graph's signature, initializers and nodes), for a reviewer to read in the diff.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

CALIBRATION_BATCHES = 4
DIRECTIVE = re.compile(r"^#\s*(RUN|CHECK|CHECK-NEXT|CHECK-NOT|TOLERANCE):\s?(.*)$")


def directives(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    run, checks = None, []
    for line in text.splitlines():
        match = DIRECTIVE.match(line.strip())
        if not match:
            continue
        kind, body = match.groups()
        if kind == "RUN":
            run = body.strip()
        elif kind != "TOLERANCE":
            checks.append((kind, body.strip()))
    return run, checks


def tolerance(text: str) -> float | None:
    """`# TOLERANCE: 0.05`: the relative L2 error a lossy pipeline may add; None: exact."""
    for line in text.splitlines():
        match = DIRECTIVE.match(line.strip())
        if match and match.group(1) == "TOLERANCE":
            return float(match.group(2))
    return None


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


def run_golden(path: Path) -> str:
    """Parse the file, run its pipeline (verifying the IR), return the printed result."""
    from qcompiler.ir import to_text

    return to_text(run_golden_model(path))


def run_golden_model(path: Path, pipeline: str | None = None):
    """Parse the file and run its pipeline, or `pipeline` instead (verifying the IR); returns the model."""
    from qcompiler.ir import parse, verify
    from qcompiler.pass_manager import run_pipeline
    from qcompiler.pipeline import parse_pipeline

    from qcompiler.context import CompileContext, using
    from qcompiler.probe import synthetic_inputs

    text = path.read_text()
    run, _ = directives(text)
    run = pipeline if pipeline is not None else run
    model = parse(text)
    verify(model)
    if run:
        batches = [synthetic_inputs(model, seed=seed) for seed in range(CALIBRATION_BATCHES)]
        with using(CompileContext(calibration=batches)):
            run_pipeline(model, parse_pipeline(run))
        verify(model)
    return model


def update(path: Path) -> None:
    text = path.read_text()
    output = run_golden(path)
    body = [line.strip() for line in output.splitlines()]
    start = body.index(">") + 1  # the graph: signature, initializers, nodes
    lines = [line for line in body[start:] if line and line not in ("{", "}")]
    checks = [f"# CHECK-NEXT: {line}" if i else f"# CHECK: {line}" for i, line in enumerate(lines)]
    kept = [line for line in text.splitlines() if not re.match(r"^#\s*CHECK", line.strip())]
    run_index = next((i for i, line in enumerate(kept) if line.startswith("# RUN")), -1)
    path.write_text("\n".join(kept[: run_index + 1] + checks + kept[run_index + 1 :]) + "\n")


if __name__ == "__main__":
    for name in sys.argv[1:]:
        update(Path(name))
