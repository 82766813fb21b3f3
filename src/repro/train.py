"""`repro-train`: train a model with a paper's recipe, on CPU, one GPU, or many under torchrun.

`setup` builds a `Training`: the model a step calls, the loss, the device-side normalization, the `TrainState`
checkpoints hold (repro.checkpoint), the data, the step's `Numerics` and the `Run` (config, processes, run dir,
length, stop flags). `fit` runs `train_one_epoch` (device-side augmentation, AMP, accumulation), evaluation
(`evaluate`, repro.scoring) and checkpoints to the run's length. Everything a run writes goes under its run dir
`outputs/train/<name>/`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
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

from repro.checkpoint import (
    NonFiniteLoss,
    Progress,
    TrainState,
    WriteError,
    kept_checkpoint,
    rank_seed,
    read_checkpoint,
    resume,
    save,
    sync_state,
)
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
from repro.config import register_configs
from repro.data import DataError, EvalViews, Normalize, ShardSampler, collate
from repro.data.build import TrainData, build_data, check_splits, crop_problem
from repro.data.datasets import DATA_KEYS, DATASETS, SPECS, ImageTensors, list_once, spec_of
from repro.data.loaders import sample_seed
from repro.distributed import (
    Dist,
    all_reduce_sum,
    broadcast_object,
    cleanup,
    export_slurm_env,
    gather_objects,
    init_distributed,
    peer_lost,
    quiet_hydra_on_other_ranks,
    select_device,
    silent_ranks,
)
from repro.models import create_model_from_config
from repro.optim import LRSchedule, build_optimizer
from repro.scoring import evaluate

log = logging.getLogger("repro.train")


# ----------------------------------------------------------------------------------------------- state


@dataclass
class Numerics:
    """How a training step computes: autocast dtype, micro-batches per optimizer step, memory layout."""

    amp_dtype: torch.dtype | None = None  # autocast's dtype (bf16/fp16), None for full precision
    grad_accum: int = 1  # micro-batches whose gradients make one optimizer step
    channels_last: bool = False  # batches (and the model) in channels_last


@dataclass
class Run:
    """The run itself: its config, processes and run dir, its length, its logs, and whether it must stop."""

    cfg: DictConfig
    dist: Dist
    device: torch.device
    out: Path
    total_steps: int
    steps_per_epoch: int
    writer: Any = None  # TensorBoard's SummaryWriter (rank 0), or None
    commit: str | None = None  # the git commit, read once per run
    resume_hint: str = ""  # the arguments that continue this run dir (rank 0's, the same on every rank)
    stop_signal: str | None = None  # set by the signal handler of this process
    stopping: bool = False  # every rank agreed to stop (see agree_to_stop)
    last_save: float = field(default_factory=time.monotonic)  # when checkpoints/last.pt was last written


@dataclass
class Training:
    """What set-up builds: the model a step calls, the loss, the device-side normalization, the state checkpoints
    hold, the data, the step's numerics and the run."""

    model: nn.Module  # DDP and/or torch.compile around state.model, or state.model itself
    criterion: nn.Module
    normalize: Normalize
    state: TrainState
    data: TrainData
    numerics: Numerics
    run: Run

    def epoch(self) -> None:
        """`train_one_epoch` with these parts."""
        train_one_epoch(self.model, self.criterion, self.normalize, self.state, self.data, self.numerics, self.run)

    def close(self) -> None:
        """Close the TensorBoard writer (rank 0's)."""
        if self.run.writer is not None:
            self.run.writer.close()


def write_checkpoint(name: str, state: TrainState, data: TrainData, run: Run) -> None:
    """checkpoints/<name>.pt of the run (every rank calls it); writing last.pt restarts the time interval."""
    save(run.out, name, state, run.cfg, data.preprocessing, run.commit, run.dist, run.device)
    if name == "last":
        run.last_save = time.monotonic()


# ------------------------------------------------------------------------------------------------ loop


class TrainMeter:
    """The training loss and error since the last log step, summed on the device (no host sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Start a new log interval."""
        self.loss = torch.zeros((), device=self.device)
        self.wrong = torch.zeros((), device=self.device)
        self.seen, self.micro, self.t0 = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Count one micro-batch."""
        self.loss += loss.detach()
        self.wrong += (logits.detach().argmax(1) != y).sum()
        self.seen += y.numel()
        self.micro += 1

    def summed(self, dist: Dist) -> tuple[float, float, float]:
        """(mean loss, error %, images/s) over every rank since the last reset (a collective under DDP)."""
        dev = self.device
        totals = all_reduce_sum(torch.stack([self.loss, self.wrong, torch.tensor(float(self.seen), device=dev),
                                             torch.tensor(float(self.micro), device=dev)]).double(), dist)
        g_loss, g_wrong, g_seen, g_micro = totals.tolist()
        rate = g_seen / (time.perf_counter() - self.t0)
        return g_loss / max(1.0, g_micro), 100.0 * g_wrong / max(1.0, g_seen), rate


def train_one_epoch(model: nn.Module, criterion: nn.Module, normalize: Normalize, state: TrainState, data: TrainData,
                    numerics: Numerics, run: Run) -> None:
    """Train from the current position to the end of the epoch (or of the run, or a stop signal).

    `model` is what a step calls (DDP and/or compiled around `state.model`); `state` (weights, weight average,
    optimizer, schedule, grad scaler, progress) is updated in place and checkpointed every
    `trainer.checkpoint_every` steps, at a stop signal and on `trainer.checkpoint_every_s`.
    """
    p, dev, cfg, accum = state.progress, run.device, run.cfg, numerics.grad_accum
    model.train()
    normalize.train()
    data.loader.sampler.set_epoch(p.epoch, p.batch)  # resumes mid-epoch at micro-batch p.batch
    meter = TrainMeter(dev)
    bar = tqdm(total=run.steps_per_epoch, initial=p.batch // accum, desc=f"epoch {p.epoch}", unit="step",
               disable=not (cfg.trainer.progress and run.dist.is_main), dynamic_ncols=True)
    skipped_before = len(p.skipped)
    for batch in data.loader:
        # data.decode=gpu: the loader left JPEG bytes; decode and crop on the device.
        if data.decoder is not None:
            batch = data.decoder(batch)
        # Unusable images: stop naming one (data.on_error=raise) or skip and count them; a batch left empty is dropped.
        if batch["failed"]:
            skip_failed(batch["failed"], p, cfg.data.on_error)
        if batch["views"] is None:
            drop_empty_batch(batch["failed"], state, accum, run.dist)
            continue
        # Move the uint8 batch to the device (there already when decoded there); augment there when the loader
        # left it to us.
        x = batch["views"].to(dev, non_blocking=True)
        y = batch["labels"].to(dev, non_blocking=True)
        if data.batch_aug is not None:
            x = data.batch_aug(x, sample_seed(rank_seed(cfg.seed, run.dist.rank), p.epoch, p.batch))
        # Normalize (and PCA-light) on the device, in channels_last (faster on CUDA and on CPU alike).
        x = normalize(x)
        if numerics.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Forward and loss under autocast (a no-op when AMP is off), backward through the grad scaler (a no-op
        # unless fp16); DDP syncs gradients only on a step's last micro-batch.
        last_micro = (p.batch + 1) % accum == 0
        sync = model.no_sync() if (run.dist.enabled and not last_micro) else contextlib.nullcontext()
        with sync:
            dtype = numerics.amp_dtype
            with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = model(x)
                loss = criterion(logits.float(), y)
            state.scaler.scale(loss / accum).backward()
        meter.add(loss, logits, y)
        p.batch += 1
        if not last_micro:
            continue
        # Optimizer step at the schedule's lr (the scaler skips it on inf/NaN fp16 gradients), then the average.
        lr = state.schedule.apply(state.optimizer, p.step)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.optimizer.zero_grad(set_to_none=True)
        if state.ema is not None:
            state.ema.update(state.model, step=p.step)
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
            mean_loss, err, rate = meter.summed(run.dist)
            if not math.isfinite(mean_loss):
                raise NonFiniteLoss(f"the training loss is {mean_loss} at step {p.step} (lr {lr:g}); stopping. "
                                    f"{kept_checkpoint(run.out)}; lower the lr or check the data")
            if at_log:
                bar.set_postfix(loss=f"{mean_loss:.3f}", err=f"{err:.1f}%", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
                if state.schedule.observe_train(p.step, err):
                    log.info("warm-up over at step %d (training error %.1f%%)", p.step, err)
                if run.writer is not None:
                    for key, value in (("loss", mean_loss), ("err", err), ("lr", lr), ("images_per_s", rate)):
                        run.writer.add_scalar(f"train/{key}", value, p.step)
                meter.reset()
        # Checkpoint (a collective: every rank writes its generators' state through rank 0).
        if at_save:
            write_checkpoint("last", state, data, run)
        if stop or p.step >= run.total_steps:
            break
    bar.close()
    if len(p.skipped) > skipped_before:
        log.warning("epoch %d: unusable training images skipped (data.on_error=skip): %d distinct so far, counted as "
                    "\"train_skipped\" in metrics.json", p.epoch, len(p.skipped))
    agree_to_stop(run)  # a signal that came late in the epoch: every rank decides alike before evaluating
    if p.batch >= data.loader.sampler.batches:  # the epoch is complete
        p.epoch, p.batch = p.epoch + 1, 0


def skip_failed(failed: list[Any], progress: Progress, on_error: str) -> None:
    """Unusable training images: stop naming the first (data.on_error=raise), or remember them as skipped."""
    if on_error == "raise":
        raise DataError(failed[0].message)
    for f in failed:
        if f.path not in progress.skipped:
            log.warning("skipping %s", f.message.split(". Replace or remove")[0])
            progress.skipped.add(f.path)


def drop_empty_batch(failed: list[Any], state: TrainState, grad_accum: int, dist: Dist) -> None:
    """A micro-batch whose every image was skipped: it adds nothing; its optimizer step is dropped with it.

    Under torchrun the other ranks would wait for this rank's gradients, so it stops instead, naming the files.
    """
    p = state.progress
    if dist.enabled:
        raise DataError(f"every image of a training batch of rank {dist.rank} is unusable (e.g. "
                        f"{failed[0].path if failed else '?'}); under torchrun a rank cannot leave out a whole batch: "
                        f"remove or replace the files (data.on_error=skip then skips the rest)")
    log.warning("epoch %d: a training batch had no usable image; its step is dropped", p.epoch)
    p.batch += 1
    if p.batch % grad_accum == 0:  # the step's last micro-batch: drop the step's gradients too
        state.optimizer.zero_grad(set_to_none=True)


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


def validate(t: Training, ds: Any, protocols: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Top-1/top-5 error of the model (and of its weight average) on an evaluation set, center view by default."""
    protocols = protocols or ["center"]
    run, state = t.run, t.state
    sync_state(state, run.dist)  # every rank evaluates the model the checkpoint holds
    resize, crop = t.data.eval_size
    ds.transform = EvalViews(protocols, resize=resize, crop=crop)
    loader = DataLoader(ds, batch_size=run.cfg.data.batch_size, num_workers=0 if isinstance(ds, ImageTensors)
                        else run.cfg.data.num_workers, sampler=ShardSampler(len(ds), run.dist.rank,
                        run.dist.world_size), collate_fn=collate, pin_memory=run.device.type == "cuda")
    on_error = run.cfg.data.on_error
    precision = run.cfg.trainer.get("eval_precision", "fp32")
    out = evaluate(state.model, t.normalize, loader, run.device, protocols, on_error=on_error, dist=run.dist,
                   progress=False, precision=precision).metrics()
    if state.ema is not None:  # the released MobileNetV2 recipe reports the averaged weights
        ema = evaluate(state.ema.module, t.normalize, loader, run.device, protocols, on_error=on_error,
                       dist=run.dist, progress=False, precision=precision).metrics()
        out = {**ema, **{f"{p}_noema": m for p, m in out.items()}}
    decoded = len(getattr(ds, "skipped", []))  # files left out when the split was decoded into memory (every rank)
    for m in out.values():
        m["skipped"] += decoded
    return out


def chooses_best(cfg: DictConfig) -> bool:
    """Whether best.pt is kept: only on a validation split, never chosen on the reported test split."""
    return bool(cfg.val_split) and cfg.val_split != cfg.test_split


def after_epoch(t: Training) -> None:
    """Evaluate on `val_split` (if any), feed the plateau schedule, log under the split's name, keep checkpoints."""
    run, state = t.run, t.state
    p, split = state.progress, run.cfg.val_split
    if t.data.val is None:  # val_split=null: no per-epoch evaluation; the final weights are reported
        write_checkpoint("last", state, t.data, run)
        return
    metrics = validate(t, t.data.val)
    err, err5 = metrics["center"]["top1_err"], metrics["center"]["top5_err"]
    state.schedule.observe_val(err)
    record = {"epoch": p.epoch, "step": p.step, "lr": state.schedule.lr(p.step), "split": split, split: metrics}
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
        write_checkpoint("best", state, t.data, run)
    write_checkpoint("last", state, t.data, run)


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
    splits = spec_of(cfg.data.name).splits
    for key in ("train_split", "val_split", "test_split"):
        if splits is not None and cfg[key] is not None and cfg[key] not in splits:
            hint = "; test_split=null reports the val split instead" if key == "test_split" else ""
            fail(f"{key}={cfg[key]!r} is not a split of data={cfg.data.name}; choose one of {list(splits)}{hint}")
    if spec_of(cfg.data.name).in_memory and set(cfg.final_protocols) - {"center"}:
        fail(f"data={cfg.data.name} is evaluated on the image itself: final_protocols=[center] only")
    if cfg.data.decode == "gpu" and not spec_of(cfg.data.name).folders:
        folders = " or ".join(f"data={name}" for name, spec in SPECS.items() if spec.folders)
        fail(f"data.decode=gpu decodes training image files ({folders}) on the GPU; "
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


def setup(cfg: DictConfig, d: Dist, device: torch.device, out: Path) -> Training:
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
    if cfg.trainer.channels_last:  # CPU too: ResNet-20's fp32 step 754 img/s against 693 (2-core Xeon, README)
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
    state = TrainState(raw, ema, optimizer, schedule, scaler)
    numerics = Numerics(dtype, cfg.trainer.grad_accum, cfg.trainer.channels_last)
    run = Run(cfg, d, device, out, total, spe, writer, commit=git_commit() if d.is_main else None)
    return Training(model, criterion, normalize, state, data, numerics, run)


def final_metrics(t: Training) -> dict[str, Any]:
    """metrics.json: per-protocol errors of the final weights on the test split (or val), with batch, lr and config."""
    run, p = t.run, t.state.progress
    ds = t.data.test if t.data.test is not None else t.data.val
    metrics = validate(t, ds, list(run.cfg.final_protocols))
    best = p.best_err if math.isfinite(p.best_err) else None
    skipped = {path for part in gather_objects(sorted(p.skipped), run.dist) for path in part}
    return {**metrics, "split": run.cfg.test_split or run.cfg.val_split, "best_val_top1_err": best,
            "train_skipped": len(skipped | set(t.data.skipped)), "steps": p.step,
            "batch": batch_plan(run.cfg, run.dist.world_size),
            "eval_precision": run.cfg.trainer.get("eval_precision", "fp32"),
            "lr": t.state.schedule.base_lr, "config": OmegaConf.to_container(run.cfg, resolve=True)}


def fit(t: Training) -> None:
    """Epochs until the run's length; evaluation after each `eval_every` epochs and at the end."""
    run, cfg = t.run, t.run.cfg
    while t.state.progress.step < run.total_steps:
        # Train to the end of the epoch (or of the run, or a stop signal).
        train_one_epoch(t.model, t.criterion, t.normalize, t.state, t.data, t.numerics, run)
        p = t.state.progress
        # A signal on any rank: checkpoint where we are and stop, saying how to continue.
        if run.stopping:
            write_checkpoint("last", t.state, t.data, run)
            log.warning("%s received: checkpoint written at step %d; continue with %s",
                        run.stop_signal or "a signal (on another rank)", p.step,
                        run.resume_hint or f"resume=auto name={cfg.name}")
            return
        # Evaluate (and checkpoint) every eval_every epochs and at the end.
        epoch_done = p.batch == 0
        if (epoch_done and p.epoch % cfg.trainer.eval_every == 0) or p.step >= run.total_steps:
            after_epoch(t)
    # The final weights on the test split (or val): metrics.json.
    metrics = final_metrics(t)
    if run.dist.is_main:
        (run.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        top = metrics["center"]
        print(f"{cfg.model.name} on {cfg.data.name}/{metrics['split']}: top-1 err {top['top1_err']:.2f}%, "
              f"top-5 err {top['top5_err']:.2f}% ({top['images']} images); run dir {run.out}")


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=CONFIG_DIR, config_name="train")
def _train(cfg: DictConfig) -> None:
    """Set up (failing fast on bad config), resume if asked, train, evaluate, write metrics.json."""
    check_config(cfg)
    with list_once():  # the split checks and the loaders walk each data folder once
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
            last = out / "checkpoints" / "last.pt"
            ck = read_checkpoint(last, hint) if cfg.resume == "auto" else None
            t = setup(cfg, d, device, out)
            t.run.resume_hint = hint
        except (ValueError, DataError) as e:
            fail(str(e))
    run = t.run
    try:
        resumed = ck is not None and resume(last, t.state, cfg, d, device, ck, hint)
    except ValueError as e:  # another run's checkpoint (model, optimizer groups) under this name
        t.close()
        fail(str(e))
    if resumed:
        p = t.state.progress
        log.info("resumed %s at step %d (epoch %d, batch %d)", out, p.step, p.epoch, p.batch)
    if d.is_main:
        save_run_info(cfg)

    def on_signal(signum: int, frame: object) -> None:
        run.stop_signal = signal.Signals(signum).name

    # Preemption and time limits: SIGTERM, SIGUSR1 (sbatch --signal), SIGUSR2 (hydra/launcher=slurm's submitit).
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, on_signal)
    try:
        fit(t)
    except (NonFiniteLoss, WriteError, DataError, ValueError) as e:  # ValueError: e.g. out of GPU memory in eval
        fail(str(e))
    except OSError as e:  # metrics.json / metrics.jsonl / TensorBoard: disk full, read-only
        fail(f"cannot write {e.filename or run.out} ({e.strerror or e}); {kept_checkpoint(run.out)}")
    except RuntimeError as e:
        if not (d.enabled and peer_lost(e)):
            raise
        fail(timeout_message(run, e))
    finally:
        t.close()
    cleanup(d)


def timeout_message(run: Run, e: BaseException) -> str:
    """What a rank says when a collective waited trainer.dist_timeout_s for the others in vain."""
    d, timeout = run.dist, float(run.cfg.trainer.dist_timeout_s)
    silent = silent_ranks(d, min(5.0, timeout))
    who = f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))}" if silent else "another rank"
    return (f"rank {d.rank}: a collective got no answer from {who} within trainer.dist_timeout_s={timeout:g} s, or "
            f"lost it (a rank stopped, hung or died: SIGSTOP, a wedged GPU, a lost node) "
            f"[{str(e).strip().splitlines()[0][:160]}]; stopping. {kept_checkpoint(run.out)}; continue with "
            f"{run.resume_hint} once every rank runs, or raise trainer.dist_timeout_s if a step can take that long")


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
