"""ImageNet training augmentations: the Inception crop against torchvision's, ResNet's scale augmentation against
the paper's ranges, PCA lighting against AlexNet's eigenvectors, and short training runs from image files."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2 as T2
from hydra import compose, initialize_config_dir
from PIL import Image

from common import CIFAR_ROOT, MEAN, ROOT, STD
from repro.cli import CONFIG_DIR
from repro.config import register_configs
from repro.data import transforms
from repro.data.transforms import Lighting, Normalize, Preprocessing, RandomResizedCrop, ScaleAugCrop
from repro.distributed import Dist
from repro.train import check_config, fit, setup

CPU = torch.device("cpu")
# Tiny models: one thread (oneDNN's spinning threads cost 10-50x on a loaded 2-core machine).
pytestmark = pytest.mark.usefixtures("one_thread")


class TorchRandom:
    """Python's `random` API drawing from torch's global generator the way torchvision's transforms draw."""

    @staticmethod
    def uniform(a: float, b: float) -> float:
        return torch.empty(1).uniform_(a, b).item()

    @staticmethod
    def randint(a: int, b: int) -> int:  # inclusive, as random.randint
        return int(torch.randint(a, b + 1, size=(1,)).item())

    @staticmethod
    def random() -> float:
        return torch.rand(1).item()


def _noise(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A uint8 [3, h, w] image of smooth-ish noise."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, max(2, h // 8), max(2, w // 8), generator=g)
    big = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
    return (big * 255).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------ Inception crop
@pytest.mark.parametrize(("size", "scale"), [
    ((60, 80), (0.08, 1.0)),  # fb.resnet.torch / torchvision / MobileNetV2 (recipe mobilenet_v2)
    ((60, 80), (0.25, 1.0)),  # MobileNetV1: fewer small crops (recipe mobilenet_v1)
    ((90, 40), (0.08, 1.0)),  # portrait
    ((12, 200), (0.9, 1.0)),  # aspect far outside [3/4, 4/3]: the ten tries fail, torchvision's central fallback
])
def test_inception_crop_equals_torchvision(monkeypatch, size, scale):
    """With the same random draws, RandomResizedCrop (+ flip) gives exactly torchvision's (v2, uint8)
    RandomResizedCrop(antialias=True) + RandomHorizontalFlip output, image by image; the windows are those of
    torchvision's RandomResizedCrop.get_params, within the recipe's area and aspect ranges."""
    monkeypatch.setattr(transforms, "random", TorchRandom())
    img = _noise(*size)
    ours = RandomResizedCrop(crop=24, scale=scale, flip=True)
    ref = T2.Compose([T2.RandomResizedCrop(24, scale=scale, ratio=(3 / 4, 4 / 3), antialias=True),
                      T2.RandomHorizontalFlip()])
    windows = set()
    for seed in range(40):
        torch.manual_seed(seed)
        got = ours(img)
        torch.manual_seed(seed)
        want = ref(img)
        assert torch.equal(got, want), seed
        torch.manual_seed(seed)
        windows.add(T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]))
    h, w = size
    if w / h > 4 / 3 * 2:  # only the fallback: the central crop of aspect 4/3
        assert windows == {(0, (w - round(h * 4 / 3)) // 2, h, round(h * 4 / 3))}
    else:
        assert len(windows) > 30  # random windows, not one fixed crop
        for _, _, ch, cw in windows:  # the recipe's ranges: area fraction and aspect (up to rounding)
            assert scale[0] - 0.02 <= ch * cw / (h * w) <= 1.0 and 3 / 4 - 0.1 <= cw / ch <= 4 / 3 + 0.1


# ------------------------------------------------------------------------------- ResNet scale augmentation
def _coordinate_image(h: int, w: int) -> torch.Tensor:
    """red = row index, green = column index: a linear ramp, so any resized crop shows where it came from."""
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    img[0] = torch.arange(h, dtype=torch.uint8)[:, None]
    img[1] = torch.arange(w, dtype=torch.uint8)[None, :]
    return img


def _fit_line(values: torch.Tensor) -> tuple[float, float]:
    """Least-squares (intercept, slope) of values[i] against i, on the interior (edges clamp)."""
    i = torch.arange(len(values), dtype=torch.float64)[10:-10]
    v = values.double()[10:-10]
    slope = float(((i - i.mean()) * (v - v.mean())).sum() / ((i - i.mean()) ** 2).sum())
    return float(v.mean() - slope * i.mean()), slope


def test_scale_augmentation_geometry_is_the_papers():
    """ResNet §3.4: the crop is 224 pixels of the image resized to a shorter side in [256, 480], anywhere inside
    it, square, flipped half the time; read back from the crops of a coordinate-ramp image (200 x 250)."""
    h, w = 200, 250
    img = _coordinate_image(h, w)
    aug = ScaleAugCrop()  # the defaults are the paper's: crop 224, shorter side 256..480, flip
    assert (aug.crop, aug.min_size, aug.max_size, aug.flip) == (224, 256, 480, True)
    sides, tops, lefts, flips = [], [], [], 0
    for seed in range(100):
        random.seed(seed)
        out = aug(img)
        assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
        top0, row_step = _fit_line(out[0].float().mean(1))  # original row under each output row
        left0, col_step = _fit_line(out[1].float().mean(0))
        flipped = col_step < 0
        flips += flipped
        assert abs(abs(col_step) / row_step - 1) < 0.01, seed  # square in the original: aspect kept
        win = row_step * 224  # the crop's side in original pixels
        sides.append(min(h, w) / row_step)  # the shorter side the image was resized to
        top = top0 - 0.5 * row_step + 0.5
        left = (left0 - 0.5 * col_step + 0.5) if not flipped else (left0 + 223.5 * col_step + 0.5)
        tops.append(top)
        lefts.append(left)
        assert -0.6 <= top and top + win <= h + 0.6, seed  # inside the image
        assert -0.6 <= left and left + win <= w + 0.6, seed
    assert 256 - 3 <= min(sides) < 270 and 465 < max(sides) <= 480 + 3  # the paper's [256, 480], all of it
    assert 30 <= flips <= 70
    assert max(tops) - min(tops) > 50 and max(lefts) - min(lefts) > 80  # anywhere, not one place


# ------------------------------------------------------------------------------------------- PCA lighting
# AlexNet's ImageNet RGB covariance, as fb.resnet.torch's transforms.lua: eigenvalues and eigenvectors (columns).
EIGVAL = [0.2175, 0.0188, 0.0045]
EIGVEC = [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]


def _solve3(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve a 3x3 linear system by Cramer's rule."""
    def det(m):
        return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
                + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))
    d = det(a)
    return [det([[b[r] if c == k else a[r][c] for c in range(3)] for r in range(3)]) / d for k in range(3)]


def test_lighting_eigenvectors_are_alexnets():
    """The constants are AlexNet's (fb.resnet.torch), and the columns are orthonormal: eigenvectors."""
    torch.testing.assert_close(Lighting().eigval, torch.tensor(EIGVAL))
    torch.testing.assert_close(Lighting().eigvec, torch.tensor(EIGVEC))
    for i in range(3):
        for j in range(3):
            dot = sum(EIGVEC[k][i] * EIGVEC[k][j] for k in range(3))
            assert dot == pytest.approx(1.0 if i == j else 0.0, abs=2e-3)


def test_lighting_shift_is_eigenvectors_times_eigenvalues_times_gaussian():
    """Each image gets one RGB shift sum_k alpha_k lambda_k v_k (the same at every pixel), alpha_k ~ N(0, 0.1):
    solving shift = V diag(lambda) alpha by hand gives alphas of mean 0 and std 0.1 for each k."""
    torch.manual_seed(0)
    x = torch.rand(3000, 3, 2, 2)
    shift = Lighting(0.1)(x) - x
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift), rtol=0, atol=1e-6)  # per image
    vl = [[EIGVEC[r][k] * EIGVAL[k] for k in range(3)] for r in range(3)]
    alphas = torch.tensor([_solve3(vl, s) for s in shift[:, :, 0, 0].double().tolist()])
    assert alphas.mean(0).abs().max() < 0.01
    assert alphas.std(0).tolist() == pytest.approx([0.1, 0.1, 0.1], rel=0.06)
    assert shift[:, 0, 0, 0].std() > 0.01  # a visible shift: the first eigenvalue, 0.2175 x 0.1 x 0.57


def test_normalize_lights_only_training_batches():
    """Normalize: (x/255 + shift - mean) / std when training (shift per image), exactly (x/255 - mean) / std in eval."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8)
    norm = Normalize(Preprocessing(MEAN, STD), lighting_std=0.1)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    plain = (x.float() / 255 - mean) / std
    torch.testing.assert_close(norm.eval()(x), plain)
    shift = norm.train()(x) * std - plain * std
    assert shift[:, :, 0, 0].abs().min() > 0
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift), rtol=0, atol=1e-5)
    torch.testing.assert_close(Normalize(Preprocessing(MEAN, STD)).train()(x), plain)  # no lighting asked


# ------------------------------------------------------------------------------ training from image files
def _image_folder(root: Path, per_class: int, seed: int) -> None:
    """Two classes of small JPEGs (40 x 52) of different colors."""
    rng = np.random.default_rng(seed)
    for c, color in enumerate(((200, 40, 40), (40, 40, 200))):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            arr = np.clip(rng.normal(color, 40, size=(40, 52, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.jpg", quality=90)


IMAGENET_RECIPES = sorted(p.stem for p in (ROOT / "configs" / "recipe").glob("*.yaml")
                          if p.stem not in ("digits", "resnet_cifar"))


def _model_for(recipe: str) -> list[str]:
    """A small model of the recipe's family."""
    if recipe.startswith("resnet"):
        return ["model=resnet18"]
    if recipe.startswith("mobilenet_v1"):
        return ["model=mobilenet_v1", "model.width_mult=0.25"]
    return ["model=mobilenet_v2", "model.width_mult=0.35"]


def test_resnet_imagenet_recipe_is_the_papers_augmentation():
    """ResNet §3.4: shorter side in [256, 480], a random crop of the model's resolution, flip, PCA lighting 0.1."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        aug = compose("train", overrides=["recipe=resnet_imagenet", "name=x"]).recipe.augment
    assert (aug.train, aug.min_size, aug.max_size, aug.flip, aug.lighting) == ("scale_aug", 256, 480, True, 0.1)


@pytest.mark.parametrize("recipe", IMAGENET_RECIPES)
def test_two_steps_from_image_files_with_each_recipes_augmentation(tmp_path, recipe):
    """data=folder, 2 optimizer steps of 4 JPEGs: the loader applies the crop the recipe names (seeded per sample),
    Normalize its lighting, the model sees normalized crops of the model's resolution, and the run finishes."""
    _image_folder(tmp_path / "train", 6, 0)
    _image_folder(tmp_path / "val", 2, 1)
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            f"recipe={recipe}", *_model_for(recipe), "model.resolution=32", "data=folder",
            f"data.train_dir={tmp_path / 'train'}", f"data.val_dir={tmp_path / 'val'}", "data.num_workers=0",
            "recipe.batch_size=4", "data.batch_size=4",
            "train_split=train", "val_split=val", "test_split=null", "trainer.max_steps=2", "trainer.device=cpu",
            "trainer.progress=false", "name=files"])
    check_config(cfg)
    run = setup(cfg, Dist(), CPU, tmp_path / "run")
    try:
        aug = cfg.recipe.augment
        expected = {"scale_aug": ScaleAugCrop(32, aug.min_size, aug.max_size, aug.flip),
                    "inception": RandomResizedCrop(32, tuple(aug.scale), flip=aug.flip),
                    "mobilenet": RandomResizedCrop(32, tuple(aug.scale), flip=aug.flip)}[aug.train]
        assert run.data.loader.dataset.base.transform == expected
        assert (run.normalize.lighting.std if run.normalize.lighting is not None else 0.0) == aug.lighting
        # Per-sample randomness is a function of (seed, epoch, sample): the same crop when read again.
        first = run.data.loader.dataset[(0, 3)][0]
        assert first.shape == (3, 32, 32) and torch.equal(first, run.data.loader.dataset[(0, 3)][0])
        assert not torch.equal(first, run.data.loader.dataset[(1, 3)][0])  # another epoch, another crop
        inputs = []
        run.state.model.register_forward_pre_hook(
            lambda m, a: inputs.append(a[0].detach().clone()) if m.training else None)
        fit(run)
    finally:
        run.close()
    assert len(inputs) == 2 and all(x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 for x in inputs)
    pre = run.data.preprocessing
    pixels = torch.stack(inputs) * torch.tensor(pre.std).view(3, 1, 1) + torch.tensor(pre.mean).view(3, 1, 1)
    assert -0.5 < pixels.min() and pixels.max() < 1.6 and pixels.max() > 0.6  # [0, 1] pixels (+ jitter, light)
    assert run.state.progress.step == 2
    metrics = (run.run.out / "metrics.json").read_text()
    assert '"images": 4' in metrics


# ------------------------------------------------------------------------------ the CIFAR training batches
def _cifar_subset(root: Path, per_class: int) -> None:
    """A CIFAR image-folder root (train/ only) with the first `per_class` shared training JPEGs of each class."""
    for cls in sorted(p for p in (CIFAR_ROOT / "train").iterdir() if p.is_dir()):
        (root / "train" / cls.name).mkdir(parents=True)
        for f in sorted(cls.glob("*.jpg"))[:per_class]:
            (root / "train" / cls.name / f.name).symlink_to(f)


def test_cifar_training_batches_are_pad_crops_of_the_files(tmp_path):
    """What ResNet-20 is fed in training (data=cifar10, recipe=resnet_cifar, §4.2): each input is a 32x32 window
    of a JPEG (decoded by PIL) zero-padded by 4 pixels, mirrored about half the time, scaled to [0, 1] minus the
    per-pixel mean of the training images, under its folder's label; every window position occurs and no image
    repeats within the epoch."""
    if not (CIFAR_ROOT / "train").is_dir():
        pytest.skip(f"the shared CIFAR-10 JPEGs are not at {CIFAR_ROOT}")
    _cifar_subset(tmp_path / "cifar", 13)  # 130 images: 2 batches of 64 in an epoch
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            "model=resnet20", "data=cifar10", "recipe=resnet_cifar", f"data.root={tmp_path / 'cifar'}",
            "data.num_workers=0", "recipe.batch_size=64", "train_split=trainval", "val_split=null",
            "test_split=null", "trainer.max_steps=2", "trainer.device=cpu", "trainer.progress=false", "name=c"])
    check_config(cfg)
    # The reference: PIL's decode of every file, its folder's index among the sorted class names, and each of
    # the 9 x 9 windows of the zero-padded image and of its mirror, by content.
    classes = sorted(p.name for p in (tmp_path / "cifar" / "train").iterdir())
    files = sorted((tmp_path / "cifar" / "train").glob("*/*.jpg"))
    images = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                          for f in files])
    mean_image = images.double().mean(0) / 255.0  # ResNet §4.2: the per-pixel mean of the training images
    windows: dict[bytes, tuple[int, int, int, bool]] = {}
    for i, img in enumerate(images):
        padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
        for top in range(9):
            for left in range(9):
                crop = padded[:, top:top + 32, left:left + 32]
                windows[crop.numpy().tobytes()] = (i, top, left, False)
                windows[crop.flip(-1).numpy().tobytes()] = (i, top, left, True)
    run = setup(cfg, Dist(), CPU, tmp_path / "run")
    inputs, targets = [], []
    run.state.model.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    run.criterion.register_forward_pre_hook(lambda m, a: targets.append(a[1].clone()))
    try:
        run.epoch()
    finally:
        run.close()
    assert run.state.progress.step == 2 and len(inputs) == 2
    x, y = torch.cat(inputs).double(), torch.cat(targets)
    assert x.shape == (128, 3, 32, 32)
    pixels = (x + mean_image) * 255.0  # undo the mean and the scale: the window's uint8 pixels
    assert (pixels - pixels.round()).abs().max() < 1e-3
    found = [windows.get(p.round().to(torch.uint8).numpy().tobytes()) for p in pixels]
    assert all(f is not None for f in found), f"{sum(f is None for f in found)} inputs are no window of any file"
    index, tops, lefts, flips = zip(*found)
    assert [classes.index(files[i].parent.name) for i in index] == y.tolist()
    assert len(set(index)) == 128  # an epoch draws without replacement
    assert set(tops) == set(range(9)) and set(lefts) == set(range(9))  # offsets 0..8 in the padded image
    assert 0.3 < sum(flips) / len(flips) < 0.7
