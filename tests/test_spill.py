"""Constants kept on disk while a large model compiles (`qcompiler.ir.spill`): read back as they
were written, nothing kept between reads, the folder removed with the last tensor that reads it."""

import gc

import numpy as np
import onnx_ir as ir

from qcompiler.ir import spill
from qcompiler.ir.layers import new_initializer


def test_spilled_constants_read_back_as_written_and_keep_nothing(tmp_path):
    scratch = spill.SpillFile(tmp_path)
    codes = np.arange(-60, 60, dtype=np.int8).reshape(8, 15)
    scales = np.linspace(0.1, 2.0, 15, dtype=np.float32)
    a, b = scratch.add(codes, "w.q"), scratch.add(scales, "w.scale")
    assert a.dtype == ir.DataType.INT8 and tuple(a.shape) == (8, 15) and b.dtype == ir.DataType.FLOAT
    np.testing.assert_array_equal(a.numpy(), codes)
    np.testing.assert_array_equal(b.numpy(), scales)
    assert a.numpy() is not a.numpy()  # a new array on each read
    assert a.tobytes() == codes.tobytes()


def test_bfloat16_constants_spill_and_serialize_as_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(spill, "SPILL_MIN_BYTES", 0)
    weights = np.linspace(-3, 3, 24, dtype=np.float32).astype(ir.DataType.BFLOAT16.numpy()).reshape(4, 6)
    with spill.spilling(spill.SpillFile(tmp_path)):
        tensor = spill.kept(weights, "w")
    assert isinstance(tensor, spill.Spilled) and tensor.dtype == ir.DataType.BFLOAT16
    in_memory = ir.serde.serialize_tensor(ir.tensor(weights, name="w")).SerializeToString()
    assert ir.serde.serialize_tensor(tensor).SerializeToString() == in_memory


def test_the_folder_goes_with_the_last_tensor_that_reads_it(tmp_path):
    scratch = spill.SpillFile(tmp_path, prefix=".out.spill-1-")
    folder = scratch.folder
    tensor = scratch.add(np.ones((4, 4), np.float32), "w")
    del scratch
    gc.collect()
    assert folder.is_dir() and tensor.numpy().sum() == 16  # still read
    del tensor
    gc.collect()
    assert not folder.exists()


def test_layers_spill_only_while_spilling_and_only_large_constants(tmp_path, monkeypatch):
    monkeypatch.setattr(spill, "SPILL_MIN_BYTES", 64)
    graph = ir.Graph([], [], nodes=[])
    big, small = np.zeros((8, 8), np.int8), np.zeros(8, np.int8)
    assert not isinstance(new_initializer(graph, "outside", big).const_value, spill.Spilled)
    scratch = spill.SpillFile(tmp_path)
    with spill.spilling(scratch):
        spilled = new_initializer(graph, "big", big)
        kept = new_initializer(graph, "small", small)
    assert isinstance(spilled.const_value, spill.Spilled) and not isinstance(kept.const_value, spill.Spilled)
    np.testing.assert_array_equal(spilled.const_value.numpy(), big)
    assert scratch.path.stat().st_size == big.nbytes
