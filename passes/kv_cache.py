"""`kv-cache{dtype=int8}`: a decoder's KV cache stored as int8 with a scale per token and head.

A decode-step graph (`models/causal_lm.py`) appends each step's keys and values to the past with
`present.{i}.key = Concat(past_key_values.{i}.key, new, axis=2)`. With `dtype=int8` each such
pair is rewritten (format and numpy reference: `qcompiler/dialect/kv_int8.py`):

    past (int8) ---Cast---Mul(past_scale)--\
                                            Concat --> the attention, as before (float)
    new (float) --------------------------/
       `--> scale = max(ReduceMax(|new|, last axis), EPS) / 127,  codes = Cast<int8>(Round(new / scale))
    present        = Concat(past, codes)          (int8, graph output)
    present_scale  = Concat(past_scale, scale)    (float32 [batch, kv_heads, total, 1], graph output)

and the graph gains the inputs `past_key_values.{i}.key_scale` / `.value_scale` and the outputs
`present.{i}.key_scale` / `.value_scale`, after the cache tensors in the same order.

Why dynamic scales per token and head rather than static per-head scales from calibration: each
token's scale is computed once, when the token enters the cache, from that token's own row, so
no calibration is needed, a token whose keys are larger than anything calibration saw is not
clipped, and one outlier token cannot coarsen every other token of its head. The cost is one
float32 per token and head beside head_dim bytes (head_dim 64: 68 bytes in place of 256, 3.8x
smaller). The int8 codes are never requantized: a token's codes and scale pass from step to
step unchanged, so the error of a cached element stays the one rounding, at most scale / 2.
The step's own keys and values enter the attention at full precision (only the past is
dequantized), so a prefill computes what the float graph computes; every later step reads the
rounded past. ONNX Runtime's attention kernels take no such scales, so the attention itself runs
in float32 on the dequantized past.

The rewrite changes the graph's inputs: passes that run the model on calibration data (which
holds float pasts) must come before it (`followers`: only `lower-ort`, `fuse` and `canonicalize`
may follow). `dtype=float32` leaves the cache as captured. A graph with no `past_key_values.*`
inputs is refused. The artifact records the format in the manifest's `causal_lm` section
(`kv_cache: int8`); `qcompiler generate` and `qcompiler eval` run it; ONNX Runtime GenAI cannot
(its decoder configuration has no cache scales), so no `genai_config.json` is written for it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.dialect.kv_int8 import EPS, PAST_PREFIX, PRESENT_PREFIX, QMAX, scale_name
from qcompiler.errors import UserError
from qcompiler.ir.layers import new_initializer
from qcompiler.ir.meta import CREATED_BY, Prop
from qcompiler.pipeline.passbase import Pass, PassResult, option, register_pass

log = logging.getLogger(__name__)

CACHE_NAME = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


@dataclasses.dataclass(frozen=True)
class CacheSite:
    """One cache tensor: its past input, the Concat that appends the step, its present output."""

    past: ir.Value
    concat: ir.Node
    new: ir.Value
    present: ir.Value


@register_pass
@dataclasses.dataclass(frozen=True)
class KvCachePass(Pass):
    """KV cache as int8 with one scale per token and head (decoder graphs with past_key_values.*)."""

    name = "kv-cache"
    provided = frozenset({Prop.KV_CACHE_FORMAT})
    followers = frozenset({"lower-ort", "fuse", "canonicalize", "kv-cache"})

    dtype: Literal["float32", "int8"] = option("int8", "how the cache is stored: int8 with per-token-per-head scales, or float32 as captured")

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        names = [v.name for v in graph.inputs if v.name and CACHE_NAME.match(v.name)]
        if not names:
            raise UserError("kv-cache: the model has no past_key_values.* inputs (a decoder with a KV cache); "
                            "drop kv-cache from the pipeline or compile a causal LM with a cache (e.g. smollm2-135m-kv)")
        sites = [find_site(graph, v) for v in graph.inputs if v.name in names and v.dtype == ir.DataType.FLOAT]
        if self.dtype == "float32" or not sites:
            return PassResult(model, False, {"caches_int8": 0})
        helpers = _shared_constants(graph)
        for site in sites:
            _store_int8(graph, site, helpers)
        return PassResult(model, True, {"caches_int8": len(sites)})


def find_site(graph: ir.Graph, past: ir.Value) -> CacheSite:
    """The Concat on axis 2 that appends the step to `past` and whose output is the matching
    `present.*` graph output; a UserError naming the cache when the graph has another shape."""
    present_name = PRESENT_PREFIX + past.name[len(PAST_PREFIX):]
    for use in past.uses():
        node = use.node
        if node.op_type != "Concat" or node.domain != "" or use.idx != 0 or len(node.inputs) != 2:
            continue
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else None
        rank = len(past.shape) if past.shape is not None else 4
        out = node.outputs[0]
        if axis is not None and axis % rank == 2 and out.name == present_name and out.is_graph_output():
            return CacheSite(past, node, node.inputs[1], out)
    raise UserError(f"kv-cache: '{past.name}' is not appended to by a Concat on axis 2 that gives '{present_name}'; "
                    "the pass takes the decode-step graphs qcompiler captures (models/causal_lm.py)")


def _shared_constants(graph: ir.Graph) -> dict[str, ir.Value]:
    """The constants every site reads: the reduced axis, EPS and QMAX."""
    return {
        "axes": new_initializer(graph, "kv_cache.last_axis", np.array([-1], np.int64)),
        "eps": new_initializer(graph, "kv_cache.eps", np.array(EPS, np.float32)),
        "qmax": new_initializer(graph, "kv_cache.qmax", np.array(QMAX, np.float32)),
    }


def _store_int8(graph: ir.Graph, site: CacheSite, helpers: dict[str, ir.Value]) -> None:
    """Rewrite one cache tensor as int8 codes plus per-token-per-head scales (module docstring)."""
    base = site.past.name
    anchor = site.concat

    def op(kind: str, inputs, attributes=None, name: str = "") -> ir.Value:
        node = ir.node(kind, inputs, attributes, name=f"{base}.{name or kind.lower()}", metadata_props={CREATED_BY: "kv-cache"})
        node.outputs[0].name = node.name
        graph.insert_before(anchor, node)
        return node.outputs[0]

    dims = list(site.past.shape) if site.past.shape is not None else None
    past_scale = ir.Value(name=scale_name(base), type=ir.TensorType(ir.DataType.FLOAT),
                          shape=ir.Shape([*dims[:-1], 1]) if dims else None)
    graph.inputs.append(past_scale)
    site.past.type = ir.TensorType(ir.DataType.INT8)

    past_float = op("Mul", [op("Cast", [site.past], {"to": ir.DataType.FLOAT}), past_scale], name="dequantize")
    site.concat.replace_input_with(0, past_float)

    absmax = op("ReduceMax", [op("Abs", [site.new], name="abs"), helpers["axes"]], {"keepdims": 1}, name="absmax")
    new_scale = op("Div", [op("Max", [absmax, helpers["eps"]], name="floor"), helpers["qmax"]], name="new_scale")
    codes = op("Cast", [op("Round", [op("Div", [site.new, new_scale], name="scaled")])], {"to": ir.DataType.INT8}, name="codes")

    present_float = site.present
    index = list(graph.outputs).index(present_float)
    present_float.name = f"{base}.float_present"
    present = op("Concat", [site.past, codes], {"axis": 2}, name="present")
    present_scale = op("Concat", [past_scale, new_scale], {"axis": 2}, name="present_scale")
    present.name, present_scale.name = PRESENT_PREFIX + base[len(PAST_PREFIX):], scale_name(PRESENT_PREFIX + base[len(PAST_PREFIX):])
    present.type, present_scale.type = ir.TensorType(ir.DataType.INT8), ir.TensorType(ir.DataType.FLOAT)
    if present_float.shape is not None:
        present.shape = ir.Shape(list(present_float.shape))
        present_scale.shape = ir.Shape([*list(present_float.shape)[:-1], 1])
    graph.outputs[index] = present
    graph.outputs.append(present_scale)
