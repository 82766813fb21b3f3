"""The model zoo: every architecture builds and runs, the variants differ as the papers say, bad input is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from repro.models import create_model, default_resolution, list_models, model_kwargs
from repro.models.resnet import ZeroPadShortcut

IMAGENET = ["plain18", "plain34", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
            "mobilenet_v1", "mobilenet_v2"]
CIFAR = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
         "plain20", "plain32", "plain44", "plain56", "plain110"]


def n_params(model: nn.Module) -> int:
    """All learnable parameters."""
    return sum(p.numel() for p in model.parameters())


def test_zoo_lists_every_paper_architecture():
    """list_models names exactly the issue's ImageNet, CIFAR and MobileNet architectures."""
    assert sorted(list_models()) == sorted(IMAGENET + CIFAR)


@pytest.mark.parametrize("name", [n for n in IMAGENET + CIFAR if n != "resnet1202"])
def test_every_model_builds_runs_and_trains(name):
    """Forward at the paper resolution gives finite logits of the right shape and gradients reach conv1."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    r = default_resolution(name)
    x = torch.randn(2, 3, r, r)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_resnet1202_builds_and_runs():
    """The 1202-layer CIFAR net (19.4M params) runs a forward pass."""
    model = create_model("resnet1202").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "plain18", "mobilenet_v1", "mobilenet_v2"])
@pytest.mark.parametrize("size", [96, 130, 640])
def test_imagenet_models_run_at_any_input_size(name, size):
    """Multi-scale testing needs every ImageNet model to run from 96 to 640 pixels (odd sizes too)."""
    model = create_model(name).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 1000)


def test_plain_and_option_a_resnets_have_equal_parameters():
    """Option A shortcuts are parameter-free, so plain-N and ResNet-N(A) match (paper §4.1, §4.2)."""
    assert n_params(create_model("plain18")) == n_params(create_model("resnet18", shortcut="A"))
    assert n_params(create_model("plain34")) == n_params(create_model("resnet34", shortcut="A"))
    for n in (20, 32, 44, 56, 110):
        assert n_params(create_model(f"plain{n}")) == n_params(create_model(f"resnet{n}"))


@pytest.mark.parametrize("name", ["resnet34", "resnet50", "resnet20"])
def test_shortcut_options_order_parameters(name):
    """A < B < C in parameters: B adds projections where dimensions grow, C everywhere."""
    a, b, c = (n_params(create_model(name, shortcut=s)) for s in "ABC")
    assert a < b < c


def test_shortcut_b_projection_counts_by_hand():
    """ResNet-34 B has exactly three 1x1 projections (64->128, 128->256, 256->512) with BN over A."""
    a, b = n_params(create_model("resnet34", shortcut="A")), n_params(create_model("resnet34", shortcut="B"))
    assert b - a == sum(cin * cout + 2 * cout for cin, cout in [(64, 128), (128, 256), (256, 512)])


def test_resnet50_matches_torchvision_parameter_count():
    """ResNet-50 (option B) has torchvision's 25,557,032 parameters."""
    assert n_params(create_model("resnet50")) == 25_557_032


def test_stride_placement_changes_where_the_stride_sits():
    """stride_in_1x1=True strides the first 1x1 (Caffe release); False strides the 3x3 (torchvision)."""
    caffe = create_model("resnet50").layer2[0]
    tv = create_model("resnet50", stride_in_1x1=False).layer2[0]
    assert caffe.conv1.stride == (2, 2) and caffe.conv2.stride == (1, 1)
    assert tv.conv1.stride == (1, 1) and tv.conv2.stride == (2, 2)


def test_option_a_padding_placements_hand_computed():
    """Option A subsamples by 2 and adds zero channels after the identity, or split before and after."""
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    after = ZeroPadShortcut(2, 6, 2, "after")(x)
    split = ZeroPadShortcut(2, 6, 2, "split")(x)
    sub = x[:, :, ::2, ::2]
    assert after.shape == split.shape == (1, 6, 2, 2)
    torch.testing.assert_close(after[:, :2], sub)
    assert after[:, 2:].abs().sum() == 0
    torch.testing.assert_close(split[:, 2:4], sub)
    assert split[:, :2].abs().sum() == 0 and split[:, 4:].abs().sum() == 0


def test_cifar_option_a_paddings_compute_different_functions():
    """The same weights under the two option-A placements give different logits."""
    torch.manual_seed(0)
    a = create_model("resnet20", shortcut_pad="after").eval()
    b = create_model("resnet20", shortcut_pad="split").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))


def test_plain_nets_have_no_shortcuts():
    """Plain nets add nothing to the block output: a block equals relu(bn2(conv2(...)))."""
    model = create_model("plain18").eval()
    block = model.layer2[0]
    x = torch.randn(1, 64, 16, 16)
    with torch.no_grad():
        expected = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x))))))
        torch.testing.assert_close(block(x), expected)
    assert not any(b.downsample is not None for b in model.modules() if hasattr(b, "downsample"))


def test_zero_init_residual_zeroes_last_bn():
    """zero_init_residual makes every residual block start as the identity path."""
    model = create_model("resnet50", zero_init_residual=True)
    assert all(b.bn3.weight.abs().sum() == 0 for layer in (model.layer1, model.layer4) for b in layer)
    assert create_model("resnet50").layer1[0].bn3.weight.abs().sum() > 0


def test_he_initialization_scale():
    """Convs use He init (fan_out): weight std ~ sqrt(2 / (k*k*out_channels))."""
    torch.manual_seed(0)
    conv = create_model("resnet34").layer3[1].conv1  # 3x3, 256 -> 256
    expected = (2.0 / (9 * 256)) ** 0.5
    assert abs(conv.weight.std().item() / expected - 1) < 0.02


def test_mobilenet_v1_variants_structure():
    """Conv MobileNet has no depthwise convs; Shallow drops exactly five 14x14x512 blocks."""
    def convs(m):
        return [c for c in m.modules() if isinstance(c, nn.Conv2d)]

    full = create_model("mobilenet_v1", full_conv=True)
    assert all(c.groups == 1 and c.kernel_size == (3, 3) for c in convs(full))
    assert len(convs(create_model("mobilenet_v1"))) == 27  # 28 layers counting the fc
    assert len(convs(create_model("mobilenet_v1", shallow=True))) == 27 - 10


def test_mobilenet_v1_width_multiplier_channels():
    """alpha thins every layer to max(int(alpha * c), 8)."""
    m = create_model("mobilenet_v1", width_mult=0.25)
    assert m.features[0][0].out_channels == 8 and m.classifier[1].in_features == 256
    assert create_model("mobilenet_v1", width_mult=0.75).classifier[1].in_features == 768


def test_mobilenet_v1_activation_choice():
    """activation=relu uses ReLU, the default relu6 ReLU6."""
    assert any(isinstance(m, nn.ReLU) for m in create_model("mobilenet_v1", activation="relu").modules())
    assert not any(type(m) is nn.ReLU for m in create_model("mobilenet_v1").modules())


def test_mobilenet_v2_width_rounding_and_head():
    """V2 channels are multiples of 8 and the 1280 head is not reduced below width 1.0."""
    for alpha in (0.35, 0.5, 0.75, 1.0, 1.4):
        m = create_model("mobilenet_v2", width_mult=alpha)
        assert all(c.out_channels % 8 == 0 for c in m.modules() if isinstance(c, nn.Conv2d))
        assert m.classifier[1].in_features == (1280 if alpha <= 1 else 1792)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("resnet34", {"shortcut": "D"}, r"shortcut='D'.*\['A', 'B', 'C'\]"),
        ("resnet20", {"shortcut_pad": "middle"}, r"shortcut_pad='middle'.*after.*split"),
        ("mobilenet_v1", {"width_mult": 0}, r"width_mult=0 .*> 0"),
        ("mobilenet_v2", {"width_mult": -1.0}, r"width_mult=-1.0"),
        ("mobilenet_v1", {"activation": "gelu"}, r"activation='gelu'.*relu.*relu6"),
        ("resnet18", {"num_classes": 0}, r"num_classes=0"),
        ("plain34", {"shortcut": "B"}, r"plain34.*shortcut.*valid arguments"),
        ("mobilenet_v2", {"full_conv": True}, r"full_conv.*valid arguments"),
    ],
)
def test_bad_arguments_name_the_valid_choices(name, kwargs, match):
    """Bad arguments raise a ValueError that names what is valid."""
    with pytest.raises(ValueError, match=match):
        create_model(name, **kwargs)


def test_unknown_model_names_valid_choices():
    """An unknown name lists the zoo."""
    with pytest.raises(ValueError, match=r"unknown model 'resnet19'.*resnet18.*mobilenet_v2"):
        create_model("resnet19")


# A value other than the constructor's default for every advertised option (the defaults: see the README table).
NON_DEFAULT = {"shortcut": "C", "stride_in_1x1": False, "num_classes": 7, "zero_init_residual": True,
               "shortcut_pad": "split", "width_mult": 0.5, "full_conv": True, "shallow": True, "activation": "relu",
               "dropout": 0.5}
# (model, option) pairs that change nothing: stride placement only matters in bottleneck blocks.
NO_EFFECT = {("resnet18", "stride_in_1x1"), ("resnet34", "stride_in_1x1")}


def _difference(a: nn.Module, b: nn.Module, size: int) -> str | None:
    """The first way two models differ: state-dict keys or shapes, weights, eval outputs, train outputs; or None."""
    sa, sb = a.state_dict(), b.state_dict()
    if {k: v.shape for k, v in sa.items()} != {k: v.shape for k, v in sb.items()}:
        return "structure"
    if not all(torch.equal(sa[k], sb[k]) for k in sa):
        return "weights"
    x = 20 * torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))  # large: ReLU6 clips
    with torch.no_grad():
        if not torch.equal(a.eval()(x), b.eval()(x)):
            return "eval outputs"
        a, b = copy.deepcopy(a), copy.deepcopy(b)  # a training forward moves the BN statistics
        torch.manual_seed(0)
        ya = a.train()(x)
        torch.manual_seed(0)
        if not torch.equal(ya, b.train()(x)):  # dropout acts in training only
            return "train outputs"
    return None


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", [n for n in IMAGENET + CIFAR if n != "resnet1202"])
def test_model_kwargs_are_constructor_arguments(name):
    """Every advertised option is accepted, and a non-default value changes the model (its layers, weights, or
    function); built from the same seed, the default options give the same model twice."""
    size = 64 if default_resolution(name) == 224 else 32

    def build(**kwargs):
        torch.manual_seed(0)
        return create_model(name, **kwargs)

    base = build()
    assert _difference(base, build(), size) is None
    for option in model_kwargs(name):
        value = NON_DEFAULT[option]
        if name.startswith("mobilenet_v2") and option == "dropout":
            value = 0.0  # V2's default is 0.2
        changed = _difference(base, build(**{option: value}), size)
        if (name, option) in NO_EFFECT:
            assert changed is None, option
        else:
            assert changed, f"{name}: {option}={value!r} changes nothing"
