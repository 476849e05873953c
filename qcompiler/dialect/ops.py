"""Ops of our own domain (`qc`): schema, verifier and numpy reference for each.

Quantization meaning lives in these ops and their attributes, so that it shows in the textual IR
and survives a round trip through a file. Every op registered here can be executed by the
reference executor (`qcompiler.analysis.execute`), which is how any stage of a pipeline is compared with
the float model. The backends lower `qc` ops away.

An op is registered with `register(OpSchema(...))` (`qcompiler.dialect.op_registry`, which the op families
import); the domain is versioned from day one (`QC_OPSET_VERSION`). This module imports every family,
so all ops are known to its users, and adds the schema verifier and the reference runner.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

# the families register their ops on import: importing this module makes every qc op known
from qcompiler.dialect import fused_ops, mixed_ops, qc_ops  # noqa: F401
from qcompiler.errors import VerificationError
from qcompiler.dialect.op_registry import (  # noqa: F401  (the registry's API, used as `ops.<name>`)
    _ATTR_TYPES, _REGISTRY, QC_DOMAIN, QC_OPSET_VERSION, Attr, OpSchema, attributes_of, register, registered, schema,
)


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
