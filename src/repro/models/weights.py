"""Load the project's own checkpoints and published weights into the zoo's models, refusing any misfit."""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

# format -> what it is and the input preprocessing its weights were trained with
# (pixels scaled to [0, 1], then (x - mean) / std). "repro" checkpoints carry their own.
IMAGENET_MEAN_STD = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
WEIGHT_FORMATS: dict[str, dict[str, Any]] = {
    "repro": {"about": "this project's checkpoints (a dict with a 'model' state dict) or a bare state dict",
              "preprocessing": None},
    "torchvision": {"about": "torchvision ResNet (shortcut=B; stride_in_1x1=False for 50/101/152) and "
                             "MobileNetV2 state dicts", "preprocessing": IMAGENET_MEAN_STD},
    "akamaster": {"about": "akamaster/pytorch_resnet_cifar10 CIFAR ResNets (option A, zeros split "
                           "before/after: shortcut_pad='split')", "preprocessing": IMAGENET_MEAN_STD},
}
_MAX_LISTED = 8


class WeightsError(ValueError):
    """A weights file or state dict that does not fit the model, or cannot be read safely."""


def read_weights_file(source: str | Path | Mapping[str, Any]) -> Mapping[str, Any]:
    """Return the object stored at `source` (read with weights_only=True), or `source` itself."""
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist; pass the path of a checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"refused to read {str(path)!r}: it holds Python objects beyond tensors and plain containers "
            f"(or is corrupted), and weights are only read with weights_only=True (no arbitrary code runs). "
            f"If you trust the file, load it yourself and re-save just its state dict with "
            f"torch.save(state_dict, ...). Details: {_unpickling_detail(e)}"
        ) from None
    except Exception as e:  # torch.load raises RuntimeError, EOFError, KeyError, ... on files it cannot parse
        raise WeightsError(f"cannot read {str(path)!r} as a PyTorch checkpoint (truncated or not a "
                           f"checkpoint?): {type(e).__name__}: {e}") from None
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    return obj


def _unpickling_detail(e: Exception) -> str:
    """The line of torch's weights_only error that names what was refused (not its ANSI-coloured preamble)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
    named = [ln.removeprefix("WeightsUnpickler error: ") for ln in lines if "WeightsUnpickler error" in ln]
    return (named or [ln for ln in lines if ln] or [type(e).__name__])[0]


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the 'module.' (DataParallel/DDP) and '_orig_mod.' (torch.compile) key prefixes."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _require(ok: bool, fmt: str, why: str) -> None:
    """Refuse a model that cannot compute what weights of format `fmt` compute."""
    if not ok:
        raise WeightsError(f"weights.format={fmt!r} needs {why}")


def _convert(model: nn.Module, obj: Mapping[str, Any], fmt: str) -> dict[str, Any]:
    """Turn a stored object of format `fmt` into a state dict with this project's key names."""
    from repro.models.mobilenet import MobileNetV2
    from repro.models.resnet import CifarResNet, ResNet

    if fmt == "repro":
        state = obj["model"] if isinstance(obj.get("model"), Mapping) else obj
        return _strip_prefixes(state)
    if fmt == "torchvision":
        if isinstance(model, ResNet):
            _require(model.residual and model.shortcut == "B", fmt,
                     "a ResNet with shortcut='B' (torchvision has no plain nets and projects only where "
                     "dimensions grow)")
            _require(model.block == "basic" or not model.stride_in_1x1, fmt,
                     "stride_in_1x1=False for ResNet-50/101/152 (torchvision puts the stride on the 3x3 conv)")
        else:
            _require(isinstance(model, MobileNetV2), fmt, "a ResNet (ImageNet) or mobilenet_v2 model")
        return _strip_prefixes(obj)
    if fmt == "akamaster":
        _require(isinstance(model, CifarResNet) and model.residual and model.shortcut == "A"
                 and model.shortcut_pad == "split", fmt,
                 "a CIFAR ResNet (resnet20/32/44/56/110/1202) with shortcut='A' and shortcut_pad='split' "
                 "(akamaster pads the zero channels on both sides)")
        state = obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj
        return {("fc." + k[len("linear."):] if k.startswith("linear.") else k): v
                for k, v in _strip_prefixes(state).items()}
    raise WeightsError(f"weights.format={fmt!r} is not valid; choose one of {list(WEIGHT_FORMATS)}")


def _listing(keys: list[str]) -> str:
    """At most _MAX_LISTED keys, then how many more."""
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def _shape(v: Any) -> str:
    """The shape of a tensor, or the type of anything else."""
    return str(tuple(v.shape)) if isinstance(v, torch.Tensor) else f"a {type(v).__name__}, not a tensor"


def check_state_dict(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Raise a WeightsError naming every missing, unexpected or mis-shaped key of `state` for `model`."""
    own = model.state_dict()
    optional = {k for k in own if k.endswith("num_batches_tracked")}  # old checkpoints lack these
    missing = sorted(set(own) - set(state) - optional)
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(
        f"{k} (file {_shape(state[k])} vs model {tuple(own[k].shape)})"
        for k in set(own) & set(state)
        if not isinstance(state[k], torch.Tensor) or state[k].shape != own[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing from the file ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"not in the model ({len(unexpected)}): {_listing(unexpected)}")
    if bad_shape:
        problems.append(f"shape mismatch ({len(bad_shape)}): {_listing(bad_shape)}")
    if problems:
        raise WeightsError(
            f"the weights do not fit {type(model).__name__}: " + "; ".join(problems)
            + ". Check model=..., its options (num_classes, width_mult, shortcut, ...) and weights.format."
        )


def load_weights(model: nn.Module, source: str | Path | Mapping[str, Any], format: str = "repro") -> nn.Module:
    """Load `source` (a path or a state dict) of `format` (repro|torchvision|akamaster) into `model`, in place."""
    if format not in WEIGHT_FORMATS:
        raise WeightsError(f"weights.format={format!r} is not valid; choose one of {list(WEIGHT_FORMATS)}")
    state = _convert(model, read_weights_file(source), format)
    check_state_dict(model, state)
    model.load_state_dict(state, strict=False)  # strict check done above, old files may lack counters
    return model
