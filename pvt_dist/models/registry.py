"""Name -> constructor registry for the model variants (``build_model("pvt_small", num_classes=10)``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a variant constructor under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def build_model(name: str, **overrides) -> nn.Module:
    """Build a registered variant; ``overrides`` go to its constructor (num_classes, img_size, ...)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    try:
        return _MODELS[name](**overrides)
    except TypeError as e:
        raise TypeError(f"model {name!r}: {e}") from e
