"""ResNets and plain nets of He et al. 2015 (arXiv 1512.03385): ImageNet (Table 1) and CIFAR (§4.2).

Module names follow torchvision (conv1, bn1, layer1..4, fc; blocks conv1/bn1/conv2/bn2[/conv3/bn3],
downsample), so torchvision state dicts load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SHORTCUTS = ("A", "B", "C")
PAD_MODES = ("after", "split")


def _check_choice(name: str, value: object, choices: tuple) -> None:
    """Raise a ValueError naming the valid choices when `value` is not one of them."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(choices)}")


class ZeroPadShortcut(nn.Module):
    """Option A: parameter-free shortcut; subsample by `stride`, add zero channels up to `out_channels`.

    pad="after" appends all zero channels after the identity (fb.resnet.torch); pad="split" puts half
    before and half after (akamaster/pytorch_resnet_cifar10). Both have no parameters but compute
    different functions, so a checkpoint must be evaluated with the placement it was trained with.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, pad: str = "after") -> None:
        super().__init__()
        _check_choice("shortcut_pad", pad, PAD_MODES)
        self.stride, self.pad = stride, pad
        extra = out_channels - in_channels
        self.before = extra // 2 if pad == "split" else 0
        self.after = extra - self.before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.before, self.after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, zeros_before={self.before}, zeros_after={self.after}"


def make_shortcut(in_ch: int, out_ch: int, stride: int, option: str, pad: str = "after") -> nn.Module | None:
    """Build the shortcut of a residual block for paper §4.1 option A, B or C (None = identity)."""
    grows = stride != 1 or in_ch != out_ch
    if option == "C" or (option == "B" and grows):
        return nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
            nn.BatchNorm2d(out_ch),
        )
    if option == "A" and grows:
        return ZeroPadShortcut(in_ch, out_ch, stride, pad)
    return None


class BasicBlock(nn.Module):
    """Two 3x3 convs [3x3,c; 3x3,c]; `residual=False` gives the plain-net block (no shortcut)."""

    expansion = 1

    def __init__(
        self, in_ch: int, width: int, stride: int, shortcut: str = "B", residual: bool = True,
        pad: str = "after", stride_in_1x1: bool = True,
    ) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual
        self.downsample = make_shortcut(in_ch, out_ch, stride, shortcut, pad) if residual else None

    def last_bn(self) -> nn.BatchNorm2d:
        """The BN whose scale `zero_init_residual` sets to zero."""
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    """[1x1,c; 3x3,c; 1x1,4c]; the stride sits on the first 1x1 (authors' Caffe) or on the 3x3 (torchvision)."""

    expansion = 4

    def __init__(
        self, in_ch: int, width: int, stride: int, shortcut: str = "B", residual: bool = True,
        pad: str = "after", stride_in_1x1: bool = True,
    ) -> None:
        super().__init__()
        out_ch = width * self.expansion
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_ch, width, 1, stride=s1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=s3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual
        self.downsample = make_shortcut(in_ch, out_ch, stride, shortcut, pad) if residual else None

    def last_bn(self) -> nn.BatchNorm2d:
        """The BN whose scale `zero_init_residual` sets to zero."""
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


def _init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    """He initialization (fan_out, as fb.resnet.torch and torchvision), BN to identity, optional zero-gamma."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, (BasicBlock, Bottleneck)) and m.residual:
                nn.init.zeros_(m.last_bn().weight)


class ResNet(nn.Module):
    """ImageNet ResNet / plain net of paper Table 1: 7x7 stem, max pool, four stages, global pool, fc."""

    def __init__(
        self,
        block: str,
        layers: list[int],
        residual: bool = True,
        shortcut: str = "B",
        stride_in_1x1: bool = True,
        num_classes: int = 1000,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        _check_choice("block", block, ("basic", "bottleneck"))
        _check_choice("shortcut", shortcut, SHORTCUTS)
        _check_num_classes(num_classes)
        block_cls = BasicBlock if block == "basic" else Bottleneck
        self.block, self.residual, self.shortcut = block, residual, shortcut
        self.stride_in_1x1 = stride_in_1x1
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block_cls(in_ch, width, stride, shortcut, residual, "after", stride_in_1x1))
                in_ch = width * block_cls.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        _init_weights(self, zero_init_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CifarResNet(nn.Module):
    """CIFAR ResNet / plain net of paper §4.2: 3x3 conv (16), 3 stages of n blocks at {16,32,64}, pool, fc.

    6n+2 weighted layers. `shortcut_pad` chooses where option A puts its zero channels (see ZeroPadShortcut).
    """

    def __init__(
        self,
        n: int,
        residual: bool = True,
        shortcut: str = "A",
        shortcut_pad: str = "after",
        num_classes: int = 10,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        _check_choice("shortcut", shortcut, SHORTCUTS)
        _check_choice("shortcut_pad", shortcut_pad, PAD_MODES)
        _check_num_classes(num_classes)
        self.residual, self.shortcut, self.shortcut_pad = residual, shortcut, shortcut_pad
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_ch = 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_ch, width, stride, shortcut, residual, shortcut_pad))
                in_ch = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        _init_weights(self, zero_init_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _check_num_classes(num_classes: int) -> None:
    """Refuse a class count that cannot build a classifier."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} is not valid; it must be a positive integer")


# One-line variant factories (paper Table 1 and §4.2).
def plain18(**kw) -> ResNet: return ResNet("basic", [2, 2, 2, 2], residual=False, **kw)  # noqa: E704
def plain34(**kw) -> ResNet: return ResNet("basic", [3, 4, 6, 3], residual=False, **kw)  # noqa: E704
def resnet18(**kw) -> ResNet: return ResNet("basic", [2, 2, 2, 2], **kw)  # noqa: E704
def resnet34(**kw) -> ResNet: return ResNet("basic", [3, 4, 6, 3], **kw)  # noqa: E704
def resnet50(**kw) -> ResNet: return ResNet("bottleneck", [3, 4, 6, 3], **kw)  # noqa: E704
def resnet101(**kw) -> ResNet: return ResNet("bottleneck", [3, 4, 23, 3], **kw)  # noqa: E704
def resnet152(**kw) -> ResNet: return ResNet("bottleneck", [3, 8, 36, 3], **kw)  # noqa: E704

def resnet20(**kw) -> CifarResNet: return CifarResNet(3, **kw)  # noqa: E704
def resnet32(**kw) -> CifarResNet: return CifarResNet(5, **kw)  # noqa: E704
def resnet44(**kw) -> CifarResNet: return CifarResNet(7, **kw)  # noqa: E704
def resnet56(**kw) -> CifarResNet: return CifarResNet(9, **kw)  # noqa: E704
def resnet110(**kw) -> CifarResNet: return CifarResNet(18, **kw)  # noqa: E704
def resnet1202(**kw) -> CifarResNet: return CifarResNet(200, **kw)  # noqa: E704
def plain20(**kw) -> CifarResNet: return CifarResNet(3, residual=False, **kw)  # noqa: E704
def plain32(**kw) -> CifarResNet: return CifarResNet(5, residual=False, **kw)  # noqa: E704
def plain44(**kw) -> CifarResNet: return CifarResNet(7, residual=False, **kw)  # noqa: E704
def plain56(**kw) -> CifarResNet: return CifarResNet(9, residual=False, **kw)  # noqa: E704
def plain110(**kw) -> CifarResNet: return CifarResNet(18, residual=False, **kw)  # noqa: E704
