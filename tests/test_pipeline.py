"""Pipeline strings: parse, print back with defaults, presets, @file, errors that name the fix."""

import dataclasses
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qcompiler.errors import UserError
from qcompiler.ir.meta import Prop
from qcompiler.pipeline.passbase import Pass, PassResult, option, register_pass
from qcompiler.pipeline.spec import PRESETS, Preset, all_passes, check_order, format_pipeline, parse_pipeline


@register_pass
@dataclasses.dataclass(frozen=True)
class _ExamplePass(Pass):
    """An option-rich pass used only by these tests."""

    name = "test-example"
    required = frozenset({Prop.CANONICAL})

    alpha: float | Literal["auto"] = option(0.5, "a number or auto")
    method: Literal["minmax", "percentile"] = option("minmax", "a choice")
    candidates: tuple[int, ...] = option((2, 3, 4, 8), "a list")
    per_token: bool = option(False, "a switch")
    count: int = option(128, "an integer")

    def call(self, model):
        return PassResult(model, False)


def test_prints_back_with_defaults_filled_in():
    passes = parse_pipeline("canonicalize,test-example{alpha=auto}")
    assert format_pipeline(passes) == (
        "canonicalize{fold-limit=67108864},"
        "test-example{alpha=auto method=minmax candidates=2,3,4,8 per-token=false count=128}"
    )


def test_printed_pipeline_parses_to_itself():
    text = format_pipeline(parse_pipeline("canonicalize,test-example{candidates=2,4 per-token=true alpha=0.85}"))
    assert format_pipeline(parse_pipeline(text)) == text
    assert parse_pipeline(text)[1].candidates == (2, 4)
    assert parse_pipeline(text)[1].alpha == 0.85


def test_preset_expands():
    assert format_pipeline(parse_pipeline("default")) == "canonicalize{fold-limit=67108864}"


def test_preset_with_options(monkeypatch):
    monkeypatch.setitem(PRESETS, "test-preset", Preset("canonicalize,test-example{count=$count}", "x", {"count": "7"}))
    assert parse_pipeline("test-preset")[1].count == 7
    assert parse_pipeline("test-preset{count=9}")[1].count == 9
    with pytest.raises(UserError, match="preset 'test-preset' has no option 'cont' \\(did you mean 'count'"):
        parse_pipeline("test-preset{cont=9}")


def test_preset_option_that_chooses_passes():
    names = [p.name for p in parse_pipeline("mixed{rounding=gptq}")]
    assert names[names.index("quantize-weights") + 1] == "gptq"
    assert "gptq" not in [p.name for p in parse_pipeline("mixed{rounding=nearest}")]
    with pytest.raises(UserError, match="preset 'mixed': rounding must be one of nearest, gptq, auto, got 'best'"):
        parse_pipeline("mixed{rounding=best}")


def test_mixed_preset_passes_its_group_size_to_allocate_bits():
    allocator = [p for p in parse_pipeline("mixed{avg-bits=3 group-size=64}") if p.name == "allocate-bits"][0]
    assert allocator.group_size == 64 and allocator.avg_bits == 3.0
    assert [p for p in parse_pipeline("mixed") if p.name == "allocate-bits"][0].group_size == 128
    awq = [p for p in parse_pipeline("mixed{group-size=64 act-scale=awq}") if p.name == "awq-scale"][0]
    assert awq.group_size == 64  # the scales are searched on the groups allocate-bits will use
    with pytest.raises(UserError, match="group-size must be 32, 64 or 128, got 48"):
        parse_pipeline("mixed{group-size=48}")


def test_pipeline_from_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# my pipeline\ncanonicalize,\ntest-example{count=3}  # three\n")
    assert format_pipeline(parse_pipeline(f"@{path}")).endswith("count=3}")


@pytest.mark.parametrize(
    "text, message",
    [
        ("canonicalise", "unknown pass 'canonicalise' \\(did you mean 'canonicalize'\\?\\)"),
        ("test-example{methd=minmax}", "has no option 'methd' \\(did you mean 'method'\\?\\)"),
        ("test-example{method=best}", "option 'method' of pass 'test-example' must be one of minmax, percentile, got 'best'"),
        ("test-example{count=1.5}", "must be an integer"),
        ("test-example{alpha=high}", "must be float or 'auto'"),
        ("test-example{count}", "must be written key=value"),
        ("canonicalize,,canonicalize", "stray comma"),
        ("test-example{count=1", "unclosed"),
        ("", "empty"),
        ("@/nonexistent/pipeline.txt", "cannot read pipeline file"),
    ],
)
def test_bad_pipelines_name_the_problem(text, message):
    with pytest.raises(UserError, match=message):
        parse_pipeline(text)


def test_a_pass_declaring_an_unknown_property_is_refused_at_registration():
    for role, value in (("required", "calibratd"), ("provided", "calibrated"), ("invalidated", "made-up")):
        cls = dataclasses.make_dataclass(f"_Bad{role}Pass", [], bases=(Pass,), frozen=True,
                                          namespace={"name": f"test-bad-{role}", role: frozenset({value})})
        with pytest.raises(ValueError, match=f"_Bad{role}Pass.{role}: '{value}' is not a property"):
            register_pass(cls)
    assert "test-bad-required" not in all_passes()
    with pytest.raises(ValueError, match="did you mean 'calibrated'"):
        register_pass(dataclasses.make_dataclass("_TypoPass", [], bases=(Pass,), frozen=True,
                                                 namespace={"name": "test-typo", "required": frozenset({"calibratd"})}))


def test_properties_are_saved_by_name_and_read_back_as_props():
    import onnx_ir as ir

    from qcompiler.ir.meta import PROPERTIES_KEY
    from qcompiler.pipeline.passbase import model_properties, set_model_properties

    model = ir.Model(ir.Graph([], [], nodes=[]), ir_version=10)
    set_model_properties(model, {Prop.QUANTIZED, Prop.CALIBRATED})
    assert model.metadata_props[PROPERTIES_KEY] == "calibrated,quantized"
    model.metadata_props[PROPERTIES_KEY] += ",from-elsewhere"
    assert model_properties(model) == {Prop.CALIBRATED, Prop.QUANTIZED}
    assert all(isinstance(p, Prop) for p in model_properties(model))


def test_order_check_names_the_missing_pass():
    with pytest.raises(UserError, match="test-example requires 'canonical'; add 'canonicalize' before it"):
        check_order(parse_pipeline("test-example"))
    check_order(parse_pipeline("canonicalize,test-example"))


def test_a_pass_after_the_lowering_is_refused_before_anything_runs():
    """lower-ort leaves no qc op to quantize or learn: a learning pass after it would run and change nothing."""
    for later in ("flexround", "gptq", "tune-scales", "quantize-weights"):
        with pytest.raises(UserError, match=f"{later} cannot come after lower-ort .only canonicalize, lower-ort may.; put lower-ort after {later}"):
            check_order(parse_pipeline(f"canonicalize,calibrate,allocate-bits,quantize-weights,lower-ort,{later}"))
    check_order(parse_pipeline("canonicalize,calibrate,allocate-bits,quantize-weights,flexround,lower-ort,canonicalize"))
    # a lowered float artifact read back quantizes from the start
    check_order(parse_pipeline("canonicalize,calibrate,allocate-bits,quantize-weights,lower-ort"), frozenset({"lowered-ort"}))


_numbers = st.floats(min_value=0, max_value=1, allow_nan=False).map(lambda x: round(x, 3))


@given(
    alpha=st.one_of(_numbers, st.just("auto")),
    method=st.sampled_from(["minmax", "percentile"]),
    candidates=st.lists(st.integers(1, 8), min_size=1, max_size=5),
    per_token=st.booleans(),
    count=st.integers(1, 10_000),
    repeat=st.integers(1, 3),
)
def test_round_trip_property(alpha, method, candidates, per_token, count, repeat):
    item = (
        f"test-example{{alpha={alpha} method={method} candidates={','.join(map(str, candidates))} "
        f"per-token={'true' if per_token else 'false'} count={count}}}"
    )
    text = ",".join(["canonicalize"] + [item] * repeat)
    passes = parse_pipeline(text)
    assert parse_pipeline(format_pipeline(passes)) == passes
    assert passes[1].candidates == tuple(candidates)


@register_pass
@dataclasses.dataclass(frozen=True)
class _BreakingPass(Pass):
    """Leaves an invalid IR: a second node producing the graph's output value's name."""

    name = "test-break-ir"

    def call(self, model):
        import onnx_ir as ir

        node = ir.node("Identity", [model.graph.inputs[0]])
        node.outputs[0].name = model.graph.outputs[0].name
        model.graph.append(node)
        return PassResult(model, True)


def test_an_invalid_ir_names_the_pass_and_the_passes_run_before_it():
    from qcompiler.errors import PassFailure
    from qcompiler.ir import parse
    from qcompiler.pipeline import instruments
    from qcompiler.pipeline.pass_manager import run_pipeline

    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
    g (float[2] X) => (float[2] Y) { Y = Relu (X) }""")
    with pytest.raises(PassFailure, match=r"pass 'test-break-ir' failed: VerificationError: IR invalid after this pass: .*"
                                          r"\(passes run before it: canonicalize\)"):
        run_pipeline(model, parse_pipeline("canonicalize,test-break-ir"), [instruments.Verify()])


@pytest.mark.parametrize("argv", [["--debug", "show", "m.onnx"], ["show", "m.onnx", "--debug"], ["show", "m.onnx"]])
def test_debug_is_taken_before_or_after_the_command(argv):
    """`rerun with --debug` is followed by adding it at the end of the command line."""
    from qcompiler.tools.cli import build_parser

    assert build_parser().parse_args(argv).debug is ("--debug" in argv or None)
