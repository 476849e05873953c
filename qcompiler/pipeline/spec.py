"""Pipeline strings: parse, print, presets, `@file`, and the static order check.

Syntax, MLIR style: passes separated by commas, options in braces separated by spaces:

    calibrate{method=percentile},smooth{alpha=auto},fold-scales,quantize

A pipeline prints back to itself with every option's value filled in, so the printed string is
the full record of what ran. Option keys are kebab-case; values are numbers, words, `true`/`false`
or comma-separated lists (`candidates=2,3,4,8`). Presets are named pipelines that may take
options (`mixed{avg-bits=3.25}`); `@path` reads a pipeline from a file (`#` starts a comment).
"""

from __future__ import annotations

import dataclasses
import string
import types
import typing
from pathlib import Path
from typing import Any, Literal

from qcompiler import passes as _passes  # noqa: F401  (importing the package registers every pass)
from qcompiler.errors import UserError, shown
from qcompiler.ir.meta import Prop
from qcompiler.pipeline.passbase import Option, Pass, did_you_mean, registered_passes


def all_passes() -> dict[str, type[Pass]]:
    """Every pass, by name."""
    return registered_passes()


def get_pass(name: str) -> type[Pass]:
    passes = all_passes()
    if name in passes:
        return passes[name]
    raise UserError(f"unknown pass '{name}'{did_you_mean(name, passes)}; `qcompiler passes` lists them")


@dataclasses.dataclass(frozen=True)
class Threshold:
    """A preset placeholder's text by a numeric option's value: `below` under `at`, else `above` (also
    for a value that is no number: the pass that reads the option refuses it)."""

    option: str
    at: float
    below: str
    above: str

    def text(self, value: str) -> str:
        try:
            return self.below if float(value) < self.at else self.above
        except ValueError:
            return self.above

    def __str__(self) -> str:
        return f"{self.option} < {self.at:g} -> '{self.below}', otherwise '{self.above}'"


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named pipeline; `$name` placeholders in `template` take the preset's options."""

    template: str
    doc: str
    params: dict[str, str] = dataclasses.field(default_factory=dict)
    # options that choose pipeline text rather than fill a value: {option: {value: text}}
    fragments: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    # placeholders that another option's value fills: {placeholder: (option, {value: text})}, "" for the values not listed
    derived: dict[str, tuple[str, dict[str, str]]] = dataclasses.field(default_factory=dict)
    # placeholders that a numeric option's value fills by a threshold: {placeholder: Threshold}
    thresholds: dict[str, Threshold] = dataclasses.field(default_factory=dict)

    def expand(self, name: str, options: dict[str, str]) -> str:
        for key in options:
            if key not in self.params:
                raise UserError(
                    f"preset '{name}' has no option '{shown(key)}'{did_you_mean(key, self.params)}; "
                    f"options: {', '.join(self.params) or 'none'}"
                )
        chosen = {key: options.get(key, default) for key, default in self.params.items()}
        values = {key.replace("-", "_"): value for key, value in chosen.items() if key not in self.fragments}
        values.update({placeholder: rule.text(chosen[rule.option]) for placeholder, rule in self.thresholds.items()})
        for key, value in chosen.items():
            if key in self.fragments:
                if value not in self.fragments[key]:
                    raise UserError(f"preset '{name}': {key} must be one of {', '.join(self.fragments[key])}, got '{shown(value)}'")
                # a fragment may use the other options' values (`$avg_bits`)
                values[key.replace("-", "_")] = string.Template(self.fragments[key][value]).substitute(values)
        for placeholder, (key, texts) in self.derived.items():
            values[placeholder] = texts.get(chosen[key], "")
        return string.Template(self.template).substitute(values)


# `kv-cache=int8` (decoders with a KV cache): the cache stored as int8 (passes/kv_cache.py), after
# every pass that runs the model; the default adds nothing, so the pipeline reads as before.
KV_CACHE = {"kv-cache": {"float32": "", "int8": ",kv-cache{dtype=int8}"}}
# `attention=auto|fused|as-is` (decoders with a KV cache): `lower-ort{attention=...}`, each layer's attention as
# one GroupQueryAttention where found (passes/lower_ort/attention.py); the presets that end with lower-ort pass it on.
# `embedding=int8|int4`: embedding tables (constant Gather tables) stored as codes (passes/quantize_embedding.py),
# looked up packed; the default adds nothing.
# shared: a table tied to a 4-bit head reads the head's codes (stored once), else int4
EMBEDDING = {"embedding": {"float": "", "int8": ",quantize-embedding{bits=8}", "int4": ",quantize-embedding{bits=4}",
                           "shared": ",quantize-embedding{bits=4 tied=share}"}}

# rounding=auto in the mixed preset: GPTQ (damp=auto) for models whose mixed layers hold at most this many weights,
# which compile in about 4 minutes per 135 M weights on 2 cores; round-to-nearest above
GPTQ_UP_TO = 600_000_000
# tuning=auto in the mixed preset: every layer's scales learned end to end against the float model's next-token
# distributions, in LMs whose mixed layers hold at most this many weights; 120 steps below 4 bits, where learning
# keeps paying for longer, 40 from 4 bits; the steps in bfloat16 where the CPU multiplies it natively (on
# SmolLM2-135M about 1.5 s a step on 2 cores, 2.8 s in float32); the rate decayed along half a cosine from 0.003
# below 4 bits, 0.004 from 4 bits (fewer steps; on SmolLM2 3.5 % and 2.0 % lower perplexity at 3.25 and 4.25 bits
# than 0.001 constant; docs/pipelines.md, "The mixed preset's tuning")
TUNE_UP_TO = 200_000_000
TUNE_STEPS = Threshold("avg-bits", 4.0, "120", "40")
TUNE_LR = Threshold("avg-bits", 4.0, "0.003", "0.004")

PRESETS: dict[str, Preset] = {
    "default": Preset("canonicalize$kv_cache$attention", "clean the graph up for the passes; no quantization",
                      {"kv-cache": "float32", "attention": "auto"},
                      # auto: the lower-ort the compiler appends for ONNX Runtime fuses where it finds one
                      {**KV_CACHE, "attention": {"auto": "", "as-is": ",lower-ort{attention=as-is}",
                                                 "fused": ",lower-ort{attention=fused}"}}),
    "w8a8": Preset(
        "canonicalize,${equalize}calibrate{method=$method},smooth{alpha=$alpha act-mode=$act_mode},fold-scales{unfoldable=$unfoldable},"
        "quantize{act-mode=$act_mode float-inputs=$float_inputs bias-correction=$bias_correction conv-method=$conv_method$conv_rounding}$tuning$embedding$kv_cache,"
        "lower-ort{attention=$attention int-kernels=$int_kernels}",
        "int8 weights and activations with SmoothQuant (needs --calib)",
        {"alpha": "auto", "method": "minmax", "act-mode": "static", "float-inputs": "0", "unfoldable": "unsmooth",
         "bias-correction": "conv", "conv-method": "mse", "equalize": "false", "embedding": "float", "kv-cache": "float32",
         "attention": "auto", "int-kernels": "auto", "tuning": "none", "conv-rounding": "auto"},
        # cross-layer equalization of Conv pairs before calibration (left out of the pipeline when off);
        # relu6 also equalizes through Clip(0, 6) as a per-channel Min
        {"equalize": {"false": "", "true": "equalize,", "relu6": "equalize{clip=per-channel},"},
         # Conv kernels' int8 codes rounded to nearest, or by GPTQ on the calibration inputs' patches (quantize{rounding=gptq});
         # auto: GPTQ where the Convs' H fit in quantize's GPTQ_UP_TO_ENTRIES, nearest above
         "conv-rounding": {"nearest": "", "gptq": " rounding=gptq", "auto": " rounding=auto"},
         # block-wise learning against the float blocks after quantize: the int8 weights' scales and the
         # activation grids (scales), or also the weights' rounding (flexround)
         "tuning": {"none": "", "scales": ",tune-scales{steps=300 lr=0.0003}", "flexround": ",flexround{steps=300 lr=0.0003}"},
         **EMBEDDING, **KV_CACHE},
    ),
    "mixed": Preset(
        "canonicalize,calibrate$act_scale,allocate-bits{avg-bits=$avg_bits scope=$scope codebook=$codebook sensitivity=$sensitivity "
        "outliers-weight=$outliers_weight outliers-act=$outliers_act group-size=$group_size$blocks$shared_input$tables},quantize-weights$rounding$tuning,fold-permutation$embedding$kv_cache,$route",
        "weight-only channel-wise mixed precision at a fractional bit budget (needs --calib)",
        {"avg-bits": "3.25", "scope": "layer", "codebook": "uniform", "sensitivity": "off", "outliers-weight": "0", "outliers-act": "0.005",
         "rounding": "auto", "tuning": "auto", "act-scale": "none", "embedding": "float", "kv-cache": "float32",
         "route": "split", "attention": "auto", "blocks": "auto", "shared-input": "auto", "group-size": "128",
         "damp": "auto"},
        # rounding: GPTQ's error compensation (gptq), or round-to-nearest (nearest); auto: gptq up to
        # GPTQ_UP_TO weights in the mixed layers and where the block interpreter runs every op, nearest
        # elsewhere (docs/pipelines.md, "The mixed preset's rounding").
        # gptq's damping (damp): by default chosen per input on held-out calibration batches; the method's usual
        # 0.01 fits H measured on a few thousand tokens too closely (docs/results.md, "GPTQ's damping")
        {"rounding": {"nearest": "", "gptq": ",gptq{damp=$damp}", "auto": f",gptq{{damp=$damp max-weights={GPTQ_UP_TO} unsupported=skip}}"},
         # linears of one input (Q/K/V, gate/up) allocated together: lowered as one wide kernel per class
         # (auto: in a decoder with a KV cache)
         "shared-input": {"auto": "", "apart": " shared-input=apart", "joint": " shared-input=joint"},
         # how MatMulNBits classes are priced (allocate-bits{blocks=...}): auto, whole blocks in layers of 16 blocks
         # or more (as resident once the session starts), else the rows filled
         "blocks": {"auto": "", "tight": " blocks=tight", "whole": " blocks=whole"},
         # one MatMulNBits a layer (wider classes as digits of the narrowest; auto: where the kernel-cost table
         # predicts it faster) and the fp16 class cast at load: fewer ops a run, for decoding one token a step
         "route": {"split": "lower-ort{attention=$attention}",
                   "digits": "lower-ort{mixed-route=digits fp16-route=load attention=$attention}",
                   "auto": "lower-ort{mixed-route=auto fp16-route=load attention=$attention}"},
         # AWQ: input channels scaled by mean|x|^alpha (alpha searched at the layer's budget), folded into the producer
         "act-scale": {"none": "", "awq": ",awq-scale{avg-bits=$avg_bits group-size=$group_size},fold-scales{unfoldable=unsmooth}"},
         # end to end: every layer's scales against the float model's next-token distributions (LMs); auto: a
         # shorter schedule, in models whose first output is token logits and of up to TUNE_UP_TO weights
         "tuning": {"none": "", "e2e-kl": ",tune-scales{regions=0 loss=kl steps=120 lr=0.001 batch=4}",
                    "auto": ",tune-scales{regions=0 loss=kl steps=$tune_steps lr=$tune_lr schedule=cosine batch=4 compute=auto "
                            f"first-output=token-logits max-weights={TUNE_UP_TO} unsupported=skip}}"},
         # budget: the tables inside avg-bits, their width chosen with the layers' bits (allocate-bits{embeddings=budget})
         "embedding": {**EMBEDDING["embedding"], "budget": ""}, **KV_CACHE},
        {"tables": ("embedding", {"budget": " embeddings=budget"})},
        {"tune_steps": TUNE_STEPS, "tune_lr": TUNE_LR},
    ),
    "int4": Preset(
        "canonicalize,calibrate,allocate-bits{avg-bits=8 candidates=4 group-size=$group_size zero-points=$zero_points outliers-act=0 "
        "outliers-weight=0},"
        "quantize-weights$rounding,fold-permutation$embedding$kv_cache,lower-ort{attention=$attention}",
        "weight-only 4-bit: every linear one symmetric 4-bit class, one MatMulNBits each (the fastest decode; needs --calib)",
        {"group-size": "64", "zero-points": "none", "rounding": "gptq", "embedding": "float", "kv-cache": "float32",
         "attention": "auto"},
        {"rounding": {"nearest": "{grid=minmax}", "gptq": ",gptq"}, **EMBEDDING, **KV_CACHE},
    ),
}


def parse_pipeline(text: str) -> list[Pass]:
    """Parse a pipeline string (or `@file`) into configured pass instances."""
    text = text.strip()
    if text.startswith("@"):
        text = _read_pipeline_file(text[1:])
    if not text:
        raise UserError("the pipeline is empty; give at least one pass, e.g. --pipeline canonicalize")
    passes: list[Pass] = []
    for item in _split_top_level(text):
        name, options = _parse_item(item)
        if name in PRESETS:
            passes.extend(parse_pipeline(PRESETS[name].expand(name, options)))
        else:
            passes.append(_instantiate(name, options))
    return passes


def format_pipeline(passes: list[Pass]) -> str:
    """The canonical string of a pipeline: every option's value written out."""
    return ",".join(format_pass(p) for p in passes)


def format_pass(pass_: Pass) -> str:
    """`name{key=value ...}`; an empty list option (the default of the ones that have it) is left out."""
    options = " ".join(
        f"{key}={format_value(value)}" for key, value in pass_.option_values().items() if value != ()
    )
    return f"{pass_.name}{{{options}}}" if options else pass_.name


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(format_value(v) for v in value)
    return str(value)


def check_order(passes: list[Pass], initial: frozenset[Prop] = frozenset()) -> None:
    """Fail before running anything if a pass's required property is not provided earlier, or a
    pass comes after one that names its followers and not it."""
    have = set(initial)
    earlier = [cls for cls in all_passes().values()
               if cls.followers is not None and cls.followers_bind_loaded and cls.provided & have]
    for at, first in [(-1, cls) for cls in earlier] + list(enumerate(passes)):
        later = next((p for p in passes[at + 1:] if first.followers is not None and p.name not in first.followers), None)
        if later is not None:
            raise UserError(
                f"{later.name} cannot come after {first.name} (only {', '.join(sorted(first.followers))} may); "
                f"put {first.name} after {later.name}"
            )
    providers = {}
    for cls in all_passes().values():
        for prop in cls.provided:
            providers.setdefault(prop, cls.name)
    for pass_ in passes:
        missing = sorted(pass_.required - have)
        if missing:
            needs = ", ".join(f"'{m}'" for m in missing)
            fixes = ", ".join(f"'{providers.get(m, '?')}'" for m in missing)
            raise UserError(f"{pass_.name} requires {needs}; add {fixes} before it")
        if pass_.required_one_of and not pass_.required_one_of & have:
            options = sorted(pass_.required_one_of)
            needs = " or ".join(f"'{m}'" for m in options)
            fixes = " or ".join(f"'{providers.get(m, '?')}'" for m in options)
            raise UserError(f"{pass_.name} requires {needs}; add {fixes} before it")
        have = (have - pass_.invalidated) | pass_.provided


# --------------------------------------------------------------------------------------------


MAX_PIPELINE_FILE_BYTES = 1 << 20


def _read_pipeline_file(path: str) -> str:
    from qcompiler.support.fileio import read_small_text

    raw = read_small_text(Path(path), "pipeline file", MAX_PIPELINE_FILE_BYTES)
    lines = [line.split("#", 1)[0].strip() for line in raw.splitlines()]
    return ",".join(part.strip().strip(",") for part in lines if part.strip().strip(","))


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
            if depth > 1:
                raise UserError(f"nested '{{' in pipeline at column {i + 1}: '{shown(text)}'")
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise UserError(f"unbalanced '}}' in pipeline at column {i + 1}: '{shown(text)}'")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise UserError(f"unclosed '{{' in pipeline: '{shown(text)}'")
    items.append(text[start:])
    stripped = [item.strip() for item in items]
    if any(not item for item in stripped):
        raise UserError(f"empty pass name in pipeline (a stray comma?): '{shown(text)}'")
    return stripped


def _parse_item(item: str) -> tuple[str, dict[str, str]]:
    name, brace, rest = item.partition("{")
    name = name.strip()
    if not name.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"'{shown(name)}' is not a pass name; names are words joined by '-'")
    options: dict[str, str] = {}
    if brace:
        if not rest.endswith("}"):
            raise UserError(f"text after '}}' in '{shown(item)}'; separate passes with commas")
        for token in rest[:-1].split():
            key, eq, value = token.partition("=")
            if not eq or not key or not value:
                raise UserError(f"option '{shown(token)}' of '{name}' must be written key=value")
            if key in options:
                raise UserError(f"option '{shown(key)}' of '{name}' is given twice")
            options[key] = value
    return name, options


def _instantiate(name: str, raw_options: dict[str, str]) -> Pass:
    if name not in all_passes():
        choices = list(all_passes()) + list(PRESETS)
        raise UserError(f"unknown pass '{shown(name)}'{did_you_mean(name, choices)}; `qcompiler passes` lists them")
    cls = get_pass(name)
    known = {opt.key: opt for opt in cls.options()}
    values = {}
    for key, raw in raw_options.items():
        if key not in known:
            listed = ", ".join(known) or "none"
            raise UserError(f"pass '{name}' has no option '{shown(key)}'{did_you_mean(key, known)}; options: {listed}")
        values[known[key].field] = convert_option(name, known[key], raw)
    try:
        return cls(**values)
    except UserError:
        raise
    except (TypeError, ValueError) as exc:
        raise UserError(f"pass '{name}': {exc}") from None


def convert_option(pass_name: str, opt: Option, raw: str) -> Any:
    """Turn the text of an option into the type its field declares."""
    try:
        return _convert(opt.type, raw)
    except ValueError as exc:
        raise UserError(f"option '{opt.key}' of pass '{pass_name}' {exc}, got '{shown(raw)}'") from None


def _convert(tp: Any, raw: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if str(choice) == raw:
                return choice
        raise ValueError(f"must be one of {', '.join(map(str, choices))}")
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(tp):
            try:
                return _convert(member, raw)
            except ValueError:
                continue
        raise ValueError(f"must be {' or '.join(_type_name(m) for m in typing.get_args(tp))}")
    if origin is tuple:
        (item, _) = typing.get_args(tp)
        return tuple(_convert(item, part) for part in raw.split(","))
    if tp is bool:
        if raw in ("true", "false"):
            return raw == "true"
        raise ValueError("must be true or false")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError("must be an integer") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError("must be a number") from None
    if tp is str:
        return raw
    raise ValueError(f"has a type the parser does not know ({tp})")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(c) for c in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))
