"""Golden IR tests: every file under tests/golden/<pass>/ runs its RUN lines (`qcompiler opt`) and
checks their output.

Each RUN line is also run numerically: its output IR must compute what the input IR computes, to
float32 round-off, on synthetic inputs (exact passes), or within the file's TOLERANCE.
"""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from filecheck import checks, execute, filecheck, parse_run, run_lines, tolerance
from qcompiler.analysis import execute as run_model
from qcompiler.analysis.probe import synthetic_inputs
from qcompiler.ir import parse

CASES = sorted(Path(__file__).parent.glob("golden/*/*.onnxtxt"))
IDS = [f"{p.parent.name}/{p.stem}" for p in CASES]


@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_golden(path):
    text = path.read_text()
    runs = run_lines(text)
    assert runs, f"{path} has no RUN line"
    for run in runs:
        expected = checks(text, run.prefix)
        assert expected, f"{path} has no {run.prefix} lines for `{run.command}`"
        filecheck(execute(run, path), expected)


@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_golden_numerics(path):
    """Exact passes keep the outputs to float32 round-off; lossy ones stay within TOLERANCE."""
    text = path.read_text()
    before = parse(text)
    feeds = synthetic_inputs(before, seed=100)  # not among the calibration seeds
    expected = run_model.run(before, feeds)
    bound = tolerance(text)
    for run in run_lines(text):
        # the text pins weight-format=s8 (the same IR on every CPU); the numbers are checked for what
        # this CPU gets (auto: uint8 weights on x86 without VNNI, where u8 x s8 kernels saturate);
        # every weight printed (no --elide), so that the output parses back to the same numbers
        here = dataclasses.replace(run, stages=[[a.replace("weight-format=s8", "weight-format=auto") for a in stage
                                                 if not a.startswith("--elide")] for stage in run.stages])
        actual = run_model.run(parse(execute(here, path)), feeds)
        for name, value in expected.items():
            if bound is None:
                np.testing.assert_allclose(actual[name], value, rtol=1e-6, atol=1e-6)
            else:
                assert run_model.drift({name: value}, {name: actual[name]})["rel_l2"] <= bound


def test_filecheck_reports_missing_line():
    with pytest.raises(AssertionError, match="not found"):
        filecheck("a\nb\n", [("CHECK", "a"), ("CHECK-NEXT", "c")])
    with pytest.raises(AssertionError, match="CHECK-NOT"):
        filecheck("a\nx\nb\n", [("CHECK", "a"), ("CHECK-NOT", "x"), ("CHECK", "b")])


def test_opt_elides_over_the_bound_it_is_given(tmp_path, capsys):
    from qcompiler.tools.cli import main

    source = Path(__file__).parent / "golden" / "quantize" / "linear_static.onnxtxt"
    assert main(["-q", "opt", str(source), "-p", "calibrate,quantize", "--elide"]) == 0
    assert '"W.q" =  {13,23,32' in capsys.readouterr().out  # 12 elements: printed
    assert main(["-q", "opt", "--elide-over", "8", str(source), "-p", "calibrate,quantize"]) == 0
    assert '# elided int8[4,3] "W.q" sha256:' in capsys.readouterr().out
    assert main(["-q", "opt", "--elide", str(source)]) == 0  # a switch: the file after it is the file
    assert main(["-q", "opt", str(source), "--elide-over=-1"]) == 2
    assert "--elide-over needs N of 0 or more" in capsys.readouterr().err


def test_run_lines_pipe_stages_and_name_their_check_prefix():
    run = parse_run("qcompiler opt %s -p 'calibrate,quantize{act-mode=per-token}' | qcompiler opt - -p lower-ort "
                    "| filecheck --check-prefix=LOWERED")
    assert run.stages == [["%s", "-p", "calibrate,quantize{act-mode=per-token}"], ["-", "-p", "lower-ort"]]
    assert run.prefix == "LOWERED"
    assert checks("# LOWERED: a\n# CHECK: b\n# LOWERED-NEXT: c\n", "LOWERED") == [("CHECK", "a"), ("CHECK-NEXT", "c")]
    with pytest.raises(ValueError, match="qcompiler opt"):
        parse_run("python -c 'print(1)'")


def test_opt_writes_the_file_asked_for_and_refuses_bad_input(tmp_path, capsys):
    from qcompiler.tools.cli import main

    source = Path(__file__).parent / "golden" / "quantize" / "linear_static.onnxtxt"
    out = tmp_path / "out.onnxtxt"
    assert main(["-q", "opt", str(source), "-p", "calibrate,quantize", "-o", str(out)]) == 0
    assert capsys.readouterr().out == "" and "qc.QuantizeActivation" in out.read_text()
    assert parse(out.read_text()).graph.initializers["W.q"].const_value.numpy().tolist()[0] == [13, 23, 32]
    assert main(["-q", "opt", str(tmp_path / "missing.onnxtxt"), "-p", "canonicalize"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["-q", "opt", str(source), "-p", "quantize"]) == 2  # nothing implied: no calibrate before it
    assert "requires 'calibrated'" in capsys.readouterr().err
