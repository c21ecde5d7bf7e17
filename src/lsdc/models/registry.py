"""The one model registry: `@register_model("name")` on a builder, `build_model("name", **cfg)`.

Builders are nn.Module classes or functions returning one; both model families register here, and
a run folder stores the name plus the keyword arguments so inference can rebuild the model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

F = TypeVar("F", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# Modules that register models on import; imported lazily so `build_model("sequence")` works
# without the caller importing the model module first (and nothing heavy runs at import time).
_KNOWN_MODULES: tuple[str, ...] = (
    "lsdc.models.sequence",
    "lsdc.models.multitask",
    "lsdc.models.superres",
)


def register_model(name: str) -> Callable[[F], F]:
    """Class or function decorator adding a model builder under `name` (unique)."""

    def decorator(builder: F) -> F:
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ValueError(f"model {name!r} is already registered by {_REGISTRY[name]!r}")
        _REGISTRY[name] = builder
        return builder

    return decorator


def _import_known() -> None:
    for module in _KNOWN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # Only a missing *model module* is tolerated (it may not exist yet); a missing
            # dependency inside an existing module is a real error.
            if exc.name != module:
                raise


def available_models() -> list[str]:
    _import_known()
    return sorted(_REGISTRY)


def build_model(name: str, **cfg: Any) -> nn.Module:
    """Instantiate the registered model `name` with keyword configuration `cfg`."""
    if name not in _REGISTRY:
        _import_known()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**cfg)
