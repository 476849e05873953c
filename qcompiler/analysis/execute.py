"""Execute any stage of the IR on numpy inputs, and compare outputs.

`run`: a graph of standard ops runs in ONNX Runtime (CPU); a graph that still holds `qc` ops runs
in ONNX's reference evaluator, with each `qc` op computed by its registered numpy reference (the
definition of the ops, for tests).

`run_expanded`: what measurements use (drift, the report, the `output-cosine` gate). A copy of
the graph has its `qc` ops expanded into standard ONNX (those of constant inputs folded by their
references, the rest lowered by `lower-ort` in its plain QDQ form) and runs in ONNX Runtime, as
the artifact will: ONNX's reference evaluator is slow and fails on graphs ONNX Runtime runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping

import numpy as np
import onnx
import onnx.external_data_helper
import onnx.reference
import onnx_ir as ir

from qcompiler.analysis.sessions import ort_session
from qcompiler.dialect import ops
from qcompiler.dialect.kv_int8 import float_cache_feeds, float_cache_outputs
from qcompiler.ir import QC_DOMAIN, is_large, mapped_tensors, qc_nodes, to_proto
from qcompiler.support import memory

log = logging.getLogger(__name__)


def run(model: ir.Model, feeds: Mapping[str, np.ndarray], threads: int | None = None) -> dict[str, np.ndarray]:
    """Run `model` on `feeds`; returns every graph output by name. A graph with an int8 KV cache
    takes float pasts and gives float presents (`qcompiler.dialect.kv_int8.float_cache_feeds`)."""
    names = [v.name for v in model.graph.outputs]
    feeds = float_cache_feeds(model, feeds)
    if qc_nodes(model):
        evaluator = onnx.reference.ReferenceEvaluator(_proto_with_data(model), new_ops=_reference_ops())
        results = evaluator.run(None, dict(feeds))
    else:
        results = ort_session(model, threads).run(names, dict(feeds))
    return float_cache_outputs(dict(zip(names, results)))


class MeasurementError(RuntimeError):
    """A stage of the IR could not be run for a measurement (reported as a warning)."""


def run_expanded(model: ir.Model, feeds: Mapping[str, np.ndarray], threads: int | None = None,
                 streamed: Collection[str] = (), sink: Callable[[str, np.ndarray], None] | None = None) -> dict[str, np.ndarray]:
    """Run `model` in ONNX Runtime with its `qc` ops expanded (on a copy); every graph output by
    name. Raises `MeasurementError` naming the reason when the graph cannot be expanded or run.
    A graph with an int8 KV cache takes float pasts and gives float presents, as in `run`.
    The outputs named in `streamed` are handed to `sink(name, array)` instead of returned, each as
    soon as it is computed: a large model's (run block by block) are then never all in memory."""
    names = [v.name for v in model.graph.outputs]
    feeds = float_cache_feeds(model, feeds)
    if is_large(model):
        results = run_by_blocks(model, feeds, names, threads, streamed, sink)
        if results is not None:
            return float_cache_outputs(results)
    target = expanded_copy(model) if qc_nodes(model) else model
    try:
        session = ort_session(target, threads)
        results = dict(zip(names, session.run(names, feeds)))
    except Exception as exc:
        raise MeasurementError(f"ONNX Runtime could not run it ({type(exc).__name__}: {first_line(exc)})") from exc
    for name in [n for n in names if n in streamed]:
        sink(name, results.pop(name))
    return float_cache_outputs(results)


def run_by_blocks(model: ir.Model, feeds: Mapping[str, np.ndarray], names: list[str], threads: int | None = None,
                  streamed: Collection[str] = (), sink: Callable[[str, np.ndarray], None] | None = None,
                  ) -> dict[str, np.ndarray] | None:
    """`names` computed one block at a time, as block-sequential calibration runs the float model
    (`qcompiler.analysis.calib_sequential`): each segment is copied with only its own weights (those
    still on disk read in), its `qc` ops expanded, run in its own ONNX Runtime session and released;
    only the values later segments read are kept. Those of `names` also in `streamed` go to
    `sink(name, array)` as their segment finishes, the others are returned. Memory: one block's
    weights and the boundary values of one batch. None when the graph cannot be cut into blocks
    (the caller runs it whole)."""
    from qcompiler.analysis import calib_sequential as sequential

    segments = sequential.cut_segments(model, names)
    if segments is None:
        return None
    last_reader = {value.name: segment.index for segment in segments for value in segment.inputs}
    values, results = dict(feeds), {name: feeds[name] for name in names if name in feeds}
    for segment in segments:
        if not segment.fetched:
            continue
        sequential.check_fits(segment, len(segments))
        part = sequential.segment_model(model, segment, values)
        _read_into_memory(part)
        try:
            target = expanded_copy(part) if qc_nodes(part) else part
            outputs = ort_session(target, threads, prepack=False).run(segment.fetched, {v.name: values[v.name] for v in segment.inputs})
        except MeasurementError:
            raise
        except Exception as exc:
            raise MeasurementError(f"ONNX Runtime could not run block {segment.index + 1} of {len(segments)} "
                                   f"({type(exc).__name__}: {first_line(exc)})") from exc
        for name, array in zip(segment.fetched, outputs):
            if name in last_reader:
                values[name] = array
            if name in streamed:
                sink(name, array)
            elif name in names:
                results[name] = array
        for name in [n for n, last in last_reader.items() if last <= segment.index and n not in feeds]:
            values.pop(name, None)
        del part, target, outputs
        memory.return_freed()  # the block's weights, copies and session, gone: their pages too
    return {name: results[name] for name in names if name in results}


def _read_into_memory(model: ir.Model) -> None:
    """Give each initializer still read from a file (`qcompiler.ir.on_disk_tensors`) an in-memory
    copy, on this model's values only: a one-block copy may then be serialized as it is. A mapped
    tensor's mapping is closed after the read (it is shared with the model being measured, whose
    weights must not stay resident)."""
    from qcompiler.ir import deferred

    for value in model.graph.initializers.values():
        if deferred.is_on_disk(value.const_value):
            value.const_value = ir.tensor(deferred.read(value.const_value, np.array), name=value.name)


def expanded_copy(model: ir.Model) -> ir.Model:
    """A copy of `model` in standard ONNX: `qc` ops lowered by `lower-ort{int-kernels=qdq
    residual-norm=fused}` (no rewrites beyond the `qc` ops themselves), then those it has no form
    for and whose inputs are all constant (`qc.BitAllocation`) replaced by their values."""
    from qcompiler.passes.lower_ort import LowerOrtPass

    copy = ir.serde.deserialize_model(to_proto(model))
    try:
        LowerOrtPass(int_kernels="qdq", residual_norm="fused")(copy)
        fold_constant_qc_nodes(copy)
    except Exception as exc:
        raise MeasurementError(f"its qc ops could not be expanded ({type(exc).__name__}: {first_line(exc)})") from exc
    if "qc" in copy.opset_imports and not qc_nodes(copy):
        del copy.opset_imports["qc"]
    left = sorted({n.op_type for n in qc_nodes(copy)})
    if left:
        raise MeasurementError(f"qc ops with no ONNX Runtime form: {', '.join(left)}")
    return copy


def fold_constant_qc_nodes(model: ir.Model) -> int:
    """Replace each `qc` node whose inputs are all constants by initializers of its outputs."""
    registry = {op.op_type: op for op in ops.registered()}
    folded = 0
    graph = model.graph
    for node in list(graph):
        op = registry.get(node.op_type) if node.domain == QC_DOMAIN else None
        if op is None or not all(v is None or v.const_value is not None for v in node.inputs):
            continue
        arrays = [None if v is None else v.const_value.numpy() for v in node.inputs]
        arrays += [None] * max(0, len(op.inputs) - len(arrays))
        results = op.reference(*arrays, **ops.attributes_of(node))
        constants = []
        for value, array in zip(node.outputs, results):
            array = np.asarray(array)
            name, value.name = value.name, f"{value.name}.folded"
            constant = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                                const_value=ir.tensor(array, name=name))
            value.replace_all_uses_with(constant, replace_graph_outputs=True)
            constants.append(constant)
        graph.remove(node, safe=True)
        for constant in constants:
            graph.register_initializer(constant)
        folded += 1
    return folded


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def _proto_with_data(model: ir.Model) -> onnx.ModelProto:
    """The model as a protobuf holding every weight (mapped weights read from their files)."""
    proto = to_proto(model)
    mapped = mapped_tensors(model)
    if mapped:
        onnx.external_data_helper.load_external_data_for_model(proto, str(mapped[0].base_dir))
    return proto


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
    outputs; sqnr_db: 10 log10(||r||^2 / ||a - r||^2) (inf when equal); lowest_cosine: the lowest
    cosine of any one output (a small output, such as an encoder's pooled vector beside its token
    features, is not hidden by a larger one), with the output's name (`lowest_cosine_output`) when
    there are several."""
    names = [k for k in reference if _floating(reference[k])]
    ref = np.concatenate([np.asarray(reference[k], np.float64).ravel() for k in names] or [np.zeros(0)])
    act = np.concatenate([np.asarray(actual[k], np.float64).ravel() for k in names] or [np.zeros(0)])
    if ref.size == 0:
        return {"max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0, "sqnr_db": None, "lowest_cosine": 1.0}
    diff = act - ref
    err = float(np.dot(diff, diff))
    energy = float(np.dot(ref, ref))
    result = {
        "max_abs": float(np.max(np.abs(diff))),
        "rel_l2": float(np.sqrt(err / energy)) if energy > 0 else float(np.sqrt(err)),
        "cosine": _cosine(ref, act),
        "sqnr_db": float(10 * np.log10(energy / err)) if err > 0 and energy > 0 else None,
    }
    if len(names) == 1:
        return result | {"lowest_cosine": result["cosine"]}
    by_output = {k: _cosine(np.asarray(reference[k], np.float64).ravel(), np.asarray(actual[k], np.float64).ravel()) for k in names}
    lowest = min(names, key=lambda k: (not np.isnan(by_output[k]), by_output[k]))  # a NaN output first
    return result | {"lowest_cosine": by_output[lowest], "lowest_cosine_output": lowest}


def _cosine(ref: np.ndarray, act: np.ndarray) -> float:
    """Cosine of two flattened outputs over their finite values; NaN where either holds a NaN or an
    infinity the other does not (an artifact that outputs NaN is not close to float: a gate fails on
    it), 1.0 where both are all zero."""
    finite = np.isfinite(ref) & np.isfinite(act)
    if not finite.all():  # equal infinities (a mask's -inf in both) match; anything else not finite does not
        if np.any(~finite & ~(ref == act)):
            return float("nan")
        ref, act = ref[finite], act[finite]
    norms = float(np.linalg.norm(ref) * np.linalg.norm(act))
    return float(np.dot(ref, act) / norms) if norms > 0 else 1.0


def _floating(array: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(array).dtype, np.floating)
