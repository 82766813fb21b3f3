"""`repro-export`: a zoo model, with trained weights in any format `repro-eval` takes or random ones, to ONNX.

The dynamo exporter (`torch.onnx.export(..., dynamo=True)`) writes the graph at the model's resolution with a dynamic
batch dimension; it takes what the PyTorch model takes (normalized float32 NCHW) and returns the logits. Before it
reports success the export checks itself: ONNX Runtime's logits against PyTorch's on real images (ImageNet photos,
or CIFAR-10 test images for the CIFAR nets), max |diff| and top-1 agreement. `export.json` (in the run dir, and
beside the ONNX file as `<name>.json`) holds the preprocessing the graph expects and that check.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from repro.cli import CONFIG_DIR, HYDRA_VERSION_BASE, check_overrides, fail, run_dir, save_run_info
from repro.config import register_configs
from repro.data import DataError, EvalViews, ImageError, Normalize, Preprocessing, load_image
from repro.data.images import is_image_file
from repro.data.transforms import default_eval_size
from repro.eval import resolve_model, sha256
from repro.models import WeightsError, create_model_from_config, default_resolution, load_weights
from repro.models.weights import IMAGENET_MEAN_STD, read_weights_file

log = logging.getLogger("repro.export")

SUFFIXES = {"onnx": ".onnx"}
EXTRA_INSTALL = "pip install -e '.[export]'"
INPUT_NAME, OUTPUT_NAME = "input", "logits"
MAX_BATCH = 4096  # the dynamic batch dimension's upper bound
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data beside the checkout
# The check's images: photos for ImageNet models, CIFAR-10 test images for the CIFAR nets.
CHECK_FOLDERS = {"photos": SHARED_DATA / "imagenet-sample", "cifar": SHARED_DATA / "cifar10-jpeg" / "test"}
NOISY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx")  # an INFO line per rewritten initializer
CHECK_BATCH = 8  # ONNX Runtime runs the check images in batches of this size (and the remainder)


class ExportError(ValueError):
    """An export that cannot run or did not reproduce PyTorch's outputs."""


def require(*modules: str, what: str = "repro-export") -> None:
    """Import `modules` or raise an ExportError naming the missing ones and the command that installs them."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"{what} needs {', '.join(missing)}, which is not installed; install the optional extra "
                          f"with: {EXTRA_INSTALL}")


def versions(*packages: str) -> dict[str, str | None]:
    """Installed versions of `packages` (None when absent)."""
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------------------------------------- the model


@dataclass
class LoadedModel:
    """A model in eval mode, its config, the preprocessing its weights expect and where the weights came from."""

    model: nn.Module
    config: dict[str, Any]
    preprocessing: Preprocessing
    weights: dict[str, Any] | None  # {"path", "format", "sha256"}; None = random initialization


def load_model(cfg: DictConfig) -> LoadedModel:
    """The model of `model=` and `weights.path` / `weights.format`, built as repro-eval builds it (random weights
    and ImageNet's mean/std when weights.path is null)."""
    fmt = cfg.weights.format
    try:
        if cfg.weights.path is None:
            if cfg.model is None:
                fail("no model: give model=NAME (random weights) or weights.path=CHECKPOINT")
            model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
            return LoadedModel(create_model_from_config(model_cfg).eval(), model_cfg,
                               Preprocessing(**{k: tuple(v) for k, v in IMAGENET_MEAN_STD.items()}), None)
        stored = read_weights_file(cfg.weights.path)
        model_cfg, pre = resolve_model(cfg, stored)
        saved = (stored.get("config", {}).get("model") or {}) if fmt == "repro" else {}
        if "num_classes" in saved:  # the checkpoint's classifier (repro-train sets it from its dataset)
            model_cfg["num_classes"] = saved["num_classes"]
        model = load_weights(create_model_from_config(model_cfg), stored, fmt).eval()
    except (ValueError, WeightsError) as e:
        fail(str(e))
    weights = {"path": str(Path(cfg.weights.path).resolve()), "format": fmt, "sha256": sha256(cfg.weights.path)}
    return LoadedModel(model, model_cfg, pre, weights)


def is_cifar(model_cfg: dict[str, Any]) -> bool:
    """A CIFAR net of ResNet §4.2 (the zoo's 32x32 models)."""
    return default_resolution(model_cfg["name"]) == 32


def view_size(model_cfg: dict[str, Any]) -> tuple[int, int]:
    """(resize of the shorter side, center crop) that turns a photo into the model's input, as repro-eval's center
    view: r / 0.875 -> r for ImageNet models; CIFAR nets take the 32x32 image itself."""
    r = model_cfg["resolution"]
    return (r, r) if is_cifar(model_cfg) else default_eval_size(r)


# ---------------------------------------------------------------------------------------------- export


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what the exporter prints to stderr, so stdout stays clean for `format=json`."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def check_out_path(out: Any, fmt: str) -> Path:
    """Refuse an output file that cannot be written, before any work starts; returns it."""
    if out is None:
        raise ExportError(f"give the file to write: export.out=FILE{SUFFIXES[fmt]}")
    path = Path(str(out))
    if path.is_dir():
        raise ExportError(f"export.out={out} is a folder; give a file name inside it, e.g. "
                          f"export.out={path / ('model' + SUFFIXES[fmt])}")
    if path.suffix != SUFFIXES[fmt]:
        raise ExportError(f"export.out={out} must end in {SUFFIXES[fmt]} for export.format={fmt}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"export.out={out}: the folder {parent} does not exist; create it first "
                          f"(mkdir -p {parent}) or choose another path")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"export.out={out}: the folder {parent} is not writable; choose another path")
    return path


def export_onnx(model: nn.Module, resolution: int, path: str | Path, opset: int | None = None) -> Path:
    """Write `model` to ONNX with the dynamo exporter: input `input` [batch, 3, r, r] float32, output `logits`."""
    require("onnx", "onnxscript")
    model = model.eval()
    example = (torch.randn(2, 3, resolution, resolution),)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    kwargs = {} if opset is None else {"opset_version": opset}
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    with stdout_to_stderr(), torch.no_grad():
        program = torch.onnx.export(model, example, dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: batch},), verbose=False, **kwargs)
        program.save(str(path))
    return Path(path)


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session; `threads` sets its intra- and inter-op threads alike (None: its default)."""
    require("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------- self-check


def image_files(folder: Path, count: int) -> list[Path]:
    """`count` image files of `folder` (searched recursively), spread evenly over its sorted list."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p.name))
    if not files:
        raise ExportError(f"export.check_images={folder} holds no images; give a folder of JPEG/PNG images")
    if len(files) <= count:
        return files
    return [files[i * len(files) // count] for i in range(count)]


def check_inputs(loaded: LoadedModel, source: Any, count: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """The check's network inputs (normalized float32 NCHW) and where they came from.

    `source`: a folder of images, or "auto" (the shared ImageNet photos, or CIFAR-10 test images for CIFAR nets;
    random inputs, said so, when that folder is absent). Photos become repro-eval's center view.
    """
    r = loaded.config["resolution"]
    if source == "auto":
        folder = CHECK_FOLDERS["cifar" if is_cifar(loaded.config) else "photos"]
        if not folder.is_dir():
            log.warning("no check images at %s: checking on %d random inputs instead", folder, count)
            x = torch.randn(count, 3, r, r, generator=torch.Generator().manual_seed(0))
            return x, {"source": "random", "images": count}
    else:
        folder = Path(str(source))
        if not folder.is_dir():
            raise ExportError(f"export.check_images={source}: no such folder; give a folder of images or auto")
    resize, crop = view_size(loaded.config)
    views = EvalViews(["center"], resize=resize, crop=crop)
    files = image_files(folder, count)
    try:
        pixels = torch.cat([views(load_image(f), str(f))["center"] for f in files])
    except (ImageError, DataError) as e:
        raise ExportError(str(e)) from None
    with torch.no_grad():
        x = Normalize(loaded.preprocessing)(pixels)
    return x, {"source": str(folder.resolve()), "images": len(files), "resize": resize, "crop": crop}


def compare(model: nn.Module, session: Any, x: torch.Tensor) -> dict[str, Any]:
    """PyTorch's and ONNX Runtime's logits on `x` (ORT in batches of CHECK_BATCH and the rest): max |diff| and the
    share of inputs whose top-1 class agrees."""
    import numpy as np

    with torch.no_grad():
        ref = model.eval()(x).numpy()
    got = np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + CHECK_BATCH].numpy()})[0]
                          for i in range(0, len(x), CHECK_BATCH)])
    if got.shape != ref.shape:
        raise ExportError(f"ONNX Runtime returned logits of shape {got.shape}, PyTorch {ref.shape}")
    return {"max_abs_diff": float(np.abs(got - ref).max()), "max_abs_logit": float(np.abs(ref).max()),
            "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
            "batch_sizes": sorted({len(x[i:i + CHECK_BATCH]) for i in range(0, len(x), CHECK_BATCH)})}


def preprocessing_info(loaded: LoadedModel) -> dict[str, Any]:
    """What turns an RGB photo into the graph's input: the center view, then (x / 255 - mean_image - mean) / std."""
    resize, crop = view_size(loaded.config)
    pre = loaded.preprocessing
    return {"resize_shorter_side": resize, "center_crop": crop, "interpolation": "bilinear", "antialias": True,
            "scale": "1/255", "mean": list(pre.mean), "std": list(pre.std),
            "mean_image": None if pre.mean_image is None else pre.mean_image.float().tolist(),
            "formula": "(rgb / 255 - mean_image - mean) / std per channel (mean_image: [3][H][W] or null)"}


def export_report(loaded: LoadedModel, path: Path, check: dict[str, Any], opset: int | None) -> dict[str, Any]:
    """The content of export.json."""
    r, classes = loaded.config["resolution"], loaded.config.get("num_classes")
    return {"format": "onnx", "file": str(path.resolve()), "model": loaded.config, "weights": loaded.weights,
            "input": {"name": INPUT_NAME, "shape": ["batch", 3, r, r], "dtype": "float32", "layout": "NCHW"},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", classes], "dtype": "float32"},
            "preprocessing": preprocessing_info(loaded), "check": check, "opset": opset,
            "versions": versions("torch", "onnx", "onnxscript", "onnxruntime")}


def run_export(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Refuse bad options, export, check, write export.json to `out_dir` (the run dir) and beside the file; raises
    ExportError if the check fails."""
    path = check_out_path(cfg.export.out, cfg.export.format)
    require("onnx", "onnxscript", "onnxruntime")
    save_run_info(cfg)
    loaded = load_model(cfg)
    log.info("exporting %s at %d x %d to %s", loaded.config["name"], loaded.config["resolution"],
             loaded.config["resolution"], path)
    export_onnx(loaded.model, loaded.config["resolution"], path, cfg.export.opset)
    x, source = check_inputs(loaded, cfg.export.check_images, cfg.export.check_count)
    result = compare(loaded.model, ort_session(path), x)
    passed = result["max_abs_diff"] <= cfg.export.tolerance and result["top1_agreement"] == 1.0
    check = {**source, **result, "tolerance": cfg.export.tolerance, "passed": passed}
    import onnx

    report = export_report(loaded, path, check, cfg.export.opset or onnx.load(str(path)).opset_import[0].version)
    text = json.dumps(report, indent=2) + "\n"
    (out_dir / "export.json").write_text(text)
    path.with_suffix(".json").write_text(text)
    if not passed:
        raise ExportError(f"the ONNX graph does not compute what PyTorch computes on {source['images']} inputs: "
                          f"max |diff| {result['max_abs_diff']:.3g} (tolerance {cfg.export.tolerance:g}), top-1 "
                          f"agreement {result['top1_agreement']:.3f}; {path} and {out_dir / 'export.json'} are kept "
                          f"for inspection")
    return report


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=CONFIG_DIR, config_name="export")
def _export(cfg: DictConfig) -> None:
    """Export the model, check it against PyTorch, print where it went and how well it matches."""
    out_dir = run_dir()
    try:
        report = run_export(cfg, out_dir)
    except ExportError as e:
        fail(str(e))
    c = report["check"]
    print(f"exported {report['model']['name']} to {report['file']} (input {INPUT_NAME} {report['input']['shape']}, "
          f"opset {report['opset']}); ONNX Runtime vs PyTorch on {c['images']} {c['source']} inputs: max |diff| "
          f"{c['max_abs_diff']:.2e}, top-1 agreement {c['top1_agreement']:.0%}")
    print(f"preprocessing and check: {out_dir / 'export.json'}")


def main() -> None:
    """Console entry point of `repro-export`."""
    register_configs()
    check_overrides("export")
    _export()


if __name__ == "__main__":
    main()
