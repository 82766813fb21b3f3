"""Training loaders whose every random choice is a function of (seed, epoch, sample), so a run resumed
mid-epoch sees exactly the batches and augmentations the uninterrupted run saw."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from repro.data.datasets import Failed


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch."""
    return (seed * 1_000_003 + epoch) * 2_147_483_647 + index & 0x7FFF_FFFF_FFFF_FFFF


class EpochSampler(Sampler[tuple[int, int]]):
    """This rank's (epoch, index) pairs: a seeded shuffle per epoch, equal shards, whole batches only.

    `start_batch` skips the batches a resumed run has already trained on. The batch count is rounded down to a
    multiple of `multiple` (trainer.grad_accum), so an epoch is a whole number of optimizer steps.
    """

    def __init__(self, length: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, multiple: int = 1) -> None:
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.start_batch = 0, 0
        self.batches = length // (batch_size * world_size) // multiple * multiple
        if self.batches == 0:
            raise ValueError(f"{length} training images cannot fill {multiple} batch(es) of {batch_size} x "
                             f"{world_size} processes; lower recipe.batch_size (the global batch), trainer.grad_accum "
                             f"or the number of processes")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch (its shuffle) and the first batch to yield."""
        self.epoch, self.start_batch = epoch, start_batch

    def indices(self) -> list[int]:
        """This rank's sample indices for the epoch, from `start_batch` on."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            order = torch.randperm(self.length, generator=g)
        else:
            order = torch.arange(self.length)
        used = self.batches * self.batch_size * self.world_size
        mine = order[:used][self.rank::self.world_size]
        return mine[self.start_batch * self.batch_size:].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter((self.epoch, i) for i in self.indices())

    def __len__(self) -> int:
        return (self.batches - self.start_batch) * self.batch_size


class SeededSamples(Dataset):
    """Wraps a dataset so item (epoch, i) is transformed with Python's `random` seeded by (seed, epoch, i)."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, i = key
        random.seed(sample_seed(self.seed, epoch, i))
        return self.base[i]


class TensorBatches:
    """Training batches straight from an in-memory uint8 tensor (CIFAR, digits): one indexing op per batch.

    The images and labels stay on the device they were given on (the run's GPU: put there once, 150 MB for
    CIFAR-10), and so does each epoch's order, copied there once per epoch: a step makes no host-device copy.
    Augmentation happens batch-wise on the same device (see BatchPadCrop), with no per-sample Python work.
    """

    def __init__(self, images: torch.Tensor, labels: list[int], sampler: EpochSampler) -> None:
        self.images, self.sampler = images, sampler
        self.labels = torch.tensor(labels, dtype=torch.long).to(images.device)

    def __len__(self) -> int:
        return self.sampler.batches - self.sampler.start_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        idx = torch.tensor(self.sampler.indices(), dtype=torch.long).to(self.images.device)
        for b in range(len(self)):
            sel = idx[b * self.sampler.batch_size:(b + 1) * self.sampler.batch_size]
            yield {"views": self.images[sel], "labels": self.labels[sel], "indices": sel, "failed": [],
                   "batch": self.sampler.start_batch + b}


class BatchPadCrop(torch.nn.Module):
    """CIFAR augmentation for a whole uint8 batch on its device: pad with zeros, random crop, random flip.

    The offsets and flips are drawn on the batch's device from a generator seeded by (seed, epoch, batch), so
    they are reproducible and a GPU step waits for no host copy (a CUDA generator draws other numbers than the
    CPU one: a run is bit-exact on one device type).
    """

    def __init__(self, crop: int, pad: int = 4, flip: bool = True) -> None:
        super().__init__()
        self.crop, self.pad, self.flip = crop, pad, flip
        self._generators: dict[torch.device, torch.Generator] = {}

    def draw(self, b: int, h: int, w: int, seed: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(top, left, flip) for each of `b` images: offsets into the padded image, flip a boolean or None."""
        g = self._generators.setdefault(device, torch.Generator(device=device))
        g.manual_seed(seed)
        p = self.pad
        top = torch.randint(0, h + 2 * p - self.crop + 1, (b,), generator=g, device=device)
        left = torch.randint(0, w + 2 * p - self.crop + 1, (b,), generator=g, device=device)
        flips = torch.rand(b, generator=g, device=device) < 0.5 if self.flip else None
        return top, left, flips

    def forward(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        b, c, h, w = x.shape
        top, left, flips = self.draw(b, h, w, seed, x.device)
        p = self.pad
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        ar = torch.arange(self.crop, device=x.device)
        rows = (top[:, None] + ar)[:, None, :, None]  # [B, 1, crop, 1]
        cols = (left[:, None] + ar)[:, None, None, :]  # [B, 1, 1, crop]
        if flips is not None:
            cols = torch.where(flips[:, None, None, None], cols.flip(-1), cols)
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[bi, ci, rows, cols]


def drop_failed(items: list[Any]) -> list[Any]:
    """Items other than failures (training skips unusable images when data.on_error=skip)."""
    return [it for it in items if not isinstance(it, Failed)]
