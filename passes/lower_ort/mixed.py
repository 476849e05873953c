"""Lowering of `qc.MixedMatMul` for ONNX Runtime (used by `lower-ort`).

Five routes (`lower-ort{mixed-route=...}`): split, single, auto, digits, expand.

`split` (the default wherever a class can take it): the layer becomes a sum of one product per
bit class, each over its own input columns (a Slice of X where the permutation is the identity on
the class's rows, e.g. after `fold-permutation`, else a GatherElements, which ONNX Runtime runs 4 to
9 times as fast as a Gather along the last axis). Every class runs from what
the file stores; nothing is expanded into a float32 weight when the session starts, except the
uniform classes with fractional zero points (asked for with `allocate-bits{other-widths=expand}`
or `zero-points=fractional`):
- uniform classes with integer zero points -> `com.microsoft.MatMulNBits` (K = the class's rows,
  block_size = group_size). ONNX Runtime 1.32's CPU kernel runs 2, 4 and 8 bits and refuses 3, 5,
  6 and 7 at session start, so a class of b bits is stored in containers of
  `bitcost.container_bits(b)` bits (3 -> 4, 5..7 -> 8; the codes and zero points fit unchanged and
  the budget paid for the container). Codes packed per column along K, a class's last block padded
  with code 0: in the file for a class of `bitcost.STORED_WHOLE_FROM` (16) blocks or more, else stored tight
  and padded by a Pad that ONNX Runtime folds at session start (the padding resident, not stored);
  fp16 scales cast to float32 at load (the kernel reads float32);
  zero points packed at the container width, or none for a symmetric class (every zero point the
  kernel's default 2^(c-1): measured 3 to 9 % faster per layer at a decoder's M=1 shapes,
  `benchmarks/nbits_shapes.py`). `accuracy_level` 4 computes in int8 (activations quantized per
  block: fast on x86 and Arm), 0 in float32 (the reference's numbers to round-off);
- fp16 classes (activation outlier channels) -> the fp16 weight cast to float32 at every run,
  then a float MatMul: the Cast reads the weight through a Reshape whose shape depends on X's
  shape, so ONNX Runtime cannot fold it into a resident float32 copy (x86 CPUs have no fp16
  MatMul; a plain Cast of an initializer, or an fp16 MatMul, both end as a float32 initializer).
  With `fp16_route="load"` the plain Cast: twice the class's bytes resident (the class is about
  0.5 % of the channels), and the per-run chain (Shape, Mul, Add, Reshape, Cast; the first two
  shared by the layers that read one input) gone;
- codebook classes -> a float MatMul of the weight expanded from the codes (bit-planes) and the
  fp16 table per column: at load by default (float32 resident), or with `codebook_route="run"` at
  every run (bit-planes read through an X-dependent Reshape, then BitShift / BitwiseAnd / ReduceSum
  and a Gather from the float32 table): resident what the file stores, but measured 316 ms against
  0.7 ms at M=1 for a 4096x4096 layer of codebook classes (onnxruntime 1.32, 2 threads), since
  every run rebuilds the K x N weight through several full-size tensors;
- uniform classes with fractional zero points -> a float MatMul of a weight expanded at load;
- sparse outliers -> float32 corrections (stored value minus the classes' dequantized value)
  multiplied by the gathered input columns and added with ScatterElements(reduction=add).
The partial products are added by one `Sum` (the bits of a chain of Adds, in one op). The route
taken is recorded on the layer's last node (`ROUTE_KEY`) for the manifest.

`single` (with `lower-ort{mixed-route=single}`): as `split`, but every MatMulNBits class of a layer
in one MatMulNBits, the classes' blocks one after another in containers of the widest class's width
(X gathered once, with a zero column at each class's padding, so the numbers are those of `split`).
One kernel instead of one per class, but a narrower class pays the wider width in bytes; measured
slower at M=1 where a layer has an 8-bit class (`benchmarks/mixed_latency.py`), so not the default.

`auto` (with `lower-ort{mixed-route=auto}`): per layer, `digits` where the target's measured
kernel-cost table (`codegen/ort/kernel_costs.json`: time per weight of each width and a fixed cost
per class, at M=1) predicts it faster than `split`, else `split`: small layers, whose time is the
calls, take one kernel; large ones, whose time is the weights, keep a kernel per class.

`digits` (with `lower-ort{mixed-route=digits}`): one MatMulNBits a layer at the narrowest class's
container width w; a class of container width c > w is written as c / w digits of w bits, lowest
first, each digit's blocks with the class's scales times 2^(w d) and the zero point's digit d, and
X's columns of the class read once per digit: s (q - z) = sum over d of 2^(w d) s (q_d - z_d), so
the products are the class's. The bytes at rest are the split route's, plus each class's column
indices (uint16, padded to whole blocks; the split route reads a class whose permutation
`fold-permutation` made the identity by a Slice, with no indices: `allocate-bits` charges 16 bits
per input channel for the permutation either way) and each digit's packing rounded up to a whole
byte per column; a c-bit class costs c / w rows of the w-bit kernel. One
kernel call a layer instead of one a class: where calls, not weights, take the time (a 135M
decoder at one token a step) that is the faster trade.

`expand` (every layer, with `lower-ort{mixed-route=expand}`): the file
stores what the bit budget counted, tightly packed; standard ops expand it back:
- codes of b bits as b bit-planes, 8 rows per byte (uint8 [b, ceil(K_c / 8), N]), unpacked with
  BitShift / BitwiseAnd / ReduceSum;
- uniform classes: fp16 scales and uint8 zero points per group, expanded with Gather;
- codebook classes: the fp16 table per column, read with Gather on flat indices;
- fp16 classes: Cast;
- sparse outliers: uint16 (row, column) pairs and fp16 values, written with ScatterND;
- the permutation: uint16, applied to X with Gather.
Every input of the expansion is an initializer, so ONNX Runtime folds it into one float weight when
the session is created: the file is small, the run is a float32 MatMul with the same numbers as the
reference of `qc.MixedMatMul`, and the weight is resident in float32.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir

from qcompiler.analysis import bitcost
from qcompiler.dialect.mixed_ops import MixedMatMulView, mixed_weight, uniform_zero_kind
from qcompiler.ir.layers import conv_reading, new_initializer
from qcompiler.ir.meta import CREATED_BY, MERGED_LAYERS_KEY, ROUTE_KEY, STORED_WEIGHTS


def pack_bitplanes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [K, N] -> uint8 [bits, ceil(K / 8), N]: plane p holds bit p, row r in bit r % 8."""
    k, n = codes.shape
    padded = np.zeros((-(-k // 8) * 8, n), np.uint8)
    padded[:k] = codes
    planes = [(padded >> p) & 1 for p in range(bits)]
    stacked = np.stack(planes).reshape(bits, -1, 8, n)
    return np.sum(stacked << np.arange(8, dtype=np.uint8)[None, None, :, None], axis=2, dtype=np.uint8)


def unpack_bitplanes(planes: np.ndarray, rows: int) -> np.ndarray:
    """Inverse of `pack_bitplanes` (numpy, for tests)."""
    bits = ((planes[:, :, None, :] >> np.arange(8, dtype=np.uint8)[None, None, :, None]) & 1).reshape(planes.shape[0], -1, planes.shape[2])
    return np.sum(bits[:, :rows].astype(np.uint16) << np.arange(planes.shape[0], dtype=np.uint16)[:, None, None], axis=0).astype(np.uint8)


SHARED_FROM_BYTES = 256  # a stored array of this size or more is made once per content (and role) in a lowering run


class _Builder:
    """Appends nodes before `anchor`, naming values after `base`."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, base: str, stored: dict | None = None):
        self.graph, self.anchor, self.base, self.count = graph, anchor, base, 0
        # stored arrays already made in this run, by role and content: layers that read one weight (ALBERT's
        # shared layers) store its codes once
        self.stored = stored if stored is not None else {}
        self._zero_dim: ir.Value | None = None  # 0 * X's first dimension, shared by the per-run reads
        self._index_shape: ir.Value | None = None  # X's leading dimensions and 1, shared by the column reads

    def index_shape(self, x: ir.Value) -> ir.Value:
        """X's shape with its last dimension 1 (computed at every run): indices along the last axis
        expanded to it match X's leading dimensions."""
        if self._index_shape is None:
            leading = self.op("Shape", [x], {"end": -1})
            self._index_shape = self.op("Concat", [leading, self.const("index_shape.last", np.array([1], np.int64))], {"axis": 0})
        return self._index_shape

    def const(self, suffix: str, array: np.ndarray) -> ir.Value:
        array = np.asarray(array)
        if array.nbytes < SHARED_FROM_BYTES:
            return new_initializer(self.graph, f"{self.base}.{suffix}", array)
        key = (suffix, array.dtype.str, array.shape, hashlib.sha256(np.ascontiguousarray(array).data).digest())
        if key not in self.stored:
            self.stored[key] = new_initializer(self.graph, f"{self.base}.{suffix}", array)
        return self.stored[key]

    def per_call(self, name: str, x: ir.Value, stored: ir.Value) -> ir.Value:
        """`stored` read through a Reshape whose shape depends on X's shape: ONNX Runtime cannot
        fold what follows into an initializer, so it is computed at every run from what is stored."""
        if self._zero_dim is None:
            first = self.op("Shape", [x], {"start": 0, "end": 1})
            self._zero_dim = self.op("Mul", [first, self.const("per_call.zero", np.array([0], np.int64))])
        shape = self.const(f"{name}.stored_shape", np.array(stored.const_value.shape, np.int64))
        return self.op("Reshape", [stored, self.op("Add", [shape, self._zero_dim])], stored=True)

    def op(self, op_type: str, inputs, attributes=None, stored: bool = False, **kwargs) -> ir.Value:
        self.count += 1
        meta = {CREATED_BY: "lower-ort"} | ({STORED_WEIGHTS: "1"} if stored else {})
        node = ir.node(op_type, inputs, attributes, name=f"{self.base}.{op_type.lower()}{self.count}",
                       metadata_props=meta, **kwargs)
        node.outputs[0].name = node.name
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0]


def _codes(b: _Builder, name: str, codes: np.ndarray, bits: int, per_call: ir.Value | None = None) -> ir.Value:
    """Float codes [K_c, N] expanded from stored bit-planes (at every run when `per_call` is X)."""
    k = codes.shape[0]
    planes = b.const(f"{name}.planes", pack_bitplanes(codes, bits))
    if per_call is not None:
        planes = b.per_call(f"{name}.planes", per_call, planes)
    shifts = b.const(f"{name}.shifts", np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1))
    one = b.const(f"{name}.one", np.array(1, np.uint8))
    expanded = b.op("Unsqueeze", [planes, b.const(f"{name}.axis", np.array([2], np.int64))])
    bit = b.op("BitwiseAnd", [b.op("BitShift", [expanded, shifts], {"direction": "RIGHT"}), one])
    flat = b.op("Reshape", [bit, b.const(f"{name}.shape", np.array([bits, -1, codes.shape[1]], np.int64))])
    rows = b.op("Slice", [flat, b.const(f"{name}.start", np.array([0], np.int64)),
                          b.const(f"{name}.stop", np.array([k], np.int64)), b.const(f"{name}.rows_axis", np.array([1], np.int64))])
    weights = b.const(f"{name}.place", (2.0 ** np.arange(bits)).astype(np.float32).reshape(bits, 1, 1))
    scaled = b.op("Mul", [b.op("Cast", [rows], {"to": ir.DataType.FLOAT}), weights])
    return b.op("ReduceSum", [scaled, b.const(f"{name}.sum_axis", np.array([0], np.int64))], {"keepdims": 0})


def _range(b: _Builder, name: str, count: int) -> ir.Value:
    """0, 1, ..., count - 1 (int64), computed at load instead of stored."""
    return b.op("Range", [b.const(f"{name}.zero_i", np.array(0, np.int64)), b.const(f"{name}.count", np.array(count, np.int64)),
                          b.const(f"{name}.step", np.array(1, np.int64))])


def _uniform(b: _Builder, name: str, codes, scale, zero, bits: int, group_size: int) -> ir.Value:
    rows = _range(b, f"{name}.rows", codes.shape[0])
    groups = b.op("Div", [rows, b.const(f"{name}.group_size", np.array(group_size, np.int64))])
    zero_rows = b.op("Gather", [b.op("Cast", [b.const(f"{name}.zero", zero)], {"to": ir.DataType.FLOAT}), groups], {"axis": 0})
    scale_rows = b.op("Gather", [b.op("Cast", [b.const(f"{name}.scale", scale)], {"to": ir.DataType.FLOAT}), groups], {"axis": 0})
    return b.op("Mul", [b.op("Sub", [_codes(b, name, codes, bits), zero_rows]), scale_rows])


def _codebook(b: _Builder, name: str, codes, book, bits: int, per_call: ir.Value | None = None) -> ir.Value:
    n, size = book.shape
    columns = b.op("Cast", [_range(b, f"{name}.columns", n)], {"to": ir.DataType.FLOAT})
    offsets = b.op("Mul", [columns, b.const(f"{name}.table_size", np.array(size, np.float32))])
    flat_index = b.op("Cast", [b.op("Add", [_codes(b, name, codes, bits, per_call), offsets])], {"to": ir.DataType.INT64})
    table = b.op("Cast", [b.const(f"{name}.codebook", book.reshape(-1))], {"to": ir.DataType.FLOAT})
    return b.op("Gather", [table, flat_index], {"axis": 0}, stored=per_call is not None)


def _fp16_per_call(b: _Builder, name: str, x: ir.Value, weight: np.ndarray) -> ir.Value:
    """The fp16 weight cast to float32 at every run (resident in fp16)."""
    return b.op("Cast", [b.per_call(f"{name}.fp16", x, b.const(f"{name}.fp16", weight))], {"to": ir.DataType.FLOAT})


def _expand_all(graph: ir.Graph, node: ir.Node, stored: dict | None = None) -> str:
    view = MixedMatMulView.of(node)
    base = node.name or node.outputs[0].name
    b = _Builder(graph, node, base, stored)
    x, perm = view.x, view.perm_array()
    weight = _expanded_weight(b, view)
    if np.array_equal(perm, np.arange(len(perm))):
        xp = x
    else:
        order = b.op("Cast", [b.const("perm", _compact(perm))], {"to": ir.DataType.INT64})
        xp = b.op("Gather", [x, order], {"axis": -1})
    route = "MixedMatMul(packed, expanded at load)"
    matmul = ir.node("MatMul", [xp, weight], name=base, metadata_props={CREATED_BY: "lower-ort", ROUTE_KEY: route})
    ir.convenience.replace_nodes_and_values(graph, node, [node], [matmul], [node.outputs[0]], [matmul.outputs[0]])
    return route


def lower_mixed_weight(graph: ir.Graph, node: ir.Node) -> str:
    """`qc.MixedWeight` -> the weight expanded from what is stored (as the expand route stores it),
    its rows put back in channel order by a Gather of the inverse permutation: every input is an
    initializer, so ONNX Runtime folds it into one float32 weight when the session starts. A Conv's
    kernel made from it names the layer: its constants are named after the Conv, which carries the route."""
    view = MixedMatMulView.of(node)
    conv = conv_reading(node.outputs[0])
    base = conv.name if conv is not None else (node.name or node.outputs[0].name)
    b = _Builder(graph, node, base)
    perm = view.perm_array()
    weight = _expanded_weight(b, view)
    if not np.array_equal(perm, np.arange(len(perm))):
        inverse = b.op("Cast", [b.const("inverse_perm", _compact(np.argsort(perm)))], {"to": ir.DataType.INT64})
        weight = b.op("Gather", [weight, inverse], {"axis": 0})
    route = "MixedWeight(packed, expanded at load)"
    if conv is not None:
        conv.conv.metadata_props[ROUTE_KEY] = route
    ir.convenience.replace_all_uses_with(node.outputs[0], weight)
    graph.remove(node, safe=True)
    return route


def _expanded_weight(b: _Builder, view: MixedMatMulView) -> ir.Value:
    """The float32 weight [K, N] in stored (permuted) row order, built at load from the classes and outliers."""
    blocks = []
    for c in view.class_arrays():
        name = f"c{c.slot}"
        if c.kind == "uniform":
            blocks.append(_uniform(b, name, *c.inputs, c.bits, view.group_size))
        elif c.kind == "codebook":
            blocks.append(_codebook(b, name, *c.inputs, c.bits))
        else:
            blocks.append(b.op("Cast", [b.const(f"{name}.fp16", c.inputs[0])], {"to": ir.DataType.FLOAT}))
    weight = blocks[0] if len(blocks) == 1 else b.op("Concat", blocks, {"axis": 0})
    outliers = view.outlier_arrays()
    if outliers is not None:
        pairs = b.op("Cast", [b.const("outlier_index", _compact(outliers[0]))], {"to": ir.DataType.INT64})
        values = b.op("Cast", [b.const("outlier_value", outliers[1])], {"to": ir.DataType.FLOAT})
        weight = b.op("ScatterND", [weight, pairs, values])
    return weight


def pack_nbits(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [K, N] -> uint8 [N, ceil(K * bits / 8)]: per column, code k at bit (k % (8 / bits)) * bits
    of byte k // (8 / bits) (MatMulNBits' layout along K, before padding to whole blocks)."""
    k, n = codes.shape
    per_byte = 8 // bits
    padded = np.zeros((n, -(-k // per_byte) * per_byte), np.uint8)
    padded[:, :k] = codes.T
    parts = padded.reshape(n, -1, per_byte).astype(np.uint16) << (np.arange(per_byte, dtype=np.uint16) * bits)
    return np.bitwise_or.reduce(parts, axis=2).astype(np.uint8)


def unpack_nbits(packed: np.ndarray, rows: int, bits: int) -> np.ndarray:
    """Inverse of `pack_nbits`: [N, bytes] -> codes [rows, N]."""
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    values = (packed[:, :, None] >> shifts) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0], -1)[:, :rows].T.astype(np.uint8)


def lower_mixed_matmul(graph: ir.Graph, node: ir.Node, accuracy_level: int = 4, route: str = "split",
                       codebook_route: str = "load", fp16_route: str = "run", kernel_costs: bitcost.KernelCosts | None = None,
                       stored: dict | None = None) -> str:
    """Lower one `qc.MixedMatMul`; returns the route taken, for the pass's statistics. `route="auto"`
    takes `digits` where `kernel_costs` predicts it faster than `split` at M=1, else `split`."""
    if route == "expand":
        return _expand_all(graph, node, stored)
    view = MixedMatMulView.of(node)
    base = node.name or node.outputs[0].name
    b = _Builder(graph, node, base, stored)
    x, perm = view.x, view.perm_array()
    k_total = len(perm)
    partial, routes = [], []
    classes = view.class_arrays()
    nbits = [c for c in classes if _runs_on_nbits(c)]
    if route == "auto":
        route = "digits" if len(nbits) > 1 and _digits_predicted_faster(nbits, kernel_costs) else "split"
    one_kernel = route in ("single", "digits") and len(nbits) > 1 and _can_pad_last_axis(graph)
    if one_kernel:
        containers = [bitcost.container_bits(c.bits) for c in nbits]
        width = min(containers) if route == "digits" else max(containers)
        partial.append(_one_matmul_nbits(b, x, perm, nbits, view.group_size, accuracy_level, width))
        routes.append(f"MatMulNBits{width}(one kernel: {','.join(str(c.bits) for c in nbits)}-bit classes in blocks"
                      + (f", wider codes as {width}-bit digits)" if route == "digits" and max(containers) > width else ")"))
        classes = [c for c in classes if not _runs_on_nbits(c)]
    if one_kernel or len(classes) < 2 or b.graph.opset_imports.get("", 0) < 13:
        sources = [_columns(b, f"c{c.slot}", x, perm[c.start:c.stop], k_total) for c in classes]
    else:
        sources = _class_columns(b, x, perm, classes)
    for c, xc in zip(classes, sources):
        name = f"c{c.slot}"
        if _runs_on_nbits(c):  # integer zero points: MatMulNBits
            container = bitcost.container_bits(c.bits)
            partial.append(_matmul_nbits(b, name, xc, *c.inputs, container, view.group_size, accuracy_level))
            routes.append(f"MatMulNBits{c.bits}" if container == c.bits else f"MatMulNBits{container}({c.bits}-bit codes)")
            continue
        if c.kind == "uniform":
            weight = _uniform(b, name, *c.inputs, c.bits, view.group_size)
            routes.append(f"uniform{c.bits}(float MatMul, expanded at load)")
        elif c.kind == "codebook":
            per_run = codebook_route == "run"
            weight = _codebook(b, name, *c.inputs, c.bits, per_call=x if per_run else None)
            routes.append(f"codebook{c.bits}(float MatMul, expanded {'per run' if per_run else 'at load'})")
        elif fp16_route == "run":
            weight = _fp16_per_call(b, name, x, c.inputs[0])
            routes.append("fp16(float MatMul, cast per run)")
        else:
            weight = b.op("Cast", [b.const(f"{name}.fp16", c.inputs[0])], {"to": ir.DataType.FLOAT})
            routes.append("fp16(float MatMul, cast at load)")
        partial.append(b.op("MatMul", [xc, weight]))
    y = partial[0] if len(partial) == 1 else b.op("Sum", partial)
    if view.outliers is not None:
        y = _sparse_corrections(b, x, y, perm, view)
        routes.append("sparse(ScatterElements add)")
    taken = (f"{route}: " if one_kernel else "split: ") + " + ".join(routes)
    y.producer().name = base
    y.producer().metadata_props[ROUTE_KEY] = taken
    if MERGED_LAYERS_KEY in node.metadata_props:
        y.producer().metadata_props[MERGED_LAYERS_KEY] = node.metadata_props[MERGED_LAYERS_KEY]
    name = node.outputs[0].name
    y.type, y.shape = node.outputs[0].type, node.outputs[0].shape
    ir.convenience.replace_all_uses_with(node.outputs[0], y, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    y.name = name
    return taken


def _digits_predicted_faster(classes, costs: bitcost.KernelCosts) -> bool:
    """At M=1, by the target's kernel-cost table: one kernel of the narrowest width w, a c-bit class
    as c / w rows of it, against one kernel (and one fixed cost) per class."""
    containers = [bitcost.container_bits(c.bits) for c in classes]
    width = min(containers)
    n = classes[0].inputs[0].shape[1]
    split = sum(costs.class_us(f"nbits{container}", c.inputs[0].shape[0], n) for c, container in zip(classes, containers))
    digit_rows = sum(c.inputs[0].shape[0] * (container // width) for c, container in zip(classes, containers))
    return costs.class_us(f"nbits{width}", digit_rows, n) < split


def _runs_on_nbits(c) -> bool:
    """A uniform class with integer zero points (on the code grid): MatMulNBits runs it."""
    return c.kind == "uniform" and c.inputs[2].dtype == np.uint8


def _can_pad_last_axis(graph: ir.Graph) -> bool:
    """`Pad` takes `axes` from opset 18 (the single-kernel route pads X by one zero column)."""
    return graph.opset_imports.get("", 0) >= 18


def _one_matmul_nbits(b: _Builder, x: ir.Value, perm: np.ndarray, classes, group_size: int, accuracy_level: int,
                      width: int) -> ir.Value:
    """Every MatMulNBits class of a layer in one kernel of `width` bits: the classes' blocks one
    after another. A class no wider than `width` is stored in its containers (its codes and zero
    points fit unchanged; `single`: the widest width, a narrower class costs it in bytes); a wider
    one as `width`-bit digits, each in its own blocks (`digits`: the narrowest width). Each class's
    (or digit's) last block is padded with code 0; X is gathered once, a class's columns once per
    digit, with a zero column at the padded rows, so the products and the int8 compute's per-block
    activation scales are those of one kernel per class where no class is split."""
    n = classes[0].inputs[0].shape[1]
    k_total = len(perm)
    columns, weights, scales, zeros, k = [], [], [], [], 0
    for c in classes:
        codes, scale, zero = c.inputs
        rows = -(-codes.shape[0] // group_size) * group_size
        class_columns = _index(b, f"c{c.slot}.channels",
                               np.concatenate([perm[c.start:c.stop], np.full(rows - codes.shape[0], k_total, np.int64)]))
        scale = b.op("Cast", [b.const(f"c{c.slot}.scale", np.ascontiguousarray(scale.T))], {"to": ir.DataType.FLOAT})
        for digit, (codes_d, digit_zero) in enumerate(_digits(codes, zero, bitcost.container_bits(c.bits), width)):
            columns.append(class_columns)
            weights.append(_nbits_blocks(b, f"c{c.slot}.d{digit}", codes_d, width, group_size))
            k += rows
            scales.append(scale if digit == 0 else
                          b.op("Mul", [scale, b.const(f"c{c.slot}.d{digit}.place", np.array(2.0 ** (width * digit), np.float32))]))
            zeros.append(digit_zero)
    padded = b.op("Pad", [x, b.const("one.pads", np.array([0, 1], np.int64)), None, b.const("one.pad_axis", np.array([-1], np.int64))])
    xc = _gather_columns(b, padded, b.op("Concat", columns, {"axis": 0}))  # a class's columns stored once, repeated at load
    weight = b.op("Concat", weights, {"axis": 1})
    scale = scales[0] if len(scales) == 1 else b.op("Concat", scales, {"axis": 1})
    return b.op("MatMulNBits", [xc, weight, scale, *_nbits_zero_points(b, "one", np.concatenate(zeros), width)],
                {"K": k, "N": n, "bits": width, "block_size": group_size, "accuracy_level": accuracy_level},
                domain="com.microsoft")


def _digits(codes: np.ndarray, zero: np.ndarray, container: int, width: int):
    """Codes and zero points of a `container`-bit class as `container // width` digits of `width`
    bits, lowest first: s (c - z) = sum over d of 2^(width d) s (c_d - z_d). A class no wider than
    `width` is one digit, its codes as they are."""
    if container <= width:
        return [(codes, zero)]
    mask = (1 << width) - 1
    return [((codes >> (width * d)) & mask, (zero >> (width * d)) & mask) for d in range(container // width)]


def _compact(indices: np.ndarray) -> np.ndarray:
    """Indices stored as uint16 where they fit (cast at load), else int32 (a row of more than 65536
    columns: a vocabulary, or the columns of linears merged into one)."""
    return indices.astype(np.uint16 if indices.size == 0 or int(indices.max()) < 1 << 16 else np.int32)


def _index(b: _Builder, name: str, indices: np.ndarray) -> ir.Value:
    """Constant int32 indices, stored as uint16 where they fit and cast at load (resident in int32)."""
    stored = _compact(indices)
    if stored.dtype == np.int32:
        return b.const(name, stored)
    return b.op("Cast", [b.const(name, stored)], {"to": ir.DataType.INT32})


def _columns(b: _Builder, name: str, x: ir.Value, channels: np.ndarray, k_total: int) -> ir.Value:
    """X's input columns `channels`: X itself, a Slice where they are consecutive, else a Gather."""
    start, stop = int(channels[0]), int(channels[-1]) + 1
    if np.array_equal(channels, np.arange(start, stop)):
        if start == 0 and stop == k_total:
            return x
        return b.op("Slice", [x, b.const(f"{name}.start", np.array([start], np.int64)),
                              b.const(f"{name}.stop", np.array([stop], np.int64)),
                              b.const(f"{name}.axis", np.array([-1], np.int64))])
    return _gather_columns(b, x, _index(b, f"{name}.channels", channels))


def _class_columns(b: _Builder, x: ir.Value, perm: np.ndarray, classes) -> list[ir.Value]:
    """Every class's input columns at once: X (gathered once by the permutation, unless
    `fold-permutation` made it the identity) split by the classes' rows. Two or three ops a layer
    instead of one or two a class, the same values."""
    if not np.array_equal(perm, np.arange(len(perm))):
        x = _gather_columns(b, x, _index(b, "channels", perm))
    sizes = b.const("class_rows", np.array([c.stop - c.start for c in classes], np.int64))
    split = b.op("Split", [x, sizes], {"axis": -1}, num_outputs=len(classes)).producer()
    for i, part in enumerate(split.outputs[1:], 1):
        part.name = f"{split.name}.{i}"
    return list(split.outputs)


def _gather_columns(b: _Builder, x: ir.Value, indices: ir.Value) -> ir.Value:
    """X[..., indices] as GatherElements, the indices expanded to X's leading dimensions at every
    run: the same copy as a Gather along the last axis, measured 4 times (M=1) to 10 times (M=32)
    faster on 4096 columns (ONNX Runtime 1.32, one thread, `column_read_cost` in
    benchmarks/mixed_latency.py; its Gather divides per element). Opsets before 15 (no `Shape(end)`)
    keep the Gather."""
    if b.graph.opset_imports.get("", 0) < 15:
        return b.op("Gather", [x, indices], {"axis": -1}, stored=True)
    expanded = b.op("Expand", [indices, b.index_shape(x)], stored=True)
    return b.op("GatherElements", [x, expanded], {"axis": -1})


def _matmul_nbits(b: _Builder, name: str, x: ir.Value, codes, scale, zero, bits: int, group_size: int,
                  accuracy_level: int) -> ir.Value:
    k, n = codes.shape
    weight = _nbits_blocks(b, name, codes, bits, group_size)
    scales = b.op("Cast", [b.const(f"{name}.scale", np.ascontiguousarray(scale.T))], {"to": ir.DataType.FLOAT})
    return b.op("MatMulNBits", [x, weight, scales, *_nbits_zero_points(b, name, zero, bits)],
                {"K": k, "N": n, "bits": bits, "block_size": group_size, "accuracy_level": accuracy_level},
                domain="com.microsoft")


def _nbits_zero_points(b: _Builder, name: str, zero: np.ndarray, bits: int) -> list[ir.Value]:
    """MatMulNBits' zero-point input of `bits`-bit containers: none where every zero point is the
    kernel's default 2^(bits-1) (a symmetric class; the kernel runs faster without them), else
    the zero points packed."""
    if uniform_zero_kind(zero, bits) == "symmetric":
        return []
    return [b.const(f"{name}.zero", pack_nbits(zero, bits))]


def _nbits_blocks(b: _Builder, name: str, codes: np.ndarray, bits: int, group_size: int) -> ir.Value:
    """MatMulNBits' weight [N, blocks, blob] of `codes` [K_c, N], packed per column along K, the last
    block padded with code 0: in the file for a class of `bitcost.STORED_WHOLE_FROM` blocks or more, else stored
    tight and padded by a Pad that ONNX Runtime folds at session start."""
    k, n = codes.shape
    blocks = -(-k // group_size)
    blob = group_size * bits // 8
    packed = pack_nbits(codes, bits)
    padding = blocks * blob - packed.shape[1]
    if padding == 0 or bitcost.stored_in_whole_blocks(blocks):
        return b.const(f"{name}.nbits", np.pad(packed, ((0, 0), (0, padding))).reshape(n, blocks, blob))
    tight = b.const(f"{name}.nbits", packed)  # the padding is resident, not stored
    pads = b.const(f"{name}.pads", np.array([0, 0, 0, blocks * blob - packed.shape[1]], np.int64))
    shape = b.const(f"{name}.blocks", np.array([n, blocks, blob], np.int64))
    return b.op("Reshape", [b.op("Pad", [tight, pads]), shape])


def _sparse_corrections(b: _Builder, x: ir.Value, y: ir.Value, perm: np.ndarray, view: MixedMatMulView) -> ir.Value:
    """y + the sparse outliers' corrections: at each outlier (row r, column c) the stored value
    replaces the classes' dequantized one, so y[..., c] += X[..., perm[r]] * (value - w_hat[r, c])."""
    dense = mixed_weight(view.class_arrays(), None, view.group_size)
    indices, values = view.outlier_arrays()
    indices = indices.astype(np.int64)
    delta = values.astype(np.float32) - dense[indices[:, 0], indices[:, 1]]
    gathered = _gather_columns(b, x, _index(b, "outlier_rows", perm[indices[:, 0]]))
    updates = b.op("Mul", [gathered, b.const("outlier_delta", delta)], stored=True)
    columns = b.op("Expand", [_index(b, "outlier_columns", indices[:, 1]), b.op("Shape", [updates])], stored=True)
    return b.op("ScatterElements", [y, columns, updates], {"axis": -1, "reduction": "add"})
