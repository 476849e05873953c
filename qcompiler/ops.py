"""Ops of our own domain (`qc`): schema, verifier and numpy reference for each.

Quantization meaning lives in these ops and their attributes, so that it shows in the textual IR
and survives a round trip through a file. Every op registered here can be executed by the
reference executor (`qcompiler.execute`), which is how any stage of a pipeline is compared with
the float model. The backends lower `qc` ops away.

An op is registered with `register(OpSchema(...))`; the domain is versioned from day one
(`QC_OPSET_VERSION`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.ir import QC_DOMAIN, VerificationError

QC_OPSET_VERSION = 1

_ATTR_TYPES = {
    "int": ir.AttributeType.INT,
    "float": ir.AttributeType.FLOAT,
    "string": ir.AttributeType.STRING,
    "ints": ir.AttributeType.INTS,
    "floats": ir.AttributeType.FLOATS,
    "strings": ir.AttributeType.STRINGS,
}


@dataclasses.dataclass(frozen=True)
class Attr:
    """An attribute of a `qc` op: its type name (int, float, string, ints, floats, strings) and default."""

    type: str
    default: Any = None  # None: required

    @property
    def required(self) -> bool:
        return self.default is None


@dataclasses.dataclass(frozen=True)
class OpSchema:
    """What a `qc` op takes and computes.

    `reference(*inputs, **attributes)` returns a tuple of numpy arrays, one per output; optional
    inputs that are absent arrive as None; a variadic op receives every input positionally. `check(node)` adds op-specific checks on top of the
    schema's (input/output counts, required attributes and their types)."""

    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: Mapping[str, Attr]
    doc: str
    reference: Callable[..., tuple[np.ndarray, ...]]
    optional_inputs: int = 0
    variadic: bool = False  # the last input may repeat any number of times
    variadic_outputs: bool = False  # the output may repeat (one or more)
    check: Callable[[ir.Node], None] | None = None
    version: int = QC_OPSET_VERSION


_REGISTRY: dict[str, OpSchema] = {}


def register(schema: OpSchema) -> OpSchema:
    if schema.op_type in _REGISTRY:
        raise ValueError(f"qc op '{schema.op_type}' is registered twice")
    _REGISTRY[schema.op_type] = schema
    return schema


def _load_definitions() -> None:
    import qcompiler.fused_ops  # noqa: F401  (importing registers the ops)
    import qcompiler.mixed_ops  # noqa: F401
    import qcompiler.qc_ops  # noqa: F401


def schema(op_type: str) -> OpSchema:
    _load_definitions()
    try:
        return _REGISTRY[op_type]
    except KeyError:
        raise VerificationError(f"unknown op '{QC_DOMAIN}.{op_type}'; registered: {', '.join(sorted(_REGISTRY)) or 'none'}") from None


def registered() -> list[OpSchema]:
    _load_definitions()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def attributes_of(node: ir.Node) -> dict[str, Any]:
    """The node's attributes as Python values, with the schema's defaults filled in."""
    op = schema(node.op_type)
    values = {name: spec.default for name, spec in op.attributes.items()}
    for name, attr in node.attributes.items():
        value = attr.value
        values[name] = list(value) if isinstance(value, (tuple, list)) else value
    return values


def verify_node(node: ir.Node) -> None:
    """Schema checks, then the op's own."""
    op = schema(node.op_type)
    where = f"node '{node.name}' ({QC_DOMAIN}.{node.op_type})"
    n_in = len(node.inputs)
    most = 1 << 30 if op.variadic else len(op.inputs)
    if not len(op.inputs) - op.optional_inputs <= n_in <= most:
        raise VerificationError(f"{where} has {n_in} inputs; the schema takes {list(op.inputs)}")
    if (len(node.outputs) < 1) if op.variadic_outputs else (len(node.outputs) != len(op.outputs)):
        raise VerificationError(f"{where} has {len(node.outputs)} outputs; the schema gives {list(op.outputs)}")
    for name, attr in node.attributes.items():
        if name not in op.attributes:
            raise VerificationError(f"{where} has unknown attribute '{name}'; known: {sorted(op.attributes)}")
        if attr.type != _ATTR_TYPES[op.attributes[name].type]:
            raise VerificationError(f"{where}: attribute '{name}' must be {op.attributes[name].type}")
    for name, spec in op.attributes.items():
        if spec.required and name not in node.attributes:
            raise VerificationError(f"{where} lacks required attribute '{name}'")
    if op.check is not None:
        op.check(node)


def run_reference(node: ir.Node, inputs: list[np.ndarray | None]) -> tuple[np.ndarray, ...]:
    """Execute one `qc` node with its numpy reference."""
    op = schema(node.op_type)
    return op.reference(*inputs, **attributes_of(node))
