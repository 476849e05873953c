"""`--mixed-options` of the benchmark scripts whose pipelines are written inside them
(`benchmarks/common.py: with_mixed_options`): the options go inside every `mixed{...}` preset call
and nowhere else."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("qc_bench_common", ROOT / "benchmarks" / "common.py")
common = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = common
_spec.loader.exec_module(common)

UNIFORM_4BIT = ("canonicalize,calibrate,allocate-bits{avg-bits=8 candidates=4 outliers-act=0 outliers-weight=0},"
                "quantize-weights{grid=minmax},fold-permutation,lower-ort")


def test_preset_with_options_gets_them_after_its_own():
    assert common.with_mixed_options("mixed{avg-bits=4.25}", "rounding=nearest") == "mixed{avg-bits=4.25 rounding=nearest}"
    assert (common.with_mixed_options("mixed{avg-bits=4.25 route=digits}", "rounding=nearest blocks=whole")
            == "mixed{avg-bits=4.25 route=digits rounding=nearest blocks=whole}")


def test_bare_preset_gets_braces():
    assert common.with_mixed_options("mixed", "rounding=nearest") == "mixed{rounding=nearest}"


def test_a_list_of_passes_is_left_alone():
    assert common.with_mixed_options(UNIFORM_4BIT, "rounding=nearest") == UNIFORM_4BIT
    assert common.with_mixed_options("default", "rounding=nearest") == "default"
    assert common.with_mixed_options("w8a8{act-mode=per-token}", "rounding=nearest") == "w8a8{act-mode=per-token}"


def test_only_items_named_mixed_count():
    # `lower-ort{mixed-route=single}` names mixed in an option, `mixed-precision` is another name
    pipeline = "calibrate,allocate-bits{avg-bits=3.25},quantize-weights,lower-ort{mixed-route=single},mixed-precision"
    assert common.with_mixed_options(pipeline, "rounding=nearest") == pipeline


def test_several_items():
    assert (common.with_mixed_options("canonicalize,mixed{avg-bits=3.25},lower-ort{attention=as-is},mixed", "rounding=nearest")
            == "canonicalize,mixed{avg-bits=3.25 rounding=nearest},lower-ort{attention=as-is},mixed{rounding=nearest}")


def test_an_option_the_call_sets_keeps_its_value():
    # `mixed 4.25 gptq` in benchmarks/decode.py: the row's own rounding, not a second one (which the parser refuses)
    assert (common.with_mixed_options("mixed{avg-bits=4.25 rounding=gptq}", "rounding=nearest blocks=whole")
            == "mixed{avg-bits=4.25 rounding=gptq blocks=whole}")
    assert common.with_mixed_options("mixed{avg-bits=4.25 rounding=gptq}", "rounding=nearest") == "mixed{avg-bits=4.25 rounding=gptq}"


def test_empty_options_change_nothing():
    for pipeline in ("mixed", "mixed{avg-bits=4.25}", UNIFORM_4BIT):
        assert common.with_mixed_options(pipeline, "") == pipeline
        assert common.with_mixed_options(pipeline, "  ") == pipeline


def test_the_result_parses_as_the_preset_with_those_options():
    from qcompiler.pipeline.spec import format_pipeline, parse_pipeline

    got = common.with_mixed_options("mixed{avg-bits=4.25}", "rounding=nearest")
    assert format_pipeline(parse_pipeline(got)) == format_pipeline(parse_pipeline("mixed{avg-bits=4.25 rounding=nearest}"))
    assert "gptq" not in format_pipeline(parse_pipeline(got))


def test_the_option_defaults_to_empty():
    parser = argparse.ArgumentParser()
    common.add_mixed_options(parser)
    assert parser.parse_args([]).mixed_options == ""
    assert parser.parse_args(["--mixed-options", "rounding=nearest"]).mixed_options == "rounding=nearest"
