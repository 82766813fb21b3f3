"""Read one image file as an RGB uint8 tensor [3, H, W], or say clearly why not."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
ON_ERROR = ("raise", "skip")


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and what to do."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}. Replace or remove the file, or set data.on_error=skip to skip "
                         f"such images (they are counted as skipped in the metrics)")


def is_image_file(name: str) -> bool:
    """Whether a file name has an image extension we read."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def decode(data: bytes, path: str | Path = "<bytes>") -> torch.Tensor:
    """Decode encoded image bytes to RGB uint8 [3, H, W]; grayscale, CMYK, RGBA and palette become RGB."""
    if not data:
        raise ImageError(path, "the file is empty")
    try:
        with warnings.catch_warnings():  # torchvision 0.29 flags its decoders as moving to TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        img = None  # a format torchvision does not decode (BMP, TIFF, ...) or a damaged file: ask PIL
    if img is not None and img.dtype == torch.uint16:  # 16-bit PNG: scale to 8 bits
        img = ((img.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    if img is None:
        img = _decode_pil(data, path)
    return img


def _decode_pil(data: bytes, path: str | Path) -> torch.Tensor:
    """PIL fallback for formats torchvision cannot decode; truncated files are refused, never padded."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = im.convert("RGB")
    except UnidentifiedImageError:
        raise ImageError(path, "not an image file (no known image format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(path, f"cannot decode the image (truncated or damaged: {e})") from None
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()


def load_image(path: str | Path) -> torch.Tensor:
    """Read and decode the image at `path` to RGB uint8 [3, H, W]."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageError(path, f"cannot read the file ({e.strerror or e})") from None
    return decode(data, path)
