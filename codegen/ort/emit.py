"""The ONNX Runtime backend: `model.onnx` (+ `model.onnx.data` from 64 MiB of weights) and `manifest.json`.

The emitted model passes `onnx.checker`, loads in ONNX Runtime's CPU provider, and holds no op of
our own domain (`lower-ort` lowers them before this runs). The manifest records what a deployment
needs to know: opsets and contrib ops required, effective bits per weight computed from the bytes
written, the source model's hash and the pipeline as printed, and for each mixed-precision layer
(`mixed_layers`) the route `lower-ort` took, the bytes at rest (its initializers in the file) and
the bytes resident after ONNX Runtime creates a session: its initializers in the graph ONNX Runtime
keeps after its optimizations (constant folding expands a weight built from constants into a float32
initializer), read from the optimized model ONNX Runtime writes when the artifact is checked.
Kernel-private copies made at session start (MatMulNBits repacks its codes, about the same bytes)
are not counted; `benchmarks/mixed_latency.py` measures process RSS for that.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from qcompiler.analysis import execute
from qcompiler.errors import UserError, first_line
from qcompiler.ir import initializer_bytes, on_disk_tensors, qc_nodes, save, weight_values
from qcompiler.ir.meta import MERGED_LAYERS_KEY, ROUTE_KEY
from qcompiler.support.progress import progress

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = "qcompiler.manifest/1"
# An artifact with this many bytes of weights or more keeps them in `model.onnx.data`: ONNX Runtime
# maps that file and lets go of what it has repacked, where a one-file model's weights stay held as
# read (SmolLM2 `mixed{avg-bits=4.25}`, 177 MiB: a session adds 388 MiB from one file, 232 MiB
# from two; docs/real-size.md "Memory at session start").
EXTERNAL_WEIGHTS_FROM = 64 << 20


def emit(model: ir.Model, directory: Path, manifest: dict[str, Any], extra_files: tuple[Path, ...] = ()) -> list[Path]:
    """Write the artifact into `directory` (a temporary folder owned by the caller, empty but for
    `extra_files`, which the manifest lists beside the model's files)."""
    leftover = qc_nodes(model)
    if leftover:
        kinds = ", ".join(sorted({f"qc.{n.op_type}" for n in leftover}))
        raise UserError(f"the ort target cannot run {kinds}; end the pipeline with 'lower-ort'")
    megabytes = initializer_bytes(model) >> 20
    with progress("write model.onnx (MB of weights)", megabytes) as bar:
        files = save(model, directory / "model.onnx", progress=lambda done, _total: bar.update(done >> 20),
                     external_from=EXTERNAL_WEIGHTS_FROM)
    routes = {n.name: n.metadata_props[ROUTE_KEY] for n in model.graph if ROUTE_KEY in n.metadata_props}
    merged = {n.name: n.metadata_props[MERGED_LAYERS_KEY].split(",") for n in model.graph if MERGED_LAYERS_KEY in n.metadata_props}
    if on_disk_tensors(model):  # a large model: ONNX Runtime maps its weights; folding would hold copies of them
        log.info("emitted model checked without ONNX Runtime's graph optimizations (weights on disk: constant folding "
                 "would hold copies of them); the manifest leaves out the mixed layers' resident bytes")
        _check(directory / "model.onnx", optimize=False)
        resident = None
    else:
        resident = _check(directory / "model.onnx", keep_optimized=bool(routes))
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "target": "ort",
        **manifest,
        "files": sorted(p.name for p in [*files, *extra_files]),
        "opsets": {domain or "ai.onnx": version for domain, version in sorted(model.opset_imports.items())},
        "contrib_ops": contrib_ops(model),
        **weight_bytes(model, manifest.get("source", {}).get("weights")),
    }
    if routes:
        manifest["mixed_layers"] = mixed_layers(model, routes, resident, merged)
    tables = quantized_embeddings(model)
    if tables:
        manifest["embeddings"] = tables
        manifest.update(with_tables(manifest, tables))
    path = directory / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return files + [path]


def _check(path: Path, keep_optimized: bool = False, optimize: bool = True) -> dict[str, int]:
    """Check the model and create an ONNX Runtime session from it (`optimize=False`: without graph
    optimizations, so that nothing is folded: every node still gets its kernel); with
    `keep_optimized`, return the bytes of each initializer of the graph that session runs (after
    constant folding)."""
    try:
        onnx.checker.check_model(str(path))
        if not keep_optimized:
            execute.ort_session(str(path), prepack=False, optimize=optimize)  # the repacked weights would be a second copy
            return {}
        with tempfile.TemporaryDirectory(prefix="qc_optimized_") as tmp:
            optimized = Path(tmp) / "optimized.onnx"
            execute.ort_session(str(path), optimized_path=optimized, prepack=False)
            return initializer_bytes_in_file(optimized)
    except Exception as exc:
        raise RuntimeError(f"emitted model does not load: {first_line(str(exc))}") from exc


def initializer_bytes_in_file(path: Path) -> dict[str, int]:
    """Bytes of each initializer of an ONNX file, without reading external data into memory."""
    proto = onnx.load(str(path), load_external_data=False)
    sizes = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            sizes[tensor.name] = int({e.key: e.value for e in tensor.external_data}.get("length", 0))
        else:
            sizes[tensor.name] = onnx.numpy_helper.to_array(tensor).nbytes
    return sizes


def mixed_layers(model: ir.Model, routes: dict[str, str], resident: dict[str, int] | None,
                 merged: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """Per lowered mixed-precision layer: the route, the bytes at rest and the bytes resident (left
    out where `resident` is None: not measured), and for a layer that computes several linears of
    one input (`merged`) their names (`layers`). A layer's initializers are named `<layer>.*` by
    `lower-ort` (ONNX Runtime keeps that name for what it folds, or prefixes it, e.g.
    `FusedBack_<layer>.*` for an fp16 tensor it converts)."""
    at_rest = {v.name: v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None}
    out = {}
    for layer, route in sorted(routes.items()):
        members = (merged or {}).get(layer, [])
        prefixes = tuple(f"{name}." for name in (layer, *members))  # a wide kernel's concatenated inputs keep their layers' names
        out[layer] = {"route": route, "bytes_at_rest": sum(b for name, b in at_rest.items() if name.startswith(prefixes))}
        if members:
            out[layer]["layers"] = members
        if resident is not None:
            out[layer]["bytes_resident"] = sum(b for name, b in resident.items()
                                               if name.startswith(prefixes) or name.startswith(tuple(f"FusedBack_{p}" for p in prefixes)))
    return out


def quantized_embeddings(model: ir.Model) -> dict[str, Any]:
    """The embedding tables stored as codes (`GatherBlockQuantized`): per lookup its rows x columns,
    bits and bytes (codes, scales and zero points), and the bits per table entry over all of them.
    Tables are not layer weights, so `effective_bits_per_weight` leaves them out;
    `effective_bits_per_weight_with_tables` counts both (`with_tables`). Codes a table shares with
    its tied head (`shared_with`: the head's kernel) are the head's bytes, not counted again."""
    tables, entries, stored = {}, 0, 0
    for node in model.graph:
        if node.op_type != "GatherBlockQuantized" or node.domain != "com.microsoft":
            continue
        codes = node.inputs[0]
        bits = node.attributes.get_int("bits", 4)
        rows, columns = int(codes.shape[0]), math.prod(codes.shape[1:]) * 8 // bits
        readers = [use.node for use in codes.uses() if use.node is not node]
        size = sum(v.const_value.nbytes for v in node.inputs
                   if v is not None and v.const_value is not None and v.is_initializer() and not (v is codes and readers))
        tables[node.name] = {"shape": [rows, columns], "bits": bits, "block_size": node.attributes.get_int("block_size", 32), "bytes": size}
        if readers:
            tables[node.name]["shared_with"] = readers[0].name
        entries, stored = entries + rows * columns, stored + size
    if not tables:
        return {}
    return {"tables": tables, "bits_per_entry": round(8 * stored / entries, 4)}


def with_tables(manifest: dict[str, Any], embeddings: dict[str, Any]) -> dict[str, Any]:
    """Bits per weight over the layers' weights and the stored embedding tables' entries together
    (what a budget that holds the tables, `allocate-bits{embeddings=budget}`, is spent on). A table
    sharing its head's codes adds its bytes (its own scales and zero points), not its entries: the
    head's weights already count them."""
    tables = embeddings["tables"].values()
    entries = sum(t["shape"][0] * t["shape"][1] for t in tables if "shared_with" not in t)
    count = manifest.get("weights", 0) + entries
    stored = manifest.get("weight_bytes", 0) + sum(t["bytes"] for t in tables)
    return {"effective_bits_per_weight_with_tables": round(8 * stored / count, 4)} if count else {}


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
