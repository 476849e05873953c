"""What passes tell each other besides the IR (`qcompiler.ir.meta`): every metadata key a pipeline
leaves on a model is declared, in the place it is declared for; no module spells a key instead of
importing it; a saved property does not vouch for facts a file does not carry; a pass that reads
calibration statistics refuses a layer without them."""

import ast
from pathlib import Path

import numpy as np
import pytest

from qcompiler.analysis.probe import synthetic_inputs
from qcompiler.errors import UserError
from qcompiler.ir import parse, to_text
from qcompiler.ir.meta import KEYS, MODEL_META, MODEL_PROPS, NODE_META, NODE_PROPS, STATS_KEY, VALUE_META, Prop
from qcompiler.pipeline.context import CompileContext, using
from qcompiler.pipeline.pass_manager import Instrument, run_pipeline
from qcompiler.pipeline.passbase import model_properties
from qcompiler.pipeline.spec import all_passes
from qcompiler.pipeline.spec import parse_pipeline
from qcompiler.tools.opt import optimize

ROOT = Path(__file__).parent.parent
MLP = ROOT / "tests" / "golden" / "flexround" / "residual_mlp.onnxtxt"  # two 64 x 64 linears and a residual Add
PIPELINES = {
    "w8a8": "w8a8",
    "mixed": "canonicalize,calibrate,allocate-bits{avg-bits=6 group-size=32},quantize-weights,"
             "flexround{steps=2 regions=1},fold-permutation,lower-ort",
}


class _KeysSeen(Instrument):
    """After every pass: each metadata key found on the model, with the place it sat in."""

    def __init__(self):
        self.seen: set[tuple[str, str]] = set()

    def after_pass(self, pass_, model, record):
        self.seen |= {(MODEL_META, k) for k in model.meta} | {(MODEL_PROPS, k) for k in model.metadata_props}
        graph = model.graph
        values = list(graph.inputs) + list(graph.initializers.values())
        for node in graph:
            self.seen |= {(NODE_META, k) for k in node.meta} | {(NODE_PROPS, k) for k in node.metadata_props}
            values += list(node.outputs)
        self.seen |= {(VALUE_META, k) for v in values for k in v.meta}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_key_a_pipeline_leaves_is_declared_in_its_place(name):
    model = parse(MLP.read_text())
    seen = _KeysSeen()
    with using(CompileContext(calibration=[synthetic_inputs(model, seed=s) for s in range(2)], calibration_source="synthetic")):
        run_pipeline(model, parse_pipeline(PIPELINES[name]), [seen])
    undeclared = sorted(f"{place}[{key!r}]" for place, key in seen.seen if key not in KEYS or KEYS[key].place != place)
    assert not undeclared, "declare these in qcompiler/ir/meta.py (or use the declared place): " + ", ".join(undeclared)
    keys = {key for _, key in seen.seen}
    # the side channels the pipeline runs on were really exercised
    expected = {"w8a8": {"qc.stats", "qc.calibration", "qc.smoothed", "qc.created_by", "qcompiler.properties"},
                "mixed": {"qc.stats", "qc.calibration", "qc.float_weight", "qc.created_by", "qcompiler.properties"}}
    assert expected[name] <= keys


def _sources():
    for folder in ("qcompiler", "passes", "codegen"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name != "meta.py":
                yield path


def test_no_module_spells_a_declared_key():
    spelled = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in KEYS:
                spelled.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not spelled, "import the key from qcompiler.ir.meta: " + "; ".join(spelled)


def test_metadata_is_read_and_written_through_names_only():
    """No string literal indexes `.meta` or `.metadata_props` (as `x.meta["k"]`, `.get("k")`, `.pop("k")`,
    `"k" in x.meta` or `metadata_props={"k": ...}`): a new key has to be declared to be used."""
    literal = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            key, holder = None, None
            if isinstance(node, ast.Subscript):
                key, holder = node.slice, node.value
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args \
                    and node.func.attr in ("get", "pop", "setdefault"):
                key, holder = node.args[0], node.func.value
            elif isinstance(node, ast.Compare) and isinstance(node.ops[0], (ast.In, ast.NotIn)):
                key, holder = node.left, node.comparators[0]
            elif isinstance(node, ast.keyword) and node.arg == "metadata_props" and isinstance(node.value, ast.Dict):
                literal += [f"{path.relative_to(ROOT)}:{k.lineno}" for k in node.value.keys if isinstance(k, ast.Constant)]
                continue
            if isinstance(holder, ast.Attribute) and holder.attr in ("meta", "metadata_props") \
                    and isinstance(key, ast.Constant) and isinstance(key.value, str):
                literal.append(f"{path.relative_to(ROOT)}:{node.lineno}: {key.value!r}")
    assert not literal, "declare the key in qcompiler/ir/meta.py and use its name: " + "; ".join(literal)


def test_every_declared_key_says_what_it_is():
    for key in KEYS.values():
        assert key.place in (VALUE_META, NODE_META, MODEL_META, NODE_PROPS, MODEL_PROPS)
        assert key.type and len(key.meaning.split()) >= 4, key.name
    assert all(len(p.meaning.split()) >= 4 for p in Prop)


@pytest.mark.parametrize("name", ["smooth", "awq-scale", "allocate-bits", "quantize-weights"])
def test_a_model_read_back_from_text_has_no_statistics_to_read(name):
    """`calibrated` vouches for statistics that live in memory only: a model saved after `calibrate`
    (and `allocate-bits`) records the property, but a pass that reads the statistics asks for
    `calibrate` again (smooth and awq-scale used to do nothing on it, quantize-weights to use unit
    energies, silently)."""
    assert all_passes()[name].reads_statistics
    model = parse(MLP.read_text())
    optimize(model, "calibrate,allocate-bits{avg-bits=6 group-size=32}" if name == "quantize-weights" else "calibrate")
    saved = parse(to_text(model))
    assert Prop.CALIBRATED in model_properties(saved)
    spec = {"allocate-bits": "allocate-bits{avg-bits=6 group-size=32}", "awq-scale": "awq-scale{group-size=32}"}.get(name, name)
    with pytest.raises(UserError, match=f"^{name} reads calibration statistics, which live in memory only, and this model "
                                        rf"has none \(read back from a file\?\); run calibrate before {name} in the same pipeline$"):
        optimize(saved, spec)


def test_allocate_bits_refuses_a_layer_without_statistics():
    model = parse(MLP.read_text())
    optimize(model, "calibrate")
    x = next(node for node in model.graph if node.op_type == "MatMul").inputs[0]
    del x.meta[STATS_KEY]
    with pytest.raises(UserError, match=rf"^allocate-bits: layer '\w+' has no calibration statistics on its input '{x.name}' "
                                        r"\(they live in memory only\); run calibrate before allocate-bits in the same pipeline$"):
        optimize(model, "allocate-bits{avg-bits=6 group-size=32}")


def test_quantize_weights_weighs_a_layer_fed_by_another_layer_by_its_calibrated_energies(monkeypatch):
    """Replacing the first layer makes its output a new value; the second layer's energies are the
    ones calibrate measured on it (they used to be replaced by ones, silently)."""
    from qcompiler.passes.quantize_weights import QuantizeWeightsPass

    rng = np.random.default_rng(1)
    w = {k: ",".join(f"{v:.4f}" for v in rng.normal(0, 0.2, 64 * 64)) for k in ("A", "B")}
    model = parse(f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[M, 64] X) => (float[M, 64] Y)
    <float[64,64] A = {{{w["A"]}}}, float[64,64] B = {{{w["B"]}}}>
    {{ H = MatMul (X, A)
       Y = MatMul (H, B) }}""")
    optimize(model, "calibrate,allocate-bits{avg-bits=6 group-size=32}")
    first = next(node for node in model.graph if node.op_type == "MatMul")
    calibrated = {v.name: v.meta[STATS_KEY].mean_sq for v in (first.inputs[0], first.outputs[0])}
    used = {}
    replace = QuantizeWeightsPass._replace

    def recording(self, graph, allocation, matmul, energy):
        used[matmul.inputs[0].name] = energy
        return replace(self, graph, allocation, matmul, energy)

    monkeypatch.setattr(QuantizeWeightsPass, "_replace", recording)
    optimize(model, "quantize-weights")
    assert sorted(used) == ["H", "X"]
    for name, energy in used.items():
        np.testing.assert_array_equal(energy, calibrated[name].astype(np.float64))
    assert np.ptp(used["H"]) > 0  # not unit energies
