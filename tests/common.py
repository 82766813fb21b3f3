"""What several test modules share: where the project and ../shared are, CIFAR's classes, ImageNet's statistics."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]  # the checkout
SHARED = ROOT.parent / "shared"  # real images and published weights, beside the checkout (tests skip without)
CIFAR_ROOT = SHARED / "data" / "cifar10-jpeg"
IMAGENET_SAMPLE = SHARED / "data" / "imagenet-sample"
AKAMASTER_DIR = SHARED / "weights" / "akamaster-cifar10"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as torchvision's and akamaster's weights


def cifar_train_only(tmp: Path) -> Path:
    """A CIFAR image-folder root holding the shared train/ images (linked, not copied) but no test/."""
    root = tmp / "cifar-train-only"
    root.mkdir(exist_ok=True)
    if not (root / "train").exists():
        (root / "train").symlink_to(CIFAR_ROOT / "train", target_is_directory=True)
    return root


class FakeDDP(nn.Module):
    """DistributedDataParallel's place in setup(), without a process group."""

    def __init__(self, module: nn.Module, device_ids: Any = None, **kwargs: Any) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without a surrounding torchrun's variables (plus `extra`), for subprocess runs."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    return {**env, **extra}


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Poll until `path` exists (failing if the process ends first or time runs out)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) before {path} appeared: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)
