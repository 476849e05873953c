"""The quantization report: what each layer became, what it cost, and what stayed in float.

`compile(report=PATH)` writes it; the schema (`qcompiler.tools.report/2`) is documented field by field
in `docs/report-schema.md`. It is built from three sources:

- `Recorder`, a pass-manager instrument used in place of `instruments.Drift` when a report is
  asked for. It runs the model on the probe batch before the pipeline and after each pass with the
  output of every layer (MatMul, Gemm, Conv, ConvTranspose or `qc.MixedMatMul` with a constant
  weight) exposed as an extra graph output, so one run gives both the output drift of the pass and
  each layer's output. Until a pass adds quantization nodes (`qc.DequantizeWeight`,
  `qc.QuantizeActivation`, `qc.MixedMatMul`, QDQ), the IR still computes in float
  (`canonicalize`, `calibrate`, `smooth`, `fold-scales` are exact) and those layer outputs become
  the float reference: taking it after the exact rewrites means a layer whose output a fold
  rescaled is compared with the same rescaled output in float. From then on each layer's output
  is compared with its reference (SQNR, cosine). Layers are found by op identity (`ir.is_weighted_layer`)
  and followed by provenance: a layer's output keeps its tensor name through quantization and
  lowering, or, where the lowering merges a linear with the Add of its bias
  (`MatMulIntegerToFloat`), the layer is read at that Add's output with the bias taken off, so the
  comparison after the last pass measures the emitted artifact. After every pass
  it also notes what the IR says about each layer (`qc.DequantizeWeight`, `qc.QuantizeActivation`,
  `qc.BitAllocation`, `qc.MixedMatMul`): the lowering erases those ops, the report keeps them.
- the passes' records (time, statistics, drift) and the manifest (bytes, effective bits);
- the final IR (the artifact): which weights are stored quantized, how many bytes each layer
  stores, and the nodes that hold or multiply weights in float, with the reason.

Output is deterministic apart from the measured times (`timings`, `passes[].seconds`): keys
sorted, floats rounded to 6 significant digits, non-finite numbers written as null.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.analysis import execute
from qcompiler.analysis.probe import leads_with_tokens, valid_positions
from qcompiler.dialect.mixed_ops import MixedMatMulView, is_mixed_matmul
from qcompiler.errors import UserError
from qcompiler.ir import spill
from qcompiler.ir import (WEIGHTED_LAYER_OPS, constant_sources, is_weighted_layer, op_key, permutation_indices, producer_of, weight_inputs,
                          weight_values)
from qcompiler.ir.layers import QUANTIZED_LOOKUPS, embedding_table
from qcompiler.ir.meta import CHANNEL_ORDER_KEY
from qcompiler.passes.allocate_bits import AllocateBitsPass as Allocate
from qcompiler.passes.quantize import QuantizePass as Quantize
from qcompiler.passes.quantize_weights import QuantizeWeightsPass as QuantizeWeights
from qcompiler.passes.smooth import SmoothPass as Smooth
from qcompiler.pipeline.instruments import Drift
from qcompiler.pipeline.pass_manager import PassRecord
from qcompiler.pipeline.passbase import option_key
from qcompiler.support.fileio import write_atomic
from qcompiler.tools.report_bits import FLOAT_BITS, FP16_BITS, decode_channel_bits, encode_channel_bits  # noqa: F401
from qcompiler.tools.report_html import render

REPORT_SCHEMA = "qcompiler.tools.report/2"
SIGNIFICANT_DIGITS = 6

QUANTIZATION_OPS = frozenset({
    ("qc", "DequantizeWeight"), ("qc", "QuantizeActivation"), ("qc", "MixedMatMul"),
    ("", "QuantizeLinear"), ("", "DequantizeLinear"), ("", "DynamicQuantizeLinear"),
    ("com.microsoft", "MatMulNBits"), ("com.microsoft", "DequantizeLinear"), ("com.microsoft", "QuantizeLinear"),
    ("qc", "GatherQuantized"), ("com.microsoft", "GatherBlockQuantized"),
})
QUANTIZING_PASSES = (Quantize.name, Allocate.name, QuantizeWeights.name)


def report_paths(report: str | os.PathLike) -> tuple[Path, Path | None]:
    """(JSON path, HTML path or None) for a `--report` argument: `x.json` -> JSON only;
    `x.html` -> the page and `x.json` beside it. Anything else is refused."""
    path = Path(report)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return path, None
    if suffix in (".html", ".htm"):
        return path.with_suffix(".json"), path
    raise UserError(f"report '{path}' must end in .json (the report) or .html (a page, with the .json beside it)")


# ---------------------------------------------------------------------------------------------
# The instrument


class Recorder(Drift):
    """Output drift per pass (as `Drift`), plus per-layer outputs and quantization choices.

    `drift=False` skips the drift of each pass; the model is then run only after passes that
    changed it (layer references and the final per-layer error still need those runs)."""

    def __init__(self, probe: Mapping[str, np.ndarray], drift: bool = True):
        super().__init__(probe)
        self.measure_drift = drift
        self.float_weight_bytes = 0
        self.initial_quantization = 0
        self.layer_reference: dict[str, np.ndarray] = {}
        self.layer_error: dict[str, dict] = {}
        self.reference_pass = "input"
        self.quantized = False  # set once the IR stops computing in float; references are then fixed
        self.layers: dict[str, dict[str, Any]] = {}  # output name -> what the IR said about it
        self.options: dict[str, dict[str, Any]] = {}  # pass name -> its options (last occurrence)
        self.measured = True
        self.valid = valid_positions(probe)

    def run_begin(self, model: ir.Model) -> None:
        self.float_weight_bytes = sum(v.const_value.nbytes for v in weight_values(model))
        self.initial_quantization = _count_quantization(model)
        outputs = self.measure(model, "input", lambda: self._run(model, "input"))
        if outputs is not None:
            self.reference = outputs
        self._snapshot(model)

    def after_pass(self, pass_, model: ir.Model, record: PassRecord) -> None:
        self.options[record.name] = pass_.option_values() if hasattr(pass_, "option_values") else {}
        self._snapshot(model)
        if not (self.measure_drift or record.modified):
            self.measured = False
            return
        self.measured = True
        if self.reference is None:  # the float model did not run: nothing to compare with
            record.measure_error = "the model before the pipeline could not be run on the probe"
            return
        outputs = self.measure(model, record.name, lambda: self._run(model, record.name), record)
        if outputs is None:
            self.layer_error = {}  # errors of an earlier stage would pass for the artifact's
            return
        if self.measure_drift:
            record.drift = execute.drift(self.reference, outputs)

    def run_end(self, model: ir.Model, records: list[PassRecord], failed: str | None) -> None:
        if failed is None and not self.measured and self.reference is not None:
            stage = records[-1].name if records else "input"
            self.layer_error = {}
            self.measure(model, stage, lambda: self._run(model, stage))
            self.measured = True

    # ------------------------------------------------------------------------------------------

    def _run(self, model: ir.Model, stage: str) -> dict[str, np.ndarray]:
        """Run `model` on the probe batch; its outputs. Each layer's output is compared with its
        reference as soon as it is computed, so a large model's (run block by block) are never all
        in memory. While the IR still computes in float, the layer outputs become the references
        (a large model's wait on disk: `qcompiler.ir.spill.kept`); from the first quantizing pass on
        they stay those of the last float stage."""
        quantized = self.quantized or _count_quantization(model) > self.initial_quantization
        carried: dict[str, list[str]] = {}  # carrier -> the layers read from it
        for name, carrier in self.located(model).items():
            carried.setdefault(carrier, []).append(name)
        references, errors = {}, {}

        def take(carrier: str, value: np.ndarray) -> None:
            for name in carried[carrier]:
                actual = value
                if carrier != name:  # the layer's output plus its bias
                    actual = np.asarray(value) - self.layers[name]["bias"]["value"]
                if quantized:
                    expected = self._reference(name)
                else:
                    on_disk = spill.kept(np.asarray(actual), name)
                    references[name] = actual if on_disk is None else on_disk
                    expected = actual
                error = self._layer_error(name, expected, actual)
                if error is not None:
                    errors[name] = error

        outputs = run_exposing(model, self.probe, list(carried), take)
        self.quantized = quantized
        if not quantized:  # still computes in float: these outputs are the reference
            self.layer_reference, self.reference_pass = references, stage
        self.layer_error = errors
        return outputs

    def _reference(self, name: str) -> np.ndarray | None:
        held = self.layer_reference.get(name)
        return held if held is None or isinstance(held, np.ndarray) else held.numpy()

    def _layer_error(self, name: str, expected: np.ndarray | None, actual: np.ndarray) -> dict | None:
        """The drift of one layer's output from its reference (None: no reference of that shape)."""
        if expected is None or np.shape(expected) != np.shape(actual):
            return None
        order = self.layers.get(name, {}).get("channel_order")
        if order is not None:  # fold-permutation reordered this layer's output channels
            expected = np.take(expected, order, axis=-1)
        if leads_with_tokens(np.shape(actual), self.valid):
            expected, actual = np.asarray(expected)[self.valid], np.asarray(actual)[self.valid]
        return execute.drift({name: expected}, {name: actual})

    def located(self, model: ir.Model) -> dict[str, str]:
        """Layer output name -> the value that carries the layer's output in `model` now.

        Before quantization: the output of every layer node. Once quantized: the layers known by
        then (a lowering may compute one layer with several nodes, e.g. one per bit class, summed
        into its output), found by their own output or, when a lowering merged the layer with the
        Add of its bias (`MatMulIntegerToFloat`), by that Add's output (`bias` in `layers`): the
        bias is taken off again when the layer is measured."""
        if not (self.quantized and self.layers):
            return {n.outputs[0].name: n.outputs[0].name for n in layer_nodes(model)}
        present = {v.name for n in model.graph for v in n.outputs}
        found = {}
        for name, info in self.layers.items():
            if name in present:
                found[name] = name
            elif "bias" in info and info["bias"]["output"] in present:
                found[name] = info["bias"]["output"]
        return found

    def layer_outputs(self, model: ir.Model) -> list[str]:
        """The layers' output names (see `located`)."""
        return list(self.located(model))

    def _snapshot(self, model: ir.Model) -> None:
        for node in layer_nodes(model):
            out = node.outputs[0].name
            if self.quantized and out not in self.layers:
                continue  # a node a lowering made for part of a known layer
            info = self.layers.setdefault(out, {"output": out, "name": node.name or out, "op": node.op_type})
            _note_layer(node, info)
            if CHANNEL_ORDER_KEY in node.outputs[0].meta:
                info["channel_order"] = node.outputs[0].meta[CHANNEL_ORDER_KEY]
            bias = _bias_add(node.outputs[0])
            if bias is not None:
                info["bias"] = bias


def _bias_add(value: ir.Value) -> dict[str, Any] | None:
    """{"output", "value"} when `value`'s only reader is an Add of a constant bias (which a lowering
    may merge into the layer's kernel), else None."""
    uses = list(value.uses())
    if len(uses) != 1:
        return None
    add = uses[0].node
    if op_key(add)[0] != "" or add.op_type != "Add" or len(add.inputs) != 2:
        return None
    bias = add.inputs[1 - uses[0].idx]
    if bias is None or bias.const_value is None:
        return None
    return {"output": add.outputs[0].name, "value": np.array(bias.const_value.numpy())}


def run_exposing(model: ir.Model, feeds, names, take: Callable[[str, np.ndarray], None]) -> dict[str, np.ndarray]:
    """Run `model` (in ONNX Runtime, its `qc` ops expanded) with the values `names` exposed as extra
    graph outputs (removed again after), each handed to `take(name, array)` as soon as it is
    computed. Returns the graph outputs."""
    graph = model.graph
    original = [v.name for v in graph.outputs]
    values = {v.name: v for node in graph for v in node.outputs if v.name}
    added, typed = [], []
    for name in dict.fromkeys(names):
        value = values.get(name)
        if value is None or name in original:
            continue
        if value.type is None:
            value.type = ir.TensorType(ir.DataType.FLOAT)
            typed.append(value)
        graph.outputs.append(value)
        added.append(value)
    try:
        results = execute.run_expanded(model, feeds, streamed={v.name for v in added}, sink=take)
    finally:
        for _ in added:
            graph.outputs.pop()
        for value in typed:
            value.type = None
    for name in dict.fromkeys(names):
        if name in original and name in results:
            take(name, results[name])
    return {name: results[name] for name in original}


# ---------------------------------------------------------------------------------------------
# Reading the IR


def _count_quantization(model: ir.Model) -> int:
    return sum(op_key(n) in QUANTIZATION_OPS for n in ir.traversal.RecursiveGraphIterator(model.graph))


def layer_nodes(model: ir.Model) -> list[ir.Node]:
    """Nodes that multiply an activation by a constant weight (`ir.is_weighted_layer`) or look rows up
    in an embedding table (`embedding_table`: followed from the float model on, listed as layers once
    stored as codes), in graph order."""
    memo: dict = {}
    return [node for node in model.graph if is_weighted_layer(node, memo) or embedding_table(node) is not None]


def layer_nodes_set(model: ir.Model, memo: dict) -> set:
    key = ("layer-nodes", id(model))
    if key not in memo:
        memo[key] = set(layer_nodes(model))
    return memo[key]


def layer_constants(node: ir.Node, input_name: str | None, limit: int = 256) -> list[ir.Value]:
    """The initializers a layer computed by several nodes reads: everything upstream of `node`
    that is not upstream of the layer's activation input `input_name` (or a graph input)."""
    found, seen, stack = {}, set(), [node]
    while stack and len(seen) < limit:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for value in current.inputs:
            if value is None or value.name == input_name:
                continue
            if value.is_initializer() and value.const_value is not None:
                found[id(value)] = value
            elif value.producer() is not None:
                stack.append(value.producer())
    return list(found.values())


def _attrs(node: ir.Node) -> dict[str, Any]:
    return {name: attr.value for name, attr in node.attributes.items()}


def _input_channels(op: str, shape, attrs: dict) -> int | None:
    if not shape:
        return None
    if op == "MatMul" and len(shape) == 2:
        return int(shape[0])
    if op == "Gemm" and len(shape) == 2:
        return int(shape[1] if attrs.get("transB") else shape[0])
    if op in ("Conv", "ConvTranspose") and len(shape) >= 2:
        return int(shape[1] if op == "Conv" else shape[0])
    return None


def _note_lookup(node: ir.Node, table: ir.Value, info: dict[str, Any]) -> None:
    """Record what the current IR says about an embedding lookup: its table's [rows, columns] (from
    the float table, the first time), and once stored as codes their bits and block size."""
    if "weight_shape" not in info and table.const_value is not None:
        shape = [int(d) for d in table.const_value.shape]
        info.update(weight_shape=shape, channels=shape[0], weights=int(np.prod(shape)), input=node.inputs[1].name)
    info["embedding"] = True
    if op_key(node) in QUANTIZED_LOOKUPS:
        a = _attrs(node)
        info["lookup"] = {"bits": int(a.get("bits", 4)), "block_size": int(a.get("block_size", 32))}


def _note_layer(node: ir.Node, info: dict[str, Any]) -> None:
    """Record what the current IR says about one layer (later passes add to or override it)."""
    table = embedding_table(node)
    if table is not None:
        _note_lookup(node, table, info)
        return
    w, x = node.inputs[1], node.inputs[0]
    if "weight_shape" not in info and w is not None and w.const_value is not None:
        shape = [int(d) for d in w.const_value.shape]
        info["weight_shape"] = shape
        info["channels"] = _input_channels(node.op_type, shape, _attrs(node))
        info["weights"] = int(np.prod(shape))
    dequantize = producer_of(w, "DequantizeWeight", "qc")
    if dequantize is not None:
        a = _attrs(dequantize)
        info["int_weight"] = {"bits": int(a.get("bits", 8)), "axis": int(a.get("axis", 0))}
    allocation = producer_of(w, "BitAllocation", "qc")
    if allocation is not None and allocation.inputs[1] is not None and allocation.inputs[1].const_value is not None:
        a = _attrs(allocation)
        info["allocation"] = {
            "channel_bits": allocation.inputs[1].const_value.numpy().astype(np.int64),
            "group_size": int(a.get("group_size", 128)), "codebook": str(a.get("codebook", "")),
        }
    if is_mixed_matmul(node):
        view = MixedMatMulView.of(node)
        perm = view.perm_array()
        channel_bits = np.empty(len(perm), np.int64)
        channel_bits[perm] = np.concatenate([np.full(c.stop - c.start, c.bits, np.int64) for c in view.classes])
        outlier_values = view.outliers[1] if view.outliers is not None else None
        sparse = int(outlier_values.const_value.shape[0]) if outlier_values is not None and outlier_values.const_value is not None else 0
        info["mixed"] = {
            "channel_bits": channel_bits, "group_size": view.group_size, "sparse_outliers": sparse,
            "classes": [{"kind": c.kind, "bits": c.bits, "channels": c.stop - c.start} for c in view.classes],
        }
        info["channels"] = len(perm)
    quant = producer_of(x, "QuantizeActivation", "qc")
    if quant is not None:
        info["activation"] = {k: v for k, v in _attrs(quant).items()}
        info["input"] = quant.inputs[0].name
    elif "activation" not in info and x is not None:
        scale = producer_of(x, "ChannelScale", "qc")
        info["input"] = scale.inputs[0].name if scale is not None else x.name


# ---------------------------------------------------------------------------------------------
# Building the report


def build(
    manifest: dict,
    records: list[PassRecord],
    timings: dict,
    recorder: Recorder,
    model: ir.Model,
    artifact_files: list[Path] = (),
    probe: Any = None,
) -> dict[str, Any]:
    """The report as a JSON-ready dict (schema `qcompiler.tools.report/2`). `probe`: the
    `qcompiler.analysis.probe.Probe` measured on (or its feeds alone)."""
    feeds = getattr(probe, "feeds", probe) or {}
    probe_source = getattr(probe, "source", "api" if probe is not None else None)
    stats = {r.name: r.stats for r in records}
    layers = _layers(model, recorder, stats)
    runtime = dict(manifest.get("mixed_layers") or {})
    for entry in list(runtime.values()):  # a merged layer's route and bytes, under each linear it computes
        runtime.update({name: entry for name in entry.get("layers", ())})
    for layer in layers:  # the route lower-ort took and the bytes at rest / resident (the manifest's)
        layer["runtime"] = runtime.get(layer["name"])
    float_nodes = _float_nodes(model, recorder, stats, layers)
    weights = manifest.get("weights") or 0
    artifact_weight_bytes = manifest.get("weight_bytes")
    file_bytes = sum(p.stat().st_size for p in artifact_files if p.name != "manifest.json" and p.exists())
    size = {
        "weights": weights,
        "float_weight_bytes": recorder.float_weight_bytes,
        "artifact_weight_bytes": artifact_weight_bytes,
        "artifact_file_bytes": file_bytes,
        "compression": (recorder.float_weight_bytes / artifact_weight_bytes) if artifact_weight_bytes else None,
        "effective_bits_per_weight": manifest.get("effective_bits_per_weight"),
    }
    output = records[-1].drift if records and records[-1].drift is not None else None
    quantized = [layer for layer in layers if layer["weight"]["format"] != "float"]
    measured = [layer["error"]["sqnr_db"] for layer in layers if layer["error"] and layer["error"]["sqnr_db"] is not None]
    body = {
        "schema": REPORT_SCHEMA,
        "manifest": manifest,
        "timings": timings,
        "passes": [r.to_json() for r in records],
        "probe": {
            "inputs": {name: {"shape": list(np.shape(a)), "dtype": str(np.asarray(a).dtype)} for name, a in sorted(feeds.items())},
            "layer_reference": recorder.reference_pass,
            "padding_excluded": recorder.valid is not None,
            "source": probe_source,
            "note": getattr(probe, "note", ""),
            "runtime": "onnxruntime",
        },
        "warnings": list(recorder.warnings),
        "size": size,
        "summary": {
            "layers": len(layers),
            "layers_quantized": len(quantized),
            "float_nodes": len(float_nodes),
            "layers_float_for_speed": len(stats.get(Quantize.name, {}).get(Quantize.Stats.FLOAT_PLACEMENT) or {}),
            "output": output,
            "output_measured_on": probe_source if output is not None else None,
            "lowest_layer_sqnr_db": min(measured) if measured else None,
        },
        "layers": layers,
        "float_nodes": float_nodes,
    }
    return clean(body)


def _layers(model: ir.Model, recorder: Recorder, stats: dict[str, dict]) -> list[dict]:
    smooth = {}
    for group in (stats.get(Smooth.name, {}).get(Smooth.Stats.GROUPS) or {}).values():
        for name in group.get(Smooth.Stats.LAYERS, []):
            smooth[name] = group
    quantize = stats.get(Quantize.name, {})
    quantize_layers = quantize.get(Quantize.Stats.PER_LAYER) or {}
    allocate = (stats.get(Allocate.name, {}).get(Allocate.Stats.PER_LAYER)) or {}
    mixed_stats = (stats.get(QuantizeWeights.name, {}).get(QuantizeWeights.Stats.PER_LAYER)) or {}
    in_float = set(quantize.get(Quantize.Stats.ACTIVATIONS_IN_FLOAT) or [])
    quantize_opts = recorder.options.get(Quantize.name, {})
    grid = recorder.options.get(QuantizeWeights.name, {}).get(option_key(QuantizeWeights, "grid"))
    memo: dict = {}
    layers = []
    producers = {v.name: n for n in model.graph for v in n.outputs}
    for out, carrier in recorder.located(model).items():
        node = producers[carrier]
        info = recorder.layers.get(out, {"output": out, "name": node.name or out, "op": node.op_type})
        if info.get("embedding") and "lookup" not in info:
            continue  # a table left in float (or a constant table such as a rotary cache): in float_nodes, with why
        name = info["name"]
        if embedding_table(node) is not None:  # the table, or its codes, scales and zero points
            sources = [v for i, v in enumerate(node.inputs) if i != 1 and v is not None and v.const_value is not None]
        elif node in layer_nodes_set(model, memo):
            sources = [v for w in weight_inputs(node) for v in (constant_sources(w, memo) or [])]
            sources = sources + (constant_sources(permutation_indices(node.inputs[0]), memo) or [])
        else:  # computed by several nodes: the constants between its input and its output
            sources = layer_constants(node, info.get("input"))
        stored = round(sum(v.const_value.nbytes for v in {id(v): v for v in sources}.values()) * _split_share(node, carrier))
        stored_float = all(v.const_value.dtype in (ir.DataType.FLOAT, ir.DataType.DOUBLE) for v in sources)
        weight = _weight(info, stored_float, allocate.get(name), mixed_stats.get(name), quantize_layers.get(name), grid)
        count = info.get("weights")
        weight["stored_bytes"] = stored
        weight["stored_bits_per_weight"] = 8 * stored / count if count else None
        activation = _activation(info, quantize_layers.get(name), in_float, quantize_opts, Quantize.name in recorder.options)
        group = smooth.get(name)
        layers.append({
            "index": len(layers),
            "name": name,
            "output": out,
            "op": info.get("op", node.op_type),
            "weight_shape": info.get("weight_shape"),
            "channels": info.get("channels"),
            "weight": weight,
            "activation": activation,
            "smooth": None if group is None else {
                "alpha": group.get(Smooth.Stats.ALPHA),
                "act_absmax_before": group.get(Smooth.Stats.ACT_ABSMAX_BEFORE),
                "act_absmax_after": group.get(Smooth.Stats.ACT_ABSMAX_AFTER),
                "shared_with": [n for n in group.get(Smooth.Stats.LAYERS, []) if n != name],
            },
            "error": recorder.layer_error.get(out),
        })
    return layers


def _split_share(node: ir.Node, carrier: str) -> float:
    """The share of a wide kernel's constants that a layer carried by one part of its `Split` stores
    (linears of one input merged by lower-ort: its columns over theirs); 1 for any other node."""
    if node.op_type != "Split" or len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[1].const_value is None:
        return 1.0
    sizes = node.inputs[1].const_value.numpy()
    index = next(i for i, v in enumerate(node.outputs) if v.name == carrier)
    return float(sizes[index]) / float(sizes.sum())


def _histogram(bits: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(bits, return_counts=True)
    return {("fp16" if v == FP16_BITS else str(int(v))): int(c) for v, c in zip(values, counts)}


def _weight(info: dict, stored_float: bool, allocate: dict | None, mixed_stats: dict | None,
            quantize: dict | None, grid: str | None) -> dict:
    empty = {"format": "float", "bits": FLOAT_BITS, "mean_bits": float(FLOAT_BITS), "bits_histogram": None,
             "channel_bits": None, "grid": None, "group_size": None, "codebook": None, "classes": None,
             "fp16_channels": 0, "sparse_outliers": 0, "sqnr_db": None, "predicted_error": None}
    if stored_float:
        return empty
    lookup = info.get("lookup")
    if lookup is not None:  # an embedding table stored as codes: one width for every row
        b, rows = lookup["bits"], info.get("channels") or 0
        return {**empty, "format": f"int{b}", "bits": b, "mean_bits": float(b), "bits_histogram": {str(b): rows},
                "grid": "minmax-asymmetric", "group_size": lookup["block_size"],
                "sqnr_db": (mixed_stats or {}).get(QuantizeWeights.Stats.WEIGHTED_SQNR_DB),
                "predicted_error": (allocate or {}).get(Allocate.Stats.PREDICTED_ERROR)}
    mixed = info.get("mixed")
    allocation = info.get("allocation")
    if mixed is not None or allocation is not None:
        bits = (mixed or allocation)["channel_bits"]
        hist = _histogram(bits)
        uniform = len(hist) == 1
        kinds = {c["kind"] for c in (mixed or {}).get("classes", [])}
        return {
            **empty,
            "format": "mixed",
            "bits": int(bits[0]) if uniform else None,
            "mean_bits": float(np.mean(bits)),
            "bits_histogram": hist,
            "channel_bits": encode_channel_bits(bits),
            "grid": grid if (not kinds or "uniform" in kinds) else None,
            "group_size": (mixed or allocation)["group_size"],
            "codebook": "kmeans" if "codebook" in kinds else ((allocation or {}).get("codebook") or "uniform"),
            "classes": (mixed or {}).get("classes"),
            "fp16_channels": hist.get("fp16", 0),
            "sparse_outliers": (mixed or {}).get("sparse_outliers", (allocate or {}).get(Allocate.Stats.SPARSE_OUTLIERS, 0)),
            "sqnr_db": (mixed_stats or {}).get(QuantizeWeights.Stats.WEIGHTED_SQNR_DB),
            "predicted_error": (allocate or {}).get(Allocate.Stats.PREDICTED_ERROR),
        }
    int_weight = info.get("int_weight")
    if int_weight is not None:
        b = int_weight["bits"]
        return {**empty, "format": f"int{b}", "bits": b, "mean_bits": float(b), "bits_histogram": {str(b): info.get("channels") or 0},
                "grid": "absmax-symmetric", "sqnr_db": (quantize or {}).get(Quantize.Stats.WEIGHT_SQNR_DB)}
    return {**empty, "format": "other", "bits": None, "mean_bits": None}


def _activation(info: dict, quantize: dict | None, in_float: set, options: dict, has_quantize: bool) -> dict:
    act = info.get("activation")
    sqnr = (quantize or {}).get(Quantize.Stats.ACTIVATION_SQNR_DB)
    if info.get("embedding"):
        return {"format": None, "mode": None, "scale": None, "zero_point": None, "sqnr_db": None,
                "float_reason": "an embedding lookup: its input is row indices"}
    if act is not None:
        return {"format": f"int{int(act.get('bits', 8))}", "mode": act.get("mode"), "scale": act.get("scale"),
                "zero_point": act.get("zero_point"), "sqnr_db": sqnr, "float_reason": None}
    if info.get("input") in in_float:
        float_inputs = option_key(Quantize, "float_inputs")
        reason = (f"kept in float by quantize{{{float_inputs}={options.get(float_inputs)}}}: among the inputs that quantize "
                  f"worst (int8 SQNR {'exact' if sqnr is None else f'{sqnr:.1f} dB'} on calibration rows)")
    elif has_quantize and options.get(option_key(Quantize, "activations")) == "none":
        reason = "quantize{activations=none}: weight-only"
    elif "mixed" in info or "allocation" in info:
        reason = "weight-only pipeline (mixed precision)"
    elif "int_weight" in info:
        reason = "activation not quantized"
    else:
        reason = "layer not quantized"
    return {"format": "float", "mode": None, "scale": None, "zero_point": None, "sqnr_db": sqnr, "float_reason": reason}


def _float_nodes(model: ir.Model, recorder: Recorder, stats: dict, layers: list[dict]) -> list[dict]:
    """Nodes that hold or multiply weights and compute in float, with the reason."""
    memo: dict = {}
    options = recorder.options
    quantizing = [p for p in QUANTIZING_PASSES if p in options]
    found = []
    by_output = {layer["output"]: layer for layer in layers}
    by_output.update({carrier: by_output[out] for out, carrier in recorder.located(model).items() if out in by_output})
    for node in model.graph:
        key = op_key(node)
        name = node.name or (node.outputs[0].name if node.outputs else "")
        if key in WEIGHTED_LAYER_OPS:
            w = node.inputs[1] if len(node.inputs) > 1 else None
            sources = constant_sources(w, memo)
            if not sources:
                found.append({"name": name, "op": node.op_type, "part": "node",
                              "reason": "no constant weight: both operands are computed at run time"})
                continue
            layer = by_output.get(node.outputs[0].name)
            if layer is None:
                continue
            if layer["weight"]["format"] == "float":
                placed = (stats.get(Quantize.name, {}).get(Quantize.Stats.FLOAT_PLACEMENT) or {}).get(layer["name"])
                found.append({"name": name, "op": node.op_type, "part": "weight",
                              "reason": f"left in float by quantize: {placed}" if placed else _why_float_weight(node, layer, options, quantizing)})
            elif options.get(Quantize.name, {}).get(option_key(Quantize, "activations")) == "int8" and layer["activation"]["format"] == "float":
                found.append({"name": name, "op": node.op_type, "part": "activation", "reason": layer["activation"]["float_reason"]})
        elif key == ("", "Gather") and node.inputs and node.inputs[0] is not None and node.inputs[0].const_value is not None:
            table = node.inputs[0].const_value
            if table.dtype.is_floating_point() and len(table.shape) == 2:
                found.append({"name": name, "op": "Gather", "part": "weight",
                              "reason": f"embedding table [{table.shape[0]}, {table.shape[1]}]: left in float (w8a8{{embedding=int8}} "
                                        f"or {{embedding=int4}} stores it as codes, mixed{{embedding=budget}} within the bit budget)"})
    return found


def _why_float_weight(node: ir.Node, layer: dict, options: dict, quantizing: list[str]) -> str:
    op = node.op_type
    if not quantizing:
        return "the pipeline has no quantizing pass"
    if op in ("Conv", "ConvTranspose"):
        if Quantize.name in options and not options[Quantize.name].get(option_key(Quantize, "conv"), True):
            return "kept by option quantize{conv=false}"
        if Quantize.name not in options:
            return "mixed precision (allocate-bits) quantizes MatMul layers only"
        if op == "ConvTranspose":
            return "ONNX Runtime runs ConvTranspose in float: quantize{activations=none} or force= quantizes its weights"
    if op == "Gemm":
        return "Gemm that canonicalize did not turn into MatMul + Add"
    shape = layer.get("weight_shape") or []
    if op == "MatMul" and len(shape) != 2:
        return f"weight of rank {len(shape)}: only 2-D weights are quantized"
    return "no quantizing pass matched this node"


def clean(value: Any) -> Any:
    """JSON-ready: numpy scalars and arrays to Python, floats rounded to 6 significant digits,
    non-finite floats to None, tuples to lists, keys to strings."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return None
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    if isinstance(value, Path):
        return str(value)
    return value


def to_json(body: dict) -> str:
    return json.dumps(body, indent=1, sort_keys=True, allow_nan=False) + "\n"


def write(report: str | os.PathLike, output: Path, staging: Path, body: dict) -> list[Path]:
    """Write the report (JSON, and the page for `.html`); paths inside `output` go into `staging`
    so that they appear with the artifact. Returns the files written into `staging`."""
    json_path, html_path = report_paths(report)
    files = [(json_path, to_json(body))]
    if html_path is not None:
        files.append((html_path, render(body)))
    staged = []
    for path, text in files:
        try:
            inside = path.resolve().relative_to(output.resolve())
        except ValueError:
            write_atomic(path, text)
        else:
            target = staging / inside
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            staged.append(target)
    return staged
