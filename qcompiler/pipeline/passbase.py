"""The pass base class and the pass registry.

A pass is a small frozen dataclass subclassing `onnx_ir.passes.InPlacePass`; its options are the
dataclass fields (each with a `doc` in its metadata), its kebab-case `name` is used everywhere
(pipeline strings, dumps, reports), and it declares the IR properties it requires and provides.
`call(model)` returns a `PassResult` whose `modified` flag is honest and whose `stats` dict says
what the pass did.

Properties are the members of `qcompiler.ir.meta.Prop`; a pass that declares anything else is refused
when it registers. A model records the ones it has in its `metadata_props` under
`meta.PROPERTIES_KEY`, so a model that was saved half-way through a pipeline still knows it is, say,
`calibrated`.

`Prop.STATS_CURRENT` says that the activation statistics `calibrate` attached still describe the
tensors they sit on. Every pass drops it unless it declares `keeps_activation_stats` (it changes no
activation, or updates the statistics of those it changes exactly), so a new pass that changes
numerics can never leave stale statistics trusted.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, ClassVar

import onnx_ir as ir

from qcompiler.ir.meta import PROPERTIES_KEY, Prop, as_props


@dataclasses.dataclass
class PassResult(ir.passes.PassResult):
    """`onnx_ir`'s result plus the pass's statistics (JSON-serialisable values)."""

    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Pass(ir.passes.InPlacePass):
    """Base of every qcompiler pass. Subclasses set `name`, the properties, and implement `call`."""

    name: ClassVar[str] = ""
    required: ClassVar[frozenset[Prop]] = frozenset()
    # At least one of these must hold too (a pass that works on either of two forms, e.g. int8 or mixed weights).
    required_one_of: ClassVar[frozenset[Prop]] = frozenset()
    provided: ClassVar[frozenset[Prop]] = frozenset()
    # Properties that no longer hold after this pass (e.g. a lowering removes `qc` ops).
    invalidated: ClassVar[frozenset[Prop]] = frozenset()
    keeps_activation_stats: ClassVar[bool] = False
    # The pass reads the statistics `calibrate` keeps in memory (`meta.STATS_KEY`): the pass manager
    # refuses to run it on a model that has none (one read back from a file still says `calibrated`).
    reads_statistics: ClassVar[bool] = False
    # Why a second run of the pass changes the IR again ("" = it changes nothing: the contract test
    # in tests/test_pass_contract.py runs every pass twice and holds it to that).
    rerun_changes: ClassVar[str] = ""
    # The only passes that may come after this one (None: any); e.g. a pass that changes the
    # graph's inputs comes after every pass that runs the model on calibration data.
    followers: ClassVar[frozenset[str] | None] = None
    # Whether `followers` also binds a model that already has this pass's property (read from a file).
    followers_bind_loaded: ClassVar[bool] = True

    def check_target(self, cost_model) -> None:
        """Options the run's target cannot honour (`cost_model`: its `StorageCost`): a UserError,
        raised by the session before any slow step (and by the pass itself when run without one)."""

    def requires(self, model: ir.Model) -> None:
        have = model_properties(model)
        missing = self.required - have
        if missing:
            raise ir.passes.PreconditionError(
                f"{self.name} requires {', '.join(sorted(missing))}; run the pass that provides it first"
            )
        if self.required_one_of and not self.required_one_of & have:
            raise ir.passes.PreconditionError(
                f"{self.name} requires one of {', '.join(sorted(self.required_one_of))}; run a pass that provides one first"
            )

    def ensures(self, model: ir.Model) -> None:
        props = model_properties(model) - self.invalidated
        if not self.keeps_activation_stats:
            props -= {Prop.STATS_CURRENT}
        props |= self.provided
        set_model_properties(model, props)

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def options(cls) -> list[Option]:
        hints = typing.get_type_hints(cls)
        return [
            Option(f.name.replace("_", "-"), f.name, hints[f.name], f.default, f.metadata.get("doc", ""))
            for f in dataclasses.fields(cls)
        ]

    def option_values(self) -> dict[str, Any]:
        return {opt.key: getattr(self, opt.field) for opt in self.options()}


@dataclasses.dataclass(frozen=True)
class Option:
    key: str  # kebab-case, as written in pipeline strings
    field: str  # the dataclass field
    type: Any
    default: Any
    doc: str


def option(default: Any, doc: str) -> Any:
    """A pass option: a dataclass field with a default and a one-line doc."""
    return dataclasses.field(default=default, metadata={"doc": doc})


def option_key(cls: type[Pass], field: str) -> str:
    """The key (as in pipeline strings and recorded option values) of `cls`'s option `field`: tools
    read options through it, so a renamed option fails here instead of reading None."""
    for opt in cls.options():
        if opt.field == field:
            return opt.key
    raise KeyError(f"{cls.name} has no option '{field}'")


def model_properties(model: ir.Model) -> frozenset[Prop]:
    return as_props(model.metadata_props.get(PROPERTIES_KEY, ""))


def set_model_properties(model: ir.Model, props: frozenset[Prop] | set[Prop]) -> None:
    if props:
        model.metadata_props[PROPERTIES_KEY] = ",".join(sorted(p.value for p in props))
    else:
        model.metadata_props.pop(PROPERTIES_KEY, None)


# --------------------------------------------------------------------------------------------
# Registry

_PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its name."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _PASSES and _PASSES[cls.name] is not cls:
        raise ValueError(f"pass name '{cls.name}' is taken by {_PASSES[cls.name].__name__}")
    for role in ("required", "required_one_of", "provided", "invalidated"):
        for prop in getattr(cls, role):
            if not isinstance(prop, Prop):
                raise ValueError(f"{cls.__name__}.{role}: '{prop}' is not a property; {_prop_fix(str(prop))}")
    _PASSES[cls.name] = cls
    return cls


def _prop_fix(text: str) -> str:
    known = {p.value: p for p in Prop}
    if text in known:
        return f"write Prop.{known[text].name} (qcompiler.ir.meta)"
    return f"declare it in qcompiler.ir.meta.Prop{did_you_mean(text, known)}"


def registered_passes() -> dict[str, type[Pass]]:
    """The passes registered so far, by name (`qcompiler.pipeline.spec.all_passes` imports them all first)."""
    return dict(sorted(_PASSES.items()))


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
