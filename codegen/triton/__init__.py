"""The Triton target: a Python package of Triton kernels and torch that runs `qc` ops itself.
`emit.py` writes the package (`kernels.py`, `runtime.py` and `reference.py` ship in it); `cost.py`
is what it stores for a mixed layer; `kernel_costs.json` the time its one-launch mixed kernel takes per
class route on a GPU (measured by `benchmarks/triton_kernel_costs.py`)."""

from __future__ import annotations

import functools
from pathlib import Path

from qcompiler.analysis import bitcost
from qcompiler.codegen import Target


class TritonTarget(Target):
    """A Python package of Triton kernels (`codegen/triton/`): it runs `qc` ops itself, so the
    pipeline drops `lower-ort` (the presets end with it) and ends with `fuse`."""

    name = "triton"

    @property
    def cost_model(self) -> bitcost.StorageCost:
        """What the package stores (`cost.py`: codes tight at their own width, fp16 scales and zero
        points, int32 permutation) and the kernel costs in `kernel_costs.json`."""
        return triton_cost_model()

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
def triton_cost_model() -> bitcost.StorageCost:
    from qcompiler.codegen.triton.cost import TritonStorageCost

    return TritonStorageCost(bitcost.KernelCosts.load(Path(__file__).resolve().parent / "kernel_costs.json"))
