"""The model zoo: one visible name -> (factory, options, default input resolution) mapping.

A model's options (the keyword arguments `create_model` takes, their types and defaults) are its constructor's:
read from the signature, so the config schemas (repro.config) and the zoo cannot drift from the code.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from repro.models import mobilenet, resnet
from repro.models.weights import WEIGHT_FORMATS, WeightsError, load_weights


def _options(cls: type, keep: tuple[str, ...] | None = None, drop: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """The options of `cls`'s constructor: name -> (type, default) of each keyword argument with a default (only
    those in `keep`, when given; less `drop`, which the factories fix)."""
    hints = typing.get_type_hints(cls.__init__)
    return {n: (hints[n], p.default) for n, p in inspect.signature(cls).parameters.items()
            if p.default is not p.empty and n not in drop and (keep is None or n in keep)}


_RESNET = _options(resnet.ResNet, drop=("residual",))
_PLAIN = _options(resnet.ResNet, keep=("num_classes",))  # no shortcuts: only the classifier's size
_CIFAR_RESNET = _options(resnet.CifarResNet, drop=("residual",))
_CIFAR_PLAIN = _options(resnet.CifarResNet, keep=("num_classes",))
_V1 = _options(mobilenet.MobileNetV1)
_V2 = _options(mobilenet.MobileNetV2)

# name -> (factory, its options: keyword argument -> (type, default), default input resolution)
MODELS: dict[str, tuple[Callable[..., nn.Module], dict[str, tuple[Any, Any]], int]] = {
    # ImageNet, paper Table 1
    "plain18": (resnet.plain18, _PLAIN, 224),
    "plain34": (resnet.plain34, _PLAIN, 224),
    "resnet18": (resnet.resnet18, _RESNET, 224),
    "resnet34": (resnet.resnet34, _RESNET, 224),
    "resnet50": (resnet.resnet50, _RESNET, 224),
    "resnet101": (resnet.resnet101, _RESNET, 224),
    "resnet152": (resnet.resnet152, _RESNET, 224),
    # CIFAR, paper §4.2
    "resnet20": (resnet.resnet20, _CIFAR_RESNET, 32),
    "resnet32": (resnet.resnet32, _CIFAR_RESNET, 32),
    "resnet44": (resnet.resnet44, _CIFAR_RESNET, 32),
    "resnet56": (resnet.resnet56, _CIFAR_RESNET, 32),
    "resnet110": (resnet.resnet110, _CIFAR_RESNET, 32),
    "resnet1202": (resnet.resnet1202, _CIFAR_RESNET, 32),
    "plain20": (resnet.plain20, _CIFAR_PLAIN, 32),
    "plain32": (resnet.plain32, _CIFAR_PLAIN, 32),
    "plain44": (resnet.plain44, _CIFAR_PLAIN, 32),
    "plain56": (resnet.plain56, _CIFAR_PLAIN, 32),
    "plain110": (resnet.plain110, _CIFAR_PLAIN, 32),
    # MobileNets
    "mobilenet_v1": (mobilenet.mobilenet_v1, _V1, 224),
    "mobilenet_v2": (mobilenet.mobilenet_v2, _V2, 224),
}

# Keys of a model config that describe the input, not the constructor.
CONFIG_ONLY_KEYS = ("name", "resolution")


def list_models() -> list[str]:
    """Names accepted by `create_model`, in zoo order."""
    return list(MODELS)


def model_kwargs(name: str) -> tuple[str, ...]:
    """The keyword arguments model `name` accepts."""
    return tuple(model_options(name))


def model_options(name: str) -> dict[str, tuple[Any, Any]]:
    """Model `name`'s options as its constructor declares them: keyword argument -> (type, default)."""
    _check_name(name)
    return dict(MODELS[name][1])


def default_resolution(name: str) -> int:
    """The input size the paper uses for model `name` (224 ImageNet, 32 CIFAR)."""
    _check_name(name)
    return MODELS[name][2]


def _check_name(name: str) -> None:
    """Raise a ValueError naming every valid model when `name` is unknown."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build model `name` with its keyword arguments; unknown names/arguments raise a ValueError."""
    _check_name(name)
    factory, accepted, _ = MODELS[name]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"model {name!r} takes no argument(s) {unknown}; valid arguments: {list(accepted)}")
    return factory(**kwargs)


def create_model_from_config(cfg: Mapping[str, Any]) -> nn.Module:
    """Build a model from a `configs/model/*.yaml` mapping (`name`, `resolution` and constructor kwargs)."""
    kwargs = {k: v for k, v in cfg.items() if k not in CONFIG_ONLY_KEYS}
    return create_model(cfg["name"], **kwargs)


__all__ = [
    "MODELS", "WEIGHT_FORMATS", "WeightsError", "create_model", "create_model_from_config",
    "default_resolution", "list_models", "load_weights", "model_kwargs", "model_options",
]
