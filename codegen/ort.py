"""The ONNX Runtime backend: `model.onnx` (+ `model.onnx.data` when large) and `manifest.json`.

The emitted model passes `onnx.checker`, loads in ONNX Runtime's CPU provider, and holds no op of
our own domain (`lower-ort` lowers them before this runs). The manifest records what a deployment
needs to know: opsets and contrib ops required, effective bits per weight computed from the bytes
written, the source model's hash and the pipeline as printed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from qcompiler import execute
from qcompiler.errors import UserError, first_line
from qcompiler.ir import initializer_bytes, qc_nodes, save, weight_values
from qcompiler.progress import progress

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = "qcompiler.manifest/1"


def emit(model: ir.Model, directory: Path, manifest: dict[str, Any], extra_files: tuple[Path, ...] = ()) -> list[Path]:
    """Write the artifact into `directory` (a temporary folder owned by the caller, empty but for
    `extra_files`, which the manifest lists beside the model's files)."""
    leftover = qc_nodes(model)
    if leftover:
        kinds = ", ".join(sorted({f"qc.{n.op_type}" for n in leftover}))
        raise UserError(f"the ort target cannot run {kinds}; end the pipeline with 'lower-ort'")
    megabytes = initializer_bytes(model) >> 20
    with progress("write model.onnx (MB of weights)", megabytes) as bar:
        files = save(model, directory / "model.onnx", progress=lambda done, _total: bar.update(done >> 20))
    _check(directory / "model.onnx")
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "target": "ort",
        **manifest,
        "files": sorted(p.name for p in [*files, *extra_files]),
        "opsets": {domain or "ai.onnx": version for domain, version in sorted(model.opset_imports.items())},
        "contrib_ops": contrib_ops(model),
        **weight_bytes(model, manifest.get("source", {}).get("weights")),
    }
    path = directory / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return files + [path]


def _check(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
        execute.ort_session(str(path))
    except Exception as exc:
        raise RuntimeError(f"emitted model does not load: {first_line(str(exc))}") from exc


def contrib_ops(model: ir.Model) -> list[str]:
    """Ops outside the default ONNX domain that a runtime must provide, as `domain.Op`."""
    ops = {f"{n.domain}.{n.op_type}" for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain not in ("", "ai.onnx")}
    return sorted(ops)


def weight_bytes(model: ir.Model, source_weights: int | None) -> dict[str, Any]:
    """Bytes stored for weights (see `qcompiler.ir.weight_values`) and bits per source weight."""
    total = sum(v.const_value.nbytes for v in weight_values(model))
    count = source_weights or 0
    return {
        "weight_bytes": total,
        "weights": count,
        "effective_bits_per_weight": round(8 * total / count, 4) if count else None,
    }
