"""The weight-byte counter every row of `benchmarks/peers.py` is measured with
(`benchmarks/common.py: linear_weight_bytes`), on a hand-made graph whose bytes are known:
a MatMulNBits layer, a packed-int4 DequantizeLinear -> Transpose -> MatMul head tied to a Gather
embedding, a float MatMul, and an attention-style MatMul of two activations (not a weight)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("qc_bench_common", ROOT / "benchmarks" / "common.py")
common = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = common
_spec.loader.exec_module(common)


def _graph() -> onnx.ModelProto:
    k, n, vocab, block = 64, 32, 100, 32
    blocks = k // block
    inits = [
        numpy_helper.from_array(np.zeros((n, blocks, block // 2), np.uint8), "nb_B"),          # 32*2*16 = 1024
        numpy_helper.from_array(np.ones((n * blocks,), np.float16), "nb_scales"),                 # 64 * 2 = 128
        numpy_helper.from_array(np.zeros((n * blocks + 1) // 2, np.uint8), "nb_zp"),             # 32
        numpy_helper.from_array(np.ones((n, n), np.float32), "w_float"),                          # 4096
        helper.make_tensor("emb_q", TensorProto.INT4, [vocab, n], np.zeros(vocab * n, np.int8)),  # 1600 (packed)
        numpy_helper.from_array(np.ones((vocab, 1), np.float32), "emb_scale"),                    # 400
        numpy_helper.from_array(np.array([1, 0], np.int64), "perm"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["x"]),
        helper.make_node("MatMulNBits", ["x", "nb_B", "nb_scales", "nb_zp"], ["h1"], domain="com.microsoft",
                         K=k, N=n, bits=4, block_size=block),
        helper.make_node("MatMul", ["h1", "w_float"], ["h2"]),
        helper.make_node("Transpose", ["h2"], ["h2t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h2", "h2t"], ["scores"]),  # activation x activation: no weight
        helper.make_node("DequantizeLinear", ["emb_q", "emb_scale"], ["emb"], axis=0),
        helper.make_node("Transpose", ["emb"], ["head_w"], perm=[1, 0]),
        helper.make_node("MatMul", ["h2", "head_w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4, vocab]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def test_linear_weight_bytes_counts_codes_scales_zero_points_once():
    counted = common.linear_weight_bytes(_graph())
    assert counted["linears"] == 3  # MatMulNBits, the float MatMul, the head; not scores
    assert counted["head"] == 1600 + 400
    assert counted["total"] == 1024 + 128 + 32 + 4096 + 1600 + 400
    assert counted["embedding"] == 0 and counted["embedding_tied_to_a_linear"]


def test_linear_weight_bytes_counts_an_untied_embedding_apart():
    model = _graph()
    model.graph.node[0].input[0] = "emb_table"
    model.graph.initializer.append(numpy_helper.from_array(np.ones((100, 32), np.float16), "emb_table"))
    counted = common.linear_weight_bytes(model)
    assert counted["embedding"] == 100 * 32 * 2 and not counted["embedding_tied_to_a_linear"]
    assert counted["total"] == 1024 + 128 + 32 + 4096 + 1600 + 400
