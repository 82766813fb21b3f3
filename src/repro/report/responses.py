"""ResNet paper Fig. 7: standard deviations of the layer responses of CIFAR ResNets and plain nets.

He et al. 2015, §4.2 / Fig. 7: "The responses are the outputs of each 3x3 layer, after BN and before
nonlinearity." For the CIFAR nets of §4.2 these are the outputs of the stem's `bn1` and of every block's `bn1`
and `bn2` (6n+1 layers: 19 for resnet20/plain20, 109 for resnet110); the BatchNorms inside projection
shortcuts (options B/C) follow 1x1 convolutions and are not counted.

Each layer's std is taken over all of its response values (every image, channel and position) of the images
given, with the model in eval mode (BN uses its running statistics), as the *sample* std (divisor N - 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader

from repro.data import DataError, EvalViews, Normalize, Preprocessing, build_dataset, collate
from repro.data.datasets import Subset, spec_of
from repro.models import MODELS, create_model_from_config, load_weights
from repro.models.resnet import CifarResNet
from repro.models.weights import read_weights_file

# The zoo's CIFAR nets of paper §4.2 (all CifarResNet): resnet20..1202 and plain20..110.
SUPPORTED_MODELS = tuple(name for name, (_, _, res) in MODELS.items()
                         if name.startswith(("resnet", "plain")) and res == 32)
_STAGES = ("layer1", "layer2", "layer3")


def _unsupported(what: str) -> ValueError:
    """The error for a model without Fig. 7's layer responses."""
    return ValueError(f"{what} has no Fig. 7 layer responses: only the CIFAR ResNets and plain nets of paper §4.2 "
                      f"are supported ({', '.join(SUPPORTED_MODELS)})")


def response_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """The BatchNorms right after each 3x3 conv of a CIFAR ResNet/plain net, in forward order, by module path."""
    if not isinstance(model, CifarResNet):
        raise _unsupported(f"a {type(model).__name__} model")
    layers: list[tuple[str, nn.BatchNorm2d]] = [("bn1", model.bn1)]
    for stage in _STAGES:
        for i, block in enumerate(getattr(model, stage)):
            # block.downsample (options B/C: 1x1 conv + BN) is the shortcut, not a 3x3 layer: left out.
            layers += [(f"{stage}.{i}.bn1", block.bn1), (f"{stage}.{i}.bn2", block.bn2)]
    return layers


class _Moments:
    """Running count, sum and sum of squares (float64) of one layer's responses, shifted for accuracy.

    The shift (the mean of the first batch) keeps sum-of-squares cancellation small when |mean| >> std;
    var = (sum(d^2) - sum(d)^2 / n) / (n - 1) with d = x - shift is exact for any shift.
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift: Tensor | None = None
        self.sum: Tensor | None = None
        self.sumsq: Tensor | None = None

    def add(self, out: Tensor) -> None:
        """Accumulate one batch of responses (read at once: an in-place ReLU overwrites them afterwards)."""
        x = out.detach().to(torch.float64)
        if self.shift is None:
            self.shift = x.mean()
            self.sum = torch.zeros((), dtype=torch.float64, device=x.device)
            self.sumsq = torch.zeros((), dtype=torch.float64, device=x.device)
        d = x - self.shift
        self.sum += d.sum()
        self.sumsq += d.square().sum()
        self.n += x.numel()

    def std(self) -> float:
        """The sample standard deviation (divisor n - 1) of everything added."""
        if self.n < 2:
            return math.nan
        var = (float(self.sumsq) - float(self.sum) ** 2 / self.n) / (self.n - 1)
        return math.sqrt(max(var, 0.0))


def response_stds(model: nn.Module, batches: Iterable[Tensor], normalize: nn.Module | None = None
                  ) -> list[tuple[str, float]]:
    """Sample std (N - 1) of each 3x3 layer's responses (after BN, before ReLU) over all images of `batches`.

    `batches` yields input tensors [B, 3, H, W]; with `normalize` (e.g. `Normalize(preprocessing)`), uint8
    pixel batches are turned into network inputs first. Runs in eval mode under no_grad on the model's device;
    the model's training mode is restored and every hook removed afterwards, also on error.
    """
    layers = response_layers(model)
    moments = {name: _Moments() for name, _ in layers}
    device = next(model.parameters()).device
    if normalize is not None:
        normalize = normalize.to(device).eval()
    was_training = model.training
    handles = []
    seen = 0
    try:
        for name, bn in layers:
            handles.append(bn.register_forward_hook(lambda _m, _i, out, acc=moments[name]: acc.add(out)))
        model.eval()
        with torch.no_grad():
            for x in batches:
                x = x.to(device)
                if normalize is not None:
                    x = normalize(x)
                model(x)
                seen += x.shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("no images: `batches` yielded nothing, so there are no responses to measure")
    return [(name, moments[name].std()) for name, _ in layers]


def sorted_stds(stds: list[float]) -> list[float]:
    """The stds in descending order (Fig. 7, bottom)."""
    return sorted(stds, reverse=True)


def _default_split(config: dict[str, Any], data_cfg: dict[str, Any]) -> str:
    """The run's test split, else its val split, else the split its data config evaluates (as repro-eval)."""
    for key in ("test_split", "val_split"):
        if config.get(key):
            return str(config[key])
    return str(data_cfg["split"])


def _eval_views(model_cfg: dict[str, Any], data_cfg: dict[str, Any]) -> EvalViews:
    """The center view the run validated on: in-memory data (CIFAR, digits) as it is, else resize + center crop."""
    resize, crop = spec_of(data_cfg["name"]).eval_size(model_cfg["resolution"])
    return EvalViews(["center"], resize=resize, crop=crop)


def _uint8_batches(loader: DataLoader, on_error: str) -> Iterable[Tensor]:
    """The center views of a repro data loader; unusable images raise or are skipped per `data.on_error`."""
    for batch in loader:
        for failed in batch["failed"]:
            if on_error != "skip":
                raise ValueError(f"{failed.message} (the checkpoint's data config has data.on_error={on_error})")
        if batch["views"] is not None:
            yield batch["views"]["center"].flatten(0, 1)


def checkpoint_response_stds(path: str | Path, data_root: str | Path | None = None, split: str | None = None,
                             max_images: int | None = 1000, batch_size: int = 200,
                             device: str | torch.device = "cpu") -> dict[str, Any]:
    """Fig. 7's response stds of a repro-train checkpoint, on `max_images` spread evenly over its dataset's split.

    The model, dataset and preprocessing come from the checkpoint (as repro-eval reads it); `data_root` and
    `split` override the saved data config's root and the split (default: the run's test split, else val split,
    else the data config's split). Returns {"model", "depth", "layers", "std", "images", "split", "data",
    "checkpoint"}; problems raise a ValueError that names the fix.
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images={max_images} is not valid; give a positive number of images (or None: all)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not valid; it must be a positive integer")
    stored = read_weights_file(path)  # WeightsError (a ValueError) names a missing or unreadable file
    config = stored.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f"{str(path)!r} is not a repro-train checkpoint (no saved model config); pass a "
                         f"checkpoints/last.pt or best.pt written by repro-train")
    if "preprocessing" not in stored:
        raise ValueError(f"{str(path)!r} carries no preprocessing; pass a checkpoint written by repro-train (it "
                         f"stores the mean/std the weights were trained with)")
    model_cfg = dict(config["model"])
    name = model_cfg.get("name")
    if name not in SUPPORTED_MODELS:
        raise _unsupported(f"{str(path)!r} holds model {name!r}, which")
    data_cfg = dict(config["data"]) if isinstance(config.get("data"), dict) else None
    if data_cfg is None:
        raise ValueError(f"{str(path)!r} carries no data config; pass a checkpoint written by repro-train")
    if data_root is not None:
        if "root" not in data_cfg:
            raise ValueError(f"data={data_cfg['name']} reads no files, so data_root does not apply; leave it None")
        data_cfg["root"] = str(data_root)
        data_cfg.update({k: None for k in ("train_dir", "val_dir") if k in data_cfg})  # folder/imagenet: root wins
    split = split or _default_split(config, data_cfg)
    data_cfg["split"] = split

    try:
        dataset = build_dataset(OmegaConf.create(data_cfg), split, _eval_views(model_cfg, data_cfg))
    except DataError as e:
        raise ValueError(f"cannot read {data_cfg['name']}/{split} for {str(path)!r}: {e} (pass data_root=... "
                         f"and/or split=...)") from None
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    if n == 0:
        raise ValueError(f"{data_cfg['name']}/{split} has no images; pass another split=... or data_root=...")
    model_cfg.setdefault("num_classes", len(dataset.classes))
    model = load_weights(create_model_from_config(model_cfg), stored, "repro").to(device)
    normalize = Normalize(Preprocessing.from_dict(stored["preprocessing"]))
    # Spread evenly over the split: image folders are sorted by class, so the first n could be one class.
    picked = [i * len(dataset) // n for i in range(n)]
    loader = DataLoader(Subset(dataset, picked), batch_size=batch_size, collate_fn=collate)
    counted = _Counted(_uint8_batches(loader, data_cfg.get("on_error", "raise")))
    stds = response_stds(model, counted, normalize)
    return {"model": name, "depth": 6 * len(model.layer1) + 2, "layers": [k for k, _ in stds],
            "std": [v for _, v in stds], "images": counted.images, "split": split, "data": data_cfg["name"],
            "checkpoint": str(path)}


class _Counted:
    """Iterate batches while counting their images."""

    def __init__(self, batches: Iterable[Tensor]) -> None:
        self.batches, self.images = batches, 0

    def __iter__(self) -> Iterator[Tensor]:
        for x in self.batches:
            self.images += x.shape[0]
            yield x


__all__ = ["SUPPORTED_MODELS", "checkpoint_response_stds", "response_layers", "response_stds", "sorted_stds"]
