"""The targets `compile` can emit, as a table: the driver looks a target up here and asks it (its
host check, the passes it needs at the ends of a pipeline, its float type, its cost model, its
emitter: the `Target` interface in `qcompiler.codegen`). Adding a target is a package
`codegen/<target>/` holding its `Target` and emitter, and one entry here."""

from __future__ import annotations

from qcompiler.codegen import Target
from qcompiler.codegen.ort import OrtTarget
from qcompiler.codegen.triton import TritonTarget
from qcompiler.errors import UserError, shown

TARGETS: dict[str, Target] = {t.name: t for t in (OrtTarget(), TritonTarget())}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UserError(f"unknown target '{shown(name)}'; choose one of: {', '.join(TARGETS)}")
    return TARGETS[name]
