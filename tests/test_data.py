"""Data pipeline: decoding and test views vs torchvision and PIL on real JPEGs, bad images, datasets, sharding."""

from __future__ import annotations

import io
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import InterpolationMode, v2

from common import CIFAR_CLASSES, CIFAR_ROOT, IMAGENET_SAMPLE, cifar_train_only
from repro.data import (
    DataError,
    EvalViews,
    Failed,
    ImageError,
    ShardSampler,
    build_dataset,
    collate,
    load_image,
)
from repro.data.datasets import ImageFiles, carve_split, imagenet_synsets, scan_folder

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------- helpers


def _sample_paths() -> list[Path]:
    """The real ImageNet JPEGs of shared/data/imagenet-sample, or skip when shared/ is absent."""
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"ImageNet sample not found in {IMAGENET_SAMPLE} (shared/ beside the checkout)")
    paths = sorted(IMAGENET_SAMPLE.glob("*/*.JPEG"))
    assert len(paths) == 108
    return paths


def _torchvision_rgb(path: Path) -> torch.Tensor:
    """The reference decode: torchvision.io.decode_image(..., mode=RGB)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)


def _pil_rgb(source: Path | bytes) -> torch.Tensor:
    """The classic decode: PIL's Image.open(...).convert('RGB') as uint8 [3, H, W]."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    """An image encoded in memory."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth-ish random RGB uint8 array (JPEG-friendly, not constant)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    return np.kron(base, np.ones((4, 4, 1), dtype=np.uint8))[:h, :w]


# ---------------------------------------------------------------------- test views vs torchvision on real JPEGs
def test_center_and_ten_crop_equal_torchvision_on_real_jpegs():
    """center and ten_crop views equal torchvision's Resize(256) + CenterCrop/TenCrop(224), image by image."""
    paths = _sample_paths()
    views = EvalViews(protocols=["center", "ten_crop"], resize=256, crop=224)
    resize = v2.Resize(256, interpolation=InterpolationMode.BILINEAR, antialias=True)
    center, ten = v2.CenterCrop(224), v2.TenCrop(224)
    modes, small, mismatched = Counter(), 0, []
    for p in paths:
        with Image.open(p) as im:
            modes[im.mode] += 1
            small += min(im.size) < 224
        ref = resize(_torchvision_rgb(p))
        out = views(load_image(p), str(p))
        assert out["center"].shape == (1, 3, 224, 224) and out["center"].dtype == torch.uint8
        assert out["ten_crop"].shape == (10, 3, 224, 224) and out["ten_crop"].dtype == torch.uint8
        if not (torch.equal(out["center"][0], center(ref)) and torch.equal(out["ten_crop"], torch.stack(ten(ref)))):
            mismatched.append(p.name)
    assert not mismatched, f"{len(mismatched)} images differ from torchvision: {mismatched[:5]}"
    assert modes["L"] >= 4 and small >= 10  # the sample does hold grayscale and smaller-than-crop photos


def test_ten_crop_structure():
    """ten_crop: tl, tr, bl, br, center of the resized image, then the same five of its mirror (torchvision's order)."""
    p = _sample_paths()[0]
    out = EvalViews(protocols=["center", "ten_crop"], resize=256, crop=224)(load_image(p), str(p))
    ten = out["ten_crop"]
    assert torch.equal(ten[4], out["center"][0])
    resized = v2.Resize(256)(_torchvision_rgb(p))
    h, w = resized.shape[-2:]
    # The mirror's top-left crop is the original's top-right one, mirrored, and so on; its center crop is
    # the mirror's own (one pixel off the original's mirrored center when w - 224 is odd).
    assert torch.equal(ten[5:9], ten[[1, 0, 3, 2]].flip(-1))
    top, left = round((h - 224) / 2), round((w - 224) / 2)
    assert torch.equal(ten[9], resized.flip(-1)[:, top:top + 224, left:left + 224])
    assert torch.equal(ten[0], resized[:, :224, :224])
    assert torch.equal(ten[1], resized[:, :224, w - 224:])
    assert torch.equal(ten[2], resized[:, h - 224:, :224])
    assert torch.equal(ten[3], resized[:, h - 224:, w - 224:])


def test_decode_equals_pil_on_real_jpegs():
    """load_image gives exactly PIL's Image.open().convert('RGB') on every real JPEG (grayscale ones too)."""
    differ = [p.name for p in _sample_paths() if not torch.equal(load_image(p), _pil_rgb(p))]
    assert not differ, f"decode differs from PIL on {differ[:5]}"


def test_resize_close_to_pil():
    """The center view is within half a grey level (mean abs diff) of the classic PIL Resize + CenterCrop."""
    pil_center = T.Compose([T.Resize(256), T.CenterCrop(224)])
    views = EvalViews(protocols=["center"], resize=256, crop=224)
    worst = 0.0
    for p in _sample_paths():
        with Image.open(p) as im:
            ref = torch.from_numpy(np.array(pil_center(im.convert("RGB")))).permute(2, 0, 1)
        ours = views(load_image(p), str(p))["center"][0]
        worst = max(worst, (ours.float() - ref.float()).abs().mean().item())
    assert worst < 0.5, f"mean abs difference to PIL up to {worst:.3f} levels"


def test_no_resampling_when_shorter_side_already_fits():
    """An image whose shorter side equals eval.resize is cropped as is, as torchvision's Resize leaves it."""
    img = torch.from_numpy(_noise(256, 300)).permute(2, 0, 1).contiguous()
    out = EvalViews(protocols=["center"], resize=256, crop=224)(img)["center"][0]
    assert torch.equal(out, img[:, 16:240, 38:262])
    assert torch.equal(out, v2.CenterCrop(224)(v2.Resize(256)(img)))


def test_no_resize_no_crop_is_the_image_itself():
    """resize=None, crop=None (the CIFAR protocol) gives the decoded image as the single center view."""
    img = torch.from_numpy(_noise(32, 32)).permute(2, 0, 1).contiguous()
    out = EvalViews(protocols=["center"], resize=None, crop=None)(img)
    assert out["center"].shape == (1, 3, 32, 32)
    assert torch.equal(out["center"][0], img)


# ------------------------------------------------------------------------------------------ multi-scale
def test_multi_scale_views():
    """multi_scale: the whole image at each shorter side (torchvision's Resize(s)), then its exact mirror."""
    paths = _sample_paths()
    info = {}
    for p in paths:
        with Image.open(p) as im:
            info[p] = (im.size, im.mode)
    chosen = {min(paths, key=lambda p: min(info[p][0])),  # the tiny one (upscaled)
              max(paths, key=lambda p: info[p][0][0] * info[p][0][1]),  # the largest
              next(p for p in paths if info[p][0][1] > info[p][0][0]),  # a portrait
              next(p for p in paths if info[p][1] == "L")}  # a grayscale one
    scales = (224, 256, 384, 480, 640)
    views = EvalViews(protocols=["multi_scale"], scales=scales)
    for p in sorted(chosen):
        img = load_image(p)
        h, w = img.shape[-2:]
        out = views(img, str(p))["multi_scale"]
        assert len(out) == len(scales)
        for s, v in zip(scales, out):
            long = int(s * max(h, w) / min(h, w))
            expected = (s, long) if h <= w else (long, s)
            assert v.shape == (2, 3, *expected), (p.name, s)
            assert torch.equal(v[1], v[0].flip(-1))
            assert torch.equal(v[0], v2.Resize(s)(img))


def test_multi_scale_without_flip():
    """flip=False gives one view per scale, with the shorter side at that scale."""
    img = torch.from_numpy(_noise(60, 90)).permute(2, 0, 1).contiguous()
    out = EvalViews(protocols=["multi_scale"], scales=(48, 60, 120), flip=False)(img)["multi_scale"]
    assert [tuple(v.shape) for v in out] == [(1, 3, 48, 72), (1, 3, 60, 90), (1, 3, 120, 180)]
    assert torch.equal(out[1][0], img)  # the native scale is the image itself


# --------------------------------------------------------------------------------- non-RGB and bad images
def _cmyk_jpeg() -> bytes:
    return _encode(Image.fromarray(_noise(40, 52, 1)).convert("CMYK"), "JPEG", quality=90)


def _gray_jpeg() -> bytes:
    return _encode(Image.fromarray(_noise(40, 52, 2)).convert("L"), "JPEG", quality=90)


def _rgba_png() -> bytes:
    arr = np.concatenate([_noise(40, 52, 3), _noise(40, 52, 4)[..., :1]], axis=-1)  # alpha varies
    return _encode(Image.fromarray(arr, "RGBA"), "PNG")


def _palette_png() -> bytes:
    return _encode(Image.fromarray(_noise(40, 52, 5)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG")


def _gray_alpha_png() -> bytes:
    return _encode(Image.fromarray(_noise(40, 52, 6)).convert("LA"), "PNG")


NON_RGB = {"grayscale-jpeg": (_gray_jpeg, "L"), "cmyk-jpeg": (_cmyk_jpeg, "CMYK"), "rgba-png": (_rgba_png, "RGBA"),
           "palette-png": (_palette_png, "P"), "gray-alpha-png": (_gray_alpha_png, "LA")}


@pytest.mark.parametrize("kind", list(NON_RGB))
def test_non_rgb_images_become_pil_rgb(kind, tmp_path):
    """Grayscale, CMYK, RGBA, palette and gray+alpha files decode to exactly PIL's convert('RGB')."""
    make, mode = NON_RGB[kind]
    data = make()
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == mode  # the file really is in that mode
    path = tmp_path / ("img.jpg" if kind.endswith("jpeg") else "img.png")
    path.write_bytes(data)
    img = load_image(path)
    assert img.dtype == torch.uint8 and img.shape == (3, 40, 52)
    assert torch.equal(img, _pil_rgb(data))


def _truncated_jpeg() -> bytes:
    data = _encode(Image.fromarray(_noise(64, 64)), "JPEG", quality=90)
    return data[: len(data) // 2]


BAD_FILES = {
    "truncated": (_truncated_jpeg, "truncated"),
    "not-an-image": (lambda: b"name,label\ncat,3\n" * 20, "not an image file"),
    "empty": (lambda: b"", "the file is empty"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_image_files_raise_image_error(kind, tmp_path):
    """Truncated, non-image and empty .jpg files raise ImageError naming the file and data.on_error=skip."""
    make, problem = BAD_FILES[kind]
    path = tmp_path / "photo.jpg"
    path.write_bytes(make())
    with pytest.raises(ImageError) as info:
        load_image(path)
    msg = str(info.value)
    assert str(path) in msg and problem in msg and "data.on_error=skip" in msg


def test_missing_image_file(tmp_path):
    """A path that does not exist raises ImageError naming it."""
    with pytest.raises(ImageError, match="cannot read the file") as info:
        load_image(tmp_path / "gone.jpg")
    assert "gone.jpg" in str(info.value)


def test_image_smaller_than_crop_without_resize():
    """With resize=None an image smaller than the crop is refused, and the message says to set eval.resize."""
    img = torch.zeros(3, 100, 120, dtype=torch.uint8)
    with pytest.raises(ImageError, match=r"120x100, smaller than the 224x224 crop; set eval.resize") as info:
        EvalViews(protocols=["center"], resize=None, crop=224)(img, "/data/small.png")
    assert "/data/small.png" in str(info.value)


def test_bad_view_options():
    """Unknown protocols or interpolations, and ten_crop without a crop size, are refused by name."""
    with pytest.raises(ValueError, match="five_crop"):
        EvalViews(protocols=["five_crop"])
    with pytest.raises(ValueError, match="lanczos"):
        EvalViews(interpolation="lanczos")
    with pytest.raises(ValueError, match="eval.crop is null"):
        EvalViews(protocols=["ten_crop"], crop=None)


# ------------------------------------------------------------------------------------------------ datasets
def _tree(root: Path, files: dict[str, bytes]) -> Path:
    """Write {relative path: bytes} under root."""
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_scan_folder_refusals(tmp_path):
    """A missing folder, one without class folders, and class folders without images each get their message."""
    with pytest.raises(DataError, match="does not exist; set data.root") as info:
        scan_folder(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class sub-folders"):
        scan_folder(tmp_path / "empty")
    _tree(tmp_path / "noimg", {"cat/notes.txt": b"x", "dog/.keep": b""})
    with pytest.raises(DataError, match="has class folders but no images") as info:
        scan_folder(tmp_path / "noimg")
    assert str(tmp_path / "noimg") in str(info.value)


def test_folder_labels_follow_sorted_class_names(tmp_path):
    """Labels index the sorted class folders; nested files count, non-image files are ignored."""
    png = _encode(Image.fromarray(_noise(8, 8)), "PNG")
    _tree(tmp_path, {"zebra/a.png": png, "apple/b.PNG": png, "apple/sub/c.png": png, "mango/readme.txt": b"x",
                     "mango/d.png": png})
    paths, labels, classes = scan_folder(tmp_path)
    assert classes == ["apple", "mango", "zebra"]
    assert [Path(p).relative_to(tmp_path).as_posix() for p in paths] == [
        "apple/b.PNG", "apple/sub/c.png", "mango/d.png", "zebra/a.png"]
    assert labels == [0, 0, 1, 2]


def test_bad_image_in_dataset_is_a_failed_record(tmp_path):
    """A dataset yields a Failed record for an unusable image (no exception in the worker); collate splits them."""
    png = _encode(Image.fromarray(_noise(8, 8)), "PNG")
    _tree(tmp_path, {"a/good.png": png, "a/bad.png": b"garbage", "b/good.png": png})
    paths, labels, classes = scan_folder(tmp_path)
    ds = ImageFiles(paths, labels, classes, EvalViews(protocols=["center"], resize=None, crop=None))
    items = [ds[i] for i in range(len(ds))]
    assert isinstance(items[0], Failed) and items[0].path.endswith("bad.png") and items[0].index == 0
    assert "not an image file" in items[0].message
    batch = collate(items)
    assert [f.path for f in batch["failed"]] == [paths[0]]
    assert batch["labels"].tolist() == [0, 1] and batch["indices"].tolist() == [1, 2]
    assert batch["views"]["center"].shape == (2, 1, 3, 8, 8)
    assert collate([items[0]])["views"] is None


def test_imagenet_synsets_sorted():
    """The ImageNet classes are the 1000 synset ids in sorted order, as torchvision's class indices."""
    synsets = imagenet_synsets()
    assert len(synsets) == 1000 == len(set(synsets))
    assert synsets == sorted(synsets)
    assert synsets[0] == "n01440764" and synsets[-1] == "n15075141"  # tench ... toilet tissue


def test_imagenet_labels_follow_sorted_synsets():
    """An imagenet-sample image's label is its folder's position among the sorted synsets."""
    _sample_paths()
    synsets = imagenet_synsets()
    cfg = SimpleNamespace(name="imagenet", root=None, train_dir=None, val_dir=str(IMAGENET_SAMPLE))
    ds = build_dataset(cfg, "val")
    assert len(ds) == 108 and ds.classes == synsets
    for path, label in zip(ds.paths, ds.labels):
        assert label == synsets.index(Path(path).parent.name), path


def test_imagenet_refuses_non_synset_folders(tmp_path):
    """data=imagenet on folders that are not synset ids says so and points at data=folder."""
    _tree(tmp_path, {"val/cat/a.png": _encode(Image.fromarray(_noise(8, 8)), "PNG")})
    cfg = SimpleNamespace(name="imagenet", root=str(tmp_path), train_dir=None, val_dir=None)
    with pytest.raises(DataError, match=r"not classes of this dataset: \['cat'\].*data=folder"):
        build_dataset(cfg, "val")


def _labels(counts: dict[int, int]) -> list[int]:
    """Interleaved labels with counts[c] images of class c."""
    out = [c for c, n in counts.items() for _ in range(n)]
    return [out[i] for i in torch.randperm(len(out), generator=torch.Generator().manual_seed(1)).tolist()]


def test_carve_split_properties():
    """carve_split is deterministic, disjoint, covers every index, and spreads val evenly over classes."""
    labels = _labels({0: 30, 1: 25, 2: 41, 3: 28})
    train, val = carve_split(labels, 22, seed=0)
    assert carve_split(labels, 22, seed=0) == (train, val)
    assert carve_split(labels, 22, seed=1) != (train, val)
    assert len(val) == 22 and len(train) == len(labels) - 22
    assert set(train).isdisjoint(val) and sorted(train + val) == list(range(len(labels)))
    assert val == sorted(val) and train == sorted(train)
    per_class = Counter(labels[i] for i in val)
    assert sorted(per_class.values()) == [5, 5, 6, 6]  # 22 over 4 classes


@pytest.mark.parametrize("val_size", [0, -3, 119, 500])
def test_carve_split_refuses_bad_sizes(val_size):
    """val_size must leave at least one image on each side."""
    labels = _labels({0: 60, 1: 59})
    with pytest.raises(DataError, match=f"data.val_size={val_size} must be between 1 and the 119"):
        carve_split(labels, val_size, 0)
    train, val = carve_split(labels, 118, 0)  # the largest valid size
    assert len(train) == 1 and len(val) == 118


def test_cifar_image_folders_splits(tmp_path):
    """CIFAR image folders: val is carved from train (balanced, fixed), train is the rest, test is test/'s 10k
    official images; a root without test/ refuses the test split, naming data.split=val."""
    if not (CIFAR_ROOT / "train").is_dir():
        pytest.skip(f"CIFAR-10 images not found in {CIFAR_ROOT} (shared/ beside the checkout)")
    cfg = SimpleNamespace(name="cifar10", root=str(CIFAR_ROOT), num_classes=10, val_size=200, split_seed=0,
                          download=False)
    val, train = build_dataset(cfg, "val"), build_dataset(cfg, "train")
    assert len(val) == 200 and len(train) == 49_800
    assert set(val.paths).isdisjoint(train.paths)
    assert tuple(val.classes) == CIFAR_CLASSES
    assert Counter(Path(p).parent.name for p in val.paths) == {c: 20 for c in CIFAR_CLASSES}
    assert all(CIFAR_CLASSES[y] == Path(p).parent.name for p, y in zip(val.paths, val.labels))
    assert build_dataset(cfg, "val").paths == val.paths  # the same images every time
    if (CIFAR_ROOT / "test").is_dir():
        test = build_dataset(cfg, "test")
        assert len(test) == 10_000 and tuple(test.classes) == CIFAR_CLASSES
        assert Counter(test.labels) == {c: 1000 for c in range(10)}
        assert set(test.paths).isdisjoint(train.paths + val.paths)
    cfg.root = str(cifar_train_only(tmp_path))
    with pytest.raises(DataError, match="has train/ but no test/ images.*data.split=val"):
        build_dataset(cfg, "test")


# ------------------------------------------------------------------------------------------------ sharding
def test_shard_sampler_covers_each_index_once():
    """Over all ranks ShardSampler yields every index exactly once (no padding), with len() matching."""
    for length in range(0, 13):
        for world in range(1, 5):
            shards = [list(ShardSampler(length, r, world)) for r in range(world)]
            assert sorted(i for s in shards for i in s) == list(range(length)), (length, world)
            assert [len(ShardSampler(length, r, world)) for r in range(world)] == [len(s) for s in shards]
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
