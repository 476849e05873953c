"""Execute any stage of the IR on numpy inputs, and compare outputs.

A graph of standard ops runs in ONNX Runtime (CPU). A graph that still holds `qc` ops runs in
ONNX's reference evaluator, with each `qc` op computed by its registered numpy reference.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir

from qcompiler import ops
from qcompiler.ir import QC_DOMAIN, qc_nodes, to_proto

log = logging.getLogger(__name__)


def ort_session(model: ir.Model | onnx.ModelProto | bytes | str, threads: int | None = None, optimized_path=None):
    """An ONNX Runtime CPU session; `threads` fixes intra-op threads (None: ORT's default);
    `optimized_path`: where ONNX Runtime writes the graph it runs (initializers of 1 KiB or more
    in `<name>.data` beside it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{Path(optimized_path).name}.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if isinstance(model, ir.Model):
        model = to_proto(model)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run(model: ir.Model, feeds: Mapping[str, np.ndarray], threads: int | None = None) -> dict[str, np.ndarray]:
    """Run `model` on `feeds`; returns every graph output by name."""
    names = [v.name for v in model.graph.outputs]
    if qc_nodes(model):
        evaluator = onnx.reference.ReferenceEvaluator(to_proto(model), new_ops=_reference_ops())
        results = evaluator.run(None, dict(feeds))
    else:
        results = ort_session(model, threads).run(names, dict(feeds))
    return dict(zip(names, results))


def _reference_ops() -> list[type]:
    from onnx.reference.op_run import OpRun

    classes = []
    for op in ops.registered():

        def _run(self, *inputs, _op=op, **_ignored):
            attrs = {name: spec.default for name, spec in _op.attributes.items()}
            for attr in self.onnx_node.attribute:
                value = onnx.helper.get_attribute_value(attr)
                if isinstance(value, bytes):
                    value = value.decode()
                elif isinstance(value, list) and value and isinstance(value[0], bytes):
                    value = [v.decode() for v in value]
                attrs[attr.name] = value
            padded = list(inputs) + [None] * max(0, len(_op.inputs) - len(inputs))
            return tuple(_op.reference(*padded, **attrs))

        classes.append(type(op.op_type, (OpRun,), {"op_domain": QC_DOMAIN, "_run": _run}))
    return classes


def drift(reference: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray]) -> dict[str, float]:
    """How far `actual` is from `reference`, over all floating outputs together.

    max_abs: largest absolute difference; rel_l2: ||a - r|| / ||r||; cosine: of the flattened
    outputs; sqnr_db: 10 log10(||r||^2 / ||a - r||^2) (inf when equal)."""
    ref = np.concatenate([np.asarray(reference[k], np.float64).ravel() for k in reference if _floating(reference[k])] or [np.zeros(0)])
    act = np.concatenate([np.asarray(actual[k], np.float64).ravel() for k in reference if _floating(reference[k])] or [np.zeros(0)])
    if ref.size == 0:
        return {"max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0, "sqnr_db": None}
    diff = act - ref
    err = float(np.dot(diff, diff))
    energy = float(np.dot(ref, ref))
    norms = float(np.linalg.norm(ref) * np.linalg.norm(act))
    return {
        "max_abs": float(np.max(np.abs(diff))),
        "rel_l2": float(np.sqrt(err / energy)) if energy > 0 else float(np.sqrt(err)),
        "cosine": float(np.dot(ref, act) / norms) if norms > 0 else 1.0,
        "sqnr_db": float(10 * np.log10(energy / err)) if err > 0 and energy > 0 else None,
    }


def _floating(array: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(array).dtype, np.floating)
