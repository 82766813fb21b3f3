"""Data: image decoding, datasets, the papers' transforms, batching that survives bad images."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from repro.data.datasets import DATASETS, DataError, Failed, build_dataset
from repro.data.images import ON_ERROR, ImageError, load_image
from repro.data.transforms import PROTOCOLS, EvalViews, Normalize, Preprocessing


def collate(items: list[Any]) -> dict[str, Any]:
    """Batch dataset items: stacked uint8 views (a dict per protocol for test views), labels, indices, failures."""
    good = [it for it in items if not isinstance(it, Failed)]
    batch: dict[str, Any] = {
        "failed": [it for it in items if isinstance(it, Failed)],
        "labels": torch.tensor([it[1] for it in good], dtype=torch.long),
        "indices": torch.tensor([it[2] for it in good], dtype=torch.long),
    }
    if not good:
        batch["views"] = None
    elif isinstance(good[0][0], dict):
        views = {}
        for key in good[0][0]:
            per_image = [it[0][key] for it in good]
            views[key] = per_image if key == "multi_scale" else torch.stack(per_image)
        batch["views"] = views
    elif isinstance(good[0][0], torch.Tensor):
        batch["views"] = torch.stack([it[0] for it in good])
    else:  # items finished on the device (data.decode=gpu: JPEG bytes and their drawn crops)
        batch["views"] = [it[0] for it in good]
    return batch


class ShardSampler(Sampler[int]):
    """Rank r of w reads indices r, r+w, r+2w, ...: every index exactly once over all ranks (no padding)."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


__all__ = [
    "DATASETS", "ON_ERROR", "PROTOCOLS", "DataError", "EvalViews", "Failed", "ImageError", "Normalize",
    "Preprocessing", "ShardSampler", "build_dataset", "collate", "load_image",
]
