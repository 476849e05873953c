"""Backends: turn the final IR into an artifact. Each target is one unit, a package
`codegen/<target>/` whose `__init__` holds its `Target` (this module's interface) and whose modules
its emitter; `codegen/targets.py` is the table the driver and `--target` read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx_ir as ir

from qcompiler.analysis import bitcost


class Target:
    """The interface (and the defaults) of a target."""

    name: str = ""
    keeps_source_float_type = False  # the artifact's edges and float weights may stay float16/bfloat16

    @property
    def cost_model(self) -> bitcost.StorageCost:
        """What `allocate-bits` prices for this target (default: ONNX Runtime's storage, no kernel table)."""
        return bitcost.ORT

    def check_host(self) -> None:
        """Fail with a UserError, before any slow step, when this machine cannot emit the target."""

    def complete(self, passes: list) -> list:
        """The pipeline with the passes this target needs appended or removed."""
        return passes

    def emit(self, model: ir.Model, staging: Path, manifest: dict[str, Any], bundled: Any, layout: Any) -> list[Path]:
        """Write the artifact into `staging` (an empty folder the caller owns); the files written.
        `bundled`, `layout`: the bundled model and a causal LM's cache layout (None when not an LM)."""
        raise NotImplementedError
