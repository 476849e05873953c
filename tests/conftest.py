import os

import numpy as np
import onnx
import onnx.parser
import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def tiny_onnx(tmp_path):
    """A small ONNX file (Gemm + Relu, opset 17) and its path."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] X) => (float[N, 3] Y)
    <float[3,4] W = {1,2,3,4,5,6,7,8,9,10,11,12}, float[3] B = {0.5, 1.5, 2.5}>
    {
      T = Gemm <transB = 1, alpha = 0.5> (X, W, B)
      Y = Relu(T)
    }
    """
    path = tmp_path / "tiny.onnx"
    onnx.save(onnx.parser.parse_model(text), str(path))
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _private_calibration_cache(tmp_path_factory, monkeypatch):
    """The CLI caches calibration statistics by default; tests keep theirs out of the home folder."""
    monkeypatch.setenv("QCOMPILER_CACHE", str(tmp_path_factory.getbasetemp() / "qcompiler-cache"))
