"""Images/s of a full CIFAR training step through the project's loader path, beside the model's bare step.

    python scripts/bench_train.py [--root DIR | --synthetic] [--limit N] [--steps N] [--rounds N]
                                  [--batch-size 128] [--threads N] [--device cpu|cuda] [--json FILE]
                                  [KEY=VALUE ...]

Trailing KEY=VALUE arguments are repro-train overrides applied last (the numerics being compared:
trainer.compile=true, trainer.channels_last=false, trainer.amp=bf16, model=resnet56, ...); the bare step uses the
run's own model (compiled when trainer.compile=true) and autocast, so both rates change with them.

The run is built exactly as `repro-train model=resnet20 data=cifar10 recipe=resnet_cifar` builds it: the
Hydra config is composed from the project's configs and `repro.train.setup` makes the Training (in-memory uint8
images, TensorBatches, BatchPadCrop, per-pixel-mean Normalize, SGD). Two measurements, on the same model and
optimizer:

  full: `repro.train.train_one_epoch` for `--steps` optimizer steps (TensorBatches -> .to(device) ->
        BatchPadCrop -> Normalize -> forward/loss/backward -> lr schedule, SGD step, bookkeeping);
  bare: forward/loss/backward/SGD step on one normalized float batch made beforehand (no loader, no
        augmentation, no normalization, no bookkeeping).

Data: by default the real CIFAR-10 JPEGs of `../shared/data/cifar10-jpeg` beside the checkout, decoded once
by the project's loader, at most `--limit` images per split (`data.limit`); `--synthetic` (or a missing
folder) puts random uint8 images in memory instead, through the same TensorBatches path. After a warm-up of
both, `--rounds` rounds time bare and full back to back (order alternating per round); the table shows the
median images/s of each and the median of the per-round ratios full/bare, which stays fair when other work
loads the machine. A per-stage breakdown of the loader path (ms per step) follows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import repro.data.build as rb
import repro.train as rt
from repro.bench import cpu_model
from repro.cli import CONFIG_DIR, HYDRA_VERSION_BASE, check_overrides
from repro.config import register_configs
from repro.data.datasets import ImageTensors
from repro.data.loaders import sample_seed
from repro.distributed import Dist, select_device

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg"
TARGET = 0.95


# ------------------------------------------------------------------------------------------------ set-up


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over `seconds` (from /proc/stat), to tell whether other work loads the machine."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU, cores, torch version and threads (and the GPU when timing on CUDA)."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_busy_before": cpu_busy(),  # other processes only: nothing of ours runs yet
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def compose_config(args: argparse.Namespace, root: Path | None) -> DictConfig:
    """`model=resnet20 data=cifar10 recipe=resnet_cifar`, composed from the project's configs like repro-train."""
    register_configs()
    overrides = [
        "model=resnet20", "data=cifar10", "recipe=resnet_cifar",
        f"data.root={root if root is not None else '/nonexistent'}",
        f"data.limit={args.limit}",
        f"recipe.batch_size={args.batch_size}",
        "test_split=null",  # evaluation is not timed: nothing decodes the test split
        f"trainer.device={args.device}",
        "trainer.checkpoint_every=1000000000",  # no checkpoint writes inside the timed steps
        "trainer.progress=false",
        "name=bench_train",
        *args.overrides,  # the user's, last: they win
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=HYDRA_VERSION_BASE):
        return compose(config_name="train", overrides=overrides)


def synthetic_tensors(n_train: int, n_val: int, size: int, classes: int) -> Callable[[DictConfig, str], ImageTensors]:
    """A stand-in for `repro.data.build._tensors`: random uint8 images in memory (seeded), as CIFAR would be."""
    names = [f"class{c}" for c in range(classes)]

    def make(cfg: DictConfig, split: str) -> ImageTensors:
        n = n_train if split == cfg.train_split else n_val
        g = torch.Generator().manual_seed(0 if split == cfg.train_split else 1)
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, classes, (n,), generator=g).tolist()
        return ImageTensors(images, labels, names, [f"synthetic-{split}/{i}" for i in range(n)])

    return make


def build_run(args: argparse.Namespace, device: torch.device, out: Path) -> tuple[rt.Training, str]:
    """The project's Training (repro.train.setup) over real CIFAR JPEGs or synthetic in-memory data; and which."""
    use_real = not args.synthetic and args.root.is_dir()
    if not args.synthetic and not use_real:
        print(f"bench_train: {str(args.root)!r} not found; using synthetic in-memory data (pass --root DIR)",
              file=sys.stderr)
    cfg = compose_config(args, args.root if use_real else None)
    rt.check_config(cfg)
    if use_real:
        source = f"real CIFAR-10 JPEGs from {args.root} (data.limit={args.limit}, decoded once)"
        t0 = time.perf_counter()
        run = rt.setup(cfg, Dist(), device, out)
        source += f", setup {time.perf_counter() - t0:.1f}s"
    else:
        source = f"synthetic random uint8 in memory ({args.limit} train images)"
        real = rb._tensors
        rb._tensors = synthetic_tensors(args.limit, max(args.batch_size, 256), 32, 10)
        try:
            run = rt.setup(cfg, Dist(), device, out)
        finally:
            rb._tensors = real
    return run, source


# ------------------------------------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    """Wait for the device (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_steps(run: rt.Training, steps: int) -> float:
    """Seconds for `steps` optimizer steps of repro.train.train_one_epoch (crossing epochs when needed)."""
    target = run.state.progress.step + steps
    run.run.total_steps = target
    sync(run.run.device)
    t0 = time.perf_counter()
    while run.state.progress.step < target:
        run.epoch()
    sync(run.run.device)
    return time.perf_counter() - t0


def bare_batch(run: rt.Training) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch already augmented and normalized on the device (float, in the training layout)."""
    batch = next(iter(run.data.loader))
    x = batch["views"].to(run.run.device)
    if run.data.batch_aug is not None:
        x = run.data.batch_aug(x, sample_seed(run.run.cfg.seed, 0, 0))
    with torch.no_grad():
        x = run.normalize(x)
    if run.run.cfg.trainer.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.clone(), batch["labels"].to(run.run.device)


def bare_step(run: rt.Training, x: torch.Tensor, y: torch.Tensor) -> None:
    """Forward, loss, backward and the optimizer step of the run's own model (same autocast as training)."""
    dtype = run.numerics.amp_dtype
    with torch.autocast(run.run.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = run.criterion(run.model(x).float(), y)
    loss.backward()
    run.state.optimizer.step()
    run.state.optimizer.zero_grad(set_to_none=True)


def bare_steps(run: rt.Training, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Seconds for `steps` bare steps."""
    run.model.train()
    sync(run.run.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        bare_step(run, x, y)
    sync(run.run.device)
    return time.perf_counter() - t0


def stage_breakdown(run: rt.Training, steps: int) -> dict[str, float]:
    """Mean ms per step of each stage of the loader path before the model, as train_one_epoch runs them."""
    dev, seed = run.run.device, run.run.cfg.seed
    totals = {"loader (TensorBatches)": 0.0, ".to(device)": 0.0, "BatchPadCrop": 0.0, "Normalize": 0.0}
    run.normalize.train()
    sampler = run.data.loader.sampler
    sampler.set_epoch(10_000, 0)  # any epoch: a shuffle of its own
    it = iter(run.data.loader)
    n = min(steps, sampler.batches)
    with torch.no_grad():
        for b in range(n):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            x = batch["views"].to(dev, non_blocking=True)
            batch["labels"].to(dev, non_blocking=True)
            sync(dev)
            t2 = time.perf_counter()
            if run.data.batch_aug is not None:
                x = run.data.batch_aug(x, sample_seed(seed, 10_000, b))
            sync(dev)
            t3 = time.perf_counter()
            x = run.normalize(x)
            sync(dev)
            t4 = time.perf_counter()
            for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                totals[key] += dt
    sampler.set_epoch(run.state.progress.epoch, run.state.progress.batch)
    return {k: 1000.0 * v / n for k, v in totals.items()}


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="CIFAR-10 image folders (train/<class>/)")
    ap.add_argument("--synthetic", action="store_true", help="random uint8 images in memory instead of --root")
    ap.add_argument("--limit", type=int, default=5000, help="data.limit: at most N images per split")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per timed pass")
    ap.add_argument("--rounds", type=int, default=5, help="timed (bare, full) pairs; the median is reported")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps of each kind first")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="repro-train overrides, e.g. trainer.compile=true trainer.amp=bf16")
    args = ap.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        ap.error(f"{bad[0]!r} is not an override; write KEY=VALUE, e.g. trainer.amp=bf16")
    if min(args.steps, args.rounds, args.batch_size, args.limit) < 1 or args.warmup < 0:
        ap.error("--steps, --rounds, --batch-size and --limit must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    """Build the run, warm up, time interleaved rounds, print the table (and write --json)."""
    args = parse_args(argv)
    register_configs()
    check_overrides("train", argv=args.overrides)  # a bad value is one line naming the choices
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    info = machine_info(device)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        run, source = build_run(args, device, Path(tmp))
        try:
            results = measure(run, args)
        finally:
            run.close()
    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report(args, info, source, run, results)


def measure(run: rt.Training, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up, then `rounds` interleaved bare/full passes and the loader-path breakdown."""
    x, y = bare_batch(run)
    bare_steps(run, x, y, args.warmup)
    if args.warmup:
        full_steps(run, args.warmup)
    bare, full = [], []
    images = args.steps * args.batch_size
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for r in range(args.rounds):
        order = ("bare", "full") if r % 2 == 0 else ("full", "bare")
        for kind in order:
            if kind == "bare":
                bare.append(images / bare_steps(run, x, y, args.steps))
            else:
                full.append(images / full_steps(run, args.steps))
    # CPU time this process got per wall second and thread: well below 1 means others took the cores.
    threads = min(torch.get_num_threads(), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    cpu_share = (time.process_time() - cpu0) / ((time.perf_counter() - wall0) * threads)
    ratios = [f / b for f, b in zip(full, bare)]
    stages = stage_breakdown(run, args.steps)
    bare_ms = 1000.0 * args.batch_size / statistics.median(bare)
    return {"bare_img_s": bare, "full_img_s": full, "ratios": ratios, "stages_ms": stages,
            "bare_ms_per_step": bare_ms,
            "full_ms_per_step": 1000.0 * args.batch_size / statistics.median(full),
            "implied_ratio": bare_ms / (bare_ms + sum(stages.values())), "cpu_share": cpu_share}


def amp_name(dtype: torch.dtype | None) -> str | None:
    """bfloat16 / float16 for the autocast dtype, None for full precision."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def fmt(values: list[float], digits: int = 1) -> str:
    """Numbers joined by spaces."""
    return " ".join(f"{v:.{digits}f}" for v in values)


def report(args: argparse.Namespace, info: dict[str, Any], source: str, run: rt.Training, res: dict[str, Any]) -> None:
    """Print machine info, the table and the breakdown; write --json."""
    bare_med, full_med = statistics.median(res["bare_img_s"]), statistics.median(res["full_img_s"])
    ratio = statistics.median(res["ratios"])
    print(f"machine: {info['cpu']}, {info['cores']} cores ({info['cores_usable']} usable), torch {info['torch']}, "
          f"{info['threads']} threads" + (f", GPU {info['gpu']}" if "gpu" in info else ""))
    busy = info["cpu_busy_before"]
    print(f"load: CPUs {'?' if busy is None else f'{100 * busy:.0f}%'} busy before the run (other processes); "
          f"load average start {fmt(info['loadavg_start'] or [], 2)}, end {fmt(info['loadavg_end'] or [], 2)}")
    cfg = run.run.cfg
    print(f"model: {cfg.model.name}, recipe {cfg.recipe.name}, device {run.run.device}, batch {args.batch_size}, "
          f"amp {amp_name(run.numerics.amp_dtype)}, channels_last {cfg.trainer.channels_last}, "
          f"compile {cfg.trainer.compile}, {args.steps} steps x {args.rounds} rounds (warm-up {args.warmup})")
    if args.overrides:
        print(f"overrides: {' '.join(args.overrides)}")
    print(f"data: {source}; {run.data.loader.sampler.length} training images, "
          f"{run.data.loader.sampler.batches} batches/epoch")
    print()
    print(f"{'':<44}{'median img/s':>13}  per round")
    print(f"{'bare step (pre-made normalized batch)':<44}{bare_med:>13.1f}  {fmt(res['bare_img_s'])}")
    print(f"{'full step (train_one_epoch, loader path)':<44}{full_med:>13.1f}  {fmt(res['full_img_s'])}")
    print(f"{'ratio full/bare (median of per-round ratios)':<44}{ratio:>13.3f}  {fmt(res['ratios'], 3)}")
    verdict = "meets" if ratio >= TARGET else "BELOW"
    print(f"target >= {TARGET}: {verdict}")
    print()
    print(f"per step: bare {res['bare_ms_per_step']:.1f} ms, full {res['full_ms_per_step']:.1f} ms "
          f"(difference {res['full_ms_per_step'] - res['bare_ms_per_step']:+.1f} ms)")
    print("loader path before the model, mean ms per step:")
    for k, v in res["stages_ms"].items():
        print(f"  {k:<26}{v:8.2f}")
    stages = sum(res["stages_ms"].values())
    print(f"  {'total':<26}{stages:8.2f}")
    print(f"ratio implied by these stages alone: bare / (bare + stages) = {res['implied_ratio']:.3f}")
    if run.run.device.type == "cpu":
        low = " (well below 100%: other processes took the cores)" if res["cpu_share"] < 0.8 else ""
        print(f"CPU share during the timed rounds: {100 * res['cpu_share']:.0f}% of {info['threads']} thread(s){low}")
    if (busy is not None and busy > 0.25) or (run.run.device.type == "cpu" and res["cpu_share"] < 0.8):
        print("note: other processes were using the CPUs: rates are disturbed (multi-threaded ops most); compare "
              "the ratios rather than absolute rates, or try --threads 1")
    if args.json:
        out = {"machine": info, "data": source, "model": run.run.cfg.model.name, "device": str(run.run.device),
               "overrides": args.overrides, "amp": amp_name(run.numerics.amp_dtype),
               "channels_last": cfg.trainer.channels_last, "compile": cfg.trainer.compile,
               "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
               "bare_img_s_median": bare_med, "full_img_s_median": full_med, "ratio_median": ratio,
               "target": TARGET, **res}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
