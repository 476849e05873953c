"""The one driver: compile options declared once (`qcompiler.driver.options`: the command line's
flags, the config file's keys and `qcompiler.compile`'s keywords all derived from them), and the
`Session` that `compile`, `doctor` and `opt` run through."""

import argparse
import dataclasses
import inspect

import numpy as np
import pytest

import qcompiler
from qcompiler.analysis import probe
from qcompiler.codegen.targets import get_target
from qcompiler.driver.options import CompileOptions, command_line_fields, from_command_line, option
from qcompiler.driver.session import Session
from qcompiler.errors import UserError
from qcompiler.ir import parse
from qcompiler.tools import buildstep
from qcompiler.tools.cli import add_option_flags, build_parser, resolve_compile_options
from qcompiler.tools.doctor import diagnose

# What the public API and the command line offered before the options were declared once.
API_KEYWORDS = ["target", "pipeline", "example_inputs", "dynamic_shapes", "dump_ir", "print_ir", "report", "probe_inputs",
                "calibration", "calib_count", "threads", "drift", "cache_dir", "force", "eval_data", "require_data_probe",
                "float_type", "dtype", "workers", "ray_address", "block_sequential"]
CONFIG_KEYS = {"source", "output", "target", "pipeline", "dump_ir", "print_ir", "report", "calib", "calib_count", "threads", "no_drift",
               "cache_dir", "no_cache", "fail_under", "fail_over", "eval_data", "eval_count", "dry_run", "force", "float_type", "dtype",
               "workers", "ray_address", "block_sequential"}
CONFIG_PATHS = {"source", "output", "dump_ir", "report", "calib", "cache_dir", "eval_data"}
COMPILE_FLAGS = {"source", "-o", "--output", "--force", "--config", "--target", "--pipeline", "--dump-ir", "--print-ir", "--report", "--calib",
                 "--calib-count", "--threads", "--workers", "--ray-address", "--float-type", "--dtype", "--block-sequential", "--no-drift",
                 "--cache-dir", "--no-cache", "--fail-under", "--fail-over", "--eval-data", "--eval-count", "--dry-run"}


def _subparser(name: str) -> argparse.ArgumentParser:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def test_the_compile_command_has_exactly_the_declared_flags():
    parsed = {s for a in _subparser("compile")._actions for s in (a.option_strings or [a.dest])} - {"-h", "--help", "--debug"}  # every command's
    declared = {flag for cls in (CompileOptions, buildstep.BuildOptions) for _, info in command_line_fields(cls) for flag in info.flags}
    assert parsed == declared == COMPILE_FLAGS


def test_config_keys_are_the_declared_long_options():
    known, paths = buildstep.config_keys(CompileOptions, buildstep.BuildOptions)
    assert set(known) == CONFIG_KEYS and paths == CONFIG_PATHS
    assert known["calib_count"] is int and known["no_drift"] is bool and known["fail_under"] is list and known["calib"] is str


def test_compile_takes_every_option_as_a_keyword_and_names_the_nearest_for_a_wrong_one():
    params = inspect.signature(qcompiler.compile).parameters
    assert list(params) == ["source", "output", *API_KEYWORDS]
    assert [f.name for f in dataclasses.fields(CompileOptions)] == list(params)
    assert (params["target"].default, params["pipeline"].default, params["calib_count"].default, params["drift"].default) == (
        "ort", "default", 128, True)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'calib' \(did you mean 'calibration'\?\)"):
        qcompiler.compile("minilm-l6", "out", calib="data.txt")


DOCTOR_FLAGS = {"source", "--pipeline", "--calib", "--calib-count", "--threads", "--cache-dir", "--dtype", "--workers", "--ray-address",
                "--no-cache", "--max-extra-bits", "--top", "--metric", "--probe-batches", "--bits-only", "--apply", "--force", "--json"}


def test_doctor_takes_its_compile_options_as_compile_does():
    parsed = {s for a in _subparser("doctor")._actions for s in (a.option_strings or [a.dest])} - {"-h", "--help", "--debug"}
    assert parsed == DOCTOR_FLAGS
    with pytest.raises(TypeError, match=r"diagnose\(\) got an unexpected keyword argument 'calib' \(did you mean 'calibration'\?\)"):
        diagnose("minilm-l6", "w8a8", calib="data.txt")
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'report'"):  # a compile option doctor has no use for
        diagnose("minilm-l6", "w8a8", report="r.json")


def test_a_config_file_and_the_command_line_reach_the_compile_options(tmp_path):
    config = tmp_path / "build.toml"
    config.write_text('source = "m.onnx"\noutput = "o"\ncalib = "c.npz"\nno-drift = true\nblock_sequential = true\nthreads = 2\n')
    opts = resolve_compile_options(build_parser().parse_args(["compile", "--config", str(config), "--threads", "3", "--print-ir", "all"]))
    options = from_command_line(CompileOptions, vars(opts))
    assert options.source == str(tmp_path / "m.onnx") and options.output == str(tmp_path / "o")
    assert options.calibration == str(tmp_path / "c.npz") and options.calib_count == 128
    assert options.drift is False and options.block_sequential is True and options.threads == 3 and options.print_ir == "all"
    assert options.target == "ort" and options.pipeline == "default"


def test_a_new_option_is_one_field(capsys):
    @dataclasses.dataclass
    class Extra:
        group_size: int = option(64, "rows per scale", flags=("--group-size",), kind=int, positive=True, metavar="N")
        keep: list = option([], "a layer to keep (repeatable)", flags=("--keep",), kind=list)
        scratch: str = option(None, "a scratch folder", flags=("--scratch",), path=True, config=False)

    parser = argparse.ArgumentParser()
    add_option_flags(parser, Extra)
    args = parser.parse_args(["--group-size", "32", "--keep", "a", "--keep", "b"])
    assert (args.group_size, args.keep, args.scratch) == (32, ["a", "b"], None)
    assert parser.parse_args([]).group_size is None  # not given: a config file may still give it
    with pytest.raises(SystemExit):
        parser.parse_args(["--group-size", "0"])
    assert "must be a positive integer" in capsys.readouterr().err
    assert buildstep.config_keys(Extra) == ({"group_size": int, "keep": list}, set())
    assert from_command_line(Extra, {"group_size": 8}).keep == []


def _linear():
    return parse("""<ir_version: 10, opset_import: ["" : 21]>
    g (float[N, 4] X) => (float[N, 3] Y)
    <float[4,3] W = {1,2,3,4,5,6,7,8,9,10,11,12}>
    { Y = MatMul (X, W) }""")


def _rows(batches) -> int:
    return sum(len(b["X"]) for b in batches)


def test_compile_sessions_hold_a_probe_apart_and_doctor_sessions_calibrate_on_everything():
    rng = np.random.default_rng(0)
    data = [{"X": rng.standard_normal((2, 4)).astype(np.float32)} for _ in range(8)]
    options = CompileOptions(source=_linear(), pipeline="calibrate,quantize", calibration=data)

    compiling = Session(options)
    compiling.load()
    measured_on = compiling.load_data()
    assert measured_on.source == probe.CALIBRATION_HELD_APART and _rows(compiling.calibration) == 16 - 4
    np.testing.assert_array_equal(measured_on.feeds["X"], np.concatenate([b["X"] for b in data])[12:])

    diagnosing = Session(options)
    diagnosing.load()
    assert diagnosing.load_data(hold_apart=False).source == probe.SYNTHETIC and _rows(diagnosing.calibration) == 16


def test_session_completes_the_pipeline_for_its_target_and_opt_runs_it_exactly():
    names = lambda session: [p.name for p in session.passes]  # noqa: E731
    assert names(Session(CompileOptions(pipeline="calibrate,quantize"))) == ["canonicalize", "calibrate", "quantize", "lower-ort"]
    assert names(Session(CompileOptions(pipeline="calibrate,quantize"), complete=False)) == ["calibrate", "quantize"]
    with pytest.raises(qcompiler.UserError, match="print-ir must be 'all' or 'changed', got 'some'"):
        Session(CompileOptions(print_ir="some"))


def test_session_context_carries_the_options_and_the_targets_cost_model():
    session = Session(CompileOptions(calibration="data.txt", threads=2, block_sequential=True))
    with session.context() as ctx:
        assert (ctx.calibration_source, ctx.threads, ctx.block_sequential) == ("data.txt", 2, True)
        assert ctx.cost_model is get_target("ort").cost_model
    with Session(CompileOptions(), complete=False, calibration_label="synthetic:4").context() as ctx:
        assert ctx.calibration_source == "synthetic:4" and ctx.block_sequential is None


def test_widths_are_checked_against_the_targets_kernels_before_any_slow_step():
    pipeline = "calibrate,allocate-bits{candidates=2,3,4},quantize-weights"
    Session(CompileOptions(source="unused.onnx", pipeline=pipeline, target="triton"))  # the Triton kernels run 3 bits packed
    with pytest.raises(UserError, match=r"ONNX Runtime's MatMulNBits kernels run 2, 4, 8 bits packed, not 3; .*other-widths=container"):
        Session(CompileOptions(source="unused.onnx", pipeline=pipeline))
    with pytest.raises(UserError, match=r"the Triton package's kernels run 2, 3, 4, 8 bits packed, not 5"):
        Session(CompileOptions(source="unused.onnx", pipeline="calibrate,allocate-bits{candidates=2,5},quantize-weights", target="triton"))
    Session(CompileOptions(source="unused.onnx", pipeline="calibrate,allocate-bits{candidates=2,3 other-widths=container},quantize-weights"))
