"""The targets `compile` can emit, each one unit: what it checks on the host before any slow step,
the passes it needs at the ends of a pipeline, the float type its artifact keeps, its cost model
(what `allocate-bits` prices: the bits its emitter stores and, where measured, its kernels' time),
and its emitter.

The driver looks a target up in `TARGETS` and asks it; adding a target is one class here and its
emitter in `codegen/<target>/`."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qcompiler.analysis import bitcost
from qcompiler.errors import UserError, shown

HERE = Path(__file__).resolve().parent


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


class OrtTarget(Target):
    """An ONNX Runtime model folder (`codegen/ort.py`): the pipeline ends with `lower-ort`; a causal
    LM also gets its tokenizer and ORT GenAI's config."""

    name = "ort"
    keeps_source_float_type = True

    @property
    def cost_model(self) -> bitcost.StorageCost:
        """`lower-ort`'s storage (`bitcost`) and the kernel costs measured by benchmarks/kernel_costs.py."""
        return ort_cost_model()

    def complete(self, passes: list) -> list:
        from qcompiler.passes.lower_ort import LowerOrtPass

        if LowerOrtPass.name in [p.name for p in passes]:
            return passes
        return passes + [LowerOrtPass()]

    def emit(self, model, staging, manifest, bundled, layout):
        from qcompiler.codegen import ort

        if layout is None:
            return ort.emit(model, staging, manifest)
        from qcompiler.codegen.lm_artifact import write_lm_files

        lm_files = write_lm_files(staging, bundled, layout)
        return ort.emit(model, staging, manifest, tuple(lm_files)) + lm_files


class TritonTarget(Target):
    """A Python package of Triton kernels (`codegen/triton/`): it runs `qc` ops itself, so the
    pipeline drops `lower-ort` (the presets end with it) and ends with `fuse`."""

    name = "triton"

    @property
    def cost_model(self) -> bitcost.StorageCost:
        """ONNX Runtime's prices, no kernel-cost table, for now. What the package really stores is
        `codegen/triton/cost.py`'s `TRITON`; it is not this target's model yet because the package
        pads every class to a whole K tile (512 rows at 2 bits, 128 at 8), so priced honestly a mixed
        budget below about 9 bits is infeasible on a layer of 128 inputs (the test suite's blocks).
        Storing the codes tight and padding at load would make the two agree."""
        return TRITON_AS_ORT

    def check_host(self) -> None:
        from qcompiler.codegen.triton.emit import check_triton

        check_triton()

    def complete(self, passes: list) -> list:
        from qcompiler.passes.fuse import FusePass
        from qcompiler.passes.lower_ort import LowerOrtPass

        names = [p.name for p in passes]
        passes = [p for p in passes if p.name != LowerOrtPass.name]
        return passes if FusePass.name in names else passes + [FusePass()]

    def emit(self, model, staging, manifest, bundled, layout):
        from qcompiler.codegen.triton import emit

        return emit.emit(model, staging, manifest)


@functools.cache
def ort_cost_model() -> bitcost.StorageCost:
    return bitcost.StorageCost(bitcost.KernelCosts.load(HERE / "ort_kernel_costs.json"))


TRITON_AS_ORT = bitcost.StorageCost(name="triton")


TARGETS: dict[str, Target] = {t.name: t for t in (OrtTarget(), TritonTarget())}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UserError(f"unknown target '{shown(name)}'; choose one of: {', '.join(TARGETS)}")
    return TARGETS[name]
