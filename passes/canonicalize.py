"""`canonicalize`: bring any captured or loaded graph to the form the quantization passes expect.

Steps, in order:
0. External tensors still in the IR (a model built in memory; `qcompiler.load` reads them already)
   are read into memory through `qcompiler.ir.external_data`'s one check, relative to their own
   model folder, so that no later step (constant folding included) opens a location as given.
1. Constants as initializers (`Constant` nodes holding tensors become initializers), so every
   weight is an initializer a pass can find by value.
2. Constant folding (onnxscript's folder): subgraphs whose inputs are all constants are computed
   once, e.g. a `Transpose` of a weight becomes the transposed weight. A weight folding creates
   is named after the module that reads it, where the capture recorded one (`lm_head.weight`, not
   `val_3790`).
3. `Gemm` with a constant B becomes `MatMul` (+ `Add` for C): quantization works on the MatMul
   form `Y = X W + b` with `W` laid out `[K, N]`. `transB` and `alpha` are folded into a copy of
   the weight (or into the weight itself when nothing else reads it), `beta` into C.
   A zero `Pad` of spatial axes read only by Convs becomes the Convs' own `pads` (exporters write
   one before every Conv of a padded-input network, e.g. MobileNetV2's): quantized, the Pad would sit
   between the activation's `QuantizeLinear` and the integer Conv and cost a float round trip.
4. Identity removal, dead-code removal (nodes, functions and opset imports nobody uses).
5. Shape inference, then topological order.

Everything but step 3 reuses `onnx_ir`'s and onnxscript's passes. A second run changes nothing.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_passes

from qcompiler import ir as qir
from qcompiler.errors import first_line
from qcompiler.ir.external_data import materialize_external_tensors
from qcompiler.ir.layers import name_weights_after_modules
from qcompiler.ir.layers import new_initializer, set_constant
from qcompiler.ir.meta import Prop
from qcompiler.pipeline.passbase import Pass, PassResult, option, register_pass

log = logging.getLogger(__name__)


class _IdentityEliminationPass(ir_passes.IdentityEliminationPass):
    """onnx_ir's pass, except that an Identity whose output is a graph output stays when its input
    is also a graph output or comes from an outer graph: onnx_ir 1.1 would rename the input to the
    output's name, which merges two graph outputs into one (a Scan body's state and scan outputs)
    or renames a value of the outer graph."""

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if node.op_type == "Identity" and node.domain == "" and len(node.inputs) == 1 and node.inputs[0] is not None:
            source, output = node.inputs[0], node.outputs[0]
            if output.is_graph_output() and (source.is_graph_output() or source.graph is not node.graph):
                return False
        return super()._try_eliminate_identity_node(node)


@register_pass
@dataclasses.dataclass(frozen=True)
class CanonicalizePass(Pass):
    """Gemm to MatMul + Add, constant folding, shape inference, dead-code removal, topological order."""

    name = "canonicalize"
    provided = frozenset({Prop.CANONICAL})

    fold_limit: int = option(1 << 26, "largest constant (elements) that constant folding may create")

    def call(self, model: ir.Model) -> PassResult:
        stats = {"nodes_before": _node_count(model)}
        external = materialize_external_tensors(model, keep_initializers_over=qir.MAPPED_DATA_THRESHOLD)
        if external:
            stats["external_tensors_read"] = external
        modified = external > 0
        modified |= _run(ir_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16), model)
        modified |= _cast_like_to_cast(model) > 0
        modified |= _fold_constants(model, self.fold_limit)
        renamed = name_weights_after_modules(model.graph)
        if renamed:
            stats["weights_named_after_modules"] = renamed
            modified = True
        gemms = _gemm_to_matmul(model.graph)
        stats["gemm_to_matmul"] = gemms
        modified |= gemms > 0
        pads = _pads_into_convs(model.graph)
        if pads:
            stats["pads_into_convs"] = pads
            modified = True
        for cleanup in (
            _IdentityEliminationPass(),
            ir_passes.RemoveUnusedNodesPass(),
            ir_passes.RemoveUnusedFunctionsPass(),
            ir_passes.RemoveUnusedOpsetsPass(),
        ):
            modified |= _run(cleanup, model)
        modified |= _infer_shapes(model)
        modified |= _run(ir_passes.TopologicalSortPass(), model)
        stats["nodes_after"] = _node_count(model)
        return PassResult(model, modified, stats)


def _run(pass_: ir.passes.PassBase, model: ir.Model) -> bool:
    return bool(pass_(model).modified)


def _node_count(model: ir.Model) -> int:
    return sum(1 for _ in model.graph)


def _fold_constants(model: ir.Model, limit: int) -> bool:
    """onnxscript's folder. A folding rule that raises (onnxscript 0.7's SplitToSequence rule on a
    split that is a run-time scalar) stops folding there: the graph stays valid, as the folder
    applies each replacement whole, and is left as far as it got."""
    from onnxscript import optimizer

    before = [id(n) for n in model.graph], list(model.graph.initializers)
    try:
        result = optimizer.fold_constants(model, onnx_shape_inference=False, input_size_limit=limit, output_size_limit=limit,
                                          should_fold=_small_constant_of_shape)
    except RuntimeError as exc:
        cause = exc.__cause__ or exc
        log.warning("constant folding stopped: %s (%s: %s)", first_line(str(exc)), type(cause).__name__, first_line(str(cause)))
        return ([id(n) for n in model.graph], list(model.graph.initializers)) != before
    return bool(result.modified)


SMALL_CONSTANT = 1024  # elements: a ConstantOfShape of at most this many, its shape constant, is folded


def _small_constant_of_shape(node: ir.Node) -> bool | None:
    """True for a `ConstantOfShape` of a small constant shape (onnxscript's folder keeps every one by
    default, so that a large one does not grow the model): exporters build a Conv's padding amounts
    from one (MobileNetV2's), which then reach a `Pad` as a constant; None: the folder's own rules."""
    if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
        return None
    shape = node.inputs[0].const_value
    return True if shape is not None and int(np.prod(shape.numpy())) <= SMALL_CONSTANT else None


def _cast_like_to_cast(model: ir.Model) -> int:
    """`CastLike(x, like)` whose `like` has a known element type becomes `Cast(x, to=...)` with
    the same `saturate` (and `round_mode`). onnxscript's folder makes the same rewrite but drops
    those attributes, which changes float8 results (`saturate=0` keeps inf and NaN)."""
    count = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.op_type != "CastLike" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        like = node.inputs[1]
        if like is None or like.dtype is None or not isinstance(like.type, ir.TensorType) or not node.attributes:
            continue  # without attributes the folder's own rewrite is exact
        attributes = {"to": like.dtype.value, **{name: attr.value for name, attr in node.attributes.items()}}
        cast = ir.node("Cast", [node.inputs[0]], attributes, name=node.name)
        ir.convenience.replace_nodes_and_values(node.graph, node, [node], [cast], [node.outputs[0]], [cast.outputs[0]])
        count += 1
    return count


def _infer_shapes(model: ir.Model) -> bool:
    """onnx shape inference, merged into the IR; reports `modified` only when a shape or type
    actually changed. (onnx_ir 1.1's ShapeInferencePass sets only `dtype` on a value that had no
    type, which makes every untyped sequence or optional a tensor; this sets the whole type.)"""
    import onnx

    try:
        from onnx_ir.passes.common._c_api_utils import call_onnx_api
    except ImportError:  # an onnx_ir without the helper: its own pass (sets dtype only)
        before = _value_types(model.graph)
        ir_passes.ShapeInferencePass(strict_mode=False)(model)
        return _value_types(model.graph) != before

    before = _value_types(model.graph)
    try:
        proto = call_onnx_api(lambda p: onnx.shape_inference.infer_shapes(p, check_type=True, strict_mode=False, data_prop=True), model)
    except Exception as exc:
        log.warning("shape inference failed, shapes left as they were: %s", first_line(str(exc)))
        return False
    inferred = ir.serde.deserialize_model(proto)
    for graph, new in zip(model.graphs(), inferred.graphs()):
        found = ir.convenience.create_value_mapping(new)
        for name, value in ir.convenience.create_value_mapping(graph).items():
            other = found.get(name)
            if other is None:
                continue
            if other.type is not None and value.type != other.type:
                value.type = other.type
            if other.shape is not None and value.shape != other.shape:
                value.shape = other.shape
    return _value_types(model.graph) != before


def _value_types(graph: ir.Graph) -> list[tuple]:
    return [(str(v.type), str(v.shape)) for node in graph for v in node.outputs]


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _gemm_to_matmul(graph: ir.Graph) -> int:
    """Rewrite every Gemm whose B is a constant; returns how many were rewritten."""
    count = 0
    for node in list(graph):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
            continue
        a, b = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if b is None or b.const_value is None or not b.is_initializer():
            continue
        alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
        trans_a, trans_b = int(_attr(node, "transA", 0)), int(_attr(node, "transB", 0))
        weight = b.const_value.numpy()
        if trans_b:
            weight = weight.T
        if alpha != 1.0:
            weight = (weight * alpha).astype(weight.dtype)
        new_b = set_constant(graph, b, weight, node, "kn") if trans_b or alpha != 1.0 else b
        new_nodes = []
        base = node.name or node.outputs[0].name
        x = a
        if trans_a:
            transpose = ir.node("Transpose", [a], {"perm": [1, 0]}, name=f"{base}.transpose_a")
            transpose.outputs[0].name = f"{base}.a_t"
            new_nodes.append(transpose)
            x = transpose.outputs[0]
        matmul = ir.node("MatMul", [x, new_b], name=f"{base}.matmul" if c is not None else base)
        matmul.outputs[0].name = f"{node.outputs[0].name}.matmul"
        new_nodes.append(matmul)
        out = matmul.outputs[0]
        if c is not None:
            bias = c
            if beta != 1.0:
                if c.const_value is None:
                    scale = new_initializer(graph, f"{base}.beta", np.array(beta, dtype=weight.dtype))
                    mul = ir.node("Mul", [c, scale], name=f"{base}.beta_mul")
                    mul.outputs[0].name = f"{base}.c_scaled"
                    new_nodes.append(mul)
                    bias = mul.outputs[0]
                else:
                    scaled = (c.const_value.numpy() * beta).astype(c.const_value.numpy().dtype)
                    bias = set_constant(graph, c, scaled, node, "scaled")
            add = ir.node("Add", [out, bias], name=base)
            new_nodes.append(add)
            out = add.outputs[0]
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [node.outputs[0]], [out])
        count += 1
    return count


def _pads_into_convs(graph: ir.Graph) -> int:
    """Fold every constant zero `Pad` of spatial axes whose readers are all Convs (their data input,
    explicit pads) into those Convs' `pads`; returns how many Pads were folded (left unread, removed
    by dead-code removal)."""
    count = 0
    for node in list(graph):
        widths = _spatial_zero_pads(node)
        if widths is None or node.outputs[0].is_graph_output():
            continue
        readers = [use.node for use in node.outputs[0].uses()]
        if not readers or not all(_takes_pads(conv, use.idx, len(widths) // 2)
                                  for conv, use in zip(readers, node.outputs[0].uses())):
            continue
        spatial = len(widths) // 2
        for conv in set(readers):
            valid = _attr(conv, "auto_pad", "NOTSET") == "VALID"  # no padding: NOTSET with zero pads (a stale `pads` ignored)
            own = [0] * (2 * spatial) if valid else list(_attr(conv, "pads", [0] * (2 * spatial)))
            merged = [a + b for a, b in zip(own, widths)]
            conv.attributes.pop("auto_pad", None)
            conv.attributes["pads"] = ir.AttrInt64s("pads", merged)
            conv.replace_input_with(0, node.inputs[0])
        count += 1
    return count


def _spatial_zero_pads(node: ir.Node) -> list[int] | None:
    """A constant-mode `Pad` with zero fill, constant non-negative pads on axes 2 and up only: its
    [begin..., end...] widths over the spatial axes; else None."""
    if node.op_type != "Pad" or node.domain not in ("", "ai.onnx") or _attr(node, "mode", "constant") != "constant":
        return None
    x = node.inputs[0]
    if x is None or x.shape is None or len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[1].const_value is None:
        return None
    rank = len(x.shape)
    value = node.inputs[2] if len(node.inputs) > 2 else None
    if value is not None and (value.const_value is None or np.any(value.const_value.numpy() != 0)):
        return None
    axes_value = node.inputs[3] if len(node.inputs) > 3 else None
    if axes_value is not None and axes_value.const_value is None:
        return None
    axes = [int(a) % rank for a in axes_value.const_value.numpy()] if axes_value is not None else list(range(rank))
    pads = [int(p) for p in node.inputs[1].const_value.numpy()]
    if rank < 3 or len(pads) != 2 * len(axes) or any(p < 0 for p in pads):
        return None
    begin, end = dict(zip(axes, pads[: len(axes)])), dict(zip(axes, pads[len(axes):]))
    if any(begin.get(a, 0) or end.get(a, 0) for a in (0, 1)):
        return None
    return [begin.get(a, 0) for a in range(2, rank)] + [end.get(a, 0) for a in range(2, rank)]


def _takes_pads(node: ir.Node, index: int, spatial: int) -> bool:
    """A Conv reading the value as its data input, with explicit pads over `spatial` axes (auto_pad NOTSET,
    or VALID: none)."""
    return (node.op_type == "Conv" and node.domain in ("", "ai.onnx") and index == 0
            and _attr(node, "auto_pad", "NOTSET") in ("NOTSET", "VALID") and len(_attr(node, "pads", [0] * (2 * spatial))) == 2 * spatial)
