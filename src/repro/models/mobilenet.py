"""MobileNetV1 (Howard et al. 2017, arXiv 1704.04861) and MobileNetV2 (Sandler et al. 2018, arXiv 1801.04381).

MobileNetV2's module names follow torchvision's, so its state dicts load without renaming.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6}

# MobileNetV1 body (paper Table 1): (output channels, stride) of each depthwise-separable block.
V1_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
# MobileNetV2 body (paper Table 2): expansion t, channels c, repeats n, first stride s.
V2_BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class ConvBNAct(nn.Sequential):
    """Conv (no bias) + BN + optional activation; children 0, 1, 2 as torchvision's Conv2dNormActivation."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1,
        act: type[nn.Module] | None = nn.ReLU6,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


def depthwise_separable(in_ch: int, out_ch: int, stride: int, act: type[nn.Module] = nn.ReLU6) -> nn.Sequential:
    """MobileNetV1's block: 3x3 depthwise + BN + act, then 1x1 pointwise + BN + act."""
    return nn.Sequential(
        ConvBNAct(in_ch, in_ch, 3, stride, groups=in_ch, act=act),
        ConvBNAct(in_ch, out_ch, 1, 1, act=act),
    )


def _check_width(width_mult: float) -> None:
    """Refuse a width multiplier that would build an empty or negative network."""
    if not isinstance(width_mult, (int, float)) or isinstance(width_mult, bool) or width_mult <= 0:
        raise ValueError(f"width_mult={width_mult!r} is not valid; it must be a number > 0 (e.g. 1.0, 0.75, 0.5)")


def _check_common(activation: str, num_classes: int, dropout: float) -> None:
    """Validate the arguments both MobileNets share."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not valid; choose one of {sorted(ACTIVATIONS)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} is not valid; it must be a positive integer")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} is not valid; it must be in [0, 1)")


def _init_weights(model: nn.Module) -> None:
    """He (fan_out) for convs, identity BN, small normal for the classifier (as torchvision/slim)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class MobileNetV1(nn.Module):
    """MobileNetV1 with width multiplier α, and the paper's Conv (Table 4) and Shallow (Table 5) variants.

    Channels are max(int(α·c), 8), as TF-slim. The resolution multiplier is the input size itself.
    """

    def __init__(
        self,
        width_mult: float = 1.0,
        full_conv: bool = False,
        shallow: bool = False,
        activation: str = "relu6",
        num_classes: int = 1000,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_width(width_mult)
        _check_common(activation, num_classes, dropout)
        self.width_mult, self.full_conv, self.shallow = width_mult, full_conv, shallow
        act = ACTIVATIONS[activation]

        def ch(c: int) -> int:
            return max(int(c * width_mult), 8)

        blocks = V1_BLOCKS
        if shallow:  # Table 5: drop the five 14x14x512 blocks
            blocks = [b for i, b in enumerate(blocks) if not 6 <= i <= 10]
        layers: list[nn.Module] = [ConvBNAct(3, ch(32), 3, 2, act=act)]
        in_ch = ch(32)
        for c, s in blocks:
            out = ch(c)
            if full_conv:  # Table 4: a full 3x3 convolution instead of depthwise + pointwise
                layers.append(ConvBNAct(in_ch, out, 3, s, act=act))
            else:
                layers.append(depthwise_separable(in_ch, out, s, act))
            in_ch = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_ch, num_classes))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round `v` to the nearest multiple of `divisor`, never going down by more than 10% (TF-slim's rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class InvertedResidual(nn.Module):
    """1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 linear projection; residual when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int, act: type[nn.Module]) -> None:
        super().__init__()
        hidden = int(round(in_ch * expand))
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(in_ch, hidden, 1, act=act))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=act),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (paper Table 2); channels rounded to multiples of 8, the 1280 head never below 1.0."""

    def __init__(
        self,
        width_mult: float = 1.0,
        activation: str = "relu6",
        num_classes: int = 1000,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        _check_width(width_mult)
        _check_common(activation, num_classes, dropout)
        self.width_mult = width_mult
        act = ACTIVATIONS[activation]
        in_ch = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [ConvBNAct(3, in_ch, 3, 2, act=act)]
        for t, c, n, s in V2_BLOCKS:
            out = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out, s if i == 0 else 1, t, act))
                in_ch = out
        layers.append(ConvBNAct(in_ch, last, 1, act=act))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v1(**kw) -> MobileNetV1: return MobileNetV1(**kw)  # noqa: E704
def mobilenet_v2(**kw) -> MobileNetV2: return MobileNetV2(**kw)  # noqa: E704
