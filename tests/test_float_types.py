"""float16 and bfloat16 sources: compiled in float32 inside, emitted with the source's float type.

The emitted model is compared with the float model (the source's weights in float32) on held-out
inputs; the bound is on the output's relative L2 error (w8a8 and w8a8 per-token: 0.04, measured
0.027; mixed at 4.25 bits: 0.35, measured 0.30, the same as the float32 source's compile on these
random weights), and the float16 and float32 compiles of the same weights must agree to within
2e-2 relative L2 (measured 0.01 for w8a8, 2e-4 for mixed).
"""

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.driver.compiler import compile
from qcompiler.errors import UserError

D, F, SEQ = 128, 256, 8
PIPELINES = {"w8a8": 0.04, "w8a8{act-mode=per-token}": 0.04, "mixed{avg-bits=4.25}": 0.35}
NUMPY = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.BFLOAT16: ml_dtypes.bfloat16,
         TensorProto.DOUBLE: np.float64}


def tiny_block(elem_type: int, seed: int = 0) -> onnx.ModelProto:
    """One pre-norm transformer block (single-head attention + ReLU MLP) in `elem_type`; the
    weights are the same for every type (drawn in float32, rounded to float16 first)."""
    rng = np.random.default_rng(seed)
    shapes = {"ln.w": [D], "ln.b": [D], "q.w": [D, D], "k.w": [D, D], "v.w": [D, D], "o.w": [D, D],
              "up.w": [D, F], "up.b": [F], "down.w": [F, D]}
    inits = []
    for name, shape in shapes.items():
        scale = 1.0 if name == "ln.w" else 0.1 if name.endswith(".b") else shape[0] ** -0.5
        array = (rng.standard_normal(shape) * scale).astype(np.float16).astype(np.float32)
        inits.append(_tensor(array, name, elem_type))
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln.w", "ln.b"], ["n"], axis=-1),
        *[helper.make_node("MatMul", ["n", f"{p}.w"], [p]) for p in "qkv"],
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["a"]),
        helper.make_node("MatMul", ["a", "o.w"], ["ao"]),
        helper.make_node("Add", ["x", "ao"], ["r1"]),
        helper.make_node("MatMul", ["r1", "up.w"], ["u0"]),
        helper.make_node("Add", ["u0", "up.b"], ["u"]),
        helper.make_node("Relu", ["u"], ["g"]),
        helper.make_node("MatMul", ["g", "down.w"], ["dn"]),
        helper.make_node("Add", ["r1", "dn"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", elem_type, ["batch", SEQ, D])],
                              [helper.make_tensor_value_info("y", elem_type, ["batch", SEQ, D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _tensor(array: np.ndarray, name: str, elem_type: int) -> onnx.TensorProto:
    if elem_type == TensorProto.BFLOAT16:
        return helper.make_tensor(name, elem_type, array.shape, array.astype(ml_dtypes.bfloat16).view(np.uint16).tobytes(), raw=True)
    return numpy_helper.from_array(array.astype(NUMPY[elem_type]), name)


def inputs(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, SEQ, D)).astype(np.float16).astype(np.float32)


def run(path, x: np.ndarray) -> np.ndarray:
    """Run a model file on `x` given in its input type (bfloat16 passes through OrtValues)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    graph = onnx.load(str(path), load_external_data=False).graph
    elem, name, output = graph.input[0].type.tensor_type.elem_type, graph.input[0].name, graph.output[0].name
    if elem != TensorProto.BFLOAT16:
        return session.run(None, {name: x.astype(NUMPY[elem])})[0].astype(np.float32)
    feed = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(x.astype(ml_dtypes.bfloat16).view(np.uint16), elem)
    out = np.zeros(x.shape, np.uint16)
    binding = session.io_binding()
    binding.bind_ortvalue_input(name, feed)
    binding.bind_ortvalue_output(output, ort.OrtValue.ortvalue_from_numpy_with_onnx_type(out, elem))
    session.run_with_iobinding(binding)
    return out.view(ml_dtypes.bfloat16).astype(np.float32)


def rel_l2(actual: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(actual - reference) / np.linalg.norm(reference))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("float-types")
    paths = {}
    for name, elem in (("float32", TensorProto.FLOAT), ("float16", TensorProto.FLOAT16), ("bfloat16", TensorProto.BFLOAT16)):
        paths[name] = folder / f"{name}.onnx"
        onnx.save(tiny_block(elem), str(paths[name]))
    return paths


def _compile(source, out, pipeline, data_type=np.float16, **options):
    batches = [{"x": inputs(8, seed).astype(data_type)} for seed in range(2)]
    return compile(str(source), out, pipeline=pipeline, calibration=batches, drift=False, **options)


@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_float16_source_compiles_and_keeps_its_float_type(sources, tmp_path, pipeline):
    result = _compile(sources["float16"], tmp_path / "fp16", pipeline)
    model = onnx.load(str(result.output / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    stored = {t.name: t.data_type for t in model.graph.initializer}
    assert stored["ln.w"] == TensorProto.FLOAT16  # a float part: stored in the source type
    manifest = json.loads((result.output / "manifest.json").read_text())
    assert manifest["float_type"] == "float16" and manifest["source"]["float_type"] == "float16"
    held_out = inputs(4, seed=99)
    reference = run(sources["float32"], held_out)
    got = run(result.output / "model.onnx", held_out)
    assert np.isfinite(got).all()
    assert rel_l2(got, reference) < PIPELINES[pipeline]
    same_in_fp32 = run(_compile(sources["float32"], tmp_path / "fp32", pipeline, np.float32).output / "model.onnx", held_out)
    assert rel_l2(got, same_in_fp32) < 2e-2


@pytest.mark.parametrize("pipeline", ["w8a8", "mixed{avg-bits=4.25}"])
def test_bfloat16_source_compiles(sources, tmp_path, pipeline):
    result = _compile(sources["bfloat16"], tmp_path / "bf16", pipeline, np.float32)
    model = onnx.load(str(result.output / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.BFLOAT16
    assert json.loads((result.output / "manifest.json").read_text())["float_type"] == "bfloat16"
    held_out = inputs(4, seed=99)
    got = run(result.output / "model.onnx", held_out)
    assert rel_l2(got, run(sources["float32"], held_out)) < PIPELINES[pipeline] + 0.01  # bfloat16 edges round to 8 bits


def test_float_type_float32_emits_float32_edges_and_parts(sources, tmp_path):
    result = _compile(sources["float16"], tmp_path / "f32", "w8a8", float_type="float32")
    model = onnx.load(str(result.output / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert {t.name: t.data_type for t in model.graph.initializer}["ln.w"] == TensorProto.FLOAT
    manifest = json.loads((result.output / "manifest.json").read_text())
    assert manifest["float_type"] == "float32" and manifest["source"]["float_type"] == "float16"
    held_out = inputs(4, seed=99)
    assert rel_l2(run(result.output / "model.onnx", held_out), run(sources["float32"], held_out)) < PIPELINES["w8a8"]


def test_float32_source_manifest_has_no_float_type(sources, tmp_path):
    result = _compile(sources["float32"], tmp_path / "f32", "w8a8", np.float32)
    assert "float_type" not in json.loads((result.output / "manifest.json").read_text())


def test_unsupported_float_type_is_named_with_the_supported_ones(tmp_path):
    path = tmp_path / "f64.onnx"
    onnx.save(tiny_block(TensorProto.DOUBLE), str(path))
    with pytest.raises(UserError, match=r"float type is float64.*supported float types: float32, float16, bfloat16"):
        compile(str(path), tmp_path / "out", pipeline="w8a8", calibration=[{"x": inputs(2, 0).astype(np.float64)}])
    assert not (tmp_path / "out").exists()
    cli = subprocess.run([sys.executable, "-m", "qcompiler.tools.cli", "compile", str(path), "-o", str(tmp_path / "out"),
                          "--pipeline", "w8a8"], capture_output=True, text=True)
    assert cli.returncode == 2
    assert len(cli.stderr.strip().splitlines()) == 1 and "float64" in cli.stderr


def test_bad_float_type_option_is_refused(sources, tmp_path):
    with pytest.raises(UserError, match="unknown float type 'float8'"):
        _compile(sources["float16"], tmp_path / "x", "w8a8", float_type="float8")
    with pytest.raises(UserError, match="applies to torch sources only"):
        _compile(sources["float16"], tmp_path / "x", "w8a8", dtype="float16")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_source_captured_in_dtype(tmp_path, dtype):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(D, F), torch.nn.Linear(F, D)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    module = MLP()
    example = {"x": torch.from_numpy(inputs(2, seed=0))}
    batches = [{"x": inputs(8, seed)} for seed in range(2)]
    result = compile(module, tmp_path / "out", example_inputs=example, dynamic_shapes={"x": {0: "batch"}},
                     pipeline="w8a8", calibration=batches, drift=False, dtype=dtype)
    model = onnx.load(str(result.output / "model.onnx"))
    want = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}[dtype]
    assert model.graph.input[0].type.tensor_type.elem_type == want
    assert json.loads((result.output / "manifest.json").read_text())["source"]["float_type"] == dtype
    held_out = inputs(4, seed=99)
    with torch.no_grad():
        reference = module(torch.from_numpy(held_out)).numpy()  # the caller's module stays float32
    assert rel_l2(run(result.output / "model.onnx", held_out), reference) < 0.04


def test_float_type_from_the_command_line_and_config(sources, tmp_path):
    data = tmp_path / "calib.npz"
    np.savez(data, x=inputs(8, seed=0).astype(np.float16))
    config = tmp_path / "build.toml"
    config.write_text(f'source = "{sources["float16"]}"\noutput = "out"\npipeline = "w8a8"\ncalib = "calib.npz"\nfloat-type = "float32"\n')
    cli = subprocess.run([sys.executable, "-m", "qcompiler.tools.cli", "compile", "--config", str(config), "--no-drift"],
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["float_type"] == "float32"
    cli = subprocess.run([sys.executable, "-m", "qcompiler.tools.cli", "compile", str(sources["float16"]), "-o", str(tmp_path / "o2"),
                          "--pipeline", "w8a8", "--calib", str(data), "--float-type", "float64"], capture_output=True, text=True)
    assert cli.returncode == 2 and "unknown float type 'float64'" in cli.stderr


def test_a_float32_edge_of_a_float16_model_stays_float32(tmp_path):
    model = tiny_block(TensorProto.FLOAT16)
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("gain", TensorProto.FLOAT, [1]))  # a float32 input
    graph.node.insert(0, helper.make_node("Cast", ["gain"], ["gain16"], to=TensorProto.FLOAT16))
    graph.node.append(helper.make_node("Mul", ["y", "gain16"], ["z"]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT16, ["batch", SEQ, D]))
    path = tmp_path / "mixed-edges.onnx"
    onnx.save(model, str(path))
    batches = [{"x": inputs(8, 0).astype(np.float16), "gain": np.ones(1, np.float32)}]
    result = compile(str(path), tmp_path / "out", pipeline="w8a8", calibration=batches, drift=False)
    written = onnx.load(str(result.output / "model.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in [*written.graph.input, *written.graph.output]}
    assert types == {"x": TensorProto.FLOAT16, "gain": TensorProto.FLOAT, "z": TensorProto.FLOAT16}
    assert not any(p.key.startswith("qc.source") for p in written.metadata_props)


def embedding_model(elem_type: int, tied: bool) -> onnx.ModelProto:
    """Token ids -> a table's rows -> one linear -> Relu, output as float32; or, `tied`, a square
    [D, D] table also read by the last MatMul as its weight."""
    rng = np.random.default_rng(3)
    table = (rng.standard_normal((D if tied else 64, D)) * 0.5).astype(np.float16).astype(np.float32)
    w = (rng.standard_normal((D, D)) * D**-0.5).astype(np.float16).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["h"])]
    if tied:
        nodes.append(helper.make_node("MatMul", ["h", "table"], ["y"]))
    else:
        nodes += [helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "embed", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", SEQ])],
                              [helper.make_tensor_value_info("y", elem_type if tied else TensorProto.FLOAT, ["batch", SEQ, D])],
                              [_tensor(table, "table", elem_type), _tensor(w, "w", elem_type)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _session_initializers(path, tmp_path) -> dict[str, onnx.TensorProto]:
    """The initializers an ONNX Runtime session holds once started (its optimized model, saved)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "as-loaded.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return {t.name: t for t in onnx.load(str(tmp_path / "as-loaded.onnx")).graph.initializer}


@pytest.mark.parametrize("elem_type", [TensorProto.FLOAT16, TensorProto.BFLOAT16], ids=["float16", "bfloat16"])
def test_a_low_precision_table_is_looked_up_as_stored_not_held_in_float32(tmp_path, elem_type):
    source = tmp_path / "embed.onnx"
    onnx.save(embedding_model(elem_type, tied=False), str(source))
    ids = [{"ids": np.random.default_rng(seed).integers(0, 64, (4, SEQ))} for seed in range(2)]
    result = compile(str(source), tmp_path / "out", pipeline="w8a8", calibration=ids, drift=False)
    path = result.output / "model.onnx"
    graph = onnx.load(str(path)).graph
    gather = next(n for n in graph.node if n.op_type == "Gather")
    assert {t.name: t.data_type for t in graph.initializer}[gather.input[0]] == elem_type  # the stored table, no Cast before it
    cast = next(n for n in graph.node if n.op_type == "Cast" and n.input[0] == gather.output[0])
    assert helper.get_attribute_value(cast.attribute[0]) == TensorProto.FLOAT
    held = _session_initializers(path, tmp_path)
    assert not any(list(t.dims) == [64, D] and t.data_type == TensorProto.FLOAT for t in held.values())
    float_result = compile(str(source), tmp_path / "float", pipeline="default", drift=False)
    feeds = {"ids": np.random.default_rng(9).integers(0, 64, (2, SEQ))}
    want = ort.InferenceSession(str(float_result.output / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert rel_l2(np.asarray(got, np.float32), np.asarray(want, np.float32)) < 0.05


def test_a_table_also_read_as_a_weight_is_still_cast_once_at_load(tmp_path):
    source = tmp_path / "tied.onnx"
    onnx.save(embedding_model(TensorProto.FLOAT16, tied=True), str(source))
    result = compile(str(source), tmp_path / "out", pipeline="default", drift=False)
    graph = onnx.load(str(result.output / "model.onnx")).graph
    table_cast = [n for n in graph.node if n.op_type == "Cast" and n.input[0] == "table"]
    assert len(table_cast) == 1
    gather = next(n for n in graph.node if n.op_type == "Gather")
    assert gather.input[0] == table_cast[0].output[0]


def test_a_table_also_looked_up_inside_a_subgraph_keeps_its_cast_at_load():
    """A Gather of the table inside an If branch reads the graph's value: restoring float16 keeps the
    table's one Cast at load (its rows cannot be cast after a lookup the graph does not hold)."""
    import onnx_ir as ir

    from qcompiler.ir import float_types

    branch = lambda name: helper.make_graph(  # noqa: E731
        [helper.make_node("Gather", ["table", "ids"], [f"{name}.rows"]), helper.make_node("Relu", [f"{name}.rows"], [f"{name}.out"])],
        name, [], [helper.make_tensor_value_info(f"{name}.out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]),
             helper.make_node("If", ["flag"], ["b"], then_branch=branch("then"), else_branch=branch("else")),
             helper.make_node("Add", ["e", "b"], ["y"])]
    graph = helper.make_graph(nodes, "sub", [helper.make_tensor_value_info("ids", TensorProto.INT64, [SEQ]),
                                             helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [SEQ, D])],
                              [numpy_helper.from_array(np.ones((16, D), np.float32), "table")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))
    float_types.restore_float_type(model, ir.DataType.FLOAT16)
    assert [(n.op_type, [v.name for v in n.inputs]) for n in model.graph][:2] == [("Cast", ["table"]), ("Gather", ["table.float32", "ids"])]
    assert model.graph.initializers["table"].dtype == ir.DataType.FLOAT16
