"""Checkpoints of `repro-train`: what one holds, how it is written (atomically, from rank 0) and read back.

A checkpoint is a dict readable with `torch.load(..., weights_only=True)`: the plain model's weights (`model`),
its weight average (`ema`), the optimizer, lr schedule and grad scaler, every rank's random generators, where
the run is (`progress`), and what evaluation needs (`config`, `preprocessing`, `git_commit`). A resumed run
continues bit-identically (on CPU) from the step it was written at.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from repro.config import plain
from repro.data import Preprocessing
from repro.distributed import Dist, broadcast_state, gather_objects
from repro.optim import LRSchedule

log = logging.getLogger("repro.train")
CHECKPOINT_KEYS = ("model", "optimizer", "schedule", "scaler", "progress", "config")


class NonFiniteLoss(RuntimeError):
    """The training loss (or the weights) became NaN or Inf."""


class WriteError(RuntimeError):
    """A file of the run could not be written (disk full, read-only, ...); the message says what is kept."""


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
class TrainState:
    """What a checkpoint saves and `resume` restores (besides the random generators), updated in place by the loop."""

    model: nn.Module  # the plain model: no DDP or torch.compile wrapper (its state dict loads anywhere)
    ema: Any  # timm's ModelEmaV3 of `model` (recipe.ema_decay > 0), or None
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: torch.amp.GradScaler
    progress: Progress = field(default_factory=Progress)


# ------------------------------------------------------------------------------------------ random streams


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


def restore_rng(ck: dict[str, Any], seed: int, dist: Dist, device: torch.device) -> None:
    """Each rank takes its own saved generator states; when the world size changed, rank 0 takes rank 0's and
    the others reseed from (seed, step, rank), so no two ranks share a stream (logged)."""
    states = ck.get("rng_ranks") or [ck["rng"]]
    if len(states) == dist.world_size:
        set_rng_state(states[dist.rank], device)
        return
    if dist.is_main:
        log.warning("resuming on %d processes a run saved on %d: rank 0 continues rank 0's random streams, the "
                    "others start new ones seeded from (seed, step, rank)", dist.world_size, len(states))
    if dist.rank == 0:
        set_rng_state(states[0], device)
        return
    s = rank_seed(seed * 1_000_033 + ck["progress"]["step"], dist.rank)
    random.seed(s)
    torch.manual_seed(s)


# ------------------------------------------------------------------------------------------------- writing


def checkpoint(state: TrainState, cfg: DictConfig, preprocessing: Preprocessing, commit: str | None,
               ranks_rng: list[dict[str, Any]]) -> dict[str, Any]:
    """The checkpoint dict: weights (`model`), the state to resume (`ranks_rng`: every rank's generators, in rank
    order), and what evaluation needs (config, preprocessing, git commit)."""
    config = plain(cfg)  # choices as plain strings: torch.load(weights_only=True) reads them
    p = state.progress
    return {
        "model": state.model.state_dict(),
        "ema": state.ema.module.state_dict() if state.ema is not None else None,
        "optimizer": state.optimizer.state_dict(),
        "schedule": state.schedule.state_dict(),
        "scaler": state.scaler.state_dict(),
        "rng": ranks_rng[0],  # rank 0's (as a single-process run's)
        "rng_ranks": ranks_rng,  # every rank's own, in rank order
        "progress": {"step": p.step, "epoch": p.epoch, "batch": p.batch, "best_err": p.best_err,
                     "history": p.history, "skipped": sorted(p.skipped)},
        "config": {"model": config["model"], "data": config["data"], "recipe": config["recipe"],
                   "seed": config["seed"]},
        "preprocessing": preprocessing.to_dict(),
        "git_commit": commit,
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


def kept_checkpoint(out: Path) -> str:
    """What a failed run in run dir `out` leaves to resume from, for its error message."""
    path = out / "checkpoints" / "last.pt"
    if path.is_file():
        return f"The last good checkpoint is kept at {path}"
    return "No checkpoint was written yet"


def sync_state(state: TrainState, dist: Dist) -> None:
    """Rank 0's BN running statistics (and the weight average) on every rank, as the checkpoint holds them.

    DDP broadcasts buffers only at a training forward, so each rank would otherwise evaluate with its own
    last batches' statistics. Called before every evaluation and save (a no-op on one process).
    """
    broadcast_state(state.model, dist)
    if state.ema is not None:
        broadcast_state(state.ema.module, dist)


def save(out: Path, name: str, state: TrainState, cfg: DictConfig, preprocessing: Preprocessing,
         commit: str | None, dist: Dist, device: torch.device) -> None:
    """Write `out`/checkpoints/<name>.pt from rank 0, never with non-finite weights (every rank checks them).

    A collective: every rank calls it (the generator states and skipped images of all ranks are gathered).
    """
    weights = state.model.state_dict()
    floats = [v for v in weights.values() if v.is_floating_point()]
    if floats and not bool(torch.stack([torch.isfinite(v).all() for v in floats]).all()):
        raise NonFiniteLoss(f"the training loss diverged: the weights are not finite at step {state.progress.step}; "
                            f"stopping. {kept_checkpoint(out)}; lower the lr or check the data")
    sync_state(state, dist)
    # Each rank's generator states, and the skipped images of all ranks.
    gathered = gather_objects((rng_state(device), sorted(state.progress.skipped)), dist)
    ranks_rng = [g[0] for g in gathered]
    state.progress.skipped = {path for g in gathered for path in g[1]}
    if dist.is_main:
        save_atomic(checkpoint(state, cfg, preprocessing, commit, ranks_rng), out / "checkpoints" / f"{name}.pt",
                    kept=out / "checkpoints" / "last.pt")


# ------------------------------------------------------------------------------------------------- reading


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


def resume(path: Path, state: TrainState, cfg: DictConfig, dist: Dist, device: torch.device,
           ck: dict[str, Any] | None = None, hint: str = "resume=auto") -> bool:
    """Load the checkpoint at `path` (or `ck`, read from it) into `state` and this rank's generators; False when
    there is none. A checkpoint of another model or optimizer is refused with a ValueError."""
    ck = ck if ck is not None else read_checkpoint(path, hint)
    if ck is None:
        return False
    saved, current = ck["config"]["model"], OmegaConf.to_container(cfg.model, resolve=True)
    if saved["name"] != current["name"]:
        raise ValueError(f"{path} holds a {saved['name']} run but model={current['name']}; "
                         f"resume with the same config or pick a new name=")
    changed = [f"model.{k}={saved.get(k)!r} there, {current.get(k)!r} here" for k in sorted({*saved, *current})
               if saved.get(k) != current.get(k)]
    if changed:
        raise ValueError(f"{path} holds a {saved['name']} run with other settings ({'; '.join(changed)}); "
                         f"resume with the same config or pick a new name=")
    state.model.load_state_dict(ck["model"])
    if state.ema is not None and ck["ema"] is not None:
        state.ema.module.load_state_dict(ck["ema"])
    try:
        state.optimizer.load_state_dict(ck["optimizer"])
    except ValueError as e:
        raise ValueError(f"{path} holds a run with another optimizer ({e}); resume with the same recipe or pick "
                         f"a new name=") from None
    state.schedule.load_state_dict(ck["schedule"])
    state.scaler.load_state_dict(ck["scaler"])
    restore_rng(ck, cfg.seed, dist, device)
    p = ck["progress"]
    state.progress = Progress(p["step"], p["epoch"], p["batch"], p["best_err"], p["history"],
                              set(p.get("skipped", [])))
    return True
