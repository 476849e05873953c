"""Golden IR tests: every file under tests/golden/<pass>/ runs its pipeline and checks lines.

Each case is also run numerically: the output IR must compute what the input IR computes, to
float32 round-off, on synthetic inputs (these passes are exact).
"""

from pathlib import Path

import numpy as np
import pytest

from filecheck import directives, filecheck, run_golden, run_golden_model, tolerance
from qcompiler import execute
from qcompiler.ir import parse
from qcompiler.probe import synthetic_inputs

CASES = sorted(Path(__file__).parent.glob("golden/*/*.onnxtxt"))


@pytest.mark.parametrize("path", CASES, ids=[f"{p.parent.name}/{p.stem}" for p in CASES])
def test_golden(path):
    _, checks = directives(path.read_text())
    assert checks, f"{path} has no CHECK lines"
    filecheck(run_golden(path), checks)


@pytest.mark.parametrize("path", CASES, ids=[f"{p.parent.name}/{p.stem}" for p in CASES])
def test_golden_numerics(path):
    """Exact passes keep the outputs to float32 round-off; lossy ones stay within TOLERANCE."""
    text = path.read_text()
    before = parse(text)
    feeds = synthetic_inputs(before, seed=100)  # not among the calibration seeds
    expected = execute.run(before, feeds)
    # the text pins weight-format=s8 (the same IR on every CPU); the numbers are checked for what
    # this CPU gets (auto: uint8 weights on x86 without VNNI, where u8 x s8 kernels saturate)
    run, _ = directives(text)
    actual = execute.run(run_golden_model(path, run.replace("weight-format=s8", "weight-format=auto")), feeds)
    bound = tolerance(text)
    for name, value in expected.items():
        if bound is None:
            np.testing.assert_allclose(actual[name], value, rtol=1e-6, atol=1e-6)
        else:
            assert execute.drift({name: value}, {name: actual[name]})["rel_l2"] <= bound


def test_filecheck_reports_missing_line():
    with pytest.raises(AssertionError, match="not found"):
        filecheck("a\nb\n", [("CHECK", "a"), ("CHECK-NEXT", "c")])
    with pytest.raises(AssertionError, match="CHECK-NOT"):
        filecheck("a\nx\nb\n", [("CHECK", "a"), ("CHECK-NOT", "x"), ("CHECK", "b")])
