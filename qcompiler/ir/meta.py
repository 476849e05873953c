"""What passes tell each other besides the IR: the properties a model has, and the metadata keys.

Properties (`Prop`) are what a pass `required`s, `provided`s or `invalidated`s; the pipeline checks
their order before anything runs and the model records the ones it has in its `metadata_props`
under `PROPERTIES_KEY`, so a saved model still knows it is, say, `calibrated`. A pass that declares
a property not listed here is refused when it registers (`passbase.register_pass`).

Metadata keys name what sits beside the IR: in `.meta` (this process only; a file does not carry
it) or in `metadata_props` (saved with the model). Every key any module reads or writes is declared
here once, with where it lives, its value type and its meaning (`KEYS`); modules import the
constant, never spell the string.

A saved property may vouch for facts a file does not carry (`calibrated`: the statistics in
`.meta`): `require_statistics` (run by the pass manager before every pass that declares
`reads_statistics`) and `activation_stats` fail, naming the pass to run first, where they are not
there.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from typing import Any

import onnx_ir as ir

from qcompiler.errors import UserError, shown

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Properties


class Prop(str, enum.Enum):
    """An IR property; its value is the name written in messages and in the saved model."""

    def __new__(cls, name: str, meaning: str) -> Prop:
        member = str.__new__(cls, name)
        member._value_ = name
        member.meaning = meaning
        return member

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__

    CANONICAL = "canonical", "Gemm is MatMul + Add, constants folded, dead code gone, shapes inferred, topological order"
    EQUALIZED = "equalized", "Conv -> ReLU-like -> Conv pairs have equalized output/input channel ranges"
    CALIBRATED = "calibrated", "weighted layers' inputs carry calibration statistics (STATS_KEY, CALIBRATION_KEY; in memory only)"
    STATS_CURRENT = "activation-stats-current", "the attached statistics still describe the tensors they sit on"
    SMOOTHED = "smoothed", "linear inputs are divided by per-channel scales (qc.ChannelScale: SmoothQuant or AWQ), weights multiplied"
    FOLDED = "folded", "smoothing scales are folded into producers (or kept as a Mul, or undone) and BatchNorm into Conv"
    QUANTIZED = "quantized", "linears have int8 weights (qc.DequantizeWeight) and, as chosen, int8 activations (qc.QuantizeActivation)"
    BITS_ALLOCATED = "bits-allocated", "each weight sits behind a qc.BitAllocation with its bits per input channel"
    WEIGHTS_QUANTIZED = "weights-quantized", "each allocated layer is a qc.MixedMatMul (float weight in FLOAT_WEIGHT_KEY)"
    ROUNDING_LEARNED = "rounding-learned", "mixed or int8 layers' rounding was learned block by block (flexround)"
    ROUNDING_COMPENSATED = "rounding-compensated", "mixed layers were rounded with GPTQ's error compensation"
    SCALES_TUNED = "scales-tuned", "mixed or int8 layers' scales (and int8 activation grids) were tuned block by block (tune-scales)"
    PERMUTATION_FOLDED = "permutation-folded", "mixed layers' channel permutations are folded into their producers"
    FUSED = "fused", "quantized linears are merged with their norms, biases, epilogues and shared inputs (qc.QLinear, qc.NormQuantize)"
    EMBEDDING_QUANTIZED = "embedding-quantized", "embedding tables are stored as codes (qc.GatherQuantized)"
    KV_CACHE_FORMAT = "kv-cache-format", "the decoder's KV cache is int8 with a scale per token and head"
    LOWERED_ORT = "lowered-ort", "no qc op is left: standard ONNX and com.microsoft ops for ONNX Runtime"


_UNKNOWN_SEEN: set[str] = set()


def as_props(names: str) -> frozenset[Prop]:
    """The properties of a comma-separated list as saved in a model; names this version does not
    know are left out (logged once each)."""
    known = {p.value: p for p in Prop}
    props = set()
    for name in filter(None, names.split(",")):
        if name in known:
            props.add(known[name])
        elif name not in _UNKNOWN_SEEN:
            _UNKNOWN_SEEN.add(name)
            log.warning("the model records a property this version does not know: '%s' (ignored)", shown(name))
    return frozenset(props)


# --------------------------------------------------------------------------------------------
# Metadata keys

VALUE_META, NODE_META, MODEL_META = "value.meta", "node.meta", "model.meta"  # this process only
NODE_PROPS, MODEL_PROPS = "node.metadata_props", "model.metadata_props"  # saved with the model


@dataclasses.dataclass(frozen=True)
class MetaKey:
    name: str
    place: str  # one of the five places above
    type: str  # the value's type
    meaning: str

    @property
    def saved(self) -> bool:
        return self.place in (NODE_PROPS, MODEL_PROPS)


KEYS: dict[str, MetaKey] = {}


def _key(name: str, place: str, type_: str, meaning: str) -> str:
    KEYS[name] = MetaKey(name, place, type_, meaning)
    return name


STATS_KEY = _key("qc.stats", VALUE_META, "calibration.TensorStats",
                 "per-channel statistics of the tensor: written by calibrate (kept exact by smooth, awq-scale, "
                 "fold-scales), read by smooth, awq-scale, quantize, allocate-bits, quantize-weights")
CALIBRATION_KEY = _key("qc.calibration", MODEL_META, "dict[str, Any]",
                       "how calibrate ran (method, percentile, bins, samples, source): read by quantize")
SMOOTHED_KEY = _key("qc.smoothed", VALUE_META, "bool",
                    "the readers of this tensor are smoothed already: smooth and awq-scale never scale them twice")
FLOAT_WEIGHT_KEY = _key("qc.float_weight", NODE_META, "ir.TensorProtocol",
                        "a qc.MixedMatMul's float weight [K, N] in original row order (a qc.GatherQuantized's: its float "
                        "table; a qc.DequantizeWeight's: the weight before quantize made it int8): written by "
                        "quantize-weights and quantize, read by flexround, tune-scales and gptq")
FLOAT_BIAS_KEY = _key("qc.float_bias", NODE_META, "np.ndarray | None",
                      "a qc.MixedWeight's Conv bias before quantize-weights corrected it, or on a Conv, its bias before "
                      "quantize corrected it (None: the Conv had none): written by quantize-weights and quantize, read "
                      "by gptq to rebuild the float model and by flexround and tune-scales for the float stream")
CHANNEL_ORDER_KEY = _key("qc.channel_order", VALUE_META, "np.ndarray",
                         "on a linear's output whose channels fold-permutation reordered: channel j holds the former "
                         "channel order[j]; read by the report, which compares the output with its float reference so")
CREATED_BY = _key("qc.created_by", NODE_PROPS, "str", "the pass (or 'pass:rule') that created the node")
SCOPE_KEY = _key("qc.scope", NODE_PROPS, "str", "the torch module path a captured node came from")
STORED_WEIGHTS = _key("qc.stored_weights", NODE_PROPS, "str ('1')",
                      "every constant input of the node is weight bytes (sparse outlier corrections)")
ROUTE_KEY = _key("lower-ort.mixed_route", NODE_PROPS, "str",
                 "on a lowered mixed layer's last node: the ONNX Runtime route taken per class, read by codegen/ort")
MERGED_LAYERS_KEY = _key("lower-ort.merged_layers", NODE_PROPS, "str (comma-separated layer names)",
                         "on a lowered mixed layer that computes several linears of one input (one allocation, "
                         "merged by lower-ort): their names, read by codegen/ort for the manifest")
SOURCE_FLOAT_KEY = _key("qc.source_float_type", MODEL_PROPS, "str (float32, float16, bfloat16)",
                        "the source model's float type, restored at the emitted model's edges")
SOURCE_EDGES_KEY = _key("qc.source_float_edges", MODEL_PROPS, "str (JSON list of names)",
                        "the graph inputs and outputs that were of the source float type")
PROPERTIES_KEY = _key("qcompiler.properties", MODEL_PROPS, "str (comma-separated Prop names)",
                      "the properties the model has")
TORCH_SCOPES_KEY = _key("pkg.torch.onnx.name_scopes", NODE_PROPS, "str (Python list literal)",
                        "torch's exporter: the module path of a node, read once by capture (then dropped)")


# --------------------------------------------------------------------------------------------
# Typed reads that fail with the fix


def require_statistics(model: ir.Model, reader: str) -> None:
    """Fail in one line when `model` has no calibration statistics in memory (a model read back from a
    file records `calibrated` but not them)."""
    if CALIBRATION_KEY not in model.meta:
        raise UserError(
            f"{reader} reads calibration statistics, which live in memory only, and this model has none "
            f"(read back from a file?); run calibrate before {reader} in the same pipeline"
        )


def activation_stats(value: ir.Value, reader: str, layer: str) -> Any:
    """The calibration statistics (`calibration.TensorStats`) of `value` (the input of `layer`), or a one-line error naming the
    pass to run first: they live in memory only, so `calibrate` runs in the same pipeline."""
    stats = value.meta.get(STATS_KEY)
    if stats is None:
        raise UserError(
            f"{reader}: layer '{layer}' has no calibration statistics on its input '{value.name}' (they live in "
            f"memory only); run calibrate before {reader} in the same pipeline"
        )
    return stats
