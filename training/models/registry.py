"""One registry of networks by name: ``register_model`` refuses duplicates, ``create_model``
builds one with keyword arguments, ``list_models`` lists the names, ``model_input`` says what a
network is fed (as timm's model configs do), so that choosing a network chooses its input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


@dataclass(frozen=True)
class ModelInput:
    """What a network is fed by default: ``kind`` (an input kind of
    :mod:`realtime_mer.input_kinds`, built from the (u, v, strain) maps; None for a network
    that takes no maps, such as the 3D network's frame stacks), ``size`` (the image side for
    the kinds that are images), and ``size_kwarg``: the network's own keyword for that side,
    set to the input's size when the network is built (None: the network adapts to any
    size)."""

    kind: str | None = "map28"
    size: int | None = None
    size_kwarg: str | None = None


_INPUTS: dict[str, ModelInput] = {}


def register_model(name: str, input: ModelInput = ModelInput()
                   ) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model class or factory under ``name``, with the input it is fed
    by default (``input``).

    Raises ValueError when ``name`` is already taken: two papers silently sharing a name would
    make results files ambiguous.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(
                f"model {name!r} is already registered (by {_REGISTRY[name].__module__}."
                f"{getattr(_REGISTRY[name], '__qualname__', _REGISTRY[name])})"
            )
        _REGISTRY[name] = fn
        _INPUTS[name] = input
        return fn

    return deco


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs``; KeyError listing the known names."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY)) or 'none'}"
        ) from None
    return factory(**kwargs)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def is_registered(name: str) -> bool:
    return name in _REGISTRY


def model_input(name: str) -> ModelInput:
    """The input network ``name`` declared; KeyError listing the known names."""
    if name not in _INPUTS:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(sorted(_INPUTS))}")
    return _INPUTS[name]
