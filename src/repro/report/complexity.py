"""Complexity accounting as the papers count it: parameters and multiply-adds of convolutions and fc layers.

Mult-adds count only convolutions and fully connected layers (BN, activations, pooling and the residual
add are free), which is how ResNet Table 1 and MobileNet Tables 2-9 count, and equals
`torch.utils.flop_counter.FlopCounterMode`'s FLOPs / 2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class Layer:
    """One convolution or fc layer as it ran on one image."""

    name: str
    type: str  # conv1x1, conv3x3, conv3x3_dw, conv7x7, fc, ...
    output: list[int]  # [C, H, W] for convs, [features] for fc
    kernel: str  # "3x3/2" = 3x3 kernel, stride 2; "" for fc
    params: int  # this layer's own parameters (weight + bias)
    weights: int  # weight tensor only, as MobileNet Table 2 counts
    macs: int


def layer_type(module: nn.Module) -> str:
    """Classify a layer the way MobileNet Table 2 does (conv1x1, conv3x3, conv3x3_dw, fc, ...)."""
    if isinstance(module, nn.Linear):
        return "fc"
    kh, kw = module.kernel_size
    kind = f"conv{kh}x{kw}"
    if module.groups > 1:
        depthwise = module.groups == module.in_channels
        kind += "_dw" if depthwise else f"_g{module.groups}"
    return kind


def profile(model: nn.Module, resolution: int, channels: int = 3) -> list[Layer]:
    """Run one `channels`x`resolution`x`resolution` input through `model`; record every conv and fc layer."""
    layers: list[Layer] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        out = list(output.shape[1:])
        weights = module.weight.numel()
        params = weights + (module.bias.numel() if module.bias is not None else 0)
        if isinstance(module, nn.Linear):
            macs, kernel = output.numel() * module.in_features, ""
        else:
            macs = output.numel() * (module.in_channels // module.groups) * module.weight[0, 0].numel()
            kernel = "{}x{}/{}".format(*module.kernel_size, module.stride[0])
        layers.append(Layer(names[module], layer_type(module), out, kernel, params, weights, macs))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, channels, resolution, resolution))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return layers


def summarize(model: nn.Module, resolution: int) -> dict:
    """The `repro-summary format=json` object: params, macs, by_type and layers of `model`."""
    layers = profile(model, resolution)
    by_type: dict[str, dict[str, int]] = {}
    for layer in layers:
        entry = by_type.setdefault(layer.type, {"params": 0, "macs": 0})
        entry["params"] += layer.weights
        entry["macs"] += layer.macs
    return {
        "resolution": resolution,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "macs": sum(layer.macs for layer in layers),
        "by_type": dict(sorted(by_type.items())),
        "layers": [asdict(layer) for layer in layers],
    }


def _fmt(n: float) -> str:
    """Thousands-separated integer."""
    return f"{int(n):,}"


def format_table(summary: dict, title: str = "") -> str:
    """Render a summary as the per-layer table (cf. ResNet Table 1) and the by-type table (MobileNet Table 2)."""
    rows = [("layer", "type", "output", "kernel/stride", "params", "mult-adds")]
    for layer in summary["layers"]:
        rows.append((layer["name"], layer["type"], "x".join(map(str, layer["output"])), layer["kernel"],
                     _fmt(layer["params"]), _fmt(layer["macs"])))
    lines = [title] if title else []
    lines += _grid(rows, right=(4, 5))
    lines.append(f"total: {_fmt(summary['params'])} params ({summary['params'] / 1e6:.2f} M, every learnable "
                 f"tensor), {_fmt(summary['macs'])} mult-adds ({summary['macs'] / 1e6:.1f} M) at "
                 f"{summary['resolution']}x{summary['resolution']}")
    lines.append("")
    total_w = sum(v["params"] for v in summary["by_type"].values()) or 1
    total_m = summary["macs"] or 1
    rows = [("type", "mult-adds", "% mult-adds", "weights", "% weights")]
    for kind, v in sorted(summary["by_type"].items(), key=lambda kv: -kv[1]["macs"]):
        rows.append((kind, _fmt(v["macs"]), f"{100 * v['macs'] / total_m:.2f}%",
                     _fmt(v["params"]), f"{100 * v['params'] / total_w:.2f}%"))
    lines.append("by layer type (weights only: no bias, no BN, as MobileNet Table 2):")
    lines += _grid(rows, right=(1, 2, 3, 4))
    return "\n".join(lines)


def _grid(rows: list[tuple], right: tuple[int, ...]) -> list[str]:
    """Align rows into columns; columns in `right` are right-aligned."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]

    def line(r: tuple) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return [line(rows[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in rows[1:]]
