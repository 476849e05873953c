"""Files a model can make us read: every route by which an ONNX model can point at external bytes
(main graph, subgraph, function body, tensor attributes, sparse tensors) passes one check, and
every way out of the model's folder is refused with one line, exit 2, before anything is written."""

import contextlib
import io
import os

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qcompiler.errors import UserError
from qcompiler.passes.canonicalize import CanonicalizePass
from qcompiler.tools.cli import main

DATA = np.arange(1, 5, dtype=np.float32)  # the external tensor: 16 bytes
SECRET = np.full(4, 7.0, np.float32).tobytes()
ROUTES = ("initializer", "subgraph", "function", "constant", "constant-of-shape", "sparse")


def _external(name, dims, location, offset=None, length=None, data_type=onnx.TensorProto.FLOAT):
    tensor = onnx.TensorProto(name=name, dims=dims, data_type=data_type, data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
    return tensor


def _model(route, tensor):
    """Y = X + C, where C ([4] float, or [1, 4] for ConstantOfShape) is `tensor`, reached by `route`."""
    x = oh.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, 4])
    y = oh.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1, 4])
    inits, functions, opsets = [], [], [oh.make_opsetid("", 21)]
    add = oh.make_node("Add", ["X", "C"], ["Y"], name="add")
    if route == "initializer":
        nodes, inits = [add], [tensor]
    elif route == "constant":
        nodes = [oh.make_node("Constant", [], ["C"], name="const", value=tensor), add]
    elif route == "constant-of-shape":
        tensor.dims[:] = [1]
        shape = nh.from_array(np.array([1, 4], np.int64), "shape")
        nodes, inits = [oh.make_node("ConstantOfShape", ["shape"], ["C"], name="fill", value=tensor), add], [shape]
    elif route == "sparse":
        indices = nh.from_array(np.arange(4, dtype=np.int64), "C.indices")
        tensor.name = "C"
        nodes = [add]
        sparse = oh.make_sparse_tensor(tensor, indices, [4])
    elif route == "subgraph":
        branch = oh.make_graph([oh.make_node("Constant", [], ["C_in"], name="inner", value=tensor)], "branch", [],
                               [oh.make_tensor_value_info("C_in", onnx.TensorProto.FLOAT, [4])])
        cond = nh.from_array(np.array(True), "cond")
        nodes = [oh.make_node("If", ["cond"], ["C"], name="if", then_branch=branch, else_branch=branch), add]
        inits = [cond]
    elif route == "function":
        body = [oh.make_node("Constant", [], ["c"], name="inner", value=tensor), oh.make_node("Add", ["x", "c"], ["y"])]
        functions = [oh.make_function("local", "add_c", ["x"], ["y"], body, [oh.make_opsetid("", 21)])]
        opsets.append(oh.make_opsetid("local", 1))
        nodes = [oh.make_node("add_c", ["X"], ["Y"], domain="local", name="call")]
    graph = oh.make_graph(nodes, "g", [x], [y], inits)
    if route == "sparse":
        graph.sparse_initializer.append(sparse)
    return oh.make_model(graph, opset_imports=opsets, functions=functions, ir_version=10)


@pytest.fixture
def layout(tmp_path):
    """tmp/secret.bin (outside), tmp/model/ (the model's folder, with w.bin and data/w.bin)."""
    (tmp_path / "secret.bin").write_bytes(SECRET)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.bin").write_bytes(SECRET)
    folder = tmp_path / "model"
    (folder / "data").mkdir(parents=True)
    (folder / "w.bin").write_bytes(DATA.tobytes())
    (folder / "data" / "w.bin").write_bytes(DATA.tobytes())
    return folder


def _compile(folder, model):
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    out = folder.parent / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["-q", "compile", str(path), "-o", str(out), "--pipeline", "canonicalize", "--no-cache"])
    return code, err.getvalue(), out


BAD = {
    "absolute": lambda f: {"location": str(f.parent / "secret.bin")},
    "dotdot": lambda f: {"location": "../secret.bin"},
    "dotdot-that-returns": lambda f: {"location": "data/../w.bin"},
    "symlink-out": lambda f: (os.symlink(f.parent / "secret.bin", f / "link.bin"), {"location": "link.bin"})[1],
    "symlinked-folder-out": lambda f: (os.symlink(f.parent / "outside", f / "d"), {"location": "d/secret.bin"})[1],
    "nul": lambda f: {"location": "w.bin\x00.txt"},
    "empty": lambda f: {"location": ""},
    "missing": lambda f: {"location": "nothere.bin"},
    "directory": lambda f: {"location": "data"},
    "fifo": lambda f: (os.mkfifo(f / "pipe"), {"location": "pipe"})[1],
    "negative-offset": lambda f: {"location": "w.bin", "offset": -4},
    "offset-past-end": lambda f: {"location": "w.bin", "offset": 20},
    "length-past-end": lambda f: {"location": "w.bin", "offset": 8, "length": 16},
    "negative-length": lambda f: {"location": "w.bin", "length": -16},
    "length-disagrees-with-dims": lambda f: {"location": "w.bin", "length": 8},
    "offset-not-a-number": lambda f: {"location": "w.bin", "offset": "0x10"},
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("problem", sorted(BAD))
def test_every_route_out_of_the_folder_is_refused(layout, route, problem):
    if problem == "fifo" and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    where = BAD[problem](layout)
    code, err, out = _compile(layout, _model(route, _external("C", [4], **where)))
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("qcompiler: error: "), err
    assert "tensor 'C'" in err and "refused" in err
    assert not out.exists() and not list(layout.parent.glob(".out*"))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("location", ["w.bin", "data/w.bin", "link-inside.bin"])
def test_every_route_inside_the_folder_compiles_to_the_right_values(layout, route, location):
    os.symlink("data/w.bin", layout / "link-inside.bin")
    length = 4 if route == "constant-of-shape" else None  # its value is one float: the file's first
    code, err, out = _compile(layout, _model(route, _external("C", [4], location, length=length)))
    assert code == 0, err
    emitted = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert not [t for t in _all_tensors(emitted) if t.data_location == onnx.TensorProto.EXTERNAL]
    x = np.array([[10, 20, 30, 40]], np.float32)
    (y,) = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"X": x})
    fill = DATA[0] if route == "constant-of-shape" else DATA  # ConstantOfShape reads one value
    np.testing.assert_array_equal(y, x + fill)


def test_offset_and_length_select_the_bytes(layout):
    (layout / "w.bin").write_bytes(SECRET + DATA.tobytes() + SECRET)
    code, err, out = _compile(layout, _model("function", _external("C", [4], "w.bin", offset=16, length=16)))
    assert code == 0, err
    (y,) = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"X": np.zeros((1, 4), np.float32)})
    np.testing.assert_array_equal(y, DATA[None])


def _all_tensors(proto):
    from qcompiler.ir.external_data import tensors_in

    return [t for t, _ in tensors_in(proto)]


def _ir_model_with_external_constant(location, base_dir):
    """An in-memory model whose function body holds a Constant with an `onnx_ir` external tensor."""
    tensor = ir.ExternalTensor(location, offset=None, length=None, dtype=ir.DataType.FLOAT, shape=ir.Shape([4]),
                               name="C", base_dir=base_dir)
    x = ir.Value(name="X", shape=ir.Shape([1, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    c = ir.node("Constant", [], {"value": tensor}, name="inner")
    body_x = ir.Value(name="x", shape=ir.Shape([1, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    add = ir.node("Add", [body_x, c.outputs[0]])
    function = ir.Function("local", "add_c", "", graph=ir.Graph([body_x], add.outputs, nodes=[c, add], opset_imports={"": 21}),
                           attributes=[])
    call = ir.node("add_c", [x], domain="local", name="call")
    call.outputs[0].name = "Y"
    graph = ir.Graph([x], call.outputs, nodes=[call], opset_imports={"": 21, "local": 1}, name="g")
    return ir.Model(graph, ir_version=10, functions=[function])


@pytest.mark.parametrize("location, base", [("../secret.bin", "model"), ("w.bin", ""), ("secret.bin", "")])
def test_canonicalize_never_reads_a_location_as_given(layout, monkeypatch, location, base):
    monkeypatch.chdir(layout.parent)  # "secret.bin" as given would be read from here
    model = _ir_model_with_external_constant(location, str(layout) if base else "")
    with pytest.raises(UserError, match="tensor 'C'.*refused"):
        CanonicalizePass()(model)


def test_canonicalize_reads_external_tensors_inside_their_folder(layout):
    model = _ir_model_with_external_constant("w.bin", str(layout))
    CanonicalizePass()(model)
    from qcompiler.analysis import execute

    y = execute.run(model, {"X": np.zeros((1, 4), np.float32)})["Y"]
    np.testing.assert_array_equal(y, DATA[None])


@pytest.mark.parametrize("location", ["../secret.bin", "secret.bin"])
def test_compiling_an_in_memory_model_never_reads_a_location_as_given(layout, monkeypatch, location):
    """A model handed to `qcompiler.compile` is copied; the copy reads its external tensors
    through the check, relative to the folder each names (none: refused), before anything runs
    it (the drift measurement runs ONNX Runtime before the first pass)."""
    import qcompiler

    monkeypatch.chdir(layout.parent)  # "secret.bin" as given would be read from here
    model = _ir_model_with_external_constant(location, str(layout) if location.startswith("..") else "")
    with pytest.raises(UserError, match="tensor 'C'.*refused"):
        qcompiler.compile(model, layout.parent / "out", pipeline="canonicalize")
    assert not (layout.parent / "out").exists()


def test_compiling_an_in_memory_model_reads_external_tensors_inside_their_folder(layout, monkeypatch):
    import qcompiler

    monkeypatch.chdir(layout.parent)
    result = qcompiler.compile(_ir_model_with_external_constant("w.bin", str(layout)), layout.parent / "out", pipeline="canonicalize")
    (y,) = ort.InferenceSession(str(result.output / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"X": np.zeros((1, 4), np.float32)})
    np.testing.assert_array_equal(y, DATA[None])


def test_a_mapped_data_file_with_a_second_hard_link_is_one_line_and_exit_2(layout, monkeypatch):
    """ONNX IR refuses to map a data file with two links (a pass would fail reading it): loading says
    so in one line, before any pass; under the mapping threshold the same file is read, as any file
    of the folder is."""
    import qcompiler.ir as qir

    os.link(layout / "w.bin", layout.parent / "second-link.bin")
    model = _model("initializer", _external("C", [4], "w.bin"))
    code, err, out = _compile(layout, model)
    assert code == 0, err
    monkeypatch.setattr(qir, "MAPPED_DATA_THRESHOLD", 0)  # the weight would stay mapped from w.bin
    code, err, out = _compile(layout, model)
    assert code == 2 and err.count("\n") == 1, err
    assert "'w.bin'" in err and "2 hard links" in err and "copy it" in err
