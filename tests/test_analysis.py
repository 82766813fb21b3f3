"""ResNet Fig. 7 analysis: which layers count, exact response stds, checkpoints as repro-train writes them, errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from common import CIFAR_ROOT, cifar_train_only
from repro.cli import CONFIG_DIR
from repro.config import register_configs
from repro.data import Normalize, Preprocessing
from repro.data.digits import digits_tensors
from repro.distributed import Dist
from repro.models import create_model, create_model_from_config, load_weights
from repro.models.resnet import BasicBlock
from repro.report.responses import (
    SUPPORTED_MODELS,
    checkpoint_response_stds,
    response_layers,
    response_stds,
    sorted_stds,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
CIFAR_NAMES = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
               "plain20", "plain32", "plain44", "plain56", "plain110"]


def _randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial running statistics and affine parameters (so eval-mode BN is not the identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    return model


def _reference_stds(model: nn.Module, batches: list[torch.Tensor], names: list[str]) -> list[float]:
    """Independent: capture each named BN's output with our own hooks (cloned: the next ReLU is in place),
    concatenate everything, take torch.std (unbiased) in float64."""
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda _m, _i, out, n=n: captured[n].append(out.detach().clone()))
               for n in names]
    model.eval()
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    return [torch.cat([t.flatten() for t in captured[n]]).double().std().item() for n in names]


# ------------------------------------------------------------------------------------------ which layers
@pytest.mark.parametrize(("name", "kwargs", "count"), [
    ("resnet20", {}, 19), ("plain20", {}, 19), ("resnet20", {"shortcut": "B"}, 19),
    ("resnet20", {"shortcut": "C"}, 19), ("resnet56", {"shortcut": "B"}, 55), ("resnet110", {"shortcut": "B"}, 109),
    ("plain110", {}, 109),
])
def test_response_layers_are_the_3x3_bns(name, kwargs, count):
    """6n+1 layers (stem + 2 per block): each BN follows a 3x3 conv; the shortcut BNs are exactly the ones left out."""
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    layers = response_layers(model)
    assert len(layers) == count
    n = (count - 1) // 2 // 3
    expected = ["bn1"] + [f"layer{s}.{i}.{bn}" for s in (1, 2, 3) for i in range(n) for bn in ("bn1", "bn2")]
    assert [k for k, _ in layers] == expected
    modules = dict(model.named_modules())
    for k, bn in layers:
        assert modules[k] is bn and isinstance(bn, nn.BatchNorm2d)
        conv = modules[k[: -len("bn1")] + "conv" + k[-1]]  # bn1 -> conv1, layerS.I.bn2 -> layerS.I.conv2
        assert conv.kernel_size == (3, 3) and conv.out_channels == bn.num_features
    left_out = {k for k, m in modules.items() if isinstance(m, nn.BatchNorm2d)} - {k for k, _ in layers}
    assert all(".downsample." in k for k in left_out)
    projections = {"A": 0, "B": 2, "C": 3 * n}[kwargs.get("shortcut", "A")] if name.startswith("resnet") else 0
    assert len(left_out) == projections


def test_response_layers_follow_forward_order():
    """The list order is the order the BNs run in a forward pass (shortcut BNs, which run in between, dropped)."""
    model = create_model("resnet20", shortcut="C")
    names = {m: k for k, m in model.named_modules()}
    order: list[str] = []
    handles = [m.register_forward_hook(lambda m, _i, _o: order.append(names[m]))
               for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    for h in handles:
        h.remove()
    assert len(order) == 19 + 9
    assert [k for k in order if ".downsample." not in k] == [k for k, _ in response_layers(model)]


@pytest.mark.parametrize("name", ["resnet18", "plain34", "mobilenet_v1", "mobilenet_v2"])
def test_other_models_are_refused_by_name(name):
    """ImageNet ResNets and MobileNets are refused with the list of supported models."""
    with torch.device("meta"):
        model = create_model(name)
    with pytest.raises(ValueError, match="only the CIFAR ResNets and plain nets") as e:
        response_layers(model)
    assert "resnet20" in str(e.value) and "plain110" in str(e.value) and "resnet1202" in str(e.value)
    with pytest.raises(ValueError, match="only the CIFAR ResNets"):
        response_layers(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


def test_supported_models_are_the_cifar_nets():
    """SUPPORTED_MODELS lists every CIFAR net of the zoo and nothing else."""
    assert list(SUPPORTED_MODELS) == CIFAR_NAMES


# ----------------------------------------------------------------------------------------- the numbers
@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_stem_std_hand_computed(offset):
    """Stem conv copies channel 0 (+1/-1 checkerboard) to all 16 channels; BN (eps 0, mean 0, var 1) maps it to
    2x + 3 (channels 0-7) and 2x - 3 (8-15), plus `offset`: values offset + {1, 5, -5, -1} in equal numbers.
    Sample std over 2 images x 16 channels x 16 pixels = 512 values: sqrt(13 * 512 / 511), whatever the offset."""
    model = create_model("resnet20")
    with torch.no_grad():
        model.conv1.weight.zero_()
        model.conv1.weight[:, 0, 1, 1] = 1.0
        bn = model.bn1
        bn.eps = 0.0
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.weight.fill_(2.0)
        bn.bias.copy_(torch.tensor([3.0] * 8 + [-3.0] * 8) + offset)
    checker = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2 * 2.0 - 1.0  # +1/-1, eight of each
    x = torch.randn(2, 3, 4, 4)
    x[:, 0] = checker
    stds = dict(response_stds(model, [x]))
    assert stds["bn1"] == pytest.approx(math.sqrt(13 * 512 / 511), rel=1e-12)
    assert abs(stds["bn1"] - math.sqrt(13)) > 1e-3  # the sample (N - 1) std, not the population one


def test_stds_equal_independent_computation_and_accumulate_over_batches():
    """Several batches: equal to torch.std of the concatenated responses (own hooks), and to one big batch."""
    torch.manual_seed(0)
    model = _randomized(create_model("resnet20", shortcut="B"))
    batches = [torch.randn(b, 3, 32, 32) for b in (5, 3, 4)]
    stds = response_stds(model, batches)
    names = [k for k, _ in stds]
    assert len(names) == 19
    reference = _reference_stds(model, batches, names)
    assert [v for _, v in stds] == pytest.approx(reference, rel=1e-6)
    one = response_stds(model, [torch.cat(batches)])
    assert [v for _, v in one] == pytest.approx([v for _, v in stds], rel=1e-6)
    assert all(math.isfinite(v) and v > 0 for v in reference)


def test_plain_net_and_normalize():
    """plain20 on uint8 batches with `normalize` equals the same net on batches normalized by hand."""
    torch.manual_seed(1)
    model = _randomized(create_model("plain20"), seed=1)
    pixels = [torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8) for b in (3, 2)]
    pre = Preprocessing((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    by_hand = [(p.float() / 255 - mean) / std for p in pixels]
    got = response_stds(model, pixels, Normalize(pre))
    assert len(got) == 19
    assert [v for _, v in got] == pytest.approx(_reference_stds(model, by_hand, [k for k, _ in got]), rel=1e-6)


def test_hooks_removed_mode_restored_stats_untouched():
    """After the call (and after a failing one) no hook of ours is left, the user's hooks stay, training mode is
    restored, and the BN running statistics did not move (eval mode)."""
    model = create_model("resnet20", shortcut="B")
    mine = model.layer2[0].bn1.register_forward_hook(lambda *_: None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = {k: len(m._forward_hooks) for k, m in model.named_modules()}
    model.train()
    response_stds(model, [torch.randn(2, 3, 32, 32)])
    assert {k: len(m._forward_hooks) for k, m in model.named_modules()} == hooks_before
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    def failing():
        yield torch.randn(2, 3, 32, 32)
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        response_stds(model, failing())
    assert {k: len(m._forward_hooks) for k, m in model.named_modules()} == hooks_before
    assert model.training
    mine.remove()
    assert not any(m._forward_hooks for m in model.modules())


def test_no_images_is_an_error():
    """An empty iterable is refused (no responses), and leaves no hooks."""
    model = create_model("resnet20")
    with pytest.raises(ValueError, match="no images"):
        response_stds(model, [])
    assert not any(m._forward_hooks for m in model.modules())


def test_sorted_stds_descending():
    """Fig. 7 bottom: descending order; the input list is not changed."""
    stds = [0.5, 2.0, 1.0, 2.0, 0.1]
    assert sorted_stds(stds) == [2.0, 2.0, 1.0, 0.5, 0.1]
    assert stds == [0.5, 2.0, 1.0, 2.0, 0.1]
    assert sorted_stds([]) == []


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    """checkpoints/last.pt written by repro-train's own setup/train_one_epoch/save: resnet20, 2 steps on digits."""
    from repro.train import setup, write_checkpoint

    out = tmp_path_factory.mktemp("train")
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["name=fig7", "trainer.progress=false", "trainer.max_steps=2",
                                          "recipe.batch_size=32"])
    run = setup(cfg, Dist(), CPU, out)
    try:
        run.epoch()
        write_checkpoint("last", run.state, run.data, run.run)
    finally:
        run.close()
    assert run.state.progress.step == 2
    return out / "checkpoints" / "last.pt"


def test_checkpoint_stds_equal_independent_computation(trained_checkpoint):
    """A repro-train checkpoint: 19 finite positive stds over 50 digits test images (every 360/50-th), equal to our own
    hooks on the model rebuilt from the checkpoint and those images normalized with its preprocessing."""
    res = checkpoint_response_stds(trained_checkpoint, max_images=50, batch_size=20)
    assert res["model"] == "resnet20" and res["depth"] == 20 and res["images"] == 50
    assert res["split"] == "test" and res["data"] == "digits" and res["checkpoint"] == str(trained_checkpoint)
    assert len(res["layers"]) == len(res["std"]) == 19 and res["layers"][0] == "bn1"
    assert all(math.isfinite(v) and v > 0 for v in res["std"])

    ck = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    model = load_weights(create_model_from_config(ck["config"]["model"]), ck, "repro")
    images, _, _, _ = digits_tensors(OmegaConf.create(ck["config"]["data"]), "test")
    pre = ck["preprocessing"]
    mean, std = torch.tensor(pre["mean"]).view(1, 3, 1, 1), torch.tensor(pre["std"]).view(1, 3, 1, 1)
    x = (images[[i * len(images) // 50 for i in range(50)]].float() / 255 - mean) / std
    assert res["std"] == pytest.approx(_reference_stds(model, [x], res["layers"]), rel=1e-6)

    everything = checkpoint_response_stds(trained_checkpoint, split="val", max_images=None, batch_size=100)
    assert everything["images"] == 180 and everything["split"] == "val"


@pytest.mark.skipif(not (CIFAR_ROOT / "train").is_dir(), reason=f"needs the CIFAR-10 JPEGs at {CIFAR_ROOT}")
def test_checkpoint_on_real_cifar(tmp_path):
    """A hand-made checkpoint (train.py's layout) of a resnet20 with option B read on real CIFAR-10 JPEGs via
    data_root and split=val; the default split (test) is refused with the fix where only train/ is there."""
    torch.manual_seed(0)
    model = _randomized(create_model("resnet20", shortcut="B"))
    path = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(),
                "preprocessing": {"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26], "mean_image": None},
                "config": {"model": {"name": "resnet20", "resolution": 32, "num_classes": 10, "shortcut": "B",
                                     "shortcut_pad": "after", "zero_init_residual": False},
                           "data": {"name": "cifar10", "root": str(tmp_path / "elsewhere"), "download": False,
                                    "split": "test", "num_classes": 10, "val_size": 5000, "split_seed": 0,
                                    "batch_size": 128, "num_workers": 2, "on_error": "raise", "limit": None},
                           "seed": 0}}, path)
    res = checkpoint_response_stds(path, data_root=CIFAR_ROOT, split="val", max_images=40, batch_size=16)
    assert res["images"] == 40 and len(res["std"]) == 19
    assert all(math.isfinite(v) and v > 0 for v in res["std"])
    with pytest.raises(ValueError, match="has train/ but no test/ images.*split="):
        checkpoint_response_stds(path, data_root=cifar_train_only(tmp_path))


def _hand_checkpoint(path: Path, name: str = "resnet20", data: dict | None = None, **drop: bool) -> Path:
    """A checkpoint dict in train.py's layout (model, config.model/data, preprocessing), minus keys in `drop`."""
    with torch.device("meta"):
        meta = create_model(name, num_classes=10)
    state = {k: torch.zeros(v.shape) for k, v in meta.state_dict().items()} if name in CIFAR_NAMES[:1] else {}
    ck = {"model": state, "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3, "mean_image": None},
          "config": {"model": {"name": name, "resolution": 32 if name in CIFAR_NAMES else 224, "num_classes": 10},
                     "data": data or {"name": "digits", "split": "test", "image_size": 32, "test_size": 360,
                                      "split_seed": 0, "num_classes": 10, "batch_size": 64, "num_workers": 0,
                                      "on_error": "raise", "limit": None}}}
    for key in drop:
        ck.pop(key)
    torch.save(ck, path)
    return path


def _bad_missing(d: Path):
    return [d / "gone.pt"], {}, ["gone.pt", "does not exist"]


def _bad_bare_state_dict(d: Path):
    torch.save(create_model("resnet20").state_dict(), d / "bare.pt")
    return [d / "bare.pt"], {}, ["not a repro-train checkpoint", "written by repro-train"]


def _bad_truncated_checkpoint(d: Path):
    data = _hand_checkpoint(d / "x.pt").read_bytes()
    (d / "cut.pt").write_bytes(data[: len(data) // 2])
    return [d / "cut.pt"], {}, ["cut.pt", "cannot read", "as a PyTorch checkpoint"]


def _bad_text_file(d: Path):
    (d / "notes.pt").write_text("not a checkpoint")
    return [d / "notes.pt"], {}, ["notes.pt", "refused to read", "or is corrupted"]


def _bad_no_preprocessing(d: Path):
    return [_hand_checkpoint(d / "x.pt", preprocessing=True)], {}, ["carries no preprocessing"]


def _bad_imagenet_model(d: Path):
    return [_hand_checkpoint(d / "r18.pt", "resnet18")], {}, ["'resnet18'", "only the CIFAR ResNets", "resnet110"]


def _bad_mobilenet(d: Path):
    return [_hand_checkpoint(d / "mb.pt", "mobilenet_v2")], {}, ["'mobilenet_v2'", "plain20"]


def _bad_weights_misfit(d: Path):
    path = _hand_checkpoint(d / "x.pt")
    ck = torch.load(path, weights_only=True)
    ck["config"]["model"]["name"] = "resnet32"
    torch.save(ck, path)
    return [path], {}, ["do not fit", "missing from the file"]


def _bad_data_root_for_digits(d: Path):
    return [_hand_checkpoint(d / "x.pt")], {"data_root": d}, ["data=digits reads no files", "data_root"]


def _bad_split(d: Path):
    return [_hand_checkpoint(d / "x.pt")], {"split": "holdout"}, ["data.split='holdout' is not valid"]


def _bad_max_images(d: Path):
    return [_hand_checkpoint(d / "x.pt")], {"max_images": 0}, ["max_images=0 is not valid"]


def _bad_batch_size(d: Path):
    return [_hand_checkpoint(d / "x.pt")], {"batch_size": 0}, ["batch_size=0 is not valid"]


def _bad_missing_cifar_root(d: Path):
    data = {"name": "cifar10", "root": None, "download": False, "split": "test", "num_classes": 10,
            "val_size": 5000, "split_seed": 0, "batch_size": 128, "num_workers": 0, "on_error": "raise",
            "limit": None}
    return [_hand_checkpoint(d / "x.pt", data=data)], {}, ["needs data.root", "pass data_root="]


BAD = {name.removeprefix("_bad_"): fn for name, fn in globals().copy().items() if name.startswith("_bad_")}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_clear_errors(case, tmp_path):
    """Each bad input raises a ValueError whose message names the problem (and the fix)."""
    args, kwargs, fragments = BAD[case](tmp_path)
    with pytest.raises(ValueError) as e:
        checkpoint_response_stds(*args, **kwargs)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)


def test_block_class_is_basic():
    """The CIFAR nets are built from BasicBlocks (two 3x3 convs each), which response_layers relies on."""
    with torch.device("meta"):
        model = create_model("resnet110")
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 54 and 1 + 2 * len(blocks) == len(response_layers(model))


# ----------------------------------------------------------------------------------------- repro-analyze
def _analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the repro-analyze console script as a user does."""
    return subprocess.run(["repro-analyze", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_repro_analyze_two_runs(trained_checkpoint, tmp_path):
    """Two runs of one model: labelled by run folder; stds.json equals checkpoint_response_stds; table, plot, config."""
    paths = []
    for run in ("a", "b"):
        (tmp_path / run / "checkpoints").mkdir(parents=True)
        paths.append(shutil.copy(trained_checkpoint, tmp_path / run / "checkpoints" / "last.pt"))
    res = _analyze(f"checkpoints=[{paths[0]},{paths[1]}]", "images=30", "device=cpu", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["#", "layer", "resnet20", "(a)", "resnet20", "(b)"]
    assert lines[2].split()[:2] == ["1", "bn1"] and lines[20].split()[:2] == ["19", "layer3.2.bn2"]
    out = next((tmp_path / "outputs" / "analyze").iterdir())
    saved = json.loads((out / "stds.json").read_text())
    assert list(saved) == ["resnet20 (a)", "resnet20 (b)"]
    direct = checkpoint_response_stds(trained_checkpoint, max_images=30)["std"]
    assert saved["resnet20 (a)"]["std"] == pytest.approx(direct, rel=1e-9) and saved["resnet20 (a)"]["images"] == 30
    assert float(lines[2].split()[-1]) == pytest.approx(direct[0], abs=1e-4)
    assert (out / "fig7.png").stat().st_size > 10_000
    assert (out / "config.yaml").is_file() and (out / "run.json").is_file()
    # format=json prints the same object, and nothing else, on stdout.
    res = _analyze(f"checkpoints={paths[0]}", "images=30", "format=json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["resnet20"]["std"] == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize(("args", "message"), [
    ((), "checkpoints= is required"),
    (("checkpoints=gone.pt",), "does not exist"),
    (("checkpoints=x.pt", "format=xml"), "format='xml' is not valid; choose one of ['table', 'json']"),
    (("checkpoints=x.pt", "device=tpu"), "device='tpu' is not valid; choose one of ['auto', 'cpu', 'cuda']"),
    (("checkpoints=x.pt", "imags=3"), "Key 'imags' not in 'AnalyzeConfig'"),
])
def test_repro_analyze_bad_input(tmp_path, args, message):
    """Bad input stops repro-analyze with a message naming it, no traceback."""
    res = _analyze(*args, cwd=tmp_path)
    assert res.returncode != 0 and message in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
