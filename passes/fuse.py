"""`fuse`: onnxscript rewrite rules that merge quantized linears with what surrounds them into the
fused `qc` ops of `qcompiler/dialect/fused_ops.py`, each recording the rules that built it (attribute
`fused`, and `qc.created_by` = `fuse:<rule>` in the node's metadata).

Rules, applied to a fixed point in this order:

    norm-quantize   QuantizeActivation(LayerNormalization(X, g, b))      -> NormQuantize(X, g, b)
    linear          MatMul(Xq, DequantizeWeight(Q, s[, z]))              -> QLinear(X, Q, s[, z])
                    (Xq from a QuantizeActivation or a NormQuantize with an 8-bit grid: the
                    grid moves into the QLinear; X is what was rounded)
    linear-mixed    MixedMatMul(X, perm, classes...)                     -> QLinear(weight=mixed)
    bias            Add(QLinear(...), b), b a constant [N]               -> QLinear(..., b)
    relu, gelu      Relu / Gelu(QLinear(...))                            -> QLinear(epilogue=...)
    silu            Mul(Y, Sigmoid(Y)), Y = QLinear(...)                 -> QLinear(epilogue=silu)
    wide            QLinears with dequantized weights that read the same X with the same input
                    grid, bias presence and epilogue (Q/K/V; gate/up when alike)
                    -> one QLinear with the weights side by side and one output per linear

A rule fires only where every value it removes is read by nothing else. `lower-ort` un-fuses (ONNX
Runtime runs the QDQ form); the Triton backend emits each QLinear as one kernel with its epilogue.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from qcompiler.dialect import ops
from qcompiler.dialect.ops import QC_OPSET_VERSION
from qcompiler.ir.layers import new_initializer, remove_unused
from qcompiler.ir.meta import CREATED_BY, Prop
from qcompiler.pipeline.passbase import Pass, PassResult, register_pass

QC = "qc"


def _attrs(node: ir.Node) -> dict:
    return ops.attributes_of(node)


def _qlinear_attrs(node: ir.Node) -> dict:
    a = _attrs(node)
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in a.items()}


def _emit_qlinear(op, rule: str, inputs: list, attrs: dict, n_outputs: int = 1):
    """Build a qc.QLinear through the rewriter's op builder and tag it."""
    attrs = dict(attrs)
    attrs["fused"] = [*attrs.get("fused", []), rule]
    defaults = ops.schema("QLinear").attributes
    clean = {k: v for k, v in attrs.items()
             if not (isinstance(v, (list, tuple)) and not v) and not (k in defaults and v == defaults[k].default)}
    out = op.QLinear(*inputs, _domain=QC, _outputs=n_outputs, **clean)
    first = out[0] if isinstance(out, (list, tuple)) else out
    first.producer().metadata_props[CREATED_BY] = f"fuse:{rule}"
    return out


def _grid(producer: ir.Node | None) -> dict | None:
    """The activation grid an int8 QLinear can take over from X's producer."""
    if producer is None or producer.domain != QC:
        return None
    if producer.op_type == "QuantizeActivation":
        a = _attrs(producer)
        return {"act_mode": a["mode"], "act_scale": float(a["scale"]), "act_zero_point": int(a["zero_point"]),
                "act_bits": int(a["bits"]), "x": producer.inputs[0]}
    if producer.op_type == "NormQuantize":
        a = _attrs(producer)
        # X stays the NormQuantize output: already on the grid, rounding it again is exact
        return {"act_mode": a["mode"], "act_scale": float(a["act_scale"]), "act_zero_point": int(a["act_zero_point"]),
                "act_bits": int(a["bits"]), "x": producer.outputs[0]}
    return None


# ------------------------------------------------------------------ norm-quantize
def _norm_quant_target(op, x, g, b):
    n = op.LayerNormalization(x, g, b, _allow_other_attributes=True, _outputs=["normed"])
    return op.QuantizeActivation(n, _domain=QC, _allow_other_attributes=True, _outputs=["y"])


def _norm_quant_check(context, x, g, b, normed, y, **_):
    ln = normed.producer()
    return len(ln.outputs) == 1 and len(normed.uses()) == 1


def _norm_quant_rewrite(op, x, g, b, normed, y, **_):
    ln, qa = normed.producer(), y.producer()
    la, qa_a = {k: v.value for k, v in ln.attributes.items()}, _attrs(qa)
    out = op.NormQuantize(x, g, b, _domain=QC, axis=int(la.get("axis", -1)), epsilon=float(la.get("epsilon", 1e-5)),
                          mode=qa_a["mode"], act_scale=float(qa_a["scale"]), act_zero_point=int(qa_a["zero_point"]),
                          bits=int(qa_a["bits"]))
    out.producer().metadata_props[CREATED_BY] = "fuse:norm-quantize"
    return out


# ------------------------------------------------------------------ linear
def _linear_target(op, xq, q, s):
    w = op.DequantizeWeight(q, s, _domain=QC, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["w"])
    return op.MatMul(xq, w, _outputs=["y"])


def _linear_check(context, xq, q, s, w, y, **_):
    dq = w.producer()
    return len(w.uses()) == 1 and q.const_value is not None and s.const_value is not None and \
        all(v is None or v.const_value is not None for v in dq.inputs) and len(q.const_value.shape) == 2


def _linear_rewrite(op, xq, q, s, w, y, **_):
    dq = w.producer()
    a = _attrs(dq)
    attrs = {"weight": "dequantize", "w_axis": int(a["axis"]), "w_bits": int(a["bits"])}
    grid = _grid(xq.producer())
    x = xq
    if grid is not None and grid["act_bits"] == 8 and grid["act_mode"] in ("static", "per-token", "dynamic"):
        x = grid.pop("x")
        attrs.update(grid)
    inputs = [x] + [v for v in dq.inputs if v is not None]
    return _emit_qlinear(op, "linear", inputs, attrs)


# ------------------------------------------------------------------ linear-mixed
def _mixed_target(op, x):
    return op.MixedMatMul(x, _domain=QC, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["y"])


def _mixed_check(context, x, y, **_):
    node = y.producer()
    return all(v is not None and v.const_value is not None for v in node.inputs[1:])


def _mixed_rewrite(op, x, y, **_):
    node = y.producer()
    a = _attrs(node)
    attrs = {"weight": "mixed", "kinds": list(a["kinds"]), "bits": list(a["bits"]), "sizes": list(a["sizes"]),
             "group_size": int(a["group_size"]), "sparse": int(a["sparse"])}
    return _emit_qlinear(op, "linear-mixed", list(node.inputs), attrs)


# ------------------------------------------------------------------ bias and epilogues
def _qlinear_value(op, x):
    return op.QLinear(x, _domain=QC, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["lin"])


def _single_plain(lin: ir.Value) -> bool:
    node = lin.producer()
    a = _attrs(node)
    return len(node.outputs) == 1 and len(lin.uses()) == 1 and a["epilogue"] == "none"


def _width(node: ir.Node) -> int | None:
    """Output columns N of a single-output QLinear, from its weight."""
    a = _attrs(node)
    first = node.inputs[1] if a["weight"] == "dequantize" else node.inputs[2]
    if first is None or first.const_value is None or len(first.const_value.shape) != 2:
        return None
    return int(first.const_value.shape[1])


def _bias_target(op, x, b):
    return op.Add(_qlinear_value(op, x), b, _outputs=["y"])


def _bias_check(context, x, b, lin, y, **_):
    if not _single_plain(lin) or _attrs(lin.producer())["has_bias"] or b.const_value is None:
        return False
    n = _width(lin.producer())
    arr = b.const_value
    return isinstance(n, int) and arr.dtype.is_floating_point() and arr.size == n and len(arr.shape) == 1


def _bias_rewrite(op, x, b, lin, y, **_):
    node = lin.producer()
    attrs = _qlinear_attrs(node)
    attrs["has_bias"] = 1
    return _emit_qlinear(op, "bias", list(node.inputs) + [b], attrs)


def _act_rule(act: str, onnx_op: str):
    def target(op, x):
        return getattr(op, onnx_op)(_qlinear_value(op, x), _allow_other_attributes=True, _outputs=["y"])

    def check(context, x, lin, y, **_):
        if not _single_plain(lin):
            return False
        if onnx_op == "Gelu":
            approx = y.producer().attributes.get("approximate")
            return approx is None or approx.value in ("none", "tanh")
        return True

    def rewrite(op, x, lin, y, **_):
        node = lin.producer()
        attrs = _qlinear_attrs(node)
        epilogue = act
        if onnx_op == "Gelu":
            approx = y.producer().attributes.get("approximate")
            epilogue = "gelu_tanh" if approx is not None and approx.value == "tanh" else "gelu"
        attrs["epilogue"] = epilogue
        return _emit_qlinear(op, act, list(node.inputs), attrs)

    return pattern.RewriteRule(target, rewrite, check, name=act)


def _silu_target(op, x):
    lin = _qlinear_value(op, x)
    return op.Mul(lin, op.Sigmoid(lin, _outputs=["sig"]), _outputs=["y"])


def _silu_check(context, x, lin, sig, y, **_):
    node = lin.producer()
    return len(node.outputs) == 1 and len(lin.uses()) == 2 and len(sig.uses()) == 1 and \
        _attrs(node)["epilogue"] == "none"


def _silu_rewrite(op, x, lin, sig, y, **_):
    node = lin.producer()
    attrs = _qlinear_attrs(node)
    attrs["epilogue"] = "silu"
    return _emit_qlinear(op, "silu", list(node.inputs), attrs)


RULES = [
    ("norm-quantize", pattern.RewriteRule(_norm_quant_target, _norm_quant_rewrite, _norm_quant_check, name="norm-quantize")),
    ("linear", pattern.RewriteRule(_linear_target, _linear_rewrite, _linear_check, name="linear")),
    ("linear-mixed", pattern.RewriteRule(_mixed_target, _mixed_rewrite, _mixed_check, name="linear-mixed")),
    ("bias", pattern.RewriteRule(_bias_target, _bias_rewrite, _bias_check, name="bias")),
    ("relu", _act_rule("relu", "Relu")),
    ("gelu", _act_rule("gelu", "Gelu")),
    ("silu", pattern.RewriteRule(_silu_target, _silu_rewrite, _silu_check, name="silu")),
]


# ------------------------------------------------------------------ wide
def _wide_key(node: ir.Node):
    a = _attrs(node)
    if a["weight"] != "dequantize" or len(node.outputs) != 1 or node.outputs[0] is None:
        return None
    rest = list(node.inputs[1:])
    if a["has_bias"]:
        rest = rest[:-1]
    if len(rest) != 2 or any(v.const_value is None for v in rest) or a["w_axis"] not in (1, -1):
        return None  # zero-pointed weights stay alone
    q, s = rest[0].const_value, rest[1].const_value
    if len(q.shape) != 2 or s.size not in (1, q.shape[1]):
        return None
    return (id(node.inputs[0]), a["act_mode"], a["act_scale"], a["act_zero_point"], a["act_bits"], a["w_bits"],
            a["has_bias"], a["epilogue"], q.shape[0])


def _merge_wide(graph: ir.Graph) -> int:
    groups: dict = {}
    for node in graph:
        if node.domain == QC and node.op_type == "QLinear":
            key = _wide_key(node)
            if key is not None:
                groups.setdefault(key, []).append(node)
    merged = 0
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        first = nodes[0]
        a = _qlinear_attrs(first)
        qs, ss, bs, widths = [], [], [], []
        for node in nodes:
            q = node.inputs[1].const_value.numpy()
            s = node.inputs[2].const_value.numpy().astype(np.float32).reshape(-1)
            qs.append(q)
            ss.append(np.broadcast_to(s, (q.shape[1],)))
            widths.append(q.shape[1])
            if a["has_bias"]:
                bs.append(node.inputs[-1].const_value.numpy().astype(np.float32).reshape(-1))
        base = (first.name or first.outputs[0].name) + ".wide"
        inputs = [first.inputs[0],
                  new_initializer(graph, f"{base}.q", np.concatenate(qs, axis=1)),
                  new_initializer(graph, f"{base}.scale", np.concatenate(ss).astype(np.float32))]
        if a["has_bias"]:
            inputs.append(new_initializer(graph, f"{base}.bias", np.concatenate(bs)))
        a["splits"] = widths
        a["w_axis"] = 1
        a["fused"] = sorted({r for n in nodes for r in _attrs(n)["fused"]}) + ["wide"]
        attributes = []
        defaults = ops.schema("QLinear").attributes
        for k, v in a.items():
            if k in defaults and v == defaults[k].default and k not in ("weight",):
                continue
            if isinstance(v, list):
                if not v:
                    continue
                attributes.append(ir.AttrStrings(k, v) if isinstance(v[0], str) else ir.AttrInt64s(k, [int(x) for x in v]))
            elif isinstance(v, str):
                attributes.append(ir.AttrString(k, v))
            elif isinstance(v, float):
                attributes.append(ir.AttrFloat32(k, v))
            else:
                attributes.append(ir.AttrInt64(k, int(v)))
        wide = ir.Node(QC, "QLinear", inputs, attributes, num_outputs=len(nodes), name=base,
                       metadata_props={CREATED_BY: "fuse:wide"})
        graph.insert_before(first, wide)
        for node, out in zip(nodes, wide.outputs):
            old = node.outputs[0]
            out.name, out.shape, out.type = old.name, old.shape, old.type
            old.name = f"{old.name}.unfused"
            ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
        # the wide node must come before every reader: readers of later members follow their member
        for node in nodes:
            graph.remove(node, safe=True)
        merged += len(nodes)
    return merged


@register_pass
@dataclasses.dataclass(frozen=True)
class FusePass(Pass):
    """Fuse quantized linears with their bias and activation, linears of one input, norm + rounding (rewrite rules)."""

    name = "fuse"
    provided = frozenset({Prop.FUSED})

    def call(self, model: ir.Model) -> PassResult:
        counts: dict[str, int] = {}
        for name, rule in RULES:
            total = 0
            while True:
                n = pattern.RewriteRuleSet([rule], commute=name == "bias").apply_to_model(model)
                total += n
                if not n:
                    break
            if total:
                counts[name] = total
        merged = _merge_wide(model.graph)
        if merged:
            counts["wide"] = merged
        if counts:
            model.opset_imports.setdefault(QC, QC_OPSET_VERSION)
            remove_unused(model)
            model.graph.sort()
        return PassResult(model, bool(counts), {"rules": counts})


def qlinear_parts(node: ir.Node) -> dict:
    """What a backend needs of a qc.QLinear: X, the weight inputs (arrays), grid, bias, epilogue, splits."""
    a = _attrs(node)
    rest = list(node.inputs[1:])
    bias = None
    if a["has_bias"]:
        bias = rest.pop().const_value.numpy().astype(np.float32).reshape(-1)
    act_quant = None
    if a["act_mode"] != "none":
        act_quant = {"mode": a["act_mode"], "scale": a["act_scale"], "zero_point": a["act_zero_point"], "bits": a["act_bits"]}
    parts = {"x": node.inputs[0], "weight": a["weight"], "bias": bias, "act": a["epilogue"], "act_quant": act_quant,
             "outputs": list(node.outputs), "splits": list(a["splits"]), "attrs": a, "weight_inputs": rest}
    if a["weight"] == "dequantize":
        parts["q"] = rest[0].const_value.numpy()
        parts["scale"] = rest[1].const_value.numpy()
        parts["zp"] = rest[2].const_value.numpy() if len(rest) > 2 and rest[2] is not None else None
        parts["axis"] = a["w_axis"]
        if not parts["splits"]:
            parts["splits"] = [parts["q"].shape[1]]
    return parts


def norm_quantize_parts(node: ir.Node) -> dict:
    a = _attrs(node)
    return {"axis": int(a["axis"]), "epsilon": float(a["epsilon"]), "mode": a["mode"], "scale": float(a["act_scale"]),
            "zero_point": int(a["act_zero_point"]), "bits": int(a["bits"])}
