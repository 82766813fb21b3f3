"""The papers' image transforms on uint8 tensors: test views (center, 10-crop, multi-scale), training crops,
and the device-side normalization and color augmentation.

Images stay uint8 [3, H, W] until the device: decode once, resize once, crop by slicing, then normalize
(and PCA-light) a whole batch where it is cheap.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from repro.data.images import ImageError

PROTOCOLS = ("center", "ten_crop", "multi_scale", "slim_center")
INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                  "nearest": InterpolationMode.NEAREST}
# ResNet paper §3.4, fully-convolutional multi-scale testing: shorter side in these sizes.
MULTI_SCALES = (224, 256, 384, 480, 640)
# AlexNet's PCA color augmentation: ImageNet RGB eigenvalues/eigenvectors (pixels in [0, 1]), as fb.resnet.torch.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))
# Luma weights of fb.resnet.torch's grayscale (ITU-R 601), used by its color jitter.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def resize_shorter(img: torch.Tensor, size: int, interpolation: str = "bilinear", antialias: bool = True
                   ) -> torch.Tensor:
    """Resize so the shorter side is `size`, keeping the aspect ratio (torchvision's Resize(int))."""
    return TF.resize(img, size, interpolation=INTERPOLATIONS[interpolation], antialias=antialias)


def central_fraction_box(h: int, w: int, fraction: float) -> tuple[int, int, int, int]:
    """(top, left, height, width) of TF's `tf.image.central_crop(image, fraction)`, integer arithmetic as TF's.

    TF: offset = int(1 / ((1 - fraction) / 2)); start = side // offset; size = side - 2 * start. For 0.875 the
    offset is 16: a 500x375 image keeps rows 23..351 and columns 31..468 (329x438), its aspect ratio kept.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"eval.central_fraction={fraction} is not valid; it must be in (0, 1]")
    if fraction == 1.0:
        return 0, 0, h, w
    offset = int(1 / ((1 - fraction) / 2.0))
    top, left = h // offset, w // offset
    return top, left, h - 2 * top, w - 2 * left


def slim_center(img: torch.Tensor, size: int, fraction: float = 0.875, interpolation: str = "bilinear",
                antialias: bool = True) -> torch.Tensor:
    """TF-slim's evaluation view: the central `fraction` of each side, resized to size x size (aspect not kept)."""
    top, left, ch, cw = central_fraction_box(*img.shape[-2:], fraction)
    return TF.resized_crop(img, top, left, ch, cw, [size, size], interpolation=INTERPOLATIONS[interpolation],
                           antialias=antialias)


def _check_fits(img: torch.Tensor, crop: int, path: str, resize: int | None) -> None:
    """Refuse an image smaller than the crop (torchvision would silently pad it with zeros)."""
    h, w = img.shape[-2:]
    if min(h, w) < crop:
        how = f" after resizing its shorter side to {resize}" if resize else ""
        raise ImageError(path, f"the image is {w}x{h}{how}, smaller than the {crop}x{crop} crop; set "
                               f"eval.resize (e.g. eval.resize={math.ceil(crop / 0.875)}) so it is resized first")


@dataclass
class EvalViews:
    """The test views of one image for each protocol, from one decode and one resize.

    center: shorter side -> `resize`, then the central `crop` (no resize/crop when None: the image itself).
    ten_crop: the 4 corners and the center of the same resized image, and their horizontal flips.
    multi_scale: the whole image with its shorter side at each of `scales` (and its flip when `flip`).
    slim_center: TF-slim's view (its published MobileNet accuracies): the central `central_fraction` of each
    side of the original image, resized to crop x crop, the aspect ratio not kept (`resize` is not used).
    """

    protocols: Sequence[str] = ("center",)
    resize: int | None = 256
    crop: int | None = 224
    scales: Sequence[int] = MULTI_SCALES
    flip: bool = True
    interpolation: str = "bilinear"
    antialias: bool = True
    central_fraction: float = 0.875  # slim_center: the kept fraction of each side (TF-slim's eval default)
    takes_path: ClassVar[bool] = True  # error messages name the file

    def __post_init__(self) -> None:
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad:
            raise ValueError(f"eval.protocols {bad} not valid; choose from {list(PROTOCOLS)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"eval.interpolation={self.interpolation!r} is not valid; "
                             f"choose one of {list(INTERPOLATIONS)}")
        for proto in ("ten_crop", "slim_center"):
            if proto in self.protocols and self.crop is None:
                raise ValueError(f"eval.protocols has {proto} but eval.crop is null; give a crop size (e.g. 224)")
        central_fraction_box(1, 1, self.central_fraction)  # refuses a fraction outside (0, 1]

    def __call__(self, img: torch.Tensor, path: str = "<image>") -> dict[str, Any]:
        """{protocol: uint8 [K, 3, h, w]} (K = 1 center, 10 ten_crop), multi_scale: a list of such tensors."""
        out: dict[str, Any] = {}
        if "center" in self.protocols or "ten_crop" in self.protocols:
            resized = self._resize(img, self.resize)
            if self.crop is not None:
                _check_fits(resized, self.crop, path, self.resize)
            if "center" in self.protocols:
                view = resized if self.crop is None else TF.center_crop(resized, [self.crop, self.crop])
                out["center"] = view.unsqueeze(0)
            if "ten_crop" in self.protocols:
                # One layout change for the whole image, not one per crop (decoded images are HWC-strided).
                resized = resized.contiguous()
                out["ten_crop"] = torch.stack(TF.ten_crop(resized, [self.crop, self.crop]))
        if "multi_scale" in self.protocols:
            views = []
            for s in self.scales:
                whole = self._resize(img, s)
                views.append(torch.stack([whole, whole.flip(-1)]) if self.flip else whole.unsqueeze(0))
            out["multi_scale"] = views
        if "slim_center" in self.protocols:
            out["slim_center"] = slim_center(img, self.crop, self.central_fraction, self.interpolation,
                                             self.antialias).unsqueeze(0)
        return out

    def _resize(self, img: torch.Tensor, size: int | None) -> torch.Tensor:
        """Resize the shorter side to `size` unless it already is (or size is None)."""
        if size is None or min(img.shape[-2:]) == size:
            return img
        return resize_shorter(img, size, self.interpolation, self.antialias)


def default_eval_size(resolution: int) -> tuple[int, int]:
    """(resize, crop) of the papers' center protocol: crop 87.5% of the resized shorter side (256 -> 224)."""
    return round(resolution / 0.875), resolution


# ---------------------------------------------------------------------------------------------- training


@dataclass
class ScaleAugCrop:
    """ResNet §3.4: shorter side resized to a random size in [min_size, max_size], a random crop, a flip.

    Computed as one resized crop of the matching window of the original image (same geometry, one resize).
    """

    crop: int = 224
    min_size: int = 256
    max_size: int = 480
    flip: bool = True

    def window(self, h: int, w: int) -> Window:
        """Draw the crop of an h x w image (Python's `random`, in the order __call__ always drew)."""
        scale = random.randint(self.min_size, self.max_size) / min(h, w)
        win = self.crop / scale  # the crop's side in original pixels
        top = random.uniform(0, h - win) if h > win else 0.0
        left = random.uniform(0, w - win) if w > win else 0.0
        side_h, side_w = min(win, h), min(win, w)
        flip = self.flip and random.random() < 0.5
        return Window(int(top), int(left), max(1, round(side_h)), max(1, round(side_w)), flip)

    def apply(self, img: torch.Tensor, win: Window) -> torch.Tensor:
        """The drawn crop, resized to crop x crop (antialiased), mirrored if drawn so; on img's device."""
        return win.resized_crop(img, self.crop)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.apply(img, self.window(*img.shape[-2:]))


@dataclass
class RandomResizedCrop:
    """Inception-style crop (fb.resnet.torch, torchvision: area 8-100%); MobileNet uses fewer small crops."""

    crop: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def window(self, h: int, w: int) -> Window:
        """Draw the crop of an h x w image (torchvision's sampling, then the flip)."""
        top, left, ch, cw = _rrc_params(h, w, self.scale, self.ratio)
        return Window(top, left, ch, cw, self.flip and random.random() < 0.5)

    def apply(self, img: torch.Tensor, win: Window) -> torch.Tensor:
        """The drawn crop, resized to crop x crop (antialiased), mirrored if drawn so; on img's device."""
        return win.resized_crop(img, self.crop)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.apply(img, self.window(*img.shape[-2:]))


@dataclass(frozen=True)
class Window:
    """One drawn training crop: a window of the image (pixels), and whether the result is mirrored."""

    top: int
    left: int
    height: int
    width: int
    flip: bool

    def resized_crop(self, img: torch.Tensor, size: int) -> torch.Tensor:
        """The window of `img` resized to size x size (antialiased), mirrored if drawn so."""
        out = TF.resized_crop(img, self.top, self.left, self.height, self.width, [size, size], antialias=True)
        return out.flip(-1) if self.flip else out


def _rrc_params(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, ...]:
    """torchvision's RandomResizedCrop window sampling (10 tries, then a central crop)."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return random.randint(0, h - ch), random.randint(0, w - cw), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@dataclass
class PadCrop:
    """CIFAR (ResNet §4.2): pad `pad` zero pixels on each side, a random `crop` crop, a random flip."""

    crop: int = 32
    pad: int = 4
    flip: bool = True
    takes_path: ClassVar[bool] = True  # error messages name the file

    def window(self, h: int, w: int) -> Window:
        """Draw the crop's offsets in the padded image, then the flip."""
        top, left = random.randint(0, h + 2 * self.pad - self.crop), random.randint(0, w + 2 * self.pad - self.crop)
        return Window(top, left, self.crop, self.crop, self.flip and random.random() < 0.5)

    def apply(self, img: torch.Tensor, win: Window) -> torch.Tensor:
        """The drawn crop of the zero-padded image, mirrored if drawn so."""
        padded = torch.nn.functional.pad(img, (self.pad,) * 4)
        out = padded[..., win.top:win.top + win.height, win.left:win.left + win.width]
        return out.flip(-1) if win.flip else out

    def __call__(self, img: torch.Tensor, path: str = "<image>") -> torch.Tensor:
        h, w = img.shape[-2:]
        if min(h, w) + 2 * self.pad < self.crop:
            raise ImageError(path, f"the image is {w}x{h}, smaller than the {self.crop}x{self.crop} training crop even "
                                   f"with {self.pad} pixels of padding on each side")
        return self.apply(img, self.window(h, w))


# ------------------------------------------------------------------------------------------ on the device


@dataclass
class Preprocessing:
    """How pixels become network inputs: x/255, minus a per-pixel mean image or a per-channel mean, over std.

    It belongs to the weights: checkpoints store it (`to_dict`), published formats declare theirs.
    """

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # per channel, pixels in [0, 1]
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    mean_image: torch.Tensor | None = field(default=None, repr=False)  # [3, H, W] in [0, 1] (CIFAR per-pixel)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for checkpoints (readable with weights_only=True)."""
        return {"mean": list(self.mean), "std": list(self.std), "mean_image": self.mean_image}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Preprocessing:
        """Inverse of to_dict; None gives the identity (pixels / 255)."""
        if d is None:
            return cls()
        return cls(tuple(d.get("mean", (0.0,) * 3)), tuple(d.get("std", (1.0,) * 3)), d.get("mean_image"))


class Normalize(nn.Module):
    """uint8 [N, 3, H, W] -> float network input on the batch's device; PCA lighting too when training."""

    def __init__(self, pre: Preprocessing, lighting_std: float = 0.0, color_jitter: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        mean_image = pre.mean_image.float().unsqueeze(0) if pre.mean_image is not None else None
        self.register_buffer("mean_image", mean_image, persistent=False)
        self.jitter = ColorJitter(color_jitter) if color_jitter > 0 else None
        self.lighting = Lighting(lighting_std) if lighting_std > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0)
        # Color augmentation acts on [0, 1] pixels, before the mean is removed (as fb.resnet.torch: jitter, then
        # lighting, then normalization).
        if self.jitter is not None and self.training:
            x = self.jitter(x)
        if self.lighting is not None and self.training:
            x = self.lighting(x)
        if self.mean_image is not None:
            if x.shape[-2:] != self.mean_image.shape[-2:]:
                raise ValueError(f"the per-pixel mean image is {tuple(self.mean_image.shape[-2:])} but the input is "
                                 f"{tuple(x.shape[-2:])}; per-pixel means need inputs of the training size")
            x = x - self.mean_image
        return (x - self.mean) * self.inv_std


class Lighting(nn.Module):
    """AlexNet's PCA color augmentation on a float batch in [0, 1] scale: x += V (alpha * lambda), alpha ~ N(0, std)."""

    def __init__(self, std: float = 0.1) -> None:
        super().__init__()
        self.std = std
        self.register_buffer("eigval", torch.tensor(PCA_EIGVAL), persistent=False)
        self.register_buffer("eigvec", torch.tensor(PCA_EIGVEC), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(x.shape[0], 3, device=x.device) * self.std
        rgb = (alpha * self.eigval) @ self.eigvec.T  # [N, 3]
        return x + rgb.view(-1, 3, 1, 1).to(x.dtype)


class ColorJitter(nn.Module):
    """fb.resnet.torch's ColorJitter on a float batch in [0, 1] scale: brightness, contrast and saturation.

    Each image gets the three in its own random order, each with its own factor a ~ U(1 - s, 1 + s), blending
    x' = a x + (1 - a) g: brightness with g = 0, contrast with g = the mean of the image's grayscale, saturation
    with g = the pixel's grayscale (0.299 R + 0.587 G + 0.114 B). No clamping (as fb.resnet.torch).
    """

    def __init__(self, strength: float = 0.4) -> None:
        super().__init__()
        self.strength = strength
        self.register_buffer("gray", torch.tensor(GRAY_WEIGHTS).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        factors = 1 + (torch.rand(n, 3, device=x.device) * 2 - 1) * self.strength  # [N, (b, c, s)]
        order = torch.rand(n, 3, device=x.device).argsort(1)  # each image's own order of the three
        return self.blend(x, factors, order)

    def blend(self, x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Blend with the given factors [N, (brightness, contrast, saturation)] in the given order [N, 3]."""
        n = x.shape[0]
        for step in range(3):
            which = order[:, step]  # [N]: 0 brightness, 1 contrast, 2 saturation
            alpha = factors.gather(1, which[:, None]).view(n, 1, 1, 1).to(x.dtype)
            gray = (x * self.gray).sum(1, keepdim=True)  # [N, 1, H, W]
            target = torch.where((which == 1).view(n, 1, 1, 1), gray.mean((2, 3), keepdim=True), gray)
            target = torch.where((which == 0).view(n, 1, 1, 1), torch.zeros_like(target), target)
            x = alpha * x + (1 - alpha) * target
        return x
