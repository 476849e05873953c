"""Block-sequential calibration: run the float graph one segment at a time.

`calibration.collect` runs the whole model in one ONNX Runtime session, which holds a copy of every
weight. `collect_sequential` instead cuts the main graph into consecutive *segments* at the block
boundaries of `qcompiler.analysis.blocks.find_blocks` (one transformer layer or conv stage each; an
embedding before the first block and a head after the last belong to the first and last segment),
and runs them in order:

- a segment's inputs are the values it reads that earlier segments or the graph inputs produce;
  its outputs are the values later segments read, plus the calibrated tensors it produces
  (graph outputs no later segment reads are not fetched: calibration does not need them);
- for each segment a small model of just its nodes and the initializers they read is built (its
  weights only; weights still memory-mapped from the source are read when its session loads), one
  ONNX Runtime session runs it over every calibration batch in data order, fed the stored
  crossing values of that batch, and the calibrated tensors are folded into their accumulators;
  the session is then released and the crossing values no later segment reads are dropped.

The statistics are those of the whole-model run bit for bit: every accumulator sees the same
arrays in the same batch order. ONNX Runtime computes a segment's values as it does inside the
whole graph as long as no fusion spans a cut; a block's closing residual Add (and the bias Adds
feeding it alone) therefore starts the next segment, beside the norm it fuses with
(`_residual_tail`). `tests/test_calib_sequential.py` checks it on transformers and conv nets, and
in the slow tier on MiniLM and SmolLM2.

Crossing values are kept in memory; once those held for all batches pass `SPILL_BYTES` they are
written to a temporary folder as `.npy` files and memory-mapped back (the folder is removed
afterwards, on error too).

A graph that cannot be cut (fewer than two blocks, nodes out of topological order, or a node
with a subgraph) is not handled here: `cut_segments` returns None and the caller runs it whole.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.blocks import find_blocks
from qcompiler.errors import UserError, first_line, shown
from qcompiler.support import memory

log = logging.getLogger(__name__)

SPILL_BYTES = 1 << 30  # crossing values held for all batches past this go to .npy files, memory-mapped back


@dataclasses.dataclass
class Segment:
    index: int
    nodes: list[ir.Node]
    inputs: list[ir.Value]  # read here, produced by earlier segments or graph inputs
    outputs: list[ir.Value]  # produced here, read by later segments
    calibrated: list[str]  # calibrated tensors produced here, in the order they were asked for
    initializers: list[ir.Value]  # the constants its nodes read

    @property
    def fetched(self) -> list[str]:
        return list(dict.fromkeys([v.name for v in self.outputs] + self.calibrated))


def cut_segments(model: ir.Model, tensors: Iterable[str]) -> list[Segment] | None:
    """The main graph cut into consecutive segments at `find_blocks`' boundaries, or None when it
    cannot be cut (fewer than two blocks, nodes out of topological order, or a node with a
    subgraph, whose outer-scope reads a segment would not see)."""
    nodes = list(model.graph)
    if not _sorted(nodes) or any(_has_subgraph(node) for node in nodes):
        return None
    blocks = find_blocks(model.graph, any_symbols=True)
    if len(blocks) < 2:
        return None
    wanted = list(tensors)
    segment_of = {}
    for block in blocks:
        for node in block.nodes:
            segment_of[node] = block.index
    if len(segment_of) != len(nodes):
        return None
    for block in blocks[:-1]:
        for node in _residual_tail(block.nodes):
            segment_of[node] = block.index + 1
    members: list[list[ir.Node]] = [[] for _ in blocks]
    for node in nodes:
        members[segment_of[node]].append(node)
    last_reader = _last_readers(segment_of)
    produced_in = {out: segment_of[node] for node in nodes for out in node.outputs}
    by_name = {v.name: v for v in produced_in}
    segments = []
    for index, members_of in enumerate(members):
        inputs, initializers, seen = [], [], set()
        for node in members_of:
            for value in node.inputs:
                if value is None or value in seen:
                    continue
                seen.add(value)
                if value.is_initializer() and value.const_value is not None:
                    initializers.append(value)
                elif produced_in.get(value, -1) != index:
                    inputs.append(value)
        outputs = [out for node in members_of for out in node.outputs if last_reader.get(out, -1) > index]
        calibrated = [name for name in wanted if name in by_name and produced_in[by_name[name]] == index]
        segments.append(Segment(index, members_of, inputs, outputs, calibrated, initializers))
    return segments


def _residual_tail(nodes: list[ir.Node]) -> list[ir.Node]:
    """The nodes that move from the end of a block to the start of the next segment: the block's
    residual Add and the bias Adds that alone feed it. ONNX Runtime fuses them with the norm that
    reads the sum (SkipLayerNormalization, bias included); in one segment they fuse as in the whole
    graph, and the values computed are the same."""
    last = nodes[-1]
    if last.op_type not in ("Add", "Sum"):
        return []
    inside = set(nodes)
    tail, stack = [last], [last]
    while stack:
        for value in stack.pop().inputs:
            producer = None if value is None else value.producer()
            if (
                producer is not None and producer in inside and producer.op_type == "Add" and len(value.uses()) == 1
                and any(v is not None and v.const_value is not None for v in producer.inputs)
            ):
                tail.append(producer)
                stack.append(producer)
    return tail


def _sorted(nodes: list[ir.Node]) -> bool:
    """Whether every node reads only values produced before it (or graph inputs and initializers)."""
    seen = set()
    for node in nodes:
        for value in node.inputs:
            producer = None if value is None else value.producer()
            if producer is not None and producer not in seen:
                return False
        seen.add(node)
    return True


def _has_subgraph(node: ir.Node) -> bool:
    return any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values())


def _last_readers(segment_of: dict[ir.Node, int]) -> dict[ir.Value, int]:
    """Value -> index of the last segment that reads it (graph outputs count as read by none:
    calibration does not need them)."""
    last: dict[ir.Value, int] = {}
    for node, index in segment_of.items():
        for value in node.inputs:
            if value is not None:
                last[value] = max(last.get(value, -1), index)
    return last


def segment_model(model: ir.Model, segment: Segment, arrays: dict[str, np.ndarray]) -> ir.Model:
    """A model of just `segment`'s nodes and the initializers they read (the tensors are shared
    with `model`, not copied). `arrays` (a batch's crossing values) gives the type of an input
    whose type the graph does not record."""
    view = ir.GraphView(
        segment.inputs, [*segment.outputs, *_values_named(segment, segment.calibrated)], nodes=segment.nodes,
        initializers=segment.initializers, opset_imports=dict(model.opset_imports), name=f"segment{segment.index}",
    )
    graph = view.clone()
    for value in graph.inputs:
        if value.type is None and value.name in arrays:
            array = arrays[value.name]
            value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
            value.shape = ir.Shape([None] * array.ndim)
    # Duplicate graph outputs (a calibrated tensor that later segments read too) are dropped.
    unique = list({id(v): v for v in graph.outputs}.values())
    graph.outputs.clear()
    graph.outputs.extend(unique)
    return ir.Model(graph, ir_version=model.ir_version, functions=list(model.functions.values()))


def _values_named(segment: Segment, names: list[str]) -> list[ir.Value]:
    produced = {out.name: out for node in segment.nodes for out in node.outputs}
    return [produced[name] for name in names]


class CrossingStore:
    """The crossing values of every batch (batch index -> name -> array), in memory until their
    total passes `spill_bytes`, then in `.npy` files of a temporary folder, memory-mapped back.
    `close` removes the folder."""

    def __init__(self, batches: int, spill_bytes: int):
        self.values: list[dict[str, np.ndarray]] = [{} for _ in range(batches)]
        self.spill_bytes = spill_bytes
        self.held = 0
        self.folder: Path | None = None
        self.files = 0
        self.spilled: set[tuple[int, str]] = set()  # (batch, name) held in a file of `folder`
        self.counted: set[tuple[int, str]] = set()  # (batch, name) held in memory, counted in `held`

    def keep(self, batch: int, name: str, array: np.ndarray) -> None:
        """Hold a caller's array (a graph input) as it is: never counted, spilled or removed."""
        self.values[batch][name] = array

    def put(self, batch: int, name: str, array: np.ndarray) -> None:
        array = np.asarray(array)
        if self.held + array.nbytes > self.spill_bytes:
            array = self._spill(array)
            self.spilled.add((batch, name))
        else:
            self.held += array.nbytes
            self.counted.add((batch, name))
        self.values[batch][name] = array

    def _spill(self, array: np.ndarray) -> np.ndarray:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="qcompiler-calib-"))
            log.info("calibration: crossing values past %.1f GB go to %s", self.spill_bytes / 1e9, self.folder)
        path = self.folder / f"{self.files}.npy"
        self.files += 1
        np.save(path, np.ascontiguousarray(array), allow_pickle=False)
        return np.load(path, mmap_mode="r", allow_pickle=False)

    def drop(self, names: Iterable[str]) -> None:
        """Forget `names` in every batch (a spilled array's file is removed; its disk space is
        freed once the map closes)."""
        names = list(names)
        for index, batch in enumerate(self.values):
            for name in names:
                array = batch.pop(name, None)
                if (index, name) in self.spilled:
                    self.spilled.discard((index, name))
                    Path(array.filename).unlink(missing_ok=True)
                elif array is not None and (index, name) in self.counted:
                    self.counted.discard((index, name))
                    self.held -= array.nbytes

    def close(self) -> None:
        self.values = []
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def check_fits(segment: Segment, count: int) -> None:
    """Refuse, naming the block, a block whose weights (float32, as its session holds them) need
    more memory than the machine has available now: it would swap or be killed."""
    need = sum(v.const_value.nbytes for v in segment.initializers if v.const_value is not None)
    free = memory.available_bytes()
    if free is not None and need > free:
        first = segment.nodes[0].name or segment.nodes[0].op_type if segment.nodes else "?"
        raise UserError(
            f"block {segment.index + 1} of {count} (from node '{shown(first)}') needs {need / 1e9:.2f} GB for its weights "
            f"and {free / 1e9:.2f} GB of memory are available; free memory or compile on a machine with more"
        )


def collect_sequential(
    model: ir.Model,
    segments: list[Segment],
    feeds: list[dict[str, np.ndarray]],
    accs: dict,
    *,
    threads: int | None = None,
    progress: Callable | None = None,
    spill_bytes: int | None = None,
    first_samples: list[int] | None = None,
) -> None:
    """Run `segments` in order over the checked batches `feeds`, folding each calibrated tensor
    into `accs[name]` in batch order. `progress(batches_done, samples_done)` follows the last
    segment's batches. `spill_bytes`: the bound past which crossing values go to files
    (default `SPILL_BYTES`). `first_samples[i]`: the first sample of batch i in the data (numbers
    the sampled rows as `calibration.collect` does; default: the samples of the batches before)."""
    from qcompiler.analysis.calib_data import batch_size_of
    from qcompiler.analysis.sessions import ort_session
    from qcompiler.support.progress import progress as progress_bar

    if first_samples is None:
        first_samples = np.cumsum([0] + [batch_size_of(b) for b in feeds[:-1]]).tolist() if feeds else []
    last_reader: dict[str, int] = {}
    for segment in segments:
        for value in segment.inputs:
            last_reader[value.name] = segment.index
    store = CrossingStore(len(feeds), SPILL_BYTES if spill_bytes is None else spill_bytes)
    try:
        for index, batch in enumerate(feeds):
            for name, array in batch.items():
                if name in last_reader:
                    store.keep(index, name, array)
        runnable = [s for s in segments if s.fetched]
        with progress_bar("calibrate blocks", len(runnable)) as bar:
            for done, segment in enumerate(runnable):
                start = time.perf_counter()
                check_fits(segment, len(segments))
                session = ort_session(segment_model(model, segment, store.values[0] if feeds else {}), threads)
                fetched = segment.fetched
                kept = {v.name for v in segment.outputs}
                samples = 0
                for index in range(len(feeds)):
                    inputs = {v.name: store.values[index][v.name] for v in segment.inputs}
                    try:
                        outputs = session.run(fetched, inputs)
                    except Exception as exc:
                        raise UserError(
                            f"ONNX Runtime could not run block {segment.index + 1} of the float model on calibration batch {index} "
                            f"({first_line(str(exc))}); check the calibration inputs' shapes"
                        ) from None
                    for i, name in enumerate(fetched):
                        if name in accs:
                            accs[name].add(outputs[i], first_samples[index], batch_size_of(feeds[index]))
                        if name in kept:
                            store.put(index, name, outputs[i])
                        outputs[i] = None
                    del outputs
                    samples += batch_size_of(feeds[index])
                    if progress is not None and done == len(runnable) - 1:
                        progress(index + 1, samples)
                del session
                store.drop([name for name, last in last_reader.items() if last <= segment.index])
                log.debug("calibration: block %d of %d, %.2f s", segment.index, len(segments), time.perf_counter() - start)
                bar.update(done + 1)
    finally:
        store.close()
