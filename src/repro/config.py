"""Structured-config schemas: Hydra checks every `configs/` file and command-line override against these.

A key that is not declared here (a typo such as `model.widht_mult=0.5`) fails when the config is built,
before any work starts. The schemas are registered in Hydra's ConfigStore by `register_configs()`, which
the command-line apps call; YAML files pick their schema with `defaults: [base_<family>, _self_]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    """Keys every model config has: the zoo name and the input resolution (the resolution multiplier)."""

    name: str = MISSING
    resolution: int = 224  # input side in pixels (224 ImageNet, 32 CIFAR)
    num_classes: int = 1000


@dataclass
class PlainNetConfig(ModelConfig):
    """ImageNet plain-18/34 (paper Table 1, no shortcuts)."""


@dataclass
class ResNetConfig(ModelConfig):
    """ImageNet ResNet-18 ... 152 (paper Table 1)."""

    stride_in_1x1: bool = True  # bottlenecks: stride on the first 1x1 (Caffe release) or the 3x3 (torchvision)
    shortcut: str = "B"  # A | B | C (paper §4.1)
    zero_init_residual: bool = False


@dataclass
class CifarPlainNetConfig(ModelConfig):
    """CIFAR plain-20 ... 110 (paper §4.2)."""

    resolution: int = 32
    num_classes: int = 10


@dataclass
class CifarResNetConfig(CifarPlainNetConfig):
    """CIFAR ResNet-20 ... 1202 (paper §4.2, option A)."""

    shortcut: str = "A"
    shortcut_pad: str = "after"  # after (fb.resnet.torch) | split (akamaster)
    zero_init_residual: bool = False


@dataclass
class MobileNetV1Config(ModelConfig):
    """MobileNetV1 with width multiplier, Conv and Shallow variants (Howard et al. Tables 4-9)."""

    width_mult: float = 1.0  # alpha
    full_conv: bool = False
    shallow: bool = False
    activation: str = "relu6"  # relu | relu6
    dropout: float = 0.0


@dataclass
class MobileNetV2Config(ModelConfig):
    """MobileNetV2 (Sandler et al. Table 2)."""

    width_mult: float = 1.0
    activation: str = "relu6"
    dropout: float = 0.2


MODEL_SCHEMAS = {
    "base_plain": PlainNetConfig,
    "base_resnet": ResNetConfig,
    "base_cifar_plain": CifarPlainNetConfig,
    "base_cifar_resnet": CifarResNetConfig,
    "base_mobilenet_v1": MobileNetV1Config,
    "base_mobilenet_v2": MobileNetV2Config,
}


@dataclass
class SummaryConfig:
    """`repro-summary`: complexity of one model."""

    model: Any = MISSING
    format: str = "table"  # table | json


@dataclass
class PlaceholderConfig:
    """Apps whose issue has not landed yet accept a model and any later keys are refused."""

    model: Any = MISSING


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    for name, node in MODEL_SCHEMAS.items():
        cs.store(group="model", name=name, node=node)
    cs.store(name="summary_schema", node=SummaryConfig)
    cs.store(name="placeholder_schema", node=PlaceholderConfig)
