"""`repro-eval`: top-1/top-5 error of a checkpoint under the papers' test protocols (center, 10-crop,
multi-scale, TF-slim's center), on one CPU/GPU or split across torchrun ranks; optionally again after
recomputing the BatchNorm statistics over training images (`eval.bn_recalibrate=N`)."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from repro.cli import (
    CONFIG_DIR,
    HYDRA_VERSION_BASE,
    check_model_name,
    check_overrides,
    fail,
    run_dir,
    save_run_info,
)
from repro.config import register_configs
from repro.data import (
    DataError,
    EvalViews,
    Normalize,
    Preprocessing,
    ShardSampler,
    build_dataset,
    collate,
)
from repro.data.datasets import DATASETS, Subset, spec_of
from repro.distributed import (
    Dist,
    all_reduce_sum,
    broadcast_object,
    cleanup,
    export_slurm_env,
    init_distributed,
    quiet_hydra_on_other_ranks,
    select_device,
)
from repro.models import WEIGHT_FORMATS, WeightsError, create_model_from_config, load_weights
from repro.models.weights import read_weights_file
from repro.scoring import eval_batch_size, evaluate

log = logging.getLogger("repro.eval")

# What a published format's weights compute, applied to the model config (e.g. akamaster's split zero padding).
FORMAT_MODEL_OVERRIDES = {"akamaster": {"shortcut_pad": "split"}, "torchvision": {"stride_in_1x1": False}}
BN_SUFFIX = "_bnrecal"  # metrics.json: "<protocol>_bnrecal" = the same protocol after eval.bn_recalibrate
PREDICTION_COLUMNS = ["path", "protocol", "label", *(f"pred{i}" for i in range(1, 6)),
                      *(f"prob{i}" for i in range(1, 6))]


def sha256(path: str | Path) -> str:
    """Hex digest of a file, to tie results to the exact weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_model(cfg: DictConfig, stored: Mapping[str, Any]) -> tuple[dict, Preprocessing]:
    """The model config (the command line's, else the checkpoint's, with the format's overrides) and the
    preprocessing the weights expect; shared by repro-eval, repro-export and repro-bench."""
    fmt = cfg.weights.format
    saved_cfg = stored.get("config", {}) if fmt == "repro" else {}
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if cfg.model is not None else saved_cfg.get("model")
    if model_cfg is None:
        fail("no model: give model=NAME (e.g. model=resnet50); only repro checkpoints carry their model config")
    for key, value in FORMAT_MODEL_OVERRIDES.get(fmt, {}).items():
        if key in model_cfg and model_cfg[key] != value:
            log.info("weights.format=%s: using model.%s=%s (the function these weights compute)", fmt, key, value)
            model_cfg[key] = value
    if fmt == "repro":
        if "preprocessing" not in stored:
            fail(f"{cfg.weights.path} carries no preprocessing (a bare state dict?); evaluate a checkpoint written "
                 f"by repro-train, or convert it to one with its mean/std")
        pre = Preprocessing.from_dict(stored["preprocessing"])
    else:
        pre = Preprocessing(**{k: tuple(v) for k, v in WEIGHT_FORMATS[fmt]["preprocessing"].items()})
    return model_cfg, pre


def resolve_inputs(cfg: DictConfig, stored: dict[str, Any]) -> tuple[dict, dict, Preprocessing]:
    """The model config, data config and preprocessing: from the command line, else from the checkpoint."""
    saved_cfg = stored.get("config", {}) if cfg.weights.format == "repro" else {}
    model_cfg, pre = resolve_model(cfg, stored)
    given = OmegaConf.to_container(cfg.data, resolve=True) if cfg.data is not None else {"name": "checkpoint"}
    if given["name"] != "checkpoint":
        return model_cfg, given, pre
    if saved_cfg.get("data") is None:
        fail(f"no dataset: give data=NAME (one of {list(DATASETS)}) and its data.root")
    # The checkpoint's data config, with the keys given on the command line (data.split=val, data.batch_size=...).
    changed = {k: v for k, v in given.items() if k != "name" and v is not None}
    return model_cfg, {**saved_cfg["data"], **changed}, pre


def eval_views(cfg: DictConfig, model_cfg: dict, data_cfg: dict) -> EvalViews:
    """The protocols' views; sizes follow the model's resolution (CIFAR: the image itself) unless given."""
    auto_resize, auto_crop = spec_of(data_cfg["name"]).eval_size(model_cfg["resolution"])  # as repro-train's
    resize = size_option("resize", cfg.eval.resize, auto_resize)
    crop = size_option("crop", cfg.eval.crop, auto_crop)
    return EvalViews(protocols=list(cfg.eval.protocols), resize=resize, crop=crop, scales=list(cfg.eval.scales),
                     flip=cfg.eval.flip, interpolation=cfg.eval.interpolation, antialias=cfg.eval.antialias,
                     central_fraction=cfg.eval.central_fraction)


def size_option(key: str, value: Any, auto: int | None) -> int | None:
    """eval.resize / eval.crop: `auto` (from the model's resolution), null (none) or a positive number of pixels."""
    if value == "auto":
        return auto
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"eval.{key}={value!r} is not valid; give a size in pixels (e.g. eval.{key}="
                         f"{256 if key == 'resize' else 224}), auto (from the model's resolution) or null (none)")
    return value


def recalibration_set(data_cfg: Any, split: str, images: int, views: EvalViews) -> Subset:
    """`images` training images (a seeded random sample, in random order so batches mix classes), center view."""
    calib_views = EvalViews(["center"], resize=views.resize, crop=views.crop, interpolation=views.interpolation,
                            antialias=views.antialias)
    ds = build_dataset(data_cfg, split, calib_views)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:images]
    return Subset(ds, order.tolist())


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def recalibrate_bn(model: nn.Module, normalize: Normalize, loader: Any, device: torch.device,
                   on_error: str = "raise", amp: bool = False, dist: Dist | None = None) -> int:
    """Recompute every BN layer's running mean and variance over `loader`'s images, in train mode.

    As the ResNet authors' "exact" BN averages: each layer's statistics are the average over all batches of
    the batch statistics train mode computes (mean; unbiased variance), each batch weighted by its images,
    and over all ranks. The weights are untouched. Returns the number of images used.
    """
    dist = dist or Dist()
    bns = batchnorms(model)
    if not bns:
        raise ValueError("eval.bn_recalibrate: the model has no BatchNorm layers to recalibrate")
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
    model.train()
    normalize.eval()
    seen = 0
    with torch.no_grad():
        for batch in loader:
            for failed in batch["failed"]:
                if on_error == "raise":
                    raise DataError(failed.message)
            if batch["views"] is None:
                continue
            x = normalize(batch["views"]["center"].flatten(0, 1).to(device, non_blocking=True))
            x = x.contiguous(memory_format=torch.channels_last)
            b = x.shape[0]
            for m in bns:  # running = running + b / (seen + b) (batch - running): the image-weighted mean
                m.momentum = b / (seen + b)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                model(x)
            seen += b
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.eval()
    if dist.enabled:  # each rank averaged its own shard: combine, weighted by images
        total = int(all_reduce_sum(torch.tensor(float(seen), device=device), dist))
        for m in bns:
            for buf in (m.running_mean, m.running_var):
                buf.copy_(all_reduce_sum(buf * seen, dist) / max(total, 1))
        seen = total
    if seen == 0:
        raise ValueError("eval.bn_recalibrate: no usable training images to recompute BN statistics on")
    return seen


def check_options(cfg: DictConfig) -> None:
    """Refuse bad option values before any work starts."""
    if cfg.weights.path is None:
        fail(f"give the weights to evaluate: weights.path=FILE (and weights.format={'|'.join(WEIGHT_FORMATS)})")
    if cfg.eval.bn_recalibrate < 0:
        fail(f"eval.bn_recalibrate={cfg.eval.bn_recalibrate} is not valid; give a number of images (0 = off)")
    if cfg.data is not None and cfg.data.batch_size is not None and not cfg.data.batch_size > 0:
        fail(f"data.batch_size={cfg.data.batch_size} is not valid; give the images per evaluation batch, > 0 "
             f"(e.g. data.batch_size=64)")
    scales = list(cfg.eval.scales)
    if "multi_scale" in cfg.eval.protocols and not scales:
        fail("eval.scales=[] leaves multi_scale no scales; give the shorter sides to test at, e.g. "
             "eval.scales=[224,256,384,480,640] (ResNet Table 4), or leave multi_scale out of eval.protocols")
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in scales):
        fail(f"eval.scales={scales} is not valid; give positive shorter sides in pixels, e.g. "
             f"eval.scales=[224,256,384,480,640]")
    check_model_name(cfg.model)


def format_metrics(metrics: dict[str, dict[str, Any]]) -> str:
    """A readable table of the protocols' errors."""
    lines = [f"{'protocol':<12} {'top-1 err %':>11} {'top-5 err %':>11} {'images':>8} {'skipped':>8}"]
    for proto, m in metrics.items():
        lines.append(f"{proto:<12} {m['top1_err']:>11.2f} {m['top5_err']:>11.2f} {m['images']:>8} {m['skipped']:>8}")
    return "\n".join(lines)


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=CONFIG_DIR, config_name="eval")
def _eval(cfg: DictConfig) -> None:
    """Evaluate the weights, print the table, write metrics.json (and predictions.csv) to the run dir."""
    check_options(cfg)
    try:
        export_slurm_env()  # the ranks of a multi-task SLURM job, before the device is chosen by LOCAL_RANK
        device = select_device(cfg.eval.device)
        stored = read_weights_file(cfg.weights.path)
        model_cfg, data_cfg, pre = resolve_inputs(cfg, stored)
        views = eval_views(cfg, model_cfg, data_cfg)
        data_cfg_node = OmegaConf.create(data_cfg)
        dataset = build_dataset(data_cfg_node, data_cfg["split"], views)
        # The model's class count follows the dataset.
        model_cfg["num_classes"] = len(dataset.classes)
        model = load_weights(create_model_from_config(model_cfg), stored, cfg.weights.format)
        calib = (recalibration_set(data_cfg_node, cfg.eval.bn_recalibrate_split, cfg.eval.bn_recalibrate, views)
                 if cfg.eval.bn_recalibrate > 0 else None)
    except (ValueError, DataError, WeightsError) as e:
        fail(str(e))
    d = init_distributed(device)  # also makes the device current on CUDA
    precision = cfg.eval.precision or ("bf16" if cfg.eval.amp else "fp32")
    out = Path(broadcast_object(str(run_dir()), d))
    model.to(device).to(memory_format=torch.channels_last)  # as repro-train evaluates: the same kernels
    normalize = Normalize(pre).to(device)
    batch_size = eval_batch_size(data_cfg["batch_size"], views.protocols)
    if batch_size < data_cfg["batch_size"] and d.is_main:
        log.info("multi_scale: %d images per evaluation batch (data.batch_size=%d), so host memory stays bounded",
                 batch_size, data_cfg["batch_size"])
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=data_cfg["num_workers"],
                        sampler=ShardSampler(len(dataset), d.rank, d.world_size), collate_fn=collate,
                        pin_memory=device.type == "cuda")
    if d.is_main:
        log.info("evaluating %s (%s) on %d images of %s/%s: %s", model_cfg["name"], cfg.weights.path, len(dataset),
                 data_cfg["name"], data_cfg["split"], ", ".join(views.protocols))
    try:
        result = evaluate(model, normalize, loader, device, list(views.protocols), cfg.eval.average,
                          data_cfg["on_error"], dataset.paths if cfg.eval.save_predictions else None,
                          dist=d, progress=cfg.eval.progress, precision=precision)
        if calib is not None:  # ResNet's exact BN averages: recompute them, evaluate again (plain numbers kept)
            calib_loader = DataLoader(calib, batch_size=data_cfg["batch_size"], num_workers=data_cfg["num_workers"],
                                      sampler=ShardSampler(len(calib), d.rank, d.world_size), collate_fn=collate,
                                      pin_memory=device.type == "cuda")
            used = recalibrate_bn(model, normalize, calib_loader, device, data_cfg["on_error"],
                                  precision in ("bf16", "fp16"), d)
            recal = evaluate(model, normalize, loader, device, list(views.protocols), cfg.eval.average,
                             data_cfg["on_error"], dataset.paths if cfg.eval.save_predictions else None,
                             dist=d, progress=cfg.eval.progress, precision=precision)
    except (DataError, ValueError) as e:
        fail(str(e))
    if d.is_main:
        metrics = result.metrics()
        info: dict[str, Any] = {}
        if calib is not None:
            metrics.update({f"{p}{BN_SUFFIX}": m for p, m in recal.metrics().items()})
            result.predictions += [{**r, "protocol": r["protocol"] + BN_SUFFIX} for r in recal.predictions]
            info["bn_recalibrate"] = {"images": used, "split": cfg.eval.bn_recalibrate_split,
                                      "batch_size": data_cfg["batch_size"], "view": "center",
                                      "protocols": [f"{p}{BN_SUFFIX}" for p in views.protocols]}
        resolved = {**OmegaConf.to_container(cfg, resolve=True), "model": model_cfg, "data": data_cfg}
        weights = {"path": str(Path(cfg.weights.path).resolve()), "format": cfg.weights.format,
                   "sha256": sha256(cfg.weights.path)}
        save_run_info(OmegaConf.create(resolved), weights=weights)
        (out / "metrics.json").write_text(json.dumps({**metrics, **info, "eval_precision": precision,
                                                      "weights": weights, "config": resolved}, indent=2))
        if cfg.eval.save_predictions:
            rows = sorted(result.predictions, key=lambda r: (r["protocol"], r["path"]))
            # File names that are not UTF-8 are written back byte for byte (os.fsdecode's surrogateescape).
            with open(out / "predictions.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
                writer = csv.DictWriter(f, fieldnames=PREDICTION_COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
        if result.skipped:
            log.warning("skipped %d unusable images (data.on_error=skip), e.g. %s", len(result.skipped),
                        result.skipped[0][1])
        print(format_metrics(metrics))
        print(f"metrics: {out / 'metrics.json'}")
    cleanup(d)


def main() -> None:
    """Console entry point of `repro-eval`."""
    register_configs()
    check_overrides("eval")
    quiet_hydra_on_other_ranks()
    _eval()


if __name__ == "__main__":
    main()
