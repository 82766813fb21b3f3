"""Weight loading: torchvision and akamaster equality, the repro format, and clear refusals of misfits."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from common import AKAMASTER_DIR, CIFAR_CLASSES, MEAN, SHARED, STD
from repro.models import WEIGHT_FORMATS, WeightsError, create_model, load_weights

pytestmark = pytest.mark.usefixtures("one_thread")

CIFAR_TRAIN = SHARED / "data" / "cifar10-jpeg" / "train"
TOL = {"atol": 1e-5, "rtol": 1e-5}


# --------------------------------------------------------------------------------------------- helpers


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN random affine/statistics and nudge every conv/linear, so equality tests bite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.add_(torch.randn(m.weight.shape, generator=g) * 1e-3)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode forward without autograd."""
    with torch.no_grad():
        return model.eval()(x)


def _imagenet_batch(seed: int = 1) -> torch.Tensor:
    """Two small ImageNet-style inputs."""
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _cifar_batch(n: int = 8, seed: int = 2) -> torch.Tensor:
    """A few CIFAR-sized normal inputs."""
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


class NotAStateDict:
    """An arbitrary Python object, which a weights_only load must refuse."""

    def __init__(self) -> None:
        self.weight = torch.zeros(3)


class SubclassedDict(collections.OrderedDict):
    """A dict subclass: not one of the plain containers weights_only accepts."""


# ----------------------------------------------------------------------------------- torchvision
TV_CASES = [
    ("resnet18", {}),
    ("resnet50", {"stride_in_1x1": False}),
    ("resnet101", {"stride_in_1x1": False}),
    ("mobilenet_v2", {}),
]


@pytest.mark.parametrize(("name", "kwargs"), TV_CASES, ids=[c[0] for c in TV_CASES])
def test_torchvision_logits_equal(name, kwargs):
    """Our model with torchvision's (randomized) state dict computes exactly torchvision's logits."""
    torch.manual_seed(0)
    tv = _randomize(getattr(torchvision.models, name)(weights=None))
    ours = load_weights(create_model(name, **kwargs), tv.state_dict(), "torchvision")
    x = _imagenet_batch()
    expected = _logits(tv, x)
    assert expected.abs().max() > 1e-3  # not a degenerate all-zero output
    torch.testing.assert_close(_logits(ours, x), expected, **TOL)


def test_torchvision_resnet18_accepts_stride_in_1x1():
    """stride_in_1x1 is irrelevant for basic blocks, so resnet18 loads torchvision weights either way."""
    tv = _randomize(torchvision.models.resnet18(weights=None))
    ours = load_weights(create_model("resnet18", stride_in_1x1=True), tv.state_dict(), "torchvision")
    x = _imagenet_batch()
    torch.testing.assert_close(_logits(ours, x), _logits(tv, x), **TOL)


@pytest.mark.parametrize(("name", "kwargs"), [TV_CASES[0], TV_CASES[3]], ids=["resnet18", "mobilenet_v2"])
def test_torchvision_from_file(name, kwargs, tmp_path):
    """A torchvision state dict saved with torch.save loads from its path (str and Path)."""
    tv = _randomize(getattr(torchvision.models, name)(weights=None), seed=3)
    path = tmp_path / f"{name}.pth"
    torch.save(tv.state_dict(), path)
    x = _imagenet_batch()
    expected = _logits(tv, x)
    for source in (path, str(path)):
        ours = load_weights(create_model(name, **kwargs), source, "torchvision")
        torch.testing.assert_close(_logits(ours, x), expected, **TOL)


# --------------------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def tv_resnet18_state():
    """A torchvision resnet18 state dict."""
    return torchvision.models.resnet18(weights=None).state_dict()


@pytest.fixture(scope="module")
def tv_resnet50_state():
    """A torchvision resnet50 state dict."""
    return torchvision.models.resnet50(weights=None).state_dict()


def test_torchvision_refuses_stride_in_1x1(tv_resnet50_state):
    """torchvision weights into resnet50 with default stride_in_1x1=True are refused, naming the option."""
    with pytest.raises(WeightsError, match="stride_in_1x1=False"):
        load_weights(create_model("resnet50"), tv_resnet50_state, "torchvision")


@pytest.fixture(scope="module")
def tv_resnet34_state():
    """A torchvision resnet34 state dict."""
    return torchvision.models.resnet34(weights=None).state_dict()


@pytest.mark.parametrize("shortcut", ["A", "C"])
def test_torchvision_refuses_shortcut(shortcut, tv_resnet34_state):
    """torchvision weights into a ResNet with shortcut A or C are refused, naming shortcut='B'."""
    with pytest.raises(WeightsError, match="shortcut='B'"):
        load_weights(create_model("resnet34", shortcut=shortcut), tv_resnet34_state, "torchvision")


def test_torchvision_refuses_plain_net(tv_resnet34_state):
    """torchvision weights into plain34 are refused: torchvision has no plain nets."""
    with pytest.raises(WeightsError, match="no plain nets"):
        load_weights(create_model("plain34"), tv_resnet34_state, "torchvision")


@pytest.mark.parametrize("name", ["mobilenet_v1", "resnet20"])
def test_torchvision_refuses_other_models(name, tv_resnet18_state):
    """torchvision format into a model torchvision does not provide is refused."""
    with pytest.raises(WeightsError, match="mobilenet_v2"):
        load_weights(create_model(name), tv_resnet18_state, "torchvision")


def test_refuses_wrong_num_classes(tv_resnet18_state):
    """A 1000-class state dict into a 10-class model names fc.weight and both shapes."""
    expected = "fc.weight (file (1000, 512) vs model (10, 512))"
    with pytest.raises(WeightsError, match=re.escape(expected)):
        load_weights(create_model("resnet18", num_classes=10), tv_resnet18_state, "torchvision")


def test_refuses_missing_and_extra_keys(tv_resnet18_state):
    """A state dict lacking a key and carrying a foreign one is refused, naming both keys."""
    state = dict(tv_resnet18_state)
    del state["layer2.0.conv1.weight"]
    state["head.extra.weight"] = torch.zeros(3)
    with pytest.raises(WeightsError) as info:
        load_weights(create_model("resnet18"), state, "repro")
    msg = str(info.value)
    assert re.search(r"missing from the file \(1\): layer2\.0\.conv1\.weight", msg), msg
    assert re.search(r"not in the model \(1\): head\.extra\.weight", msg), msg


def test_refuses_non_tensor_value(tv_resnet18_state):
    """A key whose value is not a tensor is refused, naming the key."""
    state = dict(tv_resnet18_state, **{"fc.bias": [0.0] * 1000})
    with pytest.raises(WeightsError, match=r"fc\.bias \(file a list, not a tensor"):
        load_weights(create_model("resnet18"), state, "repro")


def test_refuses_unknown_format(tv_resnet18_state):
    """An unknown format name is refused, listing every valid one."""
    with pytest.raises(WeightsError, match="choose one of") as info:
        load_weights(create_model("resnet18"), tv_resnet18_state, "timm")
    assert "'timm'" in str(info.value)
    for fmt in WEIGHT_FORMATS:
        assert repr(fmt) in str(info.value)


def test_refuses_missing_file(tmp_path):
    """A path that does not exist is refused with a WeightsError naming it."""
    path = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match="does not exist") as info:
        load_weights(create_model("resnet20"), path)
    assert "nope.pth" in str(info.value)


@pytest.mark.parametrize("obj_factory", [NotAStateDict, lambda: SubclassedDict(w=torch.zeros(1))],
                         ids=["custom-class", "ordereddict-subclass"])
def test_refuses_pickled_python_objects(obj_factory, tmp_path):
    """A file holding arbitrary pickled Python objects is refused because weights are read weights_only."""
    path = tmp_path / "evil.pth"
    torch.save(obj_factory(), path)
    with pytest.raises(WeightsError, match="weights_only=True") as info:
        load_weights(create_model("resnet20"), path)
    msg = str(info.value)
    assert "refused to read" in msg and "no arbitrary code runs" in msg
    assert type(obj_factory()).__name__ in msg  # names the class it refused
    assert "\x1b[" not in msg  # no terminal colour codes from torch's message


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_refuses_truncated_file(legacy, tmp_path):
    """The first half of a valid checkpoint gives a WeightsError, not a bare traceback."""
    full, half = tmp_path / "full.pth", tmp_path / "half.pth"
    torch.save(create_model("resnet20").state_dict(), full, _use_new_zipfile_serialization=not legacy)
    data = full.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="half.pth"):
        load_weights(create_model("resnet20"), half)


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n"], ids=["empty", "text"])
def test_refuses_non_checkpoint_file(content, tmp_path):
    """An empty or text file gives a WeightsError saying it is not a readable checkpoint."""
    path = tmp_path / "notes.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="cannot read .* as a PyTorch checkpoint"):
        load_weights(create_model("resnet20"), path)


def test_refuses_file_without_mapping(tmp_path):
    """A file holding a plain list of tensors is refused: it is not a state dict."""
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsError, match="holds a list, not a state dict"):
        load_weights(create_model("resnet20"), path)


# ---------------------------------------------------------------------------------- repro format
def _source_resnet20() -> nn.Module:
    """A CIFAR resnet20 with non-trivial weights."""
    return _randomize(create_model("resnet20"), seed=5)


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    """Two models have equal state dicts and logits."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    x = _cifar_batch(4)
    torch.testing.assert_close(_logits(a, x), _logits(b, x), rtol=0, atol=0)


def test_repro_checkpoint_dict(tmp_path):
    """A {'model': state_dict, 'extra': ...} checkpoint loads, from a dict and from a file."""
    src = _source_resnet20()
    ckpt = {"model": src.state_dict(), "extra": {"epoch": 7, "best_top1": 0.9, "tag": "x"}}
    _assert_same(load_weights(create_model("resnet20"), ckpt), src)
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    _assert_same(load_weights(create_model("resnet20"), path, "repro"), src)


def test_repro_bare_state_dict():
    """A bare state dict loads in the repro format."""
    src = _source_resnet20()
    _assert_same(load_weights(create_model("resnet20"), src.state_dict(), "repro"), src)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_repro_prefixed_state_dict(prefix):
    """DataParallel ('module.') and torch.compile ('_orig_mod.') key prefixes are stripped."""
    src = _source_resnet20()
    state = {prefix + k: v for k, v in src.state_dict().items()}
    _assert_same(load_weights(create_model("resnet20"), state), src)


def test_repro_without_batch_counters():
    """A state dict lacking num_batches_tracked (older PyTorch) still loads."""
    src = _source_resnet20()
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    loaded = load_weights(create_model("resnet20"), state)
    x = _cifar_batch(4)
    torch.testing.assert_close(_logits(loaded, x), _logits(src, x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------- akamaster
class AkaLambdaLayer(nn.Module):
    """akamaster's LambdaLayer: wraps a function as a module."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class AkaBasicBlock(nn.Module):
    """akamaster/pytorch_resnet_cifar10 BasicBlock with the option-A shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = AkaLambdaLayer(
                lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class AkaResNet(nn.Module):
    """akamaster/pytorch_resnet_cifar10 ResNet: conv1/bn1, layer1..3, avg pool, linear."""

    def __init__(self, n: int, num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.linear = nn.Linear(64, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(AkaBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


AKA_DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9}


def _aka_file(depth: int) -> Path:
    """The published akamaster checkpoint for ResNet-`depth`, or skip when shared/ lacks it."""
    found = sorted(AKAMASTER_DIR.glob(f"resnet{depth}-*.th")) if AKAMASTER_DIR.is_dir() else []
    if not found:
        pytest.skip(f"akamaster resnet{depth} checkpoint not found in {AKAMASTER_DIR} "
                    "(shared/ beside the checkout)")
    return found[0]


def _aka_reference(depth: int, path: Path) -> nn.Module:
    """The re-implemented akamaster net with the published weights, loaded strictly."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in obj["state_dict"].items()}
    ref = AkaResNet(AKA_DEPTHS[depth])
    ref.load_state_dict(state, strict=True)
    return ref.eval()


def _cifar_images(per_class: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` real CIFAR-10 images of every class, normalized, with their labels; skip when absent."""
    if not CIFAR_TRAIN.is_dir():
        pytest.skip(f"CIFAR-10 images not found in {CIFAR_TRAIN} (shared/ beside the checkout)")
    from PIL import Image

    classes = sorted(p.name for p in CIFAR_TRAIN.iterdir() if p.is_dir())
    assert tuple(classes) == CIFAR_CLASSES
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    images, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((CIFAR_TRAIN / cls).glob("*.jpg"))[:per_class]:
            with Image.open(f) as im:
                pixels = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
            x = pixels.view(32, 32, 3).permute(2, 0, 1).float() / 255.0
            images.append((x - mean) / std)
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


@pytest.mark.parametrize("depth", sorted(AKA_DEPTHS))
def test_akamaster_logits_equal_reference(depth):
    """resnetN(shortcut_pad='split') + load_weights(akamaster) equals the re-implemented akamaster net."""
    path = _aka_file(depth)
    ref = _aka_reference(depth, path)
    ours = load_weights(create_model(f"resnet{depth}", shortcut_pad="split"), path, "akamaster")
    x = _cifar_batch(8)
    torch.testing.assert_close(_logits(ours, x), _logits(ref, x), **TOL)


def test_akamaster_real_images():
    """On real CIFAR-10 images our resnet20 equals the reference and classifies most of them correctly."""
    path = _aka_file(20)
    x, labels = _cifar_images(per_class=2)
    ref = _aka_reference(20, path)
    ours = load_weights(create_model("resnet20", shortcut_pad="split"), str(path), "akamaster")
    logits = _logits(ours, x)
    torch.testing.assert_close(logits, _logits(ref, x), **TOL)
    correct = int((logits.argmax(1) == labels).sum())
    assert correct >= 15, f"only {correct}/{len(labels)} real CIFAR-10 images classified correctly"


def test_akamaster_refuses_pad_after():
    """akamaster weights into resnet20 with default shortcut_pad='after' are refused, naming shortcut_pad."""
    path = _aka_file(20)
    with pytest.raises(WeightsError, match="shortcut_pad='split'"):
        load_weights(create_model("resnet20"), path, "akamaster")


@pytest.mark.parametrize(("name", "kwargs"), [("resnet20", {"shortcut": "B"}), ("plain20", {}),
                                              ("resnet18", {})])
def test_akamaster_refuses_other_models(name, kwargs):
    """akamaster weights into anything but an option-A CIFAR ResNet are refused."""
    path = _aka_file(20)
    with pytest.raises(WeightsError, match="CIFAR ResNet"):
        load_weights(create_model(name, **kwargs), path, "akamaster")


def test_akamaster_pad_placement_matters():
    """The same weights give different logits with zeros padded after vs split: the refusal is needed."""
    path = _aka_file(20)
    split = load_weights(create_model("resnet20", shortcut_pad="split"), path, "akamaster")
    after = create_model("resnet20", shortcut_pad="after")
    after.load_state_dict(split.state_dict(), strict=True)  # bypasses load_weights' check
    x = _cifar_batch(8)
    a, b = _logits(split, x), _logits(after, x)
    assert (a - b).abs().max() > 1e-2
