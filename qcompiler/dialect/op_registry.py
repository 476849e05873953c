"""The `qc` op registry: what an op declares (`OpSchema`, `Attr`), `register`, and lookup.

The op families (`qc_ops`, `mixed_ops`, `fused_ops`) register their ops here; `qcompiler.dialect.ops`
imports every family, so code that uses `qcompiler.dialect.ops` sees them all. This module imports no op
family and nothing of the IR facade, so the families and `qcompiler.ir` can both depend on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.errors import VerificationError

QC_DOMAIN = "qc"
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


def schema(op_type: str) -> OpSchema:
    try:
        return _REGISTRY[op_type]
    except KeyError:
        raise VerificationError(f"unknown op '{QC_DOMAIN}.{op_type}'; registered: {', '.join(sorted(_REGISTRY)) or 'none'}") from None


def registered() -> list[OpSchema]:
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def attributes_of(node: ir.Node) -> dict[str, Any]:
    """The node's attributes as Python values, with the schema's defaults filled in."""
    op = schema(node.op_type)
    values = {name: spec.default for name, spec in op.attributes.items()}
    for name, attr in node.attributes.items():
        value = attr.value
        values[name] = list(value) if isinstance(value, (tuple, list)) else value
    return values
