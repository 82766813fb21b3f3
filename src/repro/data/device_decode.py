"""`data.decode=gpu`: loader workers read JPEG bytes and draw each training crop from the image header; the main
process decodes the batch on the GPU (nvJPEG, `torchvision.io.decode_jpeg(device="cuda")`) and crops it there.

The crop of every image is drawn exactly as the CPU path draws it (same seeded `random` calls, from the same
height and width), so the two paths train on the same windows; only the decoder and the resize kernels differ.
Files that are not baseline/progressive RGB or grayscale JPEGs (PNG, CMYK, ...) are decoded by the worker as
with `data.decode=cpu`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from repro.data.datasets import Failed
from repro.data.images import ImageError, decode
from repro.data.transforms import Window

DECODES = ("cpu", "gpu")
JPEG_MODES = ("RGB", "L")  # what the device decoder takes; others (CMYK, YCCK) are decoded in the worker


@dataclass
class Encoded:
    """One training image as a worker leaves it: JPEG bytes and the drawn window, or the crop already made."""

    path: str
    data: torch.Tensor | None  # uint8 bytes of a JPEG to decode on the device
    window: Window | None
    image: torch.Tensor | None = None  # uint8 [3, crop, crop]: decoded and cropped by the worker


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's header when the device decoder takes it, else None (decode on the CPU)."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            if im.format != "JPEG" or im.mode not in JPEG_MODES:
                return None
            w, h = im.size
    except (OSError, SyntaxError, ValueError):
        return None  # a damaged header: the CPU decoder names the problem
    return h, w


class EncodedFiles(Dataset):
    """Image files as `Encoded` items: bytes plus the window `transform` draws (it must have window/apply)."""

    def __init__(self, files: Any, transform: Any) -> None:
        self.files, self.transform = files, transform  # ImageFiles (or a Subset of it): paths, labels, classes
        self.paths, self.labels, self.classes = files.paths, files.labels, files.classes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Encoded, int, int] | Failed:
        path = self.paths[i]
        try:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise ImageError(path, f"cannot read the file ({e.strerror or e})") from None
            size = jpeg_size(data)
            if size is None:  # not for the device decoder: decode and crop here, as data.decode=cpu does
                return Encoded(path, None, None, self.transform(decode(data, path))), self.labels[i], i
            window = self.transform.window(*size)
            return Encoded(path, torch.frombuffer(bytearray(data), dtype=torch.uint8), window), self.labels[i], i
        except ImageError as e:
            return Failed(i, path, str(e))


class DeviceDecode:
    """Finish a batch of `Encoded` items on `device`: decode the JPEGs there, crop each as drawn."""

    def __init__(self, transform: Any, device: torch.device) -> None:
        self.transform, self.device = transform, device

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with "views" a uint8 [N, 3, crop, crop] tensor on the device (None if no image was usable);
        labels and indices of the N images kept; files the decoders refused added to "failed"."""
        items: list[Encoded] = batch["views"] or []
        todo = [k for k, it in enumerate(items) if it.data is not None]
        decoded = dict(zip(todo, self._decode([items[k].data for k in todo]))) if todo else {}
        out, keep, failed = [], [], list(batch["failed"])
        for k, it in enumerate(items):
            img = decoded.get(k)
            if it.image is not None:  # decoded and cropped by the worker
                out.append(it.image.to(self.device, non_blocking=True))
            else:
                if img is None:  # the device decoder refused it: the CPU decoder reads it or says why
                    try:
                        img = decode(bytes(it.data.numpy()), it.path).to(self.device)
                    except ImageError as e:
                        failed.append(Failed(int(batch["indices"][k]), it.path, str(e)))
                        continue
                out.append(self.transform.apply(img, it.window))
            keep.append(k)
        kept = torch.tensor(keep, dtype=torch.long)
        return {**batch, "views": torch.stack(out) if out else None, "labels": batch["labels"][kept],
                "indices": batch["indices"][kept], "failed": failed}

    def _decode(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Decode all at once on the device; when the batch call fails, one by one (None: refused)."""
        with warnings.catch_warnings():  # torchvision 0.29 flags its decoders as moving to TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                pass
            out: list[torch.Tensor | None] = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out
