"""The model zoo: one visible name -> (factory, accepted keyword arguments) mapping."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from repro.models import mobilenet, resnet
from repro.models.weights import WEIGHT_FORMATS, WeightsError, load_weights

_RESNET = ("shortcut", "stride_in_1x1", "num_classes", "zero_init_residual")
_PLAIN = ("num_classes",)
_CIFAR_RESNET = ("shortcut", "shortcut_pad", "num_classes", "zero_init_residual")
_CIFAR_PLAIN = ("num_classes",)
_V1 = ("width_mult", "full_conv", "shallow", "activation", "num_classes", "dropout")
_V2 = ("width_mult", "activation", "num_classes", "dropout")

# name -> (factory, keyword arguments it accepts, default input resolution)
MODELS: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...], int]] = {
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
    _check_name(name)
    return MODELS[name][1]


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
    "default_resolution", "list_models", "load_weights", "model_kwargs",
]
