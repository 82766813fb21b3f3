"""Datasets: ImageNet and any class-folder tree, CIFAR-10/100 (torchvision files or image folders), synthetic.

What a dataset is (its splits, whether it lives in memory, its evaluation views, how it is built, ...) is said
once, in its `DatasetSpec` in `SPECS`: code outside data/ asks `spec_of(name)` instead of testing the name.
Every dataset yields `(views, label, index)`; an image that cannot be used yields a `Failed` record instead of
raising inside a worker, so the main process can stop with a clear message or skip and count it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from repro.data.digits import DIGIT_SPLITS
from repro.data.images import IMAGE_EXTENSIONS, MAX_PIXELS, ImageError, is_image_file, load_image
from repro.data.transforms import default_eval_size

CIFAR_SPLITS = ("train", "val", "trainval", "test")
FOLDER_SPLITS = ("train", "val")


class DataError(ValueError):
    """A dataset that cannot be built as configured; the message says what to change."""


@dataclass
class Failed:
    """An image the pipeline could not use: which one, and why."""

    index: int
    path: str
    message: str


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k synset ids in sorted order (class index = position), as torchvision's."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


Listing = tuple[list[str], list[int], list[str]]  # (paths, labels, classes) of a class-folder tree
_listings: dict[tuple[str, tuple[str, ...] | None], Listing] | None = None  # scan_folder's memo inside list_once


@contextlib.contextmanager
def list_once() -> Iterator[None]:
    """Inside the block, scan_folder walks each folder once: a run's split checks and its loaders share the listing.

    ImageNet's 1.28M training files take seconds to list on a local disk and minutes on network storage; outside
    the block every call lists the folder afresh (files may have changed).
    """
    global _listings
    outer = _listings
    if outer is None:
        _listings = {}
    try:
        yield
    finally:
        _listings = outer


def scan_folder(root: str | Path, class_names: Sequence[str] | None = None) -> Listing:
    """List `root/<class>/**/<image>`: (paths, labels, classes). With `class_names`, labels index into it."""
    key = (os.path.abspath(root), None if class_names is None else tuple(class_names))
    if _listings is not None and key in _listings:
        paths, labels, classes = _listings[key]
    else:
        paths, labels, classes = _scan_folder(Path(root), class_names)
        if _listings is not None:
            _listings[key] = paths, labels, classes
    return list(paths), list(labels), list(classes)  # the caller's own lists: the memo stays as listed


def _scan_folder(root: Path, class_names: Sequence[str] | None) -> Listing:
    """scan_folder's walk of the tree, with its refusals."""
    if not root.exists():
        raise DataError(f"data folder {str(root)!r} does not exist; set data.root (or data.train_dir / "
                        f"data.val_dir) to a folder holding one sub-folder of images per class")
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} is not a folder")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise DataError(f"{str(root)!r} has no class sub-folders; expected {root}/<class>/<image> "
                        f"(e.g. ImageNet's train/n01440764/*.JPEG)")
    classes = list(class_names) if class_names is not None else found
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in found if c not in index]
    if unknown:
        raise DataError(f"{str(root)!r} has folders that are not classes of this dataset: {unknown[:5]}"
                        f"{' ...' if len(unknown) > 5 else ''}; ImageNet folders must be synset ids such as "
                        f"n01440764 (use data=folder for other class names)")
    paths, labels, empty, unreadable = [], [], [], []
    for c in found:
        before = len(paths)
        for dirpath, dirnames, filenames in os.walk(root / c, onerror=unreadable.append, followlinks=True):
            dirnames.sort()
            for f in sorted(filenames):
                if is_image_file(f):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(index[c])
        if len(paths) == before:
            empty.append(c)
    if unreadable:
        raise DataError(f"cannot read {unreadable[0].filename!r} ({unreadable[0].strerror}) in {str(root)!r}"
                        f"{f' and {len(unreadable) - 1} more folders' if len(unreadable) > 1 else ''}; fix its "
                        f"permissions or move it out of the data folder")
    if empty and len(empty) < len(found):
        raise DataError(f"{str(root)!r} has class folders without images: {empty[:5]}{' ...' if len(empty) > 5 else ''}"
                        f"; each folder is a class, so remove them or add their images")
    if not paths:
        raise DataError(f"{str(root)!r} has class folders but no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return paths, labels, classes


class ImageFiles(Dataset):
    """Images on disk, decoded in the worker that loads them."""

    def __init__(self, paths: list[str], labels: list[int], classes: list[str],
                 transform: Callable[..., Any] | None = None, root: str | None = None,
                 max_pixels: int | None = MAX_PIXELS) -> None:
        self.paths, self.labels, self.classes, self.transform = paths, labels, classes, transform
        self.root = root  # the folder scanned (for the split-overlap check)
        self.max_pixels = max_pixels  # data.max_pixels: larger images are refused before decoding

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int, int] | Failed:
        path = self.paths[i]
        try:
            img = load_image(path, self.max_pixels)
            return (_apply(self.transform, img, path), self.labels[i], i)
        except ImageError as e:
            return Failed(i, path, str(e))
        except Exception as e:  # anything else one image does to a decoder or transform is that image's failure
            return Failed(i, path, str(ImageError(path, f"cannot use the image ({type(e).__name__}: {e})")))


class ImageTensors(Dataset):
    """Images already decoded in memory as uint8 [N, 3, H, W] (CIFAR)."""

    def __init__(self, images: torch.Tensor, labels: list[int], classes: list[str], names: list[str],
                 transform: Callable[..., Any] | None = None, skipped: list[tuple[str, str]] | None = None) -> None:
        self.images, self.labels, self.classes, self.paths, self.transform = images, labels, classes, names, transform
        self.skipped = skipped or []  # (path, why) of files left out when decoding into memory (data.on_error=skip)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int, int] | Failed:
        try:
            return (_apply(self.transform, self.images[i], self.paths[i]), self.labels[i], i)
        except ImageError as e:
            return Failed(i, self.paths[i], str(e))


class Synthetic(Dataset):
    """Random uint8 images (the same for a given index), label = index mod num_classes."""

    def __init__(self, length: int, image_size: int, num_classes: int,
                 transform: Callable[..., Any] | None = None) -> None:
        self.length, self.size, self.transform = length, image_size, transform
        self.classes = [str(c) for c in range(num_classes)]
        self.labels = [i % num_classes for i in range(length)]
        self.paths = [f"synthetic/{i}" for i in range(length)]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Any, int, int] | Failed:
        g = torch.Generator().manual_seed(i)
        img = torch.randint(0, 256, (3, self.size, self.size), generator=g, dtype=torch.uint8)
        try:
            return (_apply(self.transform, img, self.paths[i]), self.labels[i], i)
        except ImageError as e:
            return Failed(i, self.paths[i], str(e))


def _apply(transform: Callable[..., Any] | None, img: torch.Tensor, path: str) -> Any:
    """Run a transform; evaluation views also take the path (for their error messages)."""
    if transform is None:
        return img
    return transform(img, path) if getattr(transform, "takes_path", False) else transform(img)


def carve_split(labels: Sequence[int], val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (train, val) with `val_size` images spread evenly over classes, fixed by `seed`."""
    if not 0 < val_size < len(labels):
        raise DataError(f"data.val_size={val_size} must be between 1 and the {len(labels)} training images")
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    classes = sorted(by_class)
    quota = {c: val_size // len(classes) + (1 if k < val_size % len(classes) else 0) for k, c in enumerate(classes)}
    val: list[int] = []
    for c in classes:
        idx = by_class[c]
        perm = torch.randperm(len(idx), generator=g).tolist()
        val += [idx[j] for j in perm[: quota[c]]]
    val_set = set(val)
    return [i for i in range(len(labels)) if i not in val_set], sorted(val)


def _cifar_arrays(root: Path, name: str, train: bool, download: bool) -> tuple[torch.Tensor, list[int], list[str]]:
    """torchvision's CIFAR files as uint8 [N, 3, 32, 32] tensors."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    try:
        ds = cls(str(root), train=train, download=download)
    except RuntimeError as e:  # not found / corrupt
        raise DataError(f"{name} files not found in {str(root)!r} ({e}); point data.root at the folder holding "
                        f"them, or at image folders train/<class>/ and test/<class>/, or set data.download=true"
                        ) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, list(ds.targets), list(ds.classes)


def build_dataset(cfg: Any, split: str, transform: Callable[..., Any] | None = None) -> Dataset:
    """The dataset `cfg.name` (imagenet|folder|cifar10|cifar100|synthetic|digits) for `split`, with `transform`.

    With `cfg.limit`, a seeded sample of at most that many images (in their original order).
    """
    ds = _build(cfg, split, transform)
    limit = getattr(cfg, "limit", None)
    if limit is not None and limit < len(ds):
        if limit < 1:
            raise DataError(f"data.limit={limit} is not valid; give a positive number of images (or null)")
        keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:limit].sort().values
        ds = Subset(ds, keep.tolist())
    return ds


def _build(cfg: Any, split: str, transform: Callable[..., Any] | None) -> Dataset:
    """build_dataset without the limit: the split checked against the dataset's spec, then built by it."""
    spec = spec_of(cfg.name)
    if spec.splits is not None and split not in spec.splits:
        raise DataError(f"data.split={split!r} is not valid for data={cfg.name}; choose one of {list(spec.splits)}")
    return spec.build(cfg, split, transform)


def _build_synthetic(cfg: Any, split: str, transform: Callable[..., Any] | None) -> Dataset:
    """Random images (any split name)."""
    return Synthetic(cfg.length, cfg.image_size, cfg.num_classes, transform)


def _build_digits(cfg: Any, split: str, transform: Callable[..., Any] | None) -> Dataset:
    """scikit-learn's digits, upscaled, in memory."""
    from repro.data.digits import digits_tensors

    images, labels, classes, index = digits_tensors(cfg, split)
    return ImageTensors(images, labels, classes, [f"digits/{i}" for i in index], transform)


def _build_folder(cfg: Any, split: str, transform: Callable[..., Any] | None) -> Dataset:
    """ImageNet (class index = sorted synsets) or any class-folder tree: <root>/<split>/ or data.<split>_dir."""
    name = cfg.name
    folder = cfg.train_dir if split == "train" else cfg.val_dir
    if folder is None:
        if cfg.root is None:
            raise DataError(f"data={name} needs data.root (holding train/ and val/) or data.{split}_dir")
        folder = os.path.join(cfg.root, split)
    classes = imagenet_synsets() if name == "imagenet" else None
    paths, labels, classes = scan_folder(folder, classes)
    if name == "folder" and split == "val":
        _same_classes(cfg, classes, folder)
    return ImageFiles(paths, labels, classes, transform, root=str(folder), max_pixels=_max_pixels(cfg))


def _max_pixels(cfg: Any) -> int | None:
    """data.max_pixels (configs written before it existed: the default; null: no limit)."""
    value = getattr(cfg, "max_pixels", MAX_PIXELS) if not isinstance(cfg, dict) else cfg.get("max_pixels", MAX_PIXELS)
    if value is not None and not (isinstance(value, int) and value > 0):
        raise DataError(f"data.max_pixels={value!r} is not valid; give a positive number of pixels (or null: no limit)")
    return value


def _same_classes(cfg: Any, val_classes: list[str], val_folder: str) -> None:
    """data=folder: the validation folder's classes must be the training folder's (labels are their sorted order)."""
    train = cfg.train_dir or (os.path.join(cfg.root, "train") if cfg.root else None)
    if train is None or not os.path.isdir(train):
        return  # evaluation alone: no training folder to compare with
    train_classes = sorted(e.name for e in os.scandir(train) if e.is_dir() and not e.name.startswith("."))
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(f"the class folders of {train!r} (training) and {val_folder!r} (validation) differ: "
                        f"only in training {only_train[:5]}, only in validation {only_val[:5]}; labels are "
                        f"the sorted folder names, so both must hold the same class folders")


def _build_cifar(cfg: Any, split: str, transform: Callable[..., Any] | None) -> Dataset:
    """CIFAR from torchvision's files or from image folders; val carved from train (45k/5k by default)."""
    if cfg.root is None:
        raise DataError(f"data={cfg.name} needs data.root: torchvision's downloaded files, or image folders "
                        f"train/<class>/ (and test/<class>/)")
    root = Path(cfg.root)
    sub = "test" if split == "test" else "train"
    if (root / sub).is_dir():  # image folders, e.g. shared/data/cifar10-jpeg
        paths, labels, classes = scan_folder(root / sub)
        if len(classes) != cfg.num_classes:
            raise DataError(f"{root / sub} has {len(classes)} class folders but data={cfg.name} has "
                            f"{cfg.num_classes} classes")
        ds: Dataset = ImageFiles(paths, labels, classes, transform, root=str(root / sub), max_pixels=_max_pixels(cfg))
    elif split == "test" and (root / "train").is_dir():
        raise DataError(f"{str(root)!r} has train/ but no test/ images; evaluate on the validation split carved "
                        f"from train with data.split=val")
    else:
        images, labels, classes = _cifar_arrays(root, cfg.name, train=(sub == "train"), download=cfg.download)
        names = [f"{cfg.name}-{sub}/{i}" for i in range(len(labels))]
        ds = ImageTensors(images, labels, classes, names, transform)
    if split in ("train", "val"):
        train_idx, val_idx = carve_split(ds.labels, cfg.val_size, cfg.split_seed)
        ds = Subset(ds, train_idx if split == "train" else val_idx)
    return ds


IN_MEMORY_AUGMENTS = ("pad_crop", "none")  # batch-wise on the device, on the image as it is
FILE_AUGMENTS = ("pad_crop", "scale_aug", "inception", "mobilenet")  # per image, in the loader workers
FOLDER_KEYS = ("train_dir", "val_dir")  # data keys of the class-folder datasets only


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is, said once; callers ask it instead of testing the dataset's name."""

    name: str
    title: str  # how tables and notes name it
    splits: tuple[str, ...] | None  # the split names it has; None: any (synthetic)
    # Small datasets are decoded once into memory for training (augmented batch-wise on the device) and evaluated
    # on the image as it is (no resize, no crop); the others are read from files by loader workers.
    in_memory: bool
    build: Callable[[Any, str, Callable[..., Any] | None], Dataset]  # (data config, split, transform) -> dataset
    image_size: int | None = None  # the side of every image where the dataset fixes it (CIFAR 32; else data.image_size)
    # Class folders of image files of any size: data.train_dir / data.val_dir name them, data.decode=gpu applies.
    folders: bool = False
    identity: bool = True  # an image is the same file or array index in every split (synthetic: random, none)
    jpeg_copies: bool = False  # its originals are lossless arrays; image folders of it are JPEG re-encodings

    @property
    def augments(self) -> tuple[str, ...]:
        """The recipe.augment.train values it trains with."""
        return IN_MEMORY_AUGMENTS if self.in_memory else FILE_AUGMENTS

    def eval_size(self, resolution: int) -> tuple[int | None, int | None]:
        """(resize, crop) of its default evaluation views: the image as it is in memory, else the papers' center."""
        return (None, None) if self.in_memory else default_eval_size(resolution)

    def image_side(self, cfg: Any) -> int | None:
        """The side of every image (the dataset's or data.image_size), or None: image files of any size."""
        if self.folders:
            return None
        return self.image_size or int(cfg.image_size)


SPECS: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec("imagenet", "ImageNet", FOLDER_SPLITS, False, _build_folder, folders=True),
    DatasetSpec("folder", "image folders", FOLDER_SPLITS, False, _build_folder, folders=True),
    DatasetSpec("cifar10", "CIFAR-10", CIFAR_SPLITS, True, _build_cifar, image_size=32, jpeg_copies=True),
    DatasetSpec("cifar100", "CIFAR-100", CIFAR_SPLITS, True, _build_cifar, image_size=32, jpeg_copies=True),
    DatasetSpec("synthetic", "synthetic images", None, False, _build_synthetic, identity=False),
    DatasetSpec("digits", "digits", DIGIT_SPLITS, True, _build_digits),
)}
DATASETS = tuple(SPECS)
# data.KEY -> the datasets that have it (sorted), for the message when another dataset is given it.
DATA_KEYS = {key: tuple(sorted(n for n, s in SPECS.items() if s.folders)) for key in FOLDER_KEYS}


def spec_of(name: str) -> DatasetSpec:
    """The spec of dataset `name`; an unknown name is refused with the valid choices."""
    spec = SPECS.get(name)
    if spec is None:
        raise DataError(f"data={name!r} is not valid; choose one of {list(SPECS)}")
    return spec


def shared_images(cfg: Any, split: str, train_split: str) -> tuple[int, int]:
    """(images of `split` that are also images of `train_split`, images of `split`), found without decoding.

    The same image is the same file (also when reached through another root, a symlink or a folder inside the
    training folder) or the same index of the same array (CIFAR's carved val inside trainval, digits).
    Synthetic data has no identity across splits and is never compared.
    """
    if not spec_of(cfg.name).identity:
        return 0, 0
    train, other = _build(cfg, train_split, None), _build(cfg, split, None)
    train_paths = set(train.paths)
    shared = sum(p in train_paths for p in other.paths)
    root = getattr(getattr(train, "base", train), "root", None)
    if not shared and root is not None:  # the same files under another path: resolve only the other split's
        real_root = os.path.realpath(root)
        relative = {os.path.relpath(p, root) for p in train.paths}
        for p in other.paths:
            real = os.path.realpath(p)
            shared += real.startswith(real_root + os.sep) and os.path.relpath(real, real_root) in relative
    return shared, len(other)


class Subset(Dataset):
    """A view of some indices of a dataset; items report their index within the subset."""

    def __init__(self, base: Dataset, indices: list[int]) -> None:
        self.base, self.indices = base, indices
        self.classes = base.classes
        self.labels = [base.labels[i] for i in indices]
        self.paths = [base.paths[i] for i in indices]

    @property
    def transform(self) -> Callable[..., Any] | None:
        """The transform of the underlying dataset."""
        return self.base.transform

    @transform.setter
    def transform(self, value: Callable[..., Any] | None) -> None:
        self.base.transform = value

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int, int] | Failed:
        item = self.base[self.indices[i]]
        if isinstance(item, Failed):
            return Failed(i, item.path, item.message)
        return (item[0], item[1], i)
