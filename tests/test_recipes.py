"""Every recipe in configs/recipe/ against its source: one test per recipe, each number beside where it comes from.

Sources: ../shared/PAPERS.md (its section named in each comment), the papers themselves (section named), and the
released code of the reproductions (file named) where PAPERS.md does not hold the fact. The recipes are composed
through Hydra exactly as repro-train composes them. Also here: fb.resnet.torch's color jitter, which
recipe=resnet_imagenet_fb needs.
"""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torchvision.transforms.v2 import functional as TF

from common import ROOT
from repro.cli import CONFIG_DIR
from repro.config import register_configs
from repro.data import Normalize, Preprocessing
from repro.data.transforms import ColorJitter
from repro.optim import LRSchedule

RECIPE_DIR = ROOT / "configs" / "recipe"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
approx = pytest.approx


def recipe(name: str):
    """The recipe as `repro-train recipe=<name>` composes it (schema defaults filled in)."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[f"recipe={name}", "name=x"]).recipe


def lr_at(r, epochs: list[float], steps_per_epoch: int = 100) -> list[float]:
    """The schedule's lr (at the recipe's own lr) at the start of each given epoch of a full-length run."""
    s = LRSchedule(r.schedule, r.optimizer.lr, round(r.length * steps_per_epoch), r.length)
    return [s.lr(round(e * steps_per_epoch)) for e in epochs]


def lr_at_batch(r) -> float:
    """The lr a run at the recipe's own global batch uses: lr x batch_size / lr_batch_size (linear scaling)."""
    return r.optimizer.lr * r.batch_size / r.lr_batch_size


# ------------------------------------------------------------------------------------------- bookkeeping
def test_every_recipe_has_its_test():
    """A recipe file added without a test here fails: each must be checked against its source."""
    tested = {name.removeprefix("test_recipe_") for name in globals() if name.startswith("test_recipe_")}
    assert tested == {p.stem for p in RECIPE_DIR.glob("*.yaml")}


@pytest.mark.parametrize("path", sorted(RECIPE_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_sets_its_batches_and_names_its_source(path):
    """Each file sets batch_size and lr_batch_size itself (no schema default), with units, and its header cites."""
    raw = OmegaConf.load(path)
    assert {"batch_size", "lr_batch_size"} <= set(raw), path.name
    lines = path.read_text().splitlines()
    assert all("#" in line for line in lines if line.startswith(("batch_size:", "lr_batch_size:"))), "units"
    assert lines[0].startswith("# ") and raw.name == path.stem


# ------------------------------------------------------------------------------------------------ ResNet
def test_recipe_resnet_cifar():
    """ResNet §4.2 (PAPERS.md §1 "CIFAR-10 (paper §4.2, Table 6)")."""
    r = recipe("resnet_cifar")
    assert r.batch_size == r.lr_batch_size == 128  # "mini-batch 128"
    assert r.optimizer.name == "sgd" and not r.optimizer.nesterov
    assert r.optimizer.lr == 0.1  # "lr 0.1"
    assert r.optimizer.momentum == 0.9  # "momentum 0.9"
    assert r.optimizer.weight_decay == 1e-4  # "Weight decay 1e-4"
    assert (r.length, r.length_unit) == (64000, "steps")  # "stop at 64k" iterations
    assert (list(r.schedule.milestones), r.schedule.gamma) == ([32000, 48000], 0.1)  # "÷10 at 32k and 48k"
    assert r.schedule.warmup_until_train_err == 80.0  # ResNet-110: 0.01 "until training error < 80%"
    assert r.schedule.warmup_lr == 0.0  # the warm-up is ResNet-110/1202's only (row cifar_resnet110 sets 0.01)
    a = r.augment
    assert (a.train, a.pad, a.flip) == ("pad_crop", 4, True)  # "pad 4 pixels each side, random 32×32 crop, flip"
    assert a.per_pixel_mean and list(a.std) == [1.0] * 3  # "per-pixel mean subtracted" (no std)
    assert r.label_smoothing == 0.0 and r.ema_decay == 0.0


def test_recipe_resnet_imagenet():
    """ResNet §3.4 (PAPERS.md §1 "ImageNet recipe (paper §3.4)")."""
    r = recipe("resnet_imagenet")
    assert r.batch_size == r.lr_batch_size == 256  # "mini-batch 256"
    assert r.optimizer.name == "sgd" and not r.optimizer.nesterov
    assert r.optimizer.lr == 0.1  # "lr 0.1"
    assert r.optimizer.momentum == 0.9  # "momentum 0.9"
    assert r.optimizer.weight_decay == 1e-4  # "weight decay 1e-4"
    assert not r.optimizer.no_decay_bn_bias
    assert (r.schedule.name, r.schedule.gamma) == ("plateau", 0.1)  # "divided by 10 when the error plateaus"
    assert (r.length, r.length_unit) == (600000, "steps")  # "up to 60×10^4 iterations"
    a = r.augment
    assert (a.train, a.min_size, a.max_size) == ("scale_aug", 256, 480)  # "random size in [256, 480]"
    assert a.crop == "auto" and a.flip  # "a random 224×224 crop of the image or its horizontal flip"
    assert a.lighting == 0.1  # "PCA lighting ... alpha ~ N(0, 0.1)"
    assert list(a.mean) == IMAGENET_MEAN and list(a.std) == [1.0] * 3  # "per-pixel mean subtracted": no std
    assert a.color_jitter == 0.0  # AlexNet's PCA lighting only
    assert r.label_smoothing == 0.0 and r.ema_decay == 0.0


def test_recipe_resnet_imagenet_fb():
    """fb.resnet.torch (PAPERS.md §1 "Published reproductions"; values from its opts.lua, train.lua,
    TRAINING.md and datasets/imagenet.lua)."""
    r = recipe("resnet_imagenet_fb")
    assert r.batch_size == r.lr_batch_size == 256  # TRAINING.md: -batchSize 256
    assert r.optimizer.name == "sgd"
    assert r.optimizer.nesterov  # PAPERS.md "SGD nesterov"; train.lua: nesterov = true
    assert r.optimizer.lr == 0.1  # opts.lua: -LR 0.1
    assert r.optimizer.momentum == 0.9  # opts.lua: -momentum 0.9
    assert r.optimizer.weight_decay == 1e-4  # opts.lua: -weightDecay 1e-4
    assert not r.optimizer.no_decay_bn_bias and not r.optimizer.no_decay_depthwise  # optim.sgd on all params
    assert (r.length, r.length_unit) == (90, "epochs")  # PAPERS.md "90 epochs"; opts.lua: nEpochs 90
    assert (list(r.schedule.milestones), r.schedule.gamma) == ([30, 60], 0.1)  # PAPERS.md "÷10 every 30 epochs"
    assert lr_at(r, [0, 29.99, 30, 60, 89.99]) == approx([0.1, 0.1, 0.01, 0.001, 0.001])
    a = r.augment
    assert (a.train, list(a.scale), a.flip) == ("inception", [0.08, 1.0], True)  # RandomSizedCrop(224), flip 0.5
    assert a.color_jitter == 0.4  # imagenet.lua: ColorJitter brightness = contrast = saturation = 0.4
    assert a.lighting == 0.1  # imagenet.lua: Lighting(0.1, pca.eigval, pca.eigvec)
    assert list(a.mean) == IMAGENET_MEAN and list(a.std) == IMAGENET_STD  # imagenet.lua: meanstd
    assert r.label_smoothing == 0.0 and r.ema_decay == 0.0


def test_recipe_resnet_imagenet_step():
    """fb.resnet.torch's schedule and optimizer with its crops and lighting, without its color jitter
    (PAPERS.md §1 "Published reproductions")."""
    r = recipe("resnet_imagenet_step")
    assert r.batch_size == r.lr_batch_size == 256  # fb.resnet.torch TRAINING.md: -batchSize 256
    assert (r.optimizer.lr, r.optimizer.momentum, r.optimizer.weight_decay) == (0.1, 0.9, 1e-4)  # opts.lua
    assert r.optimizer.nesterov  # "SGD nesterov"
    assert (r.length, list(r.schedule.milestones), r.schedule.gamma) == (90, [30, 60], 0.1)  # "÷10 every 30, 90"
    a = r.augment
    assert (a.train, list(a.scale), a.lighting, a.color_jitter) == ("inception", [0.08, 1.0], 0.1, 0.0)


# --------------------------------------------------------------------------------------------- MobileNet
def test_recipe_mobilenet_v1():
    """The V1 paper's training as the MobileNetV2 paper reports it (PAPERS.md §2 "Training (paper §3.3)" and §3
    "Training (paper)"; V2 paper §6.1: "Following MobileNetV1 setup ... 0.045 ... 0.98 per epoch")."""
    r = recipe("mobilenet_v1")
    o = r.optimizer
    assert o.name == "rmsprop_tf"  # PAPERS.md §2: "RMSprop ... as in Inception V3"; TF's epsilon inside the root
    assert o.eps == 1.0  # PAPERS.md §2 "slim's default epsilon is 1.0"; Inception V3 §8: "ε = 1.0"
    assert (o.alpha, o.momentum) == (0.9, 0.9)  # PAPERS.md §3: "RMSProp decay 0.9, momentum 0.9" (V2's V1 setup)
    assert o.lr == 0.045  # PAPERS.md §3: "lr 0.045" (V2 §6.1: V1's initial learning rate)
    assert o.weight_decay == 4e-5  # PAPERS.md §3: "weight decay 4e-5"
    assert o.no_decay_depthwise  # PAPERS.md §2: "very little or no weight decay on depthwise filters"
    assert (r.schedule.name, r.schedule.gamma, r.schedule.every) == ("exponential", 0.98, 1.0)  # "×0.98 per epoch"
    assert lr_at(r, [0, 1, 2, 100]) == approx([0.045, 0.045 * 0.98, 0.045 * 0.98**2, 0.045 * 0.98**100])
    assert r.lr_batch_size == 96  # PAPERS.md §3: "batch 96" per asynchronous worker
    assert r.batch_size == 16 * 96  # PAPERS.md §3: "16 async GPU workers, batch 96", run synchronously
    assert lr_at_batch(r) == approx(0.72)  # 0.045 per 96 images, linearly scaled to 1536
    assert r.label_smoothing == 0.0  # PAPERS.md §2: "no label smoothing"
    assert r.ema_decay == 0.0
    assert r.augment.train == "mobilenet" and r.augment.scale[0] > 0.08  # PAPERS.md §2: "fewer small crops"


def test_recipe_mobilenet_v1_slim():
    """TF-slim's released V1 trainer, research/slim/nets/mobilenet_v1_train.py (PAPERS.md §2 holds only slim's
    weight decay and preprocessing)."""
    r = recipe("mobilenet_v1_slim")
    o = r.optimizer
    assert o.name == "sgd" and o.momentum == 0.0 and not o.nesterov  # tf.train.GradientDescentOptimizer
    assert o.lr == 0.045  # get_learning_rate(): 0.045
    assert r.batch_size == r.lr_batch_size == 64  # flags: batch_size 64
    assert (r.schedule.name, r.schedule.gamma) == ("exponential", 0.94)  # _LEARNING_RATE_DECAY_FACTOR = 0.94
    assert r.schedule.every == 2.5  # num_epochs_per_decay = 2.5, staircase=True
    assert lr_at(r, [0, 2.49, 2.5, 5, 25]) == approx([0.045, 0.045, 0.045 * 0.94, 0.045 * 0.94**2,
                                                       0.045 * 0.94**10])
    assert o.weight_decay == 4e-5  # PAPERS.md §2 "Slim details: weight decay 4e-5"
    assert o.no_decay_depthwise  # PAPERS.md §2 "none on depthwise" (mobilenet_v1.py regularize_depthwise=False)
    assert o.no_decay_bn_bias  # mobilenet_v1.py: the regularizer is on conv weights only
    assert r.label_smoothing == 0.0 and r.ema_decay == 0.0  # neither in mobilenet_v1_train.py
    # PAPERS.md §2 "inception preprocessing (random crop of 5–100% area, aspect 3/4–4/3, flip, color)"
    assert (r.augment.train, list(r.augment.scale), r.augment.flip) == ("inception", [0.05, 1.0], True)


def test_recipe_mobilenet_v2():
    """The V2 paper's §6.1 training setup (PAPERS.md §3 "Training (paper)")."""
    r = recipe("mobilenet_v2")
    o = r.optimizer
    assert o.name == "rmsprop_tf" and o.eps == 1.0  # TF's RMSPropOptimizer (PAPERS.md §2: epsilon inside, 1.0)
    assert (o.alpha, o.momentum) == (0.9, 0.9)  # "RMSProp decay 0.9, momentum 0.9"
    assert o.weight_decay == 4e-5  # "weight decay 4e-5"
    assert o.lr == 0.045  # "lr 0.045"
    assert (r.schedule.name, r.schedule.gamma, r.schedule.every) == ("exponential", 0.98, 1.0)  # "×0.98 per epoch"
    assert lr_at(r, [0, 0.99, 1, 2.5, 10]) == approx([0.045, 0.045, 0.045 * 0.98, 0.045 * 0.98**2,
                                                       0.045 * 0.98**10])
    assert r.lr_batch_size == 96  # "batch 96" (each asynchronous worker's update)
    assert r.batch_size == 16 * 96  # "16 async GPU workers"
    assert lr_at_batch(r) == approx(0.72)
    assert r.label_smoothing == 0.0 and r.ema_decay == 0.0  # neither in the paper: slim's, in mobilenet_v2_slim


def test_recipe_mobilenet_v2_slim():
    """TF-slim's released recipe for 72.0% (PAPERS.md §3 "Slim recipe for 72.0%"; research/slim/nets/mobilenet/
    README.md "Training"/"V2" for the clone count; train_image_classifier.py for the RMSProp flags)."""
    r = recipe("mobilenet_v2_slim")
    o = r.optimizer
    assert o.name == "rmsprop_tf" and o.eps == 1.0  # PAPERS.md §3 "RMSProp (epsilon 1.0)"
    assert (o.alpha, o.momentum) == (0.9, 0.9)  # train_image_classifier.py: rmsprop_decay 0.9, rmsprop_momentum 0.9
    assert o.lr == 0.045 and r.lr_batch_size == 96  # PAPERS.md §3 "lr 0.045 per GPU", "batch 96 per GPU"
    assert r.batch_size == 8 * 96  # README: num_clones 8 ("after about 700K when trained on 8 GPU")
    assert lr_at_batch(r) == approx(0.36)  # README: --learning_rate=0.045 * NUM_GPUS
    assert (r.schedule.gamma, r.schedule.every) == (0.98, 2.5)  # PAPERS.md §3 "×0.98 every 2.5 epochs"
    assert lr_at(r, [0, 2.49, 2.5, 25]) == approx([0.045, 0.045, 0.045 * 0.98, 0.045 * 0.98**10])
    assert r.label_smoothing == 0.1  # PAPERS.md §3 "label smoothing 0.1"
    assert r.ema_decay == 0.9999  # PAPERS.md §3 "EMA of weights 0.9999"
    assert (r.length, r.length_unit) == (400, "epochs")  # PAPERS.md §3 "~400 epochs"
    assert o.weight_decay == 4e-5 and o.no_decay_depthwise  # mobilenet.py training_scope(weight_decay=0.00004)
    assert (r.augment.train, list(r.augment.scale)) == ("inception", [0.05, 1.0])  # "inception preprocessing"


def test_recipe_mobilenet_sgd():
    """torchvision's mobilenet_v2 recipe (PAPERS.md §3: "trained with SGD momentum 0.9, lr 0.045 ×0.98 per epoch,
    wd 4e-5, 300 epochs, batch 256")."""
    r = recipe("mobilenet_sgd")
    o = r.optimizer
    assert o.name == "sgd" and (o.momentum, o.lr, o.weight_decay) == (0.9, 0.045, 4e-5)
    assert r.batch_size == r.lr_batch_size == 256  # "batch 256"
    assert (r.schedule.gamma, r.schedule.every) == (0.98, 1.0)  # "×0.98 per epoch"
    assert (r.length, r.length_unit) == (300, "epochs")  # "300 epochs"
    assert not o.no_decay_depthwise and not o.no_decay_bn_bias  # torchvision's --wd applies to every parameter


def test_recipe_digits():
    """The offline default: the ResNet CIFAR recipe's shape (PAPERS.md §1 "CIFAR-10 (paper §4.2, Table 6)") on
    15 epochs of the bundled digits, batch 64 (this project's choice)."""
    r = recipe("digits")
    o = r.optimizer
    assert o.name == "sgd" and (o.lr, o.momentum, o.weight_decay) == (0.1, 0.9, 1e-4)  # "lr 0.1", "0.9", "1e-4"
    assert r.batch_size == r.lr_batch_size == 64
    assert (r.length, r.length_unit) == (15, "epochs")
    # §4.2's ÷10 at 32k and 48k of 64k iterations: at 50% and 75% of the run
    assert (list(r.schedule.milestones), r.schedule.gamma) == ([15 * 32 / 64, 15 * 48 / 64], 0.1)
    assert (r.augment.train, r.augment.pad, r.augment.flip) == ("pad_crop", 2, False)  # digits are not symmetric


# ------------------------------------------------------------------------------ fb.resnet.torch color jitter
def test_color_jitter_equals_torchvision_adjustments():
    """Given factors and order, the batch jitter is torchvision's adjust_brightness / contrast / saturation in
    that order (fb.resnet.torch's blends; no clamping is reached on mid-range pixels with factors near 1)."""
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 20) * 0.4 + 0.3  # pixels in [0.3, 0.7]
    factors = torch.tensor([[0.8, 1.15, 0.9], [1.2, 0.85, 1.1], [0.95, 1.05, 1.2]])  # (brightness, contrast, sat)
    order = torch.tensor([[0, 1, 2], [2, 0, 1], [1, 2, 0]])
    got = ColorJitter(0.4).blend(x, factors, order)
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for i in range(3):
        want = x[i]
        for op in order[i].tolist():
            want = adjust[op](want, float(factors[i, op]))
        # torchvision's grayscale weighs red 0.2989 where fb.resnet.torch uses 0.299
        assert torch.allclose(got[i], want, atol=2e-4), i


def test_color_jitter_draws_factors_in_range_and_runs_only_in_training():
    """On gray images contrast and saturation do nothing, so out / in is the brightness factor: U(0.6, 1.4) for
    strength 0.4. Normalize applies the jitter in training only."""
    torch.manual_seed(0)
    x = torch.full((2000, 3, 2, 2), 0.5)
    ratio = (ColorJitter(0.4)(x) / x)[:, 0, 0, 0]
    assert ratio.min() >= 0.6 - 1e-6 and ratio.max() <= 1.4 + 1e-6
    assert ratio.min() < 0.62 and ratio.max() > 1.38 and abs(float(ratio.mean()) - 1.0) < 0.02
    norm = Normalize(Preprocessing(), color_jitter=0.4)
    img = torch.full((4, 3, 2, 2), 128, dtype=torch.uint8)
    assert not torch.allclose(norm.train()(img), img.float() / 255)
    assert torch.equal(norm.eval()(img), img.float() / 255)
