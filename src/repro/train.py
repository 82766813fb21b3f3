"""`repro-train`: train a model with a paper's recipe, on CPU, one GPU, or many under torchrun.

One loop: `train_one_epoch` (device-side augmentation, AMP, accumulation, checkpoints) and `evaluate`
(repro.engine). Everything a run writes goes under its run dir `outputs/train/<name>/`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from repro.cli import (
    CONFIG_DIR,
    HYDRA_VERSION_BASE,
    check_model_name,
    check_overrides,
    claim_run_dir,
    fail,
    git_commit,
    resume_args,
    run_dir,
    save_run_info,
    unlock_all,
)
from repro.config import plain, register_configs
from repro.data import DataError, EvalViews, Normalize, Preprocessing, ShardSampler, build_dataset, collate
from repro.data.datasets import DATASET_SPLITS, DATASETS, IN_MEMORY, ImageTensors, Subset, shared_images
from repro.data.device_decode import DeviceDecode, EncodedFiles
from repro.data.loaders import BatchPadCrop, EpochSampler, SeededSamples, TensorBatches, sample_seed
from repro.data.transforms import PadCrop, RandomResizedCrop, ScaleAugCrop, default_eval_size
from repro.distributed import (
    Dist,
    all_reduce_sum,
    broadcast_object,
    broadcast_state,
    cleanup,
    export_slurm_env,
    gather_objects,
    init_distributed,
    launched_rank,
    peer_lost,
    quiet_hydra_on_other_ranks,
    select_device,
    silent_ranks,
)
from repro.engine import evaluate
from repro.models import create_model_from_config
from repro.optim import LRSchedule, build_optimizer

log = logging.getLogger("repro.train")


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or Inf."""


class WriteError(RuntimeError):
    """A file of the run could not be written (disk full, read-only, ...); the message says what is kept."""


# ------------------------------------------------------------------------------------------------- data


@dataclass
class TrainData:
    """What the loop reads: the training batches, how to finish them on the device, the evaluation sets."""

    loader: Any  # yields {"views": uint8 batch, "labels", ...}; has .sampler (EpochSampler)
    batch_aug: nn.Module | None  # device-side augmentation of in-memory data (CIFAR pad/crop/flip)
    preprocessing: Preprocessing
    val: Any | None  # the per-epoch evaluation split (`val_split`), or None
    test: Any | None  # the split of the final evaluation (`test_split`), or None
    classes: list[str]
    eval_size: tuple[int | None, int | None]  # (resize, crop) of the test views
    decoder: DeviceDecode | None = None  # data.decode=gpu: the loader leaves JPEG bytes, decoded on the device
    skipped: list[str] = field(default_factory=list)  # training files left out when decoded into memory (skip)


def _tensors(cfg: DictConfig, split: str) -> ImageTensors:
    """An in-memory split: digits, CIFAR arrays, or CIFAR image folders decoded once."""
    ds = build_dataset(cfg.data, split)
    base = ds.base if isinstance(ds, Subset) else ds
    if isinstance(base, ImageTensors):
        idx = torch.tensor(ds.indices) if isinstance(ds, Subset) else torch.arange(len(ds))
        return ImageTensors(base.images[idx], list(ds.labels), ds.classes, list(ds.paths))
    # Image folders (e.g. CIFAR as JPEGs): decode every image once, in parallel workers.
    loader = DataLoader(ds, batch_size=512, num_workers=cfg.data.num_workers, collate_fn=collate)
    chunks, labels, paths, skipped = [], [], [], []
    hide = not cfg.trainer.progress or launched_rank() != 0  # one bar under torchrun: rank 0's
    for batch in tqdm(loader, desc=f"decoding {split}", unit="batch", disable=hide):
        for f in batch["failed"]:
            if cfg.data.on_error == "raise":
                raise DataError(f.message)
            skipped.append((f.path, f.message))
        if batch["views"] is None:  # every image of this chunk was unusable
            continue
        chunks.append(batch["views"])
        labels += batch["labels"].tolist()
        paths += [ds.paths[i] for i in batch["indices"].tolist()]
    if skipped:
        log.warning("%s: skipped %d unusable images of %d (data.on_error=skip; counted as skipped), e.g. %s",
                    split, len(skipped), len(ds), skipped[0][1])
    if not chunks:
        raise DataError(f"no usable image in the {split} split of data={cfg.data.name} ({len(ds)} files, all "
                        f"unusable), e.g. {skipped[0][1] if skipped else ''}")
    return ImageTensors(torch.cat(chunks), labels, ds.classes, paths, skipped=skipped)


def _file_transform(aug: Any, crop: int) -> Any:
    """Per-sample uint8 training transform for images read from files."""
    if aug.train == "scale_aug":
        return ScaleAugCrop(crop, aug.min_size, aug.max_size, aug.flip)
    if aug.train in ("inception", "mobilenet"):
        return RandomResizedCrop(crop, tuple(aug.scale), flip=aug.flip)
    if aug.train == "pad_crop":
        return PadCrop(crop, aug.pad, aug.flip)
    raise ValueError("recipe.augment.train=none needs an in-memory dataset (cifar10, cifar100, digits)")


def _test_set(cfg: DictConfig, views: EvalViews, in_memory: bool) -> Any:
    """The split evaluated at the end (`test_split`), or None; a missing one names `test_split=null` as a way out."""
    try:
        return _eval_set(cfg, cfg.test_split, views, in_memory)
    except DataError as e:
        raise DataError(f"test_split={cfg.test_split!r}: {e} (test_split=null reports the val split instead)"
                        ) from None


def _eval_set(cfg: DictConfig, split: str | None, views: EvalViews, in_memory: bool) -> Any:
    """An evaluation split with test views (decoded into memory for small data), or None for null."""
    if not split:
        return None
    if not in_memory:
        return build_dataset(cfg.data, split, views)
    ds = _tensors(cfg, split)
    ds.transform = views
    return ds


def build_data(cfg: DictConfig, resolution: int, batch: int, d: Dist, device: torch.device) -> TrainData:
    """Training loader (`batch` images per process), device augmentation, preprocessing and evaluation sets."""
    aug = cfg.recipe.augment
    crop = resolution if aug.crop == "auto" else aug.crop
    small = cfg.data.name in IN_MEMORY
    resize, eval_crop = (None, None) if small else default_eval_size(resolution)
    views = EvalViews(["center"], resize=resize, crop=eval_crop)
    mean_image, decoder = None, None
    if small:
        train = _tensors(cfg, cfg.train_split)
        if aug.per_pixel_mean:  # ResNet §4.2: the training split's mean image, kept with the run
            mean_image = train.images.float().mean(0) / 255.0
        sampler = EpochSampler(len(train.labels), batch, cfg.seed, d.rank, d.world_size,
                               multiple=cfg.trainer.grad_accum)
        # The uint8 training set lives on the device (once), so a step copies nothing from the host.
        loader: Any = TensorBatches(train.images.to(device), train.labels, sampler)
        batch_aug = BatchPadCrop(crop, aug.pad, aug.flip).to(device) if aug.train == "pad_crop" else None
        if aug.train not in ("pad_crop", "none"):
            raise ValueError(f"recipe.augment.train={aug.train} is for image files; use pad_crop or none with "
                             f"data={cfg.data.name}")
        classes = train.classes
    else:
        if aug.per_pixel_mean:
            raise ValueError("recipe.augment.per_pixel_mean needs an in-memory dataset (CIFAR); use mean/std")
        transform = _file_transform(aug, crop)
        base = build_dataset(cfg.data, cfg.train_split, transform)
        if cfg.data.decode == "gpu":  # workers read bytes and draw each crop from the header; decoded on the GPU
            base, decoder = EncodedFiles(base, transform), DeviceDecode(transform, device)
        sampler = EpochSampler(len(base), batch, cfg.seed, d.rank, d.world_size, multiple=cfg.trainer.grad_accum)
        workers = cfg.data.num_workers
        loader = DataLoader(SeededSamples(base, cfg.seed), batch_size=batch, sampler=sampler, collate_fn=collate,
                            num_workers=workers, pin_memory=device.type == "cuda", drop_last=True,
                            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
        batch_aug, classes = None, base.classes
    val = _eval_set(cfg, cfg.val_split, views, small)
    test = _test_set(cfg, views, in_memory=small)
    pre = Preprocessing(tuple(aug.mean), tuple(aug.std), mean_image)
    skipped = [path for path, _ in train.skipped] if small else []
    return TrainData(loader, batch_aug, pre, val, test, classes, (resize, eval_crop), decoder, skipped)


# ----------------------------------------------------------------------------------------------- state


@dataclass
class Progress:
    """Where the run is: optimizer steps done, epoch, micro-batches done in that epoch, best val error."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    best_err: float = math.inf
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped: set[str] = field(default_factory=set)  # training images skipped (data.on_error=skip), every rank's


@dataclass
class Run:
    """Everything the loop touches."""

    cfg: DictConfig
    model: nn.Module  # possibly DDP/compiled
    raw: nn.Module  # the plain model (state dicts, evaluation)
    ema: Any
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: torch.amp.GradScaler
    normalize: Normalize
    criterion: nn.Module
    data: TrainData
    device: torch.device
    amp_dtype: torch.dtype | None
    total_steps: int
    steps_per_epoch: int
    dist: Dist
    out: Path
    progress: Progress
    writer: Any = None
    stop_signal: str | None = None  # set by the signal handler of this process
    stopping: bool = False  # every rank agreed to stop (see agree_to_stop)
    commit: str | None = None  # the git commit, read once per run
    last_save: float = field(default_factory=time.monotonic)  # when checkpoints/last.pt was last written
    resume_hint: str = ""  # the arguments that continue this run dir (rank 0's, the same on every rank)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s random streams (augmentation, dropout): `seed` itself on rank 0."""
    return seed + 1_000_003 * rank


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's Python, torch CPU and CUDA (its own device's only) generator states."""
    cuda = device is not None and device.type == "cuda"
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if cuda else None}


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore `rng_state()` (older checkpoints' list of every GPU's state: this device's entry, if it has one)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if isinstance(cuda, list):
        cuda = cuda[device.index or 0] if device is not None and len(cuda) > (device.index or 0) else None
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def restore_rng(ck: dict[str, Any], run: Run) -> None:
    """Each rank takes its own saved generator states; when the world size changed, rank 0 takes rank 0's and
    the others reseed from (seed, step, rank), so no two ranks share a stream (logged)."""
    d, states = run.dist, ck.get("rng_ranks") or [ck["rng"]]
    if len(states) == d.world_size:
        set_rng_state(states[d.rank], run.device)
        return
    if d.is_main:
        log.warning("resuming on %d processes a run saved on %d: rank 0 continues rank 0's random streams, the "
                    "others start new ones seeded from (seed, step, rank)", d.world_size, len(states))
    if d.rank == 0:
        set_rng_state(states[0], run.device)
        return
    s = rank_seed(run.cfg.seed * 1_000_033 + ck["progress"]["step"], d.rank)
    random.seed(s)
    torch.manual_seed(s)


def checkpoint(run: Run, ranks_rng: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The checkpoint dict: weights (`model`), the state to resume, and what evaluation needs."""
    ranks_rng = ranks_rng or [rng_state(run.device)]
    cfg = plain(run.cfg)  # choices as plain strings: torch.load(weights_only=True) reads them
    p = run.progress
    return {
        "model": run.raw.state_dict(),
        "ema": run.ema.module.state_dict() if run.ema is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "schedule": run.schedule.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": ranks_rng[0],  # rank 0's (as a single-process run's)
        "rng_ranks": ranks_rng,  # every rank's own, in rank order
        "progress": {"step": p.step, "epoch": p.epoch, "batch": p.batch, "best_err": p.best_err,
                     "history": p.history, "skipped": sorted(p.skipped)},
        "config": {"model": cfg["model"], "data": cfg["data"], "recipe": cfg["recipe"], "seed": cfg["seed"]},
        "preprocessing": run.data.preprocessing.to_dict(),
        "git_commit": run.commit,
    }


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind an exception (torch.save wraps a failed write in a RuntimeError), if any."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def save_atomic(obj: dict[str, Any], path: Path, kept: Path | None = None) -> None:
    """torch.save to a temporary file, fsync, then rename: a kill or a full disk mid-write leaves the previous file.

    A failed write removes the partial file and raises WriteError naming the problem and `kept` (default: `path`),
    the last good checkpoint.
    """
    kept = kept or path
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        cause = _os_error(e)
        where = (f"the last good checkpoint is kept at {kept}" if kept.is_file() else
                 "no checkpoint was written yet")
        if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            raise WriteError(f"no space left on {path.parent}; {where}. Free some space and continue with "
                             f"resume=auto") from None
        why = cause.strerror if cause is not None and cause.strerror else str(e).splitlines()[0]
        raise WriteError(f"cannot write {path} ({why}); {where}") from None


def kept_checkpoint(run: Run) -> str:
    """What a failed run leaves to resume from, for its error message."""
    path = run.out / "checkpoints" / "last.pt"
    if path.is_file():
        return f"The last good checkpoint is kept at {path}"
    return "No checkpoint was written yet"


def save(run: Run, name: str) -> None:
    """Write checkpoints/<name>.pt from rank 0, never with non-finite weights (every rank checks them)."""
    state = run.raw.state_dict()
    floats = [v for v in state.values() if v.is_floating_point()]
    if floats and not bool(torch.stack([torch.isfinite(v).all() for v in floats]).all()):
        raise NonFiniteLoss(f"the training loss diverged: the weights are not finite at step {run.progress.step}; "
                            f"stopping. {kept_checkpoint(run)}; lower the lr or check the data")
    sync_state(run)
    # Collective (every rank calls save()): each rank's generator states, and the skipped images of all ranks.
    gathered = gather_objects((rng_state(run.device), sorted(run.progress.skipped)), run.dist)
    ranks_rng = [g[0] for g in gathered]
    run.progress.skipped = {path for g in gathered for path in g[1]}
    if run.dist.is_main:
        save_atomic(checkpoint(run, ranks_rng), run.out / "checkpoints" / f"{name}.pt",
                    kept=run.out / "checkpoints" / "last.pt")
    if name == "last":
        run.last_save = time.monotonic()


def sync_state(run: Run) -> None:
    """Rank 0's BN running statistics (and the weight average) on every rank, as the checkpoint holds them.

    DDP broadcasts buffers only at a training forward, so each rank would otherwise evaluate with its own
    last batches' statistics. Called before every evaluation and save (a no-op on one process).
    """
    broadcast_state(run.raw, run.dist)
    if run.ema is not None:
        broadcast_state(run.ema.module, run.dist)


CHECKPOINT_KEYS = ("model", "optimizer", "schedule", "scaler", "progress", "config")


def read_checkpoint(path: Path, hint: str = "resume=auto") -> dict[str, Any] | None:
    """The checkpoint at `path` to resume from (None when there is none); an unreadable or foreign file is kept as
    it is and refused with a ValueError naming the ways out."""
    if not path.is_file():
        return None
    way_out = (f"it is kept as it is. Move it away (e.g. mv {path} {path}.bad) and rerun with {hint} to start this "
               f"run dir from step 0, or start a new run with another name=")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, a foreign pickle refused by weights_only, an empty file, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{path} cannot be read as a checkpoint ({type(e).__name__}: {reason}); {way_out}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing or not isinstance(ck["config"], dict) or "model" not in ck["config"]:
        raise ValueError(f"{path} is not a repro-train checkpoint (it lacks {missing or ['config.model']}); "
                         f"{way_out}")
    return ck


def resume(run: Run, ck: dict[str, Any] | None = None) -> bool:
    """Load checkpoints/last.pt of this run dir (or `ck`, read from it) into the run; False when there is none."""
    path = run.out / "checkpoints" / "last.pt"
    ck = ck if ck is not None else read_checkpoint(path, run.resume_hint or "resume=auto")
    if ck is None:
        return False
    saved, current = ck["config"]["model"], OmegaConf.to_container(run.cfg.model, resolve=True)
    if saved["name"] != current["name"]:
        raise ValueError(f"{path} holds a {saved['name']} run but model={current['name']}; "
                         f"resume with the same config or pick a new name=")
    changed = [f"model.{k}={saved.get(k)!r} there, {current.get(k)!r} here" for k in sorted({*saved, *current})
               if saved.get(k) != current.get(k)]
    if changed:
        raise ValueError(f"{path} holds a {saved['name']} run with other settings ({'; '.join(changed)}); "
                         f"resume with the same config or pick a new name=")
    run.raw.load_state_dict(ck["model"])
    if run.ema is not None and ck["ema"] is not None:
        run.ema.module.load_state_dict(ck["ema"])
    try:
        run.optimizer.load_state_dict(ck["optimizer"])
    except ValueError as e:
        raise ValueError(f"{path} holds a run with another optimizer ({e}); resume with the same recipe or pick "
                         f"a new name=") from None
    run.schedule.load_state_dict(ck["schedule"])
    run.scaler.load_state_dict(ck["scaler"])
    restore_rng(ck, run)
    p = ck["progress"]
    run.progress = Progress(p["step"], p["epoch"], p["batch"], p["best_err"], p["history"], set(p.get("skipped", [])))
    return True


# ------------------------------------------------------------------------------------------------ loop


def train_one_epoch(run: Run) -> None:
    """Train from the current position to the end of the epoch (or of the run, or a stop signal)."""
    p, cfg, dev = run.progress, run.cfg, run.device
    accum = cfg.trainer.grad_accum
    run.model.train()
    run.normalize.train()
    run.data.loader.sampler.set_epoch(p.epoch, p.batch)
    loss_sum = torch.zeros((), device=dev)
    wrong = torch.zeros((), device=dev)
    seen, micro, t0 = 0, 0, time.perf_counter()
    bar = tqdm(total=run.steps_per_epoch, initial=p.batch // accum, desc=f"epoch {p.epoch}", unit="step",
               disable=not (cfg.trainer.progress and run.dist.is_main), dynamic_ncols=True)
    skipped_before = len(p.skipped)
    for batch in run.data.loader:
        if run.data.decoder is not None:  # data.decode=gpu: the loader left JPEG bytes; decode and crop on the device
            batch = run.data.decoder(batch)
        items = batch["views"]
        if batch["failed"]:
            skip_failed(run, batch["failed"])
        if items is None:  # every image of this micro-batch was unusable (and skipped)
            drop_empty_batch(run, batch["failed"])
            continue
        # Move the uint8 batch to the device (there already when decoded there); augment there when the loader
        # left it to us.
        x = items.to(dev, non_blocking=True)
        y = batch["labels"].to(dev, non_blocking=True)
        if run.data.batch_aug is not None:
            x = run.data.batch_aug(x, sample_seed(rank_seed(cfg.seed, run.dist.rank), p.epoch, p.batch))
        # Normalize (and PCA-light) on the device, in channels_last (faster on CUDA and on CPU alike).
        x = run.normalize(x)
        if cfg.trainer.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Forward and loss under autocast (a no-op when AMP is off); DDP syncs only on the last micro-batch.
        last_micro = (p.batch + 1) % accum == 0
        sync = run.model.no_sync() if (run.dist.enabled and not last_micro) else contextlib.nullcontext()
        with sync:
            with torch.autocast(dev.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
                logits = run.model(x)
                loss = run.criterion(logits.float(), y)
            run.scaler.scale(loss / accum).backward()
        loss_sum += loss.detach()
        wrong += (logits.detach().argmax(1) != y).sum()
        seen += y.numel()
        micro += 1
        p.batch += 1
        if not last_micro:
            continue
        # Optimizer step at the schedule's lr, then the weight average.
        lr = run.schedule.apply(run.optimizer, p.step)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        if run.ema is not None:
            run.ema.update(run.raw, step=p.step)
        p.step += 1
        bar.update(1)
        # Act on a stop signal (or the checkpoint interval) at a step every rank agrees on (at once alone; at log
        # steps under DDP).
        at_log = p.step % cfg.trainer.log_every == 0 or p.step >= run.total_steps
        stop, due = agree_to_stop(run) if (at_log or not run.dist.enabled) else (False, False)
        at_save = p.step % cfg.trainer.checkpoint_every == 0 or due
        # Check the loss before anything is saved (every step on CPU), log, and apply the warm-up rule: on the
        # counts of every rank (summed), so every rank stops on a non-finite loss and leaves warm-up together.
        if at_log or at_save or stop or dev.type == "cpu":
            totals = all_reduce_sum(torch.stack([loss_sum, wrong, torch.tensor(float(seen), device=dev),
                                                 torch.tensor(float(micro), device=dev)]).double(), run.dist)
            g_loss, g_wrong, g_seen, g_micro = totals.tolist()
            mean_loss = g_loss / max(1.0, g_micro)
            if not math.isfinite(mean_loss):
                raise NonFiniteLoss(f"the training loss is {mean_loss} at step {p.step} (lr {lr:g}); stopping. "
                                    f"{kept_checkpoint(run)}; lower the lr or check the data")
            if at_log:
                err = 100.0 * g_wrong / max(1.0, g_seen)
                rate = g_seen / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{mean_loss:.3f}", err=f"{err:.1f}%", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
                if run.schedule.observe_train(p.step, err):
                    log.info("warm-up over at step %d (training error %.1f%%)", p.step, err)
                if run.writer is not None:
                    run.writer.add_scalar("train/loss", mean_loss, p.step)
                    run.writer.add_scalar("train/err", err, p.step)
                    run.writer.add_scalar("train/lr", lr, p.step)
                    run.writer.add_scalar("train/images_per_s", rate, p.step)
                loss_sum.zero_()
                wrong.zero_()
                seen, micro, t0 = 0, 0, time.perf_counter()
        if at_save:
            save(run, "last")
        if stop or p.step >= run.total_steps:
            break
    bar.close()
    if len(p.skipped) > skipped_before:
        log.warning("epoch %d: unusable training images skipped (data.on_error=skip): %d distinct so far, counted as "
                    "\"train_skipped\" in metrics.json", p.epoch, len(p.skipped))
    agree_to_stop(run)  # a signal that came late in the epoch: every rank decides alike before evaluating
    if p.batch >= run.data.loader.sampler.batches:  # the epoch is complete
        p.epoch, p.batch = p.epoch + 1, 0


def skip_failed(run: Run, failed: list[Any]) -> None:
    """Unusable training images: stop naming the first (data.on_error=raise), or remember them as skipped."""
    if run.cfg.data.on_error == "raise":
        raise DataError(failed[0].message)
    for f in failed:
        if f.path not in run.progress.skipped:
            log.warning("skipping %s", f.message.split(". Replace or remove")[0])
            run.progress.skipped.add(f.path)


def drop_empty_batch(run: Run, failed: list[Any]) -> None:
    """A micro-batch whose every image was skipped: it adds nothing; its optimizer step is dropped with it.

    Under torchrun the other ranks would wait for this rank's gradients, so it stops instead, naming the files.
    """
    p = run.progress
    if run.dist.enabled:
        raise DataError(f"every image of a training batch of rank {run.dist.rank} is unusable (e.g. "
                        f"{failed[0].path if failed else '?'}); under torchrun a rank cannot leave out a whole batch: "
                        f"remove or replace the files (data.on_error=skip then skips the rest)")
    log.warning("epoch %d: a training batch had no usable image; its step is dropped", p.epoch)
    p.batch += 1
    if p.batch % run.cfg.trainer.grad_accum == 0:  # the step's last micro-batch: drop the step's gradients too
        run.optimizer.zero_grad(set_to_none=True)


def agree_to_stop(run: Run) -> tuple[bool, bool]:
    """(stop for a signal, write last.pt for the time interval), the same on every rank (collective under DDP).

    Stop when any rank got a signal; the interval (`trainer.checkpoint_every_s`) runs on rank 0's clock.
    """
    got = run.stop_signal is not None
    every = run.cfg.trainer.get("checkpoint_every_s")
    due = bool(every) and run.dist.is_main and time.monotonic() - run.last_save >= every
    if run.dist.enabled:
        flags = all_reduce_sum(torch.tensor([float(got), float(due)], device=run.device), run.dist)
        got, due = bool(flags[0] > 0), bool(flags[1] > 0)
    run.stopping = got
    return got, due


def validate(run: Run, ds: Any, protocols: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Top-1/top-5 error of the model (and of its weight average) on an evaluation set, center view by default."""
    protocols = protocols or ["center"]
    sync_state(run)  # every rank evaluates the model the checkpoint holds
    resize, crop = run.data.eval_size
    ds.transform = EvalViews(protocols, resize=resize, crop=crop)
    loader = DataLoader(ds, batch_size=run.cfg.data.batch_size, num_workers=0 if isinstance(ds, ImageTensors)
                        else run.cfg.data.num_workers, sampler=ShardSampler(len(ds), run.dist.rank,
                        run.dist.world_size), collate_fn=collate, pin_memory=run.device.type == "cuda")
    on_error = run.cfg.data.on_error
    precision = run.cfg.trainer.get("eval_precision", "fp32")
    out = evaluate(run.raw, run.normalize, loader, run.device, protocols, on_error=on_error, dist=run.dist,
                   progress=False, precision=precision).metrics()
    if run.ema is not None:  # the released MobileNetV2 recipe reports the averaged weights
        ema = evaluate(run.ema.module, run.normalize, loader, run.device, protocols, on_error=on_error,
                       dist=run.dist, progress=False, precision=precision).metrics()
        out = {**ema, **{f"{p}_noema": m for p, m in out.items()}}
    decoded = len(getattr(ds, "skipped", []))  # files left out when the split was decoded into memory (every rank)
    for m in out.values():
        m["skipped"] += decoded
    return out


def chooses_best(cfg: DictConfig) -> bool:
    """Whether best.pt is kept: only on a validation split, never chosen on the reported test split."""
    return bool(cfg.val_split) and cfg.val_split != cfg.test_split


def after_epoch(run: Run) -> None:
    """Evaluate on `val_split` (if any), feed the plateau schedule, log under the split's name, keep checkpoints."""
    p, split = run.progress, run.cfg.val_split
    if run.data.val is None:  # val_split=null: no per-epoch evaluation; the final weights are reported
        save(run, "last")
        return
    metrics = validate(run, run.data.val)
    err, err5 = metrics["center"]["top1_err"], metrics["center"]["top5_err"]
    run.schedule.observe_val(err)
    record = {"epoch": p.epoch, "step": p.step, "lr": run.schedule.lr(p.step), "split": split, split: metrics}
    p.history.append(record)
    if run.dist.is_main:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if run.writer is not None:
            run.writer.add_scalar(f"{split}/top1_err", err, p.step)
            run.writer.add_scalar(f"{split}/top5_err", err5, p.step)
        log.info("epoch %d step %d: %s top-1 err %.2f%%, top-5 err %.2f%%", p.epoch, p.step, split, err, err5)
    if chooses_best(run.cfg) and err < p.best_err:
        p.best_err = err
        save(run, "best")
    save(run, "last")


# ---------------------------------------------------------------------------------------------- set-up


def check_config(cfg: DictConfig) -> None:
    """Refuse bad option values before any work starts."""
    if cfg.data.name == "checkpoint":
        fail(f"data=checkpoint is repro-eval's (a checkpoint's own dataset); repro-train needs one of "
             f"{list(DATASETS)}, e.g. data=cifar10 data.root=DIR")
    positive = {"recipe.batch_size": cfg.recipe.batch_size, "recipe.lr_batch_size": cfg.recipe.lr_batch_size,
                "data.batch_size": cfg.data.batch_size, "trainer.grad_accum": cfg.trainer.grad_accum,
                "trainer.checkpoint_every": cfg.trainer.checkpoint_every, "trainer.log_every": cfg.trainer.log_every,
                "trainer.max_steps": cfg.trainer.max_steps, "trainer.max_epochs": cfg.trainer.max_epochs,
                "recipe.optimizer.lr": cfg.recipe.optimizer.lr}
    for key, value in positive.items():
        if value is not None and not value > 0:
            fail(f"{key}={value} is not valid; it must be > 0")
    splits = DATASET_SPLITS.get(cfg.data.name)
    for key in ("train_split", "val_split", "test_split"):
        if splits is not None and cfg[key] is not None and cfg[key] not in splits:
            hint = "; test_split=null reports the val split instead" if key == "test_split" else ""
            fail(f"{key}={cfg[key]!r} is not a split of data={cfg.data.name}; choose one of {list(splits)}{hint}")
    if cfg.data.name in IN_MEMORY and set(cfg.final_protocols) - {"center"}:
        fail(f"data={cfg.data.name} is evaluated on the image itself: final_protocols=[center] only")
    if cfg.data.decode == "gpu" and cfg.data.name not in ("imagenet", "folder"):
        fail(f"data.decode=gpu decodes training image files (data=imagenet or data=folder) on the GPU; "
             f"data={cfg.data.name} has none to decode there: use data.decode=cpu")
    if cfg.data.decode == "gpu" and cfg.trainer.device == "cpu":
        fail("data.decode=gpu needs a GPU (trainer.device=cuda or auto on a GPU machine); use data.decode=cpu")
    if not cfg.trainer.dist_timeout_s > 0:
        fail(f"trainer.dist_timeout_s={cfg.trainer.dist_timeout_s} is not valid; give seconds > 0 (default 1800)")
    check_model_name(cfg.model)
    problem = crop_problem(cfg)
    if problem:
        fail(problem)
    try:  # the model's arguments, checked without allocating its weights
        with torch.device("meta"):
            create_model_from_config(OmegaConf.to_container(cfg.model, resolve=True))
    except ValueError as e:
        fail(str(e))


CIFAR_SIZE = 32


def crop_problem(cfg: DictConfig) -> str | None:
    """Why the training crop cannot be cut from the data's images (fixed-size data only), or None.

    CIFAR and digits are evaluated on the image itself and trained on padded crops of it, so the model's
    resolution (or recipe.augment.crop) must fit the image with its padding (model=resnet50 data=cifar10: 224 > 40).
    """
    name = cfg.data.name
    if name not in IN_MEMORY and name != "synthetic":
        return None  # image files of any size, resized
    aug = cfg.recipe.augment
    if name == "synthetic" and aug.train != "pad_crop":
        return None  # resized crops fit any image
    size = CIFAR_SIZE if name in ("cifar10", "cifar100") else int(cfg.data.image_size)
    crop = cfg.model.resolution if aug.crop == "auto" else aug.crop
    pad = aug.pad if aug.train == "pad_crop" else 0
    if crop <= size + 2 * pad:
        return None
    what = f"model.resolution={crop}" if aug.crop == "auto" else f"recipe.augment.crop={crop}"
    fix = (f"use a model made for {size}x{size} images (model=resnet20 ... resnet1202, plain20 ... plain110) or "
           f"model.resolution={size}" if aug.crop == "auto" else f"set recipe.augment.crop={size}")
    return (f"model={cfg.model.name} would train on {crop}x{crop} crops ({what}) but data={name}'s images are "
            f"{size}x{size} ({size + 2 * pad} with the padding); {fix}")


def check_splits(cfg: DictConfig) -> None:
    """Refuse evaluation splits that hold training images (listed, not decoded), or no evaluation at all."""
    if not cfg.val_split and not cfg.test_split:
        raise ValueError("val_split=null and test_split=null leave nothing to evaluate; set test_split (reported at "
                         "the end) or val_split")
    if not cfg.val_split and cfg.recipe.schedule.name == "plateau":
        raise ValueError("recipe.schedule.name=plateau decays on the validation error but val_split=null; set "
                         "val_split to a held-out split")
    for key in ("val_split", "test_split"):
        split = cfg[key]
        if not split:
            continue
        try:
            shared, total = shared_images(cfg.data, split, cfg.train_split)
        except DataError as e:
            if key != "test_split":
                raise
            raise DataError(f"test_split={split!r}: {e} (test_split=null reports the val split instead)") from None
        if not shared:
            continue
        if key == "val_split":
            fix = ("use val_split=null (no per-epoch evaluation; the final weights are reported), or val_split=test "
                   "where the protocol reports the test curve (ResNet Fig. 6)")
        else:
            fix = "choose a test split held out from training, or test_split=null"
        raise DataError(f"{key}={split!r} shares {shared} of its {total} images with train_split={cfg.train_split!r} "
                        f"(data={cfg.data.name}): its error would be measured on training images; {fix}")


def batch_plan(cfg: DictConfig, world_size: int) -> dict[str, int]:
    """The recipe's global batch over processes and micro-batches: global, per_process, world_size, grad_accum."""
    g, accum = cfg.recipe.batch_size, cfg.trainer.grad_accum
    if g % (world_size * accum):
        raise ValueError(f"the global batch recipe.batch_size={g} does not divide into {world_size} processes x "
                         f"trainer.grad_accum={accum}; choose processes x grad_accum that divide {g} (each process "
                         f"then takes {g} / (processes x grad_accum) images per micro-batch), or change the recipe's "
                         f"global batch with recipe.batch_size=N (the lr is then scaled)")
    return {"global": g, "per_process": g // (world_size * accum), "world_size": world_size, "grad_accum": accum}


def peak_lr(recipe: DictConfig) -> float:
    """The recipe's lr, scaled linearly from the batch it is quoted for to the run's global batch."""
    quoted = recipe.lr_batch_size or recipe.batch_size
    return recipe.optimizer.lr * (recipe.batch_size / quoted if recipe.scale_lr else 1.0)


def amp_dtype(kind: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = full precision); auto: bf16 on GPUs with native bf16, else fp16; off on CPU."""
    if kind == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[kind]


def setup(cfg: DictConfig, d: Dist, device: torch.device, out: Path) -> Run:
    """Data, model, optimizer, schedule and logging for a run."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    batch = batch_plan(cfg, d.world_size)
    data = build_data(cfg, model_cfg["resolution"], batch["per_process"], d, device)
    # The model's class count follows the dataset.
    model_cfg["num_classes"] = len(data.classes)
    cfg.model.num_classes = len(data.classes)
    raw = create_model_from_config(model_cfg).to(device)
    if d.rank > 0:  # the same initial weights on every rank; each rank's own augmentation and dropout streams
        torch.manual_seed(rank_seed(cfg.seed, d.rank))
        random.seed(rank_seed(cfg.seed, d.rank))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.trainer.cudnn_benchmark
    if cfg.trainer.channels_last:  # CPU too: ResNet-20's fp32 step 487 img/s against 424 (2-core Xeon)
        raw = raw.to(memory_format=torch.channels_last)
    model: nn.Module = raw
    if d.enabled:
        if cfg.trainer.sync_bn:
            raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
        model = nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.trainer.compile:
        model = torch.compile(model)
    recipe = cfg.recipe
    lr = peak_lr(recipe)
    optimizer = build_optimizer(raw, recipe.optimizer, lr)
    spe = data.loader.sampler.batches // cfg.trainer.grad_accum
    if spe == 0:
        raise ValueError(f"trainer.grad_accum={cfg.trainer.grad_accum} exceeds the {data.loader.sampler.batches} "
                         f"batches of an epoch")
    if cfg.trainer.max_steps:
        total = int(cfg.trainer.max_steps)
    elif cfg.trainer.max_epochs:
        total = int(cfg.trainer.max_epochs) * spe
    elif recipe.length_unit == "steps":  # the paper's images seen, whatever the global batch
        total = round(recipe.length * (recipe.lr_batch_size or recipe.batch_size) / recipe.batch_size)
    else:
        total = round(recipe.length * spe)
    schedule = LRSchedule(recipe.schedule, lr, total, recipe.length)
    ema = None
    if recipe.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(raw, decay=recipe.ema_decay)
    dtype = amp_dtype(cfg.trainer.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    normalize = Normalize(data.preprocessing, lighting_std=recipe.augment.lighting,
                          color_jitter=recipe.augment.color_jitter).to(device)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    writer = None
    if d.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
        log.info("%s on %s/%s: %d images, %d steps (%d per epoch), global batch %d = %d processes x %d micro-batches "
                 "x %d images, lr %g; device %s; evaluated on %s each epoch, %s at the end", model_cfg["name"],
                 cfg.data.name, cfg.train_split, data.loader.sampler.length, total, spe, batch["global"],
                 d.world_size, batch["grad_accum"], batch["per_process"], lr, device, cfg.val_split or "nothing",
                 cfg.test_split or cfg.val_split)
    return Run(cfg, model, raw, ema, optimizer, schedule, scaler, normalize, criterion, data, device, dtype, total,
               spe, d, out, Progress(), writer, commit=git_commit() if d.is_main else None)


def final_metrics(run: Run) -> dict[str, Any]:
    """metrics.json: per-protocol errors of the final weights on the test split (or val), with batch, lr and config."""
    ds = run.data.test if run.data.test is not None else run.data.val
    metrics = validate(run, ds, list(run.cfg.final_protocols))
    best = run.progress.best_err if math.isfinite(run.progress.best_err) else None
    skipped = {path for part in gather_objects(sorted(run.progress.skipped), run.dist) for path in part}
    return {**metrics, "split": run.cfg.test_split or run.cfg.val_split, "best_val_top1_err": best,
            "train_skipped": len(skipped | set(run.data.skipped)), "steps": run.progress.step,
            "batch": batch_plan(run.cfg, run.dist.world_size),
            "eval_precision": run.cfg.trainer.get("eval_precision", "fp32"),
            "lr": run.schedule.base_lr, "config": OmegaConf.to_container(run.cfg, resolve=True)}


def fit(run: Run) -> None:
    """Epochs until the run's length; evaluation after each `eval_every` epochs and at the end."""
    cfg = run.cfg
    while run.progress.step < run.total_steps:
        train_one_epoch(run)
        if run.stopping:
            save(run, "last")
            log.warning("%s received: checkpoint written at step %d; continue with %s",
                        run.stop_signal or "a signal (on another rank)", run.progress.step,
                        run.resume_hint or f"resume=auto name={cfg.name}")
            return
        epoch_done = run.progress.batch == 0
        if (epoch_done and run.progress.epoch % cfg.trainer.eval_every == 0) or run.progress.step >= run.total_steps:
            after_epoch(run)
    metrics = final_metrics(run)
    if run.dist.is_main:
        (run.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        top = metrics["center"]
        print(f"{cfg.model.name} on {cfg.data.name}/{metrics['split']}: top-1 err {top['top1_err']:.2f}%, "
              f"top-5 err {top['top5_err']:.2f}% ({top['images']} images); run dir {run.out}")


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=CONFIG_DIR, config_name="train")
def _train(cfg: DictConfig) -> None:
    """Set up (failing fast on bad config), resume if asked, train, evaluate, write metrics.json."""
    check_config(cfg)
    try:
        check_splits(cfg)  # the splits' files are listed, not decoded
        export_slurm_env()  # the ranks of a multi-task SLURM job, before the device is chosen by LOCAL_RANK
        device = select_device(cfg.trainer.device)
        d = init_distributed(device, cfg.trainer.dist_timeout_s)  # also makes the device current on CUDA
        # Rank 0's run dir and the arguments that continue it (other ranks have a scratch dir and another name).
        hint = resume_args(cfg.name, HydraConfig.get()) if d.is_main else None
        out_str, hint = broadcast_object((str(run_dir()), hint), d)
        out = Path(out_str)
        # Never another run's dir (unless resume=auto), never two processes in one (a sweep's job claims it here).
        problem = broadcast_object(claim_run_dir(out, cfg.resume, cfg.name, HydraConfig.get()) if d.is_main
                                   else None, d)
        if problem:
            fail(problem)
        ck = read_checkpoint(out / "checkpoints" / "last.pt", hint) if cfg.resume == "auto" else None
        run = setup(cfg, d, device, out)
        run.resume_hint = hint
    except (ValueError, DataError) as e:
        fail(str(e))
    try:
        resumed = ck is not None and resume(run, ck)
    except ValueError as e:  # another run's checkpoint (model, optimizer groups) under this name
        if run.writer is not None:
            run.writer.close()
        fail(str(e))
    if resumed:
        log.info("resumed %s at step %d (epoch %d, batch %d)", out, run.progress.step, run.progress.epoch,
                 run.progress.batch)
    if d.is_main:
        save_run_info(cfg)

    def on_signal(signum: int, frame: object) -> None:
        run.stop_signal = signal.Signals(signum).name

    # Preemption and time limits: SIGTERM, SIGUSR1 (sbatch --signal), SIGUSR2 (hydra/launcher=slurm's submitit).
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, on_signal)
    try:
        fit(run)
    except (NonFiniteLoss, WriteError, DataError, ValueError) as e:  # ValueError: e.g. out of GPU memory in eval
        fail(str(e))
    except OSError as e:  # metrics.json / metrics.jsonl / TensorBoard: disk full, read-only
        fail(f"cannot write {e.filename or run.out} ({e.strerror or e}); {kept_checkpoint(run)}")
    except RuntimeError as e:
        if not (d.enabled and peer_lost(e)):
            raise
        fail(timeout_message(run, e))
    finally:
        if run.writer is not None:
            run.writer.close()
    cleanup(d)


def timeout_message(run: Run, e: BaseException) -> str:
    """What a rank says when a collective waited trainer.dist_timeout_s for the others in vain."""
    d, timeout = run.dist, float(run.cfg.trainer.dist_timeout_s)
    silent = silent_ranks(d, min(5.0, timeout))
    who = f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))}" if silent else "another rank"
    return (f"rank {d.rank}: a collective got no answer from {who} within trainer.dist_timeout_s={timeout:g} s, or "
            f"lost it (a rank stopped, hung or died: SIGSTOP, a wedged GPU, a lost node) "
            f"[{str(e).strip().splitlines()[0][:160]}]; stopping. {kept_checkpoint(run)}; continue with "
            f"{run.resume_hint} once every rank runs, or raise trainer.dist_timeout_s if a step can take that long")


DATA_KEYS = {"train_dir": ("folder", "imagenet"), "val_dir": ("folder", "imagenet")}  # keys of some datasets only


def main() -> None:
    """Console entry point of `repro-train`."""
    register_configs()
    check_overrides("train", DATA_KEYS)
    quiet_hydra_on_other_ranks()
    try:
        _train()
    finally:
        unlock_all()


if __name__ == "__main__":
    main()
