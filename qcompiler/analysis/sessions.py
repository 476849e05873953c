"""ONNX Runtime CPU sessions for the compiler's own runs (calibration, measurements, checks).

A large IR model (`qcompiler.ir.is_large`) is written to a temporary folder with its weights in one
external data file and loaded from there, never serialized to bytes. `qcompiler.analysis.execute`
re-exports `ort_session`.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir

from qcompiler.ir import is_large, to_proto


def ort_session(model: ir.Model | onnx.ModelProto | bytes | str, threads: int | None = None, optimized_path=None,
                prepack: bool = True, optimize: bool = True):
    """An ONNX Runtime CPU session; `threads` fixes intra-op threads (None: ORT's default);
    `optimized_path`: where ONNX Runtime writes the graph it runs (initializers of 1 KiB or more
    in `<name>.data` beside it). A large IR model (`qcompiler.ir.is_large`) is written to a
    temporary folder with external data and loaded from there, never serialized to bytes.
    `prepack=False` (and every large model's session) skips ONNX Runtime's repacked copy of the
    MatMul weights: for a session that runs little or is only checked, it is memory spent for nothing.
    `optimize=False` turns ONNX Runtime's graph optimizations off (no constant folding)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{Path(optimized_path).name}.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    large = isinstance(model, ir.Model) and is_large(model)
    if not prepack or large:  # MLAS would keep a second, repacked copy of every MatMul weight
        options.add_session_config_entry("session.disable_prepacking", "1")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if large:
        return _session_from_folder(model, options)
    if isinstance(model, ir.Model):
        model = to_proto(model)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _session_from_folder(model: ir.Model, options):
    """Write `model` with its weights in one external data file to a temporary folder and load the
    session from that path (the folder is removed once ONNX Runtime has read it)."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="qcompiler-session-") as folder:
        path = Path(folder) / "model.onnx"
        ir.save(model, str(path), external_data="model.onnx.data", size_threshold_bytes=1024)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
