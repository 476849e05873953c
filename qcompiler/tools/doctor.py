"""`qcompiler doctor`: which layers and which passes cost accuracy, and what to change.

1. Runs the pipeline (without its lowering) on the model, measuring each pass's output drift on
   the probe batch, and keeps two stages of the IR: the float model as the first quantizing pass
   sees it (`float_stage`: after smoothing and folding, so its weights already carry the folded
   scales) and the quantized model (`quant_stage`).
2. Reads, for every layer (a MatMul or Conv with a constant weight in the float stage), what the
   quantized stage computes in its place: the weight it effectively multiplies by (`DequantizeWeight`
   evaluated on its constants, or a weight-only `MixedMatMul` applied to the identity matrix, which
   gives back its weight exactly, outliers and permutation included) and the activation quantizer
   in front of it (`QuantizeActivation`'s mode, scale and zero point), if any.
3. Builds one ONNX Runtime session of the float stage in which every layer's weight is a graph
   input and every quantized activation passes through a switchable fake-quantizer built from
   standard ops, so that any mix of float and quantized layers runs without recompiling. On the
   probe batch it measures the output error (relative MSE against the float model) with all layers
   quantized, with one layer quantized at a time (`alone`) and with all but one (`recovered`: how
   much the error falls when that layer stays in float).
4. Suggests the cheapest set of layers to keep at higher precision: by recovered error per extra
   stored bit, within `max_extra_bits` average bits (`allocate-bits{keep=... keep-bits=8}`), or,
   for int8 pipelines, the layers whose float recovers the most (`quantize{keep=...}`); measures
   the suggestion's predicted error with those layers in float, and writes the pipeline with
   `--apply FILE` (which `--pipeline @FILE` reads).
5. When `quantize-weights` is the pass that adds the most drift and nothing learns its rounding,
   runs the suggestion with `flexround` after it and adds that pass to the suggestion if the
   weights it learns lower the probe error (it costs compile time, not stored bits).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.analysis import bitcost, execute
from qcompiler.analysis.probe import log_softmax, mean_kl
from qcompiler.dialect import ops
from qcompiler.dialect.mixed_ops import MixedMatMulView, is_mixed_matmul
from qcompiler.errors import UserError
from qcompiler.ir import qc_nodes, to_proto
from qcompiler.ir.layers import embedding_table
from qcompiler.passes.allocate_bits import AllocateBitsPass as Allocate
from qcompiler.passes.flexround import FlexRoundPass
from qcompiler.passes.fold_permutation import FoldPermutationPass
from qcompiler.passes.fuse import FusePass
from qcompiler.passes.gptq import GPTQPass
from qcompiler.passes.lower_ort import LowerOrtPass
from qcompiler.passes.quantize import QuantizePass as Quantize
from qcompiler.passes.quantize_weights import QuantizeWeightsPass as QuantizeWeights
from qcompiler.passes.tune_scales import TuneScalesPass
from qcompiler.pipeline import instruments
from qcompiler.pipeline.pass_manager import Instrument, PassRecord, run_pipeline
from qcompiler.pipeline.spec import format_pipeline, parse_pipeline
from qcompiler.support.progress import progress

log = logging.getLogger(__name__)

KEEP_BITS = 8
WEIGHT_COPIES = 7  # float32 copies of a model's weights the doctor holds (measured: 4.9 GB at 0.65 GB of weights, docs/real-size.md)
TABLE_KEEP_BITS = bitcost.table_bits(1, 32, 8, 32) / 32  # a kept embedding table: 8-bit codes, a scale and zero point a block


@dataclasses.dataclass
class LayerQuant:
    """One layer: its weight name, float and effective quantized weights, activation quantizer."""

    name: str
    node: str
    w_float: np.ndarray
    w_quant: np.ndarray
    act: dict[str, Any] | None
    w_high: np.ndarray | None = None  # the weight at a raised bit budget (allocate-bits{boost})
    embedding: bool = False  # an embedding table (its Gather's input 0), stored as codes

    @property
    def params(self) -> int:
        return int(self.w_float.size)


class _Stages(Instrument):
    """Keeps a copy of the model after the last pass that left it free of qc ops."""

    def __init__(self):
        self.float_stage: ir.Model | None = None

    def run_begin(self, model: ir.Model) -> None:
        self.float_stage = _copy(model)

    def after_pass(self, pass_, model: ir.Model, record: PassRecord) -> None:
        if record.modified and not qc_nodes(model):  # an unchanged model needs no new copy
            self.float_stage = _copy(model)


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(to_proto(model))


# ------------------------------------------------------------------------------------------------
# Pipeline trials: the same pipeline with another allocation, run side by side on Ray


@dataclasses.dataclass(frozen=True)
class TrialInputs:
    """What a pipeline trial reads besides its passes (shared read-only with the workers): the model
    before any pass, serialized, and the compile context's data and settings."""

    model: bytes
    calibration: Any
    threads: int | None
    block_sequential: bool | None
    cost_model: Any


def run_trial(inputs: TrialInputs, passes: list) -> tuple[bytes, list[PassRecord]]:
    """`passes` over a copy of the model (a pure function, run as a Ray task; its own measurements
    in-process): the model they leave, serialized, and their records."""
    from qcompiler.pipeline.context import CompileContext, using

    model = _from_bytes(inputs.model)
    ctx = CompileContext(calibration=inputs.calibration, threads=inputs.threads, block_sequential=inputs.block_sequential,
                         cost_model=inputs.cost_model)
    with using(ctx):
        records = run_pipeline(model, passes, [])
    return to_proto(model).SerializeToString(), records


class _Trials:
    """Pipeline runs on copies of the model before any pass. In-process (and for a large model, whose
    weights stay mapped) each runs when its result is asked for, in the compiling process, as it always did; on a Ray executor each is a task started
    at once (`run_trial`), so that trials run side by side and beside the compiling process's own
    work, the model put in the object store once. Either way the same passes on the same model: the
    same result (a pass's fanned-out measurements give the same numbers on any executor)."""

    def __init__(self, original: ir.Model, ctx):
        self.original, self.ctx, self._shared = original, ctx, None

    def start(self, passes: list, label: str):
        """A handle whose `.result()` is (the model the passes leave, their records)."""
        from qcompiler.ir import is_large
        from qcompiler.support.parallel import Deferred, InProcess

        executor = self.ctx.executor
        if isinstance(executor, InProcess) or is_large(self.original):  # a large model's weights are not sent as bytes
            return Deferred(lambda: self.here(passes))
        if self._shared is None:
            ctx = self.ctx
            self._shared = executor.share(TrialInputs(to_proto(self.original).SerializeToString(), ctx.calibration, ctx.threads,
                                                      ctx.block_sequential, ctx.cost_model))
        running = executor.submit(run_trial, list(passes), shared=self._shared, name=label)
        return Deferred(lambda: _from_worker(*running.result()))

    def here(self, passes: list) -> tuple[ir.Model, list[PassRecord]]:
        """`passes` over a copy of the model in the compiling process: (the model they leave, their records)."""
        from qcompiler.pipeline.context import using

        model = _copy(self.original)
        with using(self.ctx):
            records = run_pipeline(model, passes, [])
        return model, records


def _from_worker(serialized: bytes, records: list[PassRecord]) -> tuple[ir.Model, list[PassRecord]]:
    return _from_bytes(serialized), records


def _from_bytes(serialized: bytes) -> ir.Model:
    import onnx

    return ir.serde.deserialize_model(onnx.load_from_string(serialized))


# ------------------------------------------------------------------------------------------------
# What the quantized stage computes per layer


def quantized_layers(float_stage: ir.Model, quant_stage: ir.Model) -> tuple[list[LayerQuant], list[dict]]:
    """Layers of `float_stage` and their quantized form in `quant_stage`; plus those skipped, with why."""
    producers = {out.name: node for node in quant_stage.graph for out in node.outputs}
    layers, skipped = [], []
    for node in float_stage.graph:
        table = embedding_table(node)
        if table is not None:
            found = producers.get(node.outputs[0].name)
            if found is not None and found.domain == "qc" and found.op_type == "GatherQuantized":
                w_float = table.const_value.numpy()
                codes, _, scale, zero = found.inputs  # every row looked up gives the table as stored
                w_quant = ops.run_reference(found, [_const(codes), np.arange(w_float.shape[0]), _const(scale), _const(zero)])[0]
                layers.append(LayerQuant(table.name, node.name or node.outputs[0].name, w_float, np.asarray(w_quant, np.float32),
                                         None, embedding=True))
            continue
        # narrower than `ir.is_weighted_layer` on purpose: the layers the switchboard can emulate
        if node.op_type not in ("MatMul", "Conv") or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if w is None or w.const_value is None or not w.const_value.dtype.is_floating_point():
            continue
        w_float = w.const_value.numpy()
        found = producers.get(node.outputs[0].name)
        try:
            layer = _layer_from(found, x.name, w.name, node.name or node.outputs[0].name, w_float)
        except _Unreadable as exc:
            skipped.append({"layer": w.name, "why": str(exc)})
            continue
        if layer is not None:
            layers.append(layer)
    return layers, skipped


class _Unreadable(Exception):
    pass



def _layer_from(q: ir.Node | None, x_name: str, w_name: str, node_name: str, w_float: np.ndarray) -> LayerQuant | None:
    if q is None:
        raise _Unreadable("its output is not produced in the quantized model")
    if is_mixed_matmul(q):
        if MixedMatMulView.of(q).x.name != x_name:
            raise _Unreadable("its MixedMatMul reads another activation")
        consts = [_const(v) for v in q.inputs[1:]]
        eye = np.eye(w_float.shape[0], dtype=np.float32)
        w_quant = ops.run_reference(q, [eye] + consts)[0]
        return LayerQuant(w_name, node_name, w_float, np.asarray(w_quant, np.float32).reshape(w_float.shape), None)
    if q.domain not in ("", "ai.onnx") or q.op_type not in ("MatMul", "Conv"):
        raise _Unreadable(f"the quantized model computes it with {q.domain or 'onnx'}.{q.op_type}")
    a, b = q.inputs[0], q.inputs[1]
    act = None
    producer = a.producer()
    if producer is not None and producer.domain == "qc" and producer.op_type == "QuantizeActivation":
        if producer.inputs[0].name != x_name:
            raise _Unreadable("its activation quantizer reads another tensor")
        act = ops.attributes_of(producer)
    elif a.name != x_name:
        raise _Unreadable("its activation input is rewritten by ops the doctor cannot emulate")
    if b.const_value is not None:
        w_quant = b.const_value.numpy()
    elif b.producer() is not None and b.producer().domain == "qc" and b.producer().op_type == "DequantizeWeight":
        w_quant = ops.run_reference(b.producer(), [_const(v) for v in b.producer().inputs])[0]
    else:
        raise _Unreadable("its weight is not a constant or a DequantizeWeight of constants")
    w_quant = np.asarray(w_quant, np.float32)
    if w_quant.shape != w_float.shape:
        raise _Unreadable(f"its quantized weight has shape {w_quant.shape}, not {w_float.shape}")
    if act is None and np.array_equal(w_quant, w_float):
        return None  # left in float by the pipeline
    return LayerQuant(w_name, node_name, w_float, w_quant, act)


def _const(value: ir.Value | None):
    if value is None:
        return None
    if value.const_value is None:
        raise _Unreadable(f"input '{value.name}' of its quantized op is not a constant")
    return value.const_value.numpy()


# ------------------------------------------------------------------------------------------------
# The switchboard: one session, any mix of float and quantized layers


@dataclasses.dataclass(frozen=True)
class BoardInputs:
    """What a switchboard's session is built from (shared read-only with the workers)."""

    graph: Any  # the float stage with weights and gates as inputs: the IR here, serialized bytes for workers
    layers: list[LayerQuant]
    weight_inputs: dict[str, str]  # layer -> graph input of its weight
    gate_inputs: dict[str, str]  # layer -> graph input of its activation quantizer's gate
    output: str
    feeds: dict[str, np.ndarray]
    threads: int | None
    metric: str


def measure_errors(inputs: BoardInputs, queries: list[tuple[frozenset[str], frozenset[str]]]) -> list[float]:
    """The error of each (quantized, high) query on a switchboard built from `inputs` (a pure
    function, run in-process or as a Ray task)."""
    board = Switchboard.from_inputs(inputs)
    return [board.error(set(quantized), set(high)) for quantized, high in queries]


class Switchboard:
    """The float stage with every layer's weight as an input and a gated fake-quantizer on every
    quantized activation; `run(quantized)` runs it with the layers in `quantized` quantized."""

    def __init__(self, float_stage: ir.Model, layers: list[LayerQuant], feeds: dict[str, np.ndarray], threads: int | None,
                 metric: str = "mse"):
        model = _copy(float_stage)
        graph = model.graph
        by_weight = {layer.name: layer for layer in layers}
        weight_inputs: dict[str, str] = {}
        gate_inputs: dict[str, str] = {}
        nodes = [(n, 1) for n in graph if n.op_type in ("MatMul", "Conv") and len(n.inputs) > 1 and n.inputs[1] is not None]
        nodes += [(n, 0) for n in graph if embedding_table(n) is not None]
        for index, (node, slot) in enumerate(nodes):
            layer = by_weight.get(node.inputs[slot].name)
            if layer is None or layer.node != (node.name or node.outputs[0].name):
                continue
            w_in = ir.Value(name=f"doctor.w{index}", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(layer.w_float.shape))
            graph.inputs.append(w_in)
            node.replace_input_with(slot, w_in)
            weight_inputs[layer.name] = w_in.name
            if layer.act is not None:
                gate = ir.Value(name=f"doctor.g{index}", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
                graph.inputs.append(gate)
                node.replace_input_with(0, _fake_quant(graph, node, node.inputs[0], gate, layer.act, index))
                gate_inputs[layer.name] = gate.name
        from qcompiler.ir.layers import remove_unused

        remove_unused(model)
        self._model = model
        self._start(BoardInputs(model, list(layers), weight_inputs, gate_inputs, graph.outputs[0].name, dict(feeds), threads, metric))

    @classmethod
    def from_inputs(cls, inputs: "BoardInputs") -> "Switchboard":
        board = cls.__new__(cls)
        board._model = None
        board._start(inputs)
        return board

    def _start(self, inputs: "BoardInputs") -> None:
        self.inputs = inputs
        self.layers = inputs.layers
        self.weight_inputs = inputs.weight_inputs
        self.gate_inputs = inputs.gate_inputs
        self.output = inputs.output
        self.session = execute.ort_session(inputs.graph, inputs.threads)
        self.feeds = inputs.feeds
        self.metric = inputs.metric
        self.reference = self.run(set())
        self._log_p = log_softmax(self.reference) if self.metric == "kl" else None

    def errors(self, queries: list[tuple[frozenset[str], frozenset[str]]], executor, label: str) -> list[float]:
        """`error(quantized, high)` of every query, in order: here, one after another, or fanned out
        on a Ray executor, one chunk of queries per worker, each worker building the same session
        from the same serialized graph (`measure_errors`), so that the numbers are the same."""
        from qcompiler.support.parallel import InProcess, chunks

        if isinstance(executor, InProcess):
            out = []
            with progress(label, len(queries)) as bar:
                for quantized, high in queries:
                    out.append(self.error(set(quantized), set(high)))
                    bar.update()
            return out
        shared = dataclasses.replace(self.inputs, graph=to_proto(self._model).SerializeToString())
        parts = chunks(queries, executor.workers)
        names = [f"{label} {sum(map(len, parts[:i])) + 1}-{sum(map(len, parts[:i + 1]))} of {len(queries)}" for i in range(len(parts))]
        return [e for part in executor.map(measure_errors, parts, shared=shared, names=names) for e in part]

    def run(self, quantized: set[str], high: set[str] = frozenset(), weights: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The output with the layers in `quantized` quantized (those also in `high` at the raised
        budget, those in `weights` with that weight) and the others in float."""
        feeds = dict(self.feeds)
        for layer in self.layers:
            on = layer.name in quantized
            weight = layer.w_float
            if on and weights is not None and layer.name in weights:
                weight = weights[layer.name]
            elif on:
                weight = layer.w_high if layer.name in high and layer.w_high is not None else layer.w_quant
            feeds[self.weight_inputs[layer.name]] = weight
            if layer.name in self.gate_inputs:
                feeds[self.gate_inputs[layer.name]] = np.array(on)
        return self.session.run([self.output], feeds)[0]

    def error(self, quantized: set[str], high: set[str] = frozenset(), weights: dict[str, np.ndarray] | None = None) -> float:
        """The output's distance from the all-float run: relative MSE, or (metric "kl") the mean
        KL divergence of the softmax over the last axis (next-token distributions of an LM)."""
        out = self.run(quantized, high, weights)
        if self.metric == "kl":
            return mean_kl(self._log_p, out)
        ref = self.reference.astype(np.float64)
        diff = out.astype(np.float64) - ref
        return float(np.sum(diff * diff) / max(np.sum(ref * ref), 1e-30))


METRICS = {
    "mse": "relative MSE of the model output against the float model",
    "kl": "mean KL divergence of the output's softmax (last axis) from the float model's",
}


def _fake_quant(graph: ir.Graph, node: ir.Node, x: ir.Value, gate: ir.Value, act: dict, index: int) -> ir.Value:
    """Standard ops computing `qc.QuantizeActivation` (see `qcompiler.dialect.qc_ops.quantize_activation`)."""
    from qcompiler.dialect.qc_ops import int_range

    tape = ir.tape.Tape()
    f32 = lambda v: tape.initializer(ir.tensor(np.array(v, np.float32), name=f"doctor.c{index}.{len(tape.initializers)}"))  # noqa: E731
    mode, bits = act.get("mode", "static"), int(act.get("bits", 8))
    if mode == "static":
        lo, hi = int_range(bits, signed=True)
        scale, zp = f32(act["scale"]), f32(act.get("zero_point", 0))
        q = tape.op("Clip", [tape.op("Add", [tape.op("Round", [tape.op("Div", [x, scale])]), zp]), f32(lo), f32(hi)])
        y = tape.op("Mul", [tape.op("Sub", [q, zp]), scale])
    elif mode == "per-token":
        _, hi = int_range(bits, signed=True)
        amax = tape.op("ReduceMax", [tape.op("Abs", [x]), tape.initializer(ir.tensor(np.array([-1], np.int64), name=f"doctor.c{index}.axes"))], attributes={"keepdims": 1})
        s = tape.op("Div", [amax, f32(hi)])
        s = tape.op("Where", [tape.op("Equal", [s, f32(0.0)]), f32(1.0), s])
        y = tape.op("Mul", [tape.op("Clip", [tape.op("Round", [tape.op("Div", [x, s])]), f32(-hi), f32(hi)]), s])
    elif mode == "dynamic":
        lo, hi = int_range(bits, signed=False)
        x_min = tape.op("Min", [tape.op("ReduceMin", [x], attributes={"keepdims": 0}), f32(0.0)])
        x_max = tape.op("Max", [tape.op("ReduceMax", [x], attributes={"keepdims": 0}), f32(0.0)])
        span = tape.op("Sub", [x_max, x_min])
        s = tape.op("Where", [tape.op("Greater", [span, f32(0.0)]), tape.op("Div", [span, f32(hi - lo)]), f32(1.0)])
        zp = tape.op("Clip", [tape.op("Round", [tape.op("Div", [tape.op("Neg", [x_min]), s])]), f32(lo), f32(hi)])
        q = tape.op("Clip", [tape.op("Add", [tape.op("Round", [tape.op("Div", [x, s])]), zp]), f32(lo), f32(hi)])
        y = tape.op("Mul", [tape.op("Sub", [q, zp]), s])
    else:
        raise UserError(f"doctor: activation mode '{mode}' is not known")
    out = tape.op("Where", [gate, y, x])
    for value in tape.initializers:
        graph.register_initializer(value)
    for new in tape.nodes:
        graph.insert_before(node, new)
    return out


# ------------------------------------------------------------------------------------------------
# The diagnosis

# Passes that only lay out or lower what the quantizing passes chose: the doctor reads the IR before them.
LAYOUT_PASSES = (FoldPermutationPass.name, FusePass.name, LowerOrtPass.name)
BOOST_BITS = 1.0
# Re-measurements of the allocate-bits choice (repeated while each lowers the probe error). One:
# on SmolLM2 at 3 bits a second round lowered the probe batch's KL (0.553 -> 0.546) but raised the
# held-out perplexity (52.4 -> 53.1; benchmarks/results/doctor_suggestion_rounds.json): further
# rounds fit the probe batch, not the model.
REFINE_ROUNDS = 1
# Passes that learn or compensate the weights' rounding after `quantize-weights`; the doctor suggests the first
# where none is in the pipeline (it does not stack a second learner on gptq's codes).
ROUNDING_PASSES = (FlexRoundPass.name, TuneScalesPass.name, GPTQPass.name)


def diagnose(
    source: Any,
    pipeline: str,
    *,
    max_extra_bits: float = 0.25,
    metric: str = "auto",
    probe_batches: int = 1,
    bits_only: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Run the pipeline, rank layers and passes by what they cost, and suggest a pipeline change.
    `options`: compile options by name, those in `qcompiler.driver.options.DIAGNOSIS_OPTIONS`
    (calibration, calib_count, threads, cache_dir, ..., probe_inputs).
    The error is measured on `probe_inputs`; by default the first `probe_batches` calibration
    batches joined into one (more data than the probe batch drift uses: each run costs in
    proportion, and one batch's measurements are noisy), else the source's probe batch
    (`qcompiler.analysis.probe`).
    `metric`: "mse", "kl", or "auto" (kl for a bundled causal LM, mse otherwise).
    `bits_only`: suggest bit-width changes only, never an added pass (learned rounding costs
    compile time).
    `workers`, `ray_address`: fan the pipeline's measurements out on Ray, as for `compile`
    (`qcompiler.support.parallel`); the diagnosis is the same."""
    from qcompiler.driver.options import DIAGNOSIS_OPTIONS, CompileOptions, check_keywords
    from qcompiler.driver.session import Session
    from qcompiler.ir.float_types import cast_float_feeds

    check_keywords(options, "diagnose", DIAGNOSIS_OPTIONS)
    if not 0.0 < max_extra_bits <= 8.0:
        raise UserError(f"doctor: --max-extra-bits must be in (0, 8], got {max_extra_bits}")
    if isinstance(probe_batches, bool) or not isinstance(probe_batches, int) or probe_batches < 1:
        raise UserError(f"doctor: --probe-batches must be a positive integer, got {probe_batches}")
    if metric not in ("auto", *METRICS):
        raise UserError(f"doctor: --metric must be auto, {' or '.join(METRICS)}, got '{metric}'")
    session = Session(CompileOptions(source=source, pipeline=pipeline, **options))
    full, probe_inputs, threads = session.passes, session.options.probe_inputs, session.options.threads
    passes = [p for p in full if p.name not in LAYOUT_PASSES]
    model = session.load()
    session.to_float32()
    _check_fits(model)
    drift_feeds = cast_float_feeds(session.load_data(hold_apart=False).feeds, model)
    source_info, batches = session.source, session.calibration
    feeds = probe_inputs if probe_inputs is not None else joined(batches[:probe_batches]) if batches else drift_feeds
    feeds = cast_float_feeds(feeds, model)
    if metric == "auto":
        metric = "kl" if getattr(source_info.bundled, "task", None) == "perplexity" else "mse"
    with session.context() as ctx:
        return _diagnose(full, passes, model, source_info, feeds, drift_feeds, metric, ctx, threads, max_extra_bits, bits_only)


def _check_fits(model: ir.Model) -> None:
    """Refuse, before any pass runs, a model whose weights the doctor's copies would not fit in the
    memory available now: it holds the float and quantized stages and each layer's float, quantized
    and raised weights, all in float32 (`WEIGHT_COPIES`)."""
    from qcompiler.support import memory

    floats = sum(v.const_value.size * 4 for v in model.graph.initializers.values()
                 if v.const_value is not None and v.const_value.dtype.is_floating_point())
    need, free = WEIGHT_COPIES * floats, memory.available_bytes()
    if free is not None and need > free:
        raise UserError(
            f"doctor: this model's weights are {floats / 1e9:.2f} GB in float32 and the doctor holds about {WEIGHT_COPIES} "
            f"copies of them ({need / 1e9:.1f} GB), {free / 1e9:.1f} GB are available; diagnose a smaller model of the same "
            f"architecture, or compile with --report for each layer's error, measured block by block"
        )


def _diagnose(full, passes, model: ir.Model, source_info, feeds: dict[str, np.ndarray], drift_feeds, metric: str, ctx,
              threads: int | None, max_extra_bits: float, bits_only: bool) -> dict[str, Any]:
    from qcompiler.pipeline.context import using

    names = [p.name for p in passes]
    boosted = None
    if Allocate.name in names:  # the same pipeline at a raised budget, for the boost option
        allocator = passes[names.index(Allocate.name)]
        boosted = [dataclasses.replace(p, avg_bits=p.avg_bits + BOOST_BITS) if p is allocator else p for p in passes]
    original = _copy(model) if Allocate.name in names or QuantizeWeights.name in names else None
    trials = _Trials(original, ctx) if original is not None else None
    stages = _Stages()
    with using(ctx):
        # on Ray the raised budget's run starts now, on a worker, beside the pipeline's own run here
        high_trial = trials.start(boosted, "doctor: the pipeline at a raised budget") if boosted is not None else None
        records = run_pipeline(model, passes, [instruments.Verify(), instruments.Drift(drift_feeds), stages])
        layers, skipped = quantized_layers(stages.float_stage, model)
        high_records = []
        if high_trial is not None and layers:
            log.info("doctor: the pipeline again at %g average bits, for the boost option", allocator.avg_bits + BOOST_BITS)
            # only allocate-bits differs, so the float stage is the first run's
            high_model, high_records = high_trial.result()
            high = {layer.name: layer for layer in quantized_layers(stages.float_stage, high_model)[0]}
            for layer in layers:
                if layer.name in high and not layer.embedding:  # a table is kept, never boosted
                    layer.w_high = high[layer.name].w_quant
            del high_model
    if not layers:
        raise UserError("doctor: the pipeline quantizes no layer the doctor can read; give a pipeline with quantize or allocate-bits/quantize-weights")
    board = Switchboard(stages.float_stage, layers, feeds, threads, metric)
    everything = {layer.name for layer in layers}
    total = board.error(everything)
    bits, high_bits = _layer_bits(records), _layer_bits(high_records)
    queries = []  # per layer: alone, all but it, (all with it boosted)
    for layer in layers:
        queries += [(frozenset({layer.name}), frozenset()), (frozenset(everything - {layer.name}), frozenset())]
        if layer.w_high is not None:
            queries.append((frozenset(everything), frozenset({layer.name})))
    measured = iter(board.errors(queries, ctx.executor, "doctor: layer measurements"))
    rows = []
    for layer in layers:
        row = {
            "layer": layer.name,
            "params": layer.params,
            "activation": (layer.act or {}).get("mode"),
            "bits": bits.get(layer.name),
            **({"embedding": True} if layer.embedding else {}),
            "alone": next(measured),
            "recovered": total - next(measured),
        }
        if layer.w_high is not None:
            row["boosted_bits"] = high_bits.get(layer.name)
            row["recovered_by_boost"] = total - next(measured)
        row["share"] = row["recovered"] / total if total > 0 else 0.0
        rows.append(row)
    rows.sort(key=lambda r: (-r["recovered"], r["layer"]))
    suggestion = _suggest(full, rows, total, board, everything, max_extra_bits, ctx.executor)
    if suggestion.get("pipeline") and Allocate.name in names:
        with using(ctx):
            suggestion = _measure_allocations(suggestion, passes, records, trials, stages.float_stage, board, total, max_extra_bits)
    if not bits_only and _rounding_dominates(full, records):
        with using(ctx):
            suggestion = _measure_learned_rounding(suggestion, full, trials, stages.float_stage, board, total)
    del original, trials
    return {
        "schema": "qcompiler.tools.doctor/1",
        "source": source_info.name,
        "pipeline": format_pipeline(full),
        "metric": metric,
        "metric_doc": METRICS[metric],
        "measured_on": {name: list(np.shape(a)) for name, a in sorted(feeds.items())},
        "error_all_quantized": total,
        "layers": rows,
        "skipped_layers": skipped,
        "passes": _pass_costs(records),
        "suggestion": suggestion,
    }


def joined(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Calibration batches as one batch (stacked along the first axis of every input)."""
    if len(batches) == 1:
        return dict(batches[0])
    shapes = {tuple(tuple(np.shape(a)[1:]) for _, a in sorted(b.items())) for b in batches}
    if len(shapes) > 1 or {frozenset(b) for b in batches} != {frozenset(batches[0])}:
        raise UserError("doctor: the calibration batches to join differ in inputs or shape (padded to different "
                        "lengths); give --probe-batches 1, or calibration data of one length")
    return {name: np.concatenate([np.asarray(b[name]) for b in batches]) for name in batches[0]}


def _layer_bits(records: list[PassRecord]) -> dict[str, float]:
    """Stored bits per weight of each layer, by weight name, from allocate-bits' statistics."""
    S = Allocate.Stats
    for record in records:
        if record.name == Allocate.name:
            return {v[S.WEIGHT]: v.get(S.BITS_PER_WEIGHT) for v in record.stats.get(S.PER_LAYER, {}).values() if S.WEIGHT in v}
    return {}


def _pass_costs(records: list[PassRecord]) -> list[dict]:
    """Each pass's share of the output drift: the rise in (1 - cosine) it caused."""
    costs, before = [], 0.0
    for record in records:
        after = 1.0 - (record.drift or {}).get("cosine", 1.0)
        costs.append({"pass": record.spec, "seconds": record.seconds, "drift_added": after - before, "cosine_after": 1.0 - after})
        before = after
    return costs


def _suggest(passes, rows, total, board: Switchboard, everything: set[str], max_extra_bits: float, executor) -> dict:
    names = [p.name for p in passes]
    if Allocate.name in names:
        index = names.index(Allocate.name)
        allocator = passes[index]
        # a table can be kept at 8 bits only where allocate-bits stores it (embeddings=budget), and only if it has fewer
        rows = [row for row in rows if not row.get("embedding")
                or (allocator.embeddings == "budget" and (row["bits"] or 0) < TABLE_KEEP_BITS)]
        keep, boost, extra = _choose_upgrades(rows, allocator, max_extra_bits)
        refinement = []
        while (keep or boost) and len(refinement) < REFINE_ROUNDS and (not refinement or refinement[-1]["kept"] == "refilled"):
            keep, boost, extra, record = _refine_upgrades(rows, allocator, max_extra_bits, board, everything, keep, boost, extra,
                                                          executor)
            refinement.append(record)
        chosen = keep + boost
        changed = dataclasses.replace(
            allocator, keep=tuple(sorted(set(allocator.keep) | set(keep))), keep_bits=KEEP_BITS,
            boost=tuple(sorted(set(allocator.boost) | set(boost))), boost_bits=BOOST_BITS,
        )
        parts = ([f"keep {len(keep)} layers at {KEEP_BITS} bits"] if keep else []) + \
            ([f"give {len(boost)} layers {BOOST_BITS:g} more bit per weight"] if boost else [])
        change = f"{' and '.join(parts)} (+{extra:.3f} average bits)"
        predicted = min(refinement[-1]["choice_error"], refinement[-1]["refilled_error"]) if refinement else total
    elif Quantize.name in names:
        index = names.index(Quantize.name)
        quantizer = passes[index]
        boost, refinement = [], []
        rows = [row for row in rows if not row.get("embedding")]  # quantize{keep} names layers, not tables
        chosen, predicted = _keep_in_float(rows, everything, total, board, executor)
        keep = list(chosen)
        changed = dataclasses.replace(quantizer, keep=tuple(sorted(set(quantizer.keep) | set(chosen))))
        extra = None
        change = f"keep {len(chosen)} layers in float"
    else:
        return {"change": "none: the pipeline has no allocate-bits or quantize pass to adjust", "pipeline": None}
    if not chosen:
        return {"change": "none: no layer recovers error within the allowed extra bits", "pipeline": None}
    suggested = list(passes)
    suggested[index] = changed
    return {
        "change": change,
        "layers": chosen,
        "keep": keep,
        "boost": boost,
        "extra_bits": extra,
        "predicted_error": predicted,
        "predicted_recovery": (total - predicted) / total if total > 0 else 0.0,
        "pipeline": format_pipeline(suggested),
        **({"refinement": refinement} if refinement else {}),
    }


KEEP_IN_FLOAT = 8  # layers an int8 suggestion keeps in float at most


def _keep_in_float(rows: list[dict], everything: set[str], total: float, board: Switchboard, executor) -> tuple[list[str], float]:
    """The int8 walk: the layers in order of recovered error (none that recovers nothing), kept in
    float one more at a time until the predicted error halves, at most `KEEP_IN_FLOAT`. In-process
    the walk measures one prefix after another and stops at the first that halves the error; on a
    Ray executor every prefix is measured as one batch (`Switchboard.errors`) and the walk reads
    them in order: the same choice, the measurements at once."""
    from qcompiler.support.parallel import InProcess

    candidates = []
    for row in rows:
        if total <= 0 or len(candidates) >= KEEP_IN_FLOAT or row["recovered"] <= 0:
            break
        candidates.append(row["layer"])
    if isinstance(executor, InProcess):
        errors = (board.error(everything - set(candidates[:k])) for k in range(1, len(candidates) + 1))
    else:
        queries = [(frozenset(everything - set(candidates[:k])), frozenset()) for k in range(1, len(candidates) + 1)]
        errors = iter(board.errors(queries, executor, "doctor: layers kept in float"))
    chosen, predicted = [], total
    for layer, error in zip(candidates, errors):
        chosen.append(layer)
        predicted = error
        if predicted <= total / 2:
            break
    return chosen, predicted


def _measure_allocations(suggestion: dict, passes, records, trials: _Trials, float_stage: ir.Model, board: Switchboard,
                         total: float, max_extra_bits: float) -> dict:
    """Run the suggested allocation, and the same upgrades under a model-wide budget with measured
    layer sensitivity (`scope=model sensitivity=output`, when the pipeline budgets per layer), and
    measure each one's output error on the probe batch with the weights it actually produces (the
    choice itself approximates kept layers by float and adds the upgrades' gains). Returns the
    suggestion with the lower error within `max_extra_bits`; every measurement under `measured`.
    On Ray the runs are tasks side by side (`_Trials`)."""
    names = [p.name for p in passes]
    index = names.index(Allocate.name)
    chosen = parse_pipeline(suggestion["pipeline"])
    allocator = next(p for p in chosen if p.name == Allocate.name)
    base_bits = _bits_per_weight(records)
    variants = [("as chosen", allocator)]
    if allocator.scope == "layer" or allocator.sensitivity == "off":
        variants.append(("model-wide budget with measured layer sensitivity",
                         dataclasses.replace(allocator, scope="model", sensitivity="output")))
    measured, started = [], []
    for label, variant in variants:
        trial = list(passes)
        trial[index] = variant
        started.append((label, variant, trials.start(trial, f"doctor: the suggestion ({label})")))
    for label, variant, running in started:
        log.info("doctor: measuring the suggestion (%s)", label)
        error, trial_records = _measured(running.result(), float_stage, board)
        extra = _bits_per_weight(trial_records) - base_bits
        measured.append({"label": label, "error": error, "extra_bits": round(extra, 4),
                         "pipeline": format_pipeline([variant if p.name == Allocate.name else p for p in chosen])})
    within = [m for m in measured if m["extra_bits"] <= max_extra_bits + 1e-9] or measured[:1]
    best = min(within, key=lambda m: m["error"])
    result = dict(suggestion, pipeline=best["pipeline"], predicted_error=best["error"], extra_bits=best["extra_bits"],
                  predicted_recovery=(total - best["error"]) / total if total > 0 else 0.0, measured=measured)
    if best["label"] != "as chosen":
        result["change"] = f"{suggestion['change']}, with a {best['label']}"
    return result


def _measured(run: tuple[ir.Model, list[PassRecord]], float_stage: ir.Model, board: Switchboard) -> tuple[float, list[PassRecord]]:
    """The output error on the probe batch of the weights a pipeline run left in its model, with its records."""
    model, records = run
    weights = {layer.name: layer.w_quant for layer in quantized_layers(float_stage, model)[0]}
    del model, run
    return board.error(set(weights), weights=weights), records


def _rounding_dominates(full, records: list[PassRecord]) -> bool:
    """The pipeline rounds weights with `quantize-weights`, nothing learns that rounding yet, and
    `quantize-weights` is the pass that adds the most output drift."""
    names = [p.name for p in full]
    if QuantizeWeights.name not in names or any(name in names for name in ROUNDING_PASSES):
        return False
    costs = _pass_costs(records)
    worst = max(costs, key=lambda c: c["drift_added"], default=None)
    return worst is not None and worst["pass"].split("{")[0] == QuantizeWeights.name and worst["drift_added"] > 0


def _measure_learned_rounding(suggestion: dict, full, trials: _Trials, float_stage: ir.Model, board: Switchboard,
                              total: float) -> dict:
    """Add `flexround` (learned rounding, its default steps) after `quantize-weights` in the suggested
    pipeline (or the given one, when no bit change was found), run it and measure the weights it
    produces on the probe batch; suggest it when it lowers the error. It adds compile time, not bits."""
    base = parse_pipeline(suggestion["pipeline"]) if suggestion.get("pipeline") else list(full)
    base_error = suggestion["predicted_error"] if suggestion.get("pipeline") else total
    rounding = parse_pipeline(ROUNDING_PASSES[0])[0]
    names = [p.name for p in base]
    with_rounding = base[: names.index(QuantizeWeights.name) + 1] + [rounding] + base[names.index(QuantizeWeights.name) + 1:]
    log.info("doctor: measuring learned rounding (%s)", format_pipeline([rounding]))
    # in the compiling process, where torch runs the learning on every core (a Ray task gets one)
    error, _ = _measured(trials.here([p for p in with_rounding if p.name not in LAYOUT_PASSES]), float_stage, board)
    measured = list(suggestion.get("measured", [])) + [
        {"label": "with learned rounding", "error": error, "extra_bits": suggestion.get("extra_bits") or 0.0,
         "pipeline": format_pipeline(with_rounding)}]
    if error >= base_error:
        return dict(suggestion, measured=measured)
    what = f"learn the weight rounding ({format_pipeline([rounding])} after quantize-weights; compile time, no bits)"
    change = f"{suggestion['change']}; and {what}" if suggestion.get("pipeline") else what
    return dict(suggestion, change=change, pipeline=format_pipeline(with_rounding), predicted_error=error,
                predicted_recovery=(total - error) / total if total > 0 else 0.0, measured=measured,
                added_passes=[rounding.name], pipeline_bits_only=suggestion.get("pipeline"),
                **({} if suggestion.get("pipeline") else {"extra_bits": 0.0, "layers": []}))


def _bits_per_weight(records: list[PassRecord]) -> float:
    """allocate-bits' stored bits per weight of the whole model."""
    return next(r.stats[Allocate.Stats.PREDICTED_BITS_PER_WEIGHT] for r in records if r.name == Allocate.name)


def _choose_upgrades(rows: list[dict], allocator, max_extra_bits: float) -> tuple[list[str], list[str], float]:
    """Per layer at most one upgrade (keep at KEEP_BITS, or boost by BOOST_BITS), taken greedily by
    recovered error per added stored bit while the model's average stays within `max_extra_bits`."""
    options = []
    for row in rows:
        costs = _upgrade_costs(row, allocator)
        options.append((row["recovered"], costs["keep"], "keep", row["layer"]))
        if "boost" in costs:
            options.append((row["recovered_by_boost"], costs["boost"], "boost", row["layer"]))
    return _fill(options, sum(r["params"] for r in rows), max_extra_bits)


def _upgrade_costs(row: dict, allocator) -> dict[str, float]:
    """Stored bits each upgrade of the layer adds: keep (all channels at KEEP_BITS), boost (the
    layer's allocation at BOOST_BITS more), the latter only where it was measured."""
    current = row["bits"] if row["bits"] is not None else allocator.avg_bits
    kept = KEEP_BITS + 32.0 / allocator.group_size
    if row.get("embedding"):  # a kept table leaves the budget: the rest get back its share, avg-bits a weight
        current, kept = allocator.avg_bits, TABLE_KEEP_BITS
    costs = {"keep": max(kept - current, 1e-3) * row["params"]}
    if row.get("recovered_by_boost") is not None:
        raised = row["boosted_bits"] if row.get("boosted_bits") is not None else current + BOOST_BITS
        costs["boost"] = max(raised - current, 1e-3) * row["params"]
    return costs


def _fill(options: list[tuple], weights: int, max_extra_bits: float) -> tuple[list[str], list[str], float]:
    """Take (gain, cost, kind, layer) options by gain per cost, one per layer, within the budget."""
    options = sorted(options, key=lambda o: (-o[0] / o[1], o[3], o[2]))
    taken: dict[str, str] = {}
    extra = 0.0
    for gain, cost, kind, layer in options:
        if gain <= 0 or layer in taken or extra + cost / weights > max_extra_bits:
            continue
        taken[layer] = kind
        extra += cost / weights
    keep = sorted(name for name, kind in taken.items() if kind == "keep")
    boost = sorted(name for name, kind in taken.items() if kind == "boost")
    return keep, boost, extra


def _refine_upgrades(rows: list[dict], allocator, max_extra_bits: float, board: Switchboard, everything: set[str],
                     keep: list[str], boost: list[str], extra: float, executor) -> tuple[list[str], list[str], float, dict]:
    """One round of re-measurement where the choice landed. Quantization errors interact
    (the gains measured one layer at a time, from the all-quantized model, add up to about twice
    what their union recovers on SmolLM2), so at the chosen set each chosen upgrade is valued by
    the error its removal adds back, and each layer left out that had a positive gain by the error
    its boost removes; the budget is filled again from those values, and the new set is kept if it
    measures lower. The round's runs (the choice, one per chosen upgrade, one per candidate boost)
    are independent: they run as one batch on `executor` (`Switchboard.errors`), in order."""
    costs = {row["layer"]: _upgrade_costs(row, allocator) for row in rows}
    chosen = set(keep) | set(boost)
    candidates = [row["layer"] for row in rows
                  if row["layer"] not in chosen and "boost" in costs[row["layer"]] and row["recovered_by_boost"] > 0]
    quantized, high = frozenset(everything - set(keep)), frozenset(boost)
    queries = [(quantized, high)]
    queries += [(frozenset(everything - (set(keep) - {layer})), high) for layer in keep]
    queries += [(quantized, frozenset(set(boost) - {layer})) for layer in boost]
    queries += [(quantized, frozenset(set(boost) | {layer})) for layer in candidates]
    measured = iter(board.errors(queries, executor, "doctor: re-measurement at the choice"))
    at = next(measured)
    options = [(next(measured) - at, costs[layer]["keep"], "keep", layer) for layer in keep]
    options += [(next(measured) - at, costs[layer]["boost"], "boost", layer) for layer in boost]
    options += [(at - next(measured), costs[layer]["boost"], "boost", layer) for layer in candidates]
    new_keep, new_boost, new_extra = _fill(options, sum(r["params"] for r in rows), max_extra_bits)
    refined = board.error(everything - set(new_keep), set(new_boost))
    log.info("doctor: re-measured at the choice: error %.4g, refilled %.4g", at, refined)
    record = {"choice_error": at, "choice_layers": len(keep) + len(boost), "refilled_error": refined,
              "refilled_layers": len(new_keep) + len(new_boost), "kept": "refilled" if refined < at else "choice"}
    if refined < at:
        return new_keep, new_boost, new_extra, record
    return keep, boost, extra, record


def format_diagnosis(result: dict, top: int = 15) -> str:
    lines = [
        f"doctor: {result['source']}",
        f"pipeline: {result['pipeline']}",
        f"output error, all layers quantized: {result['error_all_quantized']:.4g} ({result['metric_doc']}, "
        f"on {', '.join(f'{k} {v}' for k, v in result['measured_on'].items())})",
        "",
        "passes (drift added = rise of 1 - cosine of the output vs float):",
    ]
    for p in result["passes"]:
        lines.append(f"  {p['drift_added']:+.3e}  cos {p['cosine_after']:.6f}  {p['seconds']:7.2f} s  {p['pass'].split('{')[0]}")
    lines.append("")
    lines.append(f"layers, ranked by the error recovered when left in float (top {min(top, len(result['layers']))} of {len(result['layers'])}):")
    lines.append(f"  {'rank':>4}  {'recovered':>10}  {'share':>6}  {'alone':>10}  {'bits':>5}  {'by boost':>10}  layer")
    for rank, row in enumerate(result["layers"][:top], 1):
        bits = f"{row['bits']:.2f}" if row["bits"] is not None else "-"
        boost = f"{row['recovered_by_boost']:10.3e}" if row.get("recovered_by_boost") is not None else f"{'-':>10}"
        lines.append(f"  {rank:>4}  {row['recovered']:10.3e}  {row['share']:6.1%}  {row['alone']:10.3e}  {bits:>5}  {boost}  "
                     f"{_printable(row['layer'])}")
    lines.append("  (recovered: error removed by leaving the layer in float; by boost: by giving it "
                 f"{BOOST_BITS:g} more bit per weight; alone: the error with only this layer quantized)")
    for skipped in result["skipped_layers"]:
        lines.append(f"  not analysed: {_printable(skipped['layer'])}: {skipped['why']}")
    s = result["suggestion"]
    lines.append("")
    lines.append(f"suggestion: {s['change']}")
    if s.get("pipeline"):
        lines.append(f"  predicted output error {result['error_all_quantized']:.4g} -> {s['predicted_error']:.4g} "
                     f"({s['predicted_recovery']:.0%} recovered)")
        for i, r in enumerate(s.get("refinement", []), 1):
            lines.append(f"  re-measurement {i}: at the choice ({r['choice_layers']} layers) error {r['choice_error']:.4g}; "
                         f"refilled ({r['refilled_layers']} layers): {r['refilled_error']:.4g}; kept the {r['kept']}")
        for m in s.get("measured", []):
            lines.append(f"  measured: {m['label']}: output error {m['error']:.4g} at {m['extra_bits']:+.4f} average bits")
        lines.append(f"  pipeline: {s['pipeline']}")
    return "\n".join(lines) + "\n"


def _printable(name: str) -> str:
    return name.encode("unicode_escape").decode("ascii")
