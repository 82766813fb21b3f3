"""A training run's data, assembled from its config and the dataset's spec: the training batches, their
device-side augmentation, preprocessing and the evaluation sets; and the checks made before any image is decoded."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from repro.data import DataError, EvalViews, Preprocessing, build_dataset, collate
from repro.data.datasets import FILE_AUGMENTS, SPECS, ImageTensors, Subset, shared_images, spec_of
from repro.data.device_decode import DeviceDecode, EncodedFiles
from repro.data.loaders import BatchPadCrop, EpochSampler, SeededSamples, TensorBatches
from repro.data.transforms import PadCrop, RandomResizedCrop, ScaleAugCrop
from repro.distributed import Dist, launched_rank

log = logging.getLogger("repro.data")


@dataclass
class TrainData:
    """What the loop reads: the training batches, how to finish them on the device, the evaluation sets."""

    loader: Any  # yields {"views": uint8 batch, "labels", ...}; has .sampler (EpochSampler)
    batch_aug: nn.Module | None  # device-side augmentation of in-memory data (CIFAR pad/crop/flip)
    preprocessing: Preprocessing
    val: Any | None  # the per-epoch evaluation split (`val_split`), or None
    test: Any | None  # the split of the final evaluation (`test_split`), or None
    classes: list[str]
    eval_size: tuple[int | None, int | None]  # (resize, crop) of the test views
    decoder: DeviceDecode | None = None  # data.decode=gpu: the loader leaves JPEG bytes, decoded on the device
    skipped: list[str] = field(default_factory=list)  # training files left out when decoded into memory (skip)


def _tensors(cfg: DictConfig, split: str) -> ImageTensors:
    """An in-memory split: digits, CIFAR arrays, or CIFAR image folders decoded once."""
    ds = build_dataset(cfg.data, split)
    base = ds.base if isinstance(ds, Subset) else ds
    if isinstance(base, ImageTensors):
        idx = torch.tensor(ds.indices) if isinstance(ds, Subset) else torch.arange(len(ds))
        return ImageTensors(base.images[idx], list(ds.labels), ds.classes, list(ds.paths))
    # Image folders (e.g. CIFAR as JPEGs): decode every image once, in parallel workers.
    loader = DataLoader(ds, batch_size=512, num_workers=cfg.data.num_workers, collate_fn=collate)
    chunks, labels, paths, skipped = [], [], [], []
    hide = not cfg.trainer.progress or launched_rank() != 0  # one bar under torchrun: rank 0's
    for batch in tqdm(loader, desc=f"decoding {split}", unit="batch", disable=hide):
        for f in batch["failed"]:
            if cfg.data.on_error == "raise":
                raise DataError(f.message)
            skipped.append((f.path, f.message))
        if batch["views"] is None:  # every image of this chunk was unusable
            continue
        chunks.append(batch["views"])
        labels += batch["labels"].tolist()
        paths += [ds.paths[i] for i in batch["indices"].tolist()]
    if skipped:
        log.warning("%s: skipped %d unusable images of %d (data.on_error=skip; counted as skipped), e.g. %s",
                    split, len(skipped), len(ds), skipped[0][1])
    if not chunks:
        raise DataError(f"no usable image in the {split} split of data={cfg.data.name} ({len(ds)} files, all "
                        f"unusable), e.g. {skipped[0][1] if skipped else ''}")
    return ImageTensors(torch.cat(chunks), labels, ds.classes, paths, skipped=skipped)


def _file_transform(aug: Any, crop: int) -> Any:
    """Per-sample uint8 training transform for images read from files."""
    if aug.train == "scale_aug":
        return ScaleAugCrop(crop, aug.min_size, aug.max_size, aug.flip)
    if aug.train in ("inception", "mobilenet"):
        return RandomResizedCrop(crop, tuple(aug.scale), flip=aug.flip)
    if aug.train == "pad_crop":
        return PadCrop(crop, aug.pad, aug.flip)
    raise ValueError(f"recipe.augment.train={aug.train} is not a transform of image files; choose one of "
                     f"{list(FILE_AUGMENTS)}")


def _test_set(cfg: DictConfig, views: EvalViews, in_memory: bool) -> Any:
    """The split evaluated at the end (`test_split`), or None; a missing one names `test_split=null` as a way out."""
    try:
        return _eval_set(cfg, cfg.test_split, views, in_memory)
    except DataError as e:
        raise DataError(f"test_split={cfg.test_split!r}: {e} (test_split=null reports the val split instead)"
                        ) from None


def _eval_set(cfg: DictConfig, split: str | None, views: EvalViews, in_memory: bool) -> Any:
    """An evaluation split with test views (decoded into memory for small data), or None for null."""
    if not split:
        return None
    if not in_memory:
        return build_dataset(cfg.data, split, views)
    ds = _tensors(cfg, split)
    ds.transform = views
    return ds


def _check_augment(cfg: DictConfig) -> None:
    """Refuse a training augmentation (or per-pixel mean) the dataset does not take, before anything is decoded."""
    aug, spec = cfg.recipe.augment, spec_of(cfg.data.name)
    if not spec.in_memory and aug.per_pixel_mean:
        raise ValueError("recipe.augment.per_pixel_mean needs an in-memory dataset (CIFAR); use mean/std")
    if aug.train in spec.augments:
        return
    if spec.in_memory:
        raise ValueError(f"recipe.augment.train={aug.train} is for image files; use {' or '.join(spec.augments)} "
                         f"with data={cfg.data.name}")
    in_memory = ", ".join(name for name, spec in SPECS.items() if spec.in_memory)
    raise ValueError(f"recipe.augment.train={aug.train} needs an in-memory dataset ({in_memory})")


def build_data(cfg: DictConfig, resolution: int, batch: int, d: Dist, device: torch.device) -> TrainData:
    """Training loader (`batch` images per process), device augmentation, preprocessing and evaluation sets."""
    aug, spec = cfg.recipe.augment, spec_of(cfg.data.name)
    _check_augment(cfg)
    crop = resolution if aug.crop == "auto" else aug.crop
    resize, eval_crop = spec.eval_size(resolution)
    views = EvalViews(["center"], resize=resize, crop=eval_crop)
    mean_image, decoder = None, None
    if spec.in_memory:
        train = _tensors(cfg, cfg.train_split)
        if aug.per_pixel_mean:  # ResNet §4.2: the training split's mean image, kept with the run
            mean_image = train.images.float().mean(0) / 255.0
        sampler = EpochSampler(len(train.labels), batch, cfg.seed, d.rank, d.world_size,
                               multiple=cfg.trainer.grad_accum)
        # The uint8 training set lives on the device (once), so a step copies nothing from the host.
        loader: Any = TensorBatches(train.images.to(device), train.labels, sampler)
        batch_aug = BatchPadCrop(crop, aug.pad, aug.flip).to(device) if aug.train == "pad_crop" else None
        classes = train.classes
    else:
        transform = _file_transform(aug, crop)
        base = build_dataset(cfg.data, cfg.train_split, transform)
        if cfg.data.decode == "gpu":  # workers read bytes and draw each crop from the header; decoded on the GPU
            base, decoder = EncodedFiles(base, transform), DeviceDecode(transform, device)
        sampler = EpochSampler(len(base), batch, cfg.seed, d.rank, d.world_size, multiple=cfg.trainer.grad_accum)
        workers = cfg.data.num_workers
        loader = DataLoader(SeededSamples(base, cfg.seed), batch_size=batch, sampler=sampler, collate_fn=collate,
                            num_workers=workers, pin_memory=device.type == "cuda", drop_last=True,
                            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
        batch_aug, classes = None, base.classes
    val = _eval_set(cfg, cfg.val_split, views, spec.in_memory)
    # val_split=test (ResNet Fig. 6's curve): one dataset serves both, decoded once (validate sets its views).
    test = val if cfg.test_split == cfg.val_split else _test_set(cfg, views, in_memory=spec.in_memory)
    pre = Preprocessing(tuple(aug.mean), tuple(aug.std), mean_image)
    skipped = [path for path, _ in train.skipped] if spec.in_memory else []
    return TrainData(loader, batch_aug, pre, val, test, classes, (resize, eval_crop), decoder, skipped)


# ---------------------------------------------------------------------------------------------- checks


def crop_problem(cfg: DictConfig) -> str | None:
    """Why the training crop cannot be cut from the data's images (fixed-size data only), or None.

    CIFAR and digits are evaluated on the image itself and trained on padded crops of it, so the model's
    resolution (or recipe.augment.crop) must fit the image with its padding (model=resnet50 data=cifar10: 224 > 40).
    """
    name, aug = cfg.data.name, cfg.recipe.augment
    spec = spec_of(name)
    size = spec.image_side(cfg.data)
    if size is None:
        return None  # image files of any size, resized
    if not spec.in_memory and aug.train != "pad_crop":
        return None  # resized crops fit any image
    crop = cfg.model.resolution if aug.crop == "auto" else aug.crop
    pad = aug.pad if aug.train == "pad_crop" else 0
    if crop <= size + 2 * pad:
        return None
    what = f"model.resolution={crop}" if aug.crop == "auto" else f"recipe.augment.crop={crop}"
    fix = (f"use a model made for {size}x{size} images (model=resnet20 ... resnet1202, plain20 ... plain110) or "
           f"model.resolution={size}" if aug.crop == "auto" else f"set recipe.augment.crop={size}")
    return (f"model={cfg.model.name} would train on {crop}x{crop} crops ({what}) but data={name}'s images are "
            f"{size}x{size} ({size + 2 * pad} with the padding); {fix}")


def check_splits(cfg: DictConfig) -> None:
    """Refuse evaluation splits that hold training images (listed, not decoded), or no evaluation at all."""
    if not cfg.val_split and not cfg.test_split:
        raise ValueError("val_split=null and test_split=null leave nothing to evaluate; set test_split (reported at "
                         "the end) or val_split")
    if not cfg.val_split and cfg.recipe.schedule.name == "plateau":
        raise ValueError("recipe.schedule.name=plateau decays on the validation error but val_split=null; set "
                         "val_split to a held-out split")
    for key in ("val_split", "test_split"):
        split = cfg[key]
        if not split or (key == "test_split" and split == cfg.val_split):  # listed once, checked as val_split
            continue
        try:
            shared, total = shared_images(cfg.data, split, cfg.train_split)
        except DataError as e:
            if key != "test_split":
                raise
            raise DataError(f"test_split={split!r}: {e} (test_split=null reports the val split instead)") from None
        if not shared:
            continue
        if key == "val_split":
            fix = ("use val_split=null (no per-epoch evaluation; the final weights are reported), or val_split=test "
                   "where the protocol reports the test curve (ResNet Fig. 6)")
        else:
            fix = "choose a test split held out from training, or test_split=null"
        raise DataError(f"{key}={split!r} shares {shared} of its {total} images with train_split={cfg.train_split!r} "
                        f"(data={cfg.data.name}): its error would be measured on training images; {fix}")
