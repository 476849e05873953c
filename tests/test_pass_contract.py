"""The contract every registered pass keeps: its kebab name, module (`passes/<snake>.py`, or a package `passes/<snake>/`), class
(`<Camel>Pass`, compared without case so that `GPTQPass` and `FlexRoundPass` keep their spelling)
and golden folder (`tests/golden/<kebab>/`) agree; the folder holds at least one case; and a second
run of the pass over its own output changes nothing, unless the pass says why it does
(`Pass.rerun_changes`)."""

import sys
from pathlib import Path

import pytest

from filecheck import run_lines
from qcompiler.ir import parse, to_text
from qcompiler.pipeline.spec import all_passes, format_pass, parse_pipeline
from qcompiler.tools.opt import optimize

GOLDEN = Path(__file__).parent / "golden"
TESTS = Path(__file__).parent.resolve()
# the product's passes: not the example passes that test modules register for themselves
PASSES = {name: cls for name, cls in all_passes().items()
          if TESTS not in Path(sys.modules[cls.__module__].__file__).resolve().parents}
NAMES = sorted(PASSES)


@pytest.mark.parametrize("name", NAMES)
def test_name_module_class_and_golden_folder_agree(name):
    cls = PASSES[name]
    snake = name.replace("-", "_")
    assert cls.__module__ == f"qcompiler.passes.{snake}", f"{name}: defined in {cls.__module__}"
    passes = Path(__file__).parent.parent / "passes"
    assert (passes / f"{snake}.py").is_file() or (passes / snake / "__init__.py").is_file()  # a module, or a package when large
    camel = "".join(part.capitalize() for part in name.split("-"))
    assert cls.__name__.lower() == f"{camel}Pass".lower(), f"{name}: class {cls.__name__}, expected {camel}Pass"
    cases = sorted((GOLDEN / name).glob("*.onnxtxt"))
    assert cases, f"{name}: no golden case in tests/golden/{name}/"
    assert all(any(name in stage[stage.index("-p") + 1] for run in run_lines(c.read_text()) for stage in run.stages
                   if "-p" in stage) for c in cases), f"{name}: a golden case under tests/golden/{name}/ does not run it"


def test_every_golden_folder_is_a_registered_pass():
    assert sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()) == NAMES


def _first_case(name):
    for path in sorted((GOLDEN / name).glob("*.onnxtxt")):
        for run in run_lines(path.read_text()):
            if len(run.stages) == 1:
                stage = run.stages[0]
                return path, stage[stage.index("-p") + 1]
    raise AssertionError(f"{name}: no single-stage RUN line")


@pytest.mark.parametrize("name", NAMES)
def test_second_run_changes_nothing(name):
    cls = PASSES[name]
    if cls.rerun_changes:
        assert len(cls.rerun_changes.split()) >= 4, f"{name}: say why a second run changes the IR"
        pytest.skip(f"{name}: {cls.rerun_changes}")
    path, spec = _first_case(name)
    model = parse(path.read_text())
    passes = parse_pipeline(spec)
    optimize(model, spec)
    text = to_text(model)
    last = [p for p in passes if p.name == name][-1]
    records = optimize(model, format_pass(last))
    assert not records[0].modified, f"{name}: the second run says it modified the IR"
    assert to_text(model) == text
