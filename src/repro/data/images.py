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
# data.max_pixels: the largest image (width x height) any decoder is asked to decode, checked on the file's header
# first; a 12000x12000 JPEG would take 432 MB of RGB (and more while decoding) in every loader worker.
MAX_PIXELS = 100_000_000


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and what to do."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}. Replace or remove the file, or set data.on_error=skip to skip "
                         f"such images (they are counted as skipped in the metrics)")


def is_image_file(name: str) -> bool:
    """Whether a file name has an image extension we read."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image's header, without decoding its pixels; None when PIL cannot tell."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit (data.max_pixels) is checked on this size, for every decoder
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except Exception:  # not an image PIL knows, or a damaged header: the decoders will say what is wrong
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def check_pixels(size: tuple[int, int] | None, path: str | Path, max_pixels: int | None) -> None:
    """Refuse an image larger than `max_pixels` (width x height) before it is decoded."""
    if size is None or not max_pixels:
        return
    w, h = size
    if w * h > max_pixels:
        raise ImageError(path, f"the image is {w}x{h} = {w * h:,} pixels, more than data.max_pixels={max_pixels:,} "
                               f"(a decompression bomb, or a huge scan); if it is genuine, raise data.max_pixels")


def decode(data: bytes, path: str | Path = "<bytes>", max_pixels: int | None = MAX_PIXELS) -> torch.Tensor:
    """Decode encoded image bytes to RGB uint8 [3, H, W]; grayscale, CMYK, RGBA and palette become RGB.

    Images over `max_pixels` (read from the header, before any decoder runs) are refused (None: no limit).
    """
    if not data:
        raise ImageError(path, "the file is empty")
    check_pixels(header_size(data), path, max_pixels)
    try:
        with warnings.catch_warnings():  # torchvision 0.29 flags its decoders as moving to TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        img = None  # a format torchvision does not decode (BMP, TIFF, ...) or a damaged file: ask PIL
    if img is not None and img.dtype == torch.uint16:  # 16-bit PNG: scale to 8 bits
        img = ((img.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    if img is None:
        img = _decode_pil(data, path, max_pixels)
    check_pixels((img.shape[-1], img.shape[-2]), path, max_pixels)  # a header PIL could not read
    return img


def _decode_pil(data: bytes, path: str | Path, max_pixels: int | None = MAX_PIXELS) -> torch.Tensor:
    """PIL fallback for formats torchvision cannot decode; truncated files are refused, never padded."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            check_pixels(im.size, path, max_pixels)
            im.load()
            rgb = im.convert("RGB")
    except UnidentifiedImageError:
        raise ImageError(path, "not an image file (no known image format)") from None
    except Image.DecompressionBombError as e:  # PIL's own bound (2 x Image.MAX_IMAGE_PIXELS)
        raise ImageError(path, f"the image is too large to decode safely ({e}); if it is genuine, raise "
                               f"data.max_pixels") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(path, f"cannot decode the image (truncated or damaged: {e})") from None
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()


def load_image(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> torch.Tensor:
    """Read and decode the image at `path` to RGB uint8 [3, H, W] (at most `max_pixels`, see decode)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageError(path, f"cannot read the file ({e.strerror or e})") from None
    return decode(data, path, max_pixels)
