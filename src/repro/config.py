"""Structured-config schemas: Hydra checks every `configs/` file and command-line override against these.

A key that is not declared here (a typo such as `model.widht_mult=0.5`) fails when the config is built,
before any work starts. The schemas are registered in Hydra's ConfigStore by `register_configs()`, which
the command-line apps call; YAML files pick their schema with `defaults: [base_<family>, _self_]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
class DataConfig:
    """Keys every dataset has (`configs/data/`)."""

    name: str = MISSING  # imagenet | folder | cifar10 | cifar100 | synthetic
    split: str = "val"  # what the evaluator reads
    num_classes: Any = 1000  # the model's class count follows it (folder: null = one per class folder)
    batch_size: int = 256  # images per batch per process (ten_crop puts 10 views of each through the net)
    num_workers: int = 8  # loader processes per GPU process
    on_error: str = "raise"  # raise | skip: what an unusable image does (skipped ones are counted)


@dataclass
class FolderDataConfig(DataConfig):
    """ImageNet (class index = sorted 1000 synsets) or any class-folder tree (sorted folder names)."""

    root: Any = None  # holds train/ and val/
    train_dir: Any = None  # default: <root>/train
    val_dir: Any = None  # default: <root>/val


@dataclass
class CifarDataConfig(DataConfig):
    """CIFAR-10/100: torchvision's files or image folders train/<class>/, test/<class>/."""

    root: Any = None
    split: str = "test"
    download: bool = False  # fetch torchvision's files into root (needs the network)
    val_size: int = 5000  # images carved from train for `val` (the paper's 45k/5k)
    split_seed: int = 0
    batch_size: int = 128
    num_workers: int = 2


@dataclass
class SyntheticDataConfig(DataConfig):
    """Random images, for benchmarks and tests."""

    length: int = 256
    image_size: int = 224
    num_workers: int = 0


DATA_SCHEMAS = {
    "base_folder": FolderDataConfig,
    "base_cifar": CifarDataConfig,
    "base_synthetic": SyntheticDataConfig,
}


@dataclass
class WeightsConfig:
    """Which weights to evaluate and how they are stored."""

    path: Any = None  # a checkpoint file
    format: str = "repro"  # repro | torchvision | akamaster


@dataclass
class EvalOptions:
    """The test protocols (`repro-eval eval.*`)."""

    protocols: list[str] = field(default_factory=lambda: ["center"])  # center | ten_crop | multi_scale
    average: str = "softmax"  # softmax (authors' Caffe models) | logits (fb.resnet.torch)
    resize: Any = "auto"  # shorter side before cropping; auto = resolution / 0.875 (CIFAR: none); null = none
    crop: Any = "auto"  # auto = the model's resolution (CIFAR: none); null = the whole image
    scales: list[int] = field(default_factory=lambda: [224, 256, 384, 480, 640])  # multi_scale shorter sides
    flip: bool = True  # multi_scale: average each scale with its horizontal flip
    interpolation: str = "bilinear"  # bilinear | bicubic | nearest
    antialias: bool = True  # torchvision's preset
    save_predictions: bool = False  # also write predictions.csv
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = False  # bf16 autocast on CUDA
    progress: bool = True


@dataclass
class EvalConfig:
    """`repro-eval`: a checkpoint under the papers' test protocols."""

    model: Any = None  # null: taken from a repro checkpoint
    data: Any = None  # null: taken from a repro checkpoint
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    eval: EvalOptions = field(default_factory=EvalOptions)


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
    for name, node in DATA_SCHEMAS.items():
        cs.store(group="data", name=name, node=node)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="summary_schema", node=SummaryConfig)
    cs.store(name="placeholder_schema", node=PlaceholderConfig)
