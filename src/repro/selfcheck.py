"""`repro-selfcheck`: is this machine ready to reproduce the papers? PASS / FAIL / SKIP per check, in minutes.

Environment, collectives in a real process group, evaluation parity across precisions, short training runs in
every precision, throughput, memory at the recipe's batch, and a bit-identical resume. On a CPU-only machine the
CUDA checks are skipped (with the reason) and the others run on tiny models in seconds. Exit code 1 on any FAIL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from repro.cli import CONFIG_DIR, HYDRA_VERSION_BASE, check_overrides, fail, save_run_info
from repro.config import register_configs

log = logging.getLogger(__name__)

STATUSES = ("pass", "fail", "skip")


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str  # pass | fail | skip
    detail: str


@dataclass
class Context:
    """What the checks share: the config, the device, the run dir, the weights the training check left."""

    cfg: DictConfig
    device: torch.device
    out: Path
    trained: dict[str, Any] | None = None  # {"state": state_dict} of a ResNet-20 trained on digits in fp32

    @property
    def cuda(self) -> bool:
        """Whether the device checks run on a GPU."""
        return self.device.type == "cuda"


NO_GPU = "no CUDA GPU visible"


# ------------------------------------------------------------------------------------------ environment


def machine_info() -> dict[str, Any]:
    """Versions and hardware: torch, CUDA, cuDNN, NCCL, the GPUs, native bf16, TF32 and cuDNN flags."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
        else None, "nccl": None, "gpus": [],
        "flags": {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                  "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "cudnn_enabled": torch.backends.cudnn.enabled,
                  "cudnn_benchmark": torch.backends.cudnn.benchmark,
                  "cudnn_deterministic": torch.backends.cudnn.deterministic,
                  "float32_matmul_precision": torch.get_float32_matmul_precision()},
    }
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):
            v = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                 "memory_gib": round(p.total_memory / 2**30, 1)})
        info["bf16_native"] = torch.cuda.is_bf16_supported(including_emulation=False)
    return info


def check_environment(ctx: Context) -> list[Check]:
    """torch / CUDA / cuDNN / NCCL versions, the GPU with native bf16, and the precision flags."""
    m = machine_info()
    checks = [Check("environment", "pass", f"torch {m['torch']}, python {m['python']}, {m['cpu_count']} CPUs")]
    if not ctx.cuda:
        checks.append(Check("gpu", "skip", f"{NO_GPU}: CUDA, cuDNN, NCCL, bf16 not checked"))
    else:
        gpu = m["gpus"][ctx.device.index or 0]
        problems = [what for what, ok in (("cuDNN", m["cudnn"]), ("NCCL", m["nccl"]), ("native bf16", m["bf16_native"]))
                    if not ok]
        detail = (f"{gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']} GiB) x{len(m['gpus'])}; CUDA "
                  f"{m['cuda']}, cuDNN {m['cudnn']}, NCCL {m['nccl']}, native bf16 {m['bf16_native']}")
        checks.append(Check("gpu", "fail" if problems else "pass",
                            detail + (f"; missing: {', '.join(problems)}" if problems else "")))
    f = m["flags"]
    checks.append(Check("precision_flags", "pass",
                        f"TF32 matmul {f['matmul_allow_tf32']}, TF32 cuDNN {f['cudnn_allow_tf32']}, float32 matmul "
                        f"precision {f['float32_matmul_precision']}, cuDNN benchmark {f['cudnn_benchmark']}, "
                        f"deterministic {f['cudnn_deterministic']} (repro-train sets cudnn.benchmark per trainer)"))
    return checks


# ------------------------------------------------------------------------------------------ collectives


def _free_port() -> int:
    """A free TCP port on localhost."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collective_worker(rank: int, world: int, port: int, backend: str, out_dir: str) -> None:
    """One rank: join the group through repro.distributed, run each collective the project uses, write results."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    from repro.distributed import all_reduce_sum, broadcast_object, cleanup, gather_objects, init_distributed

    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    results: dict[str, Any] = {}
    d = init_distributed(device)
    try:
        if world > 1 and not d.enabled:
            raise RuntimeError("init_distributed did not join a group")
        # Tensors: the evaluation's long counts and the BN recalibration's float buffers.
        counts = all_reduce_sum(torch.tensor([rank + 1, 10 * (rank + 1)], dtype=torch.long, device=device), d)
        results["all_reduce_sum_long"] = counts.cpu().tolist()
        buf = all_reduce_sum(torch.full((3,), 0.5 * (rank + 1), device=device), d)
        results["all_reduce_sum_float"] = buf.cpu().tolist()
        # Objects: the run dir from rank 0, and the per-rank skipped lists / prediction rows.
        results["broadcast_object"] = broadcast_object({"run_dir": f"dir-of-rank-{rank}"}, d)
        results["gather_objects"] = gather_objects([("rank", rank)], d)
        # DDP's gradient all-reduce (the training loop): each rank a different input, same mean gradient.
        torch.manual_seed(0)
        lin = nn.Linear(4, 1, bias=False).to(device)
        model = nn.parallel.DistributedDataParallel(lin, device_ids=[device.index] if device.type == "cuda" else None) \
            if d.enabled else lin
        x = torch.full((1, 4), float(rank + 1), device=device)
        model(x).sum().backward()
        results["ddp_grad"] = lin.weight.grad.cpu().flatten().tolist()
    except Exception as e:  # reported by the parent
        results["error"] = f"{type(e).__name__}: {e}"
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    if d.enabled and "error" not in results:
        torch.distributed.barrier()  # no rank leaves the group while a peer still talks to it
    cleanup(d)


def expected_collectives(world: int) -> dict[str, Any]:
    """What every rank must hold after `collective_worker`, computed by hand."""
    s = world * (world + 1) // 2  # sum of rank + 1
    return {"all_reduce_sum_long": [s, 10 * s], "all_reduce_sum_float": [0.5 * s] * 3,
            "broadcast_object": {"run_dir": "dir-of-rank-0"},
            "gather_objects": [[["rank", r]] for r in range(world)],
            "ddp_grad": [s / world] * 4}


def run_collectives(backend: str, world: int, timeout: float = 120.0) -> tuple[str, str]:
    """Spawn `world` processes on localhost, run the collectives, compare each rank with the expectation."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="repro-selfcheck-") as tmp:
        ctx = mp.spawn(collective_worker, args=(world, _free_port(), backend, tmp), nprocs=world, join=False)
        t0 = time.monotonic()
        teardown = ""
        try:
            while not ctx.join(timeout=5):
                if time.monotonic() - t0 > timeout:
                    for p in ctx.processes:
                        p.kill()
                    return "fail", f"{backend}: the {world}-process group hung for {timeout:.0f} s"
        except mp.ProcessExitedException as e:  # a rank died; fine only after it wrote every result (teardown)
            if not all(Path(tmp, f"rank{r}.json").is_file() for r in range(world)):
                raise
            teardown = f" (a rank then died leaving the group: {e})"
        want = expected_collectives(world)
        bad = []
        for r in range(world):
            got = json.loads(Path(tmp, f"rank{r}.json").read_text())
            if "error" in got:
                bad.append(f"rank {r}: {got['error']}")
                continue
            # JSON turns tuples into lists on both sides; floats compare exactly (small integers and halves).
            bad += [f"rank {r} {k}: {got.get(k)} != {v}" for k, v in json.loads(json.dumps(want)).items()
                    if got.get(k) != v]
    names = ", ".join(want)
    if bad:
        return "fail", f"{backend}, {world} processes: " + "; ".join(bad)
    return "pass", f"{backend}, {world} processes: {names} agree on every rank{teardown}"


def check_collectives(ctx: Context) -> list[Check]:
    """Every collective of repro.distributed (and DDP), on tensors and objects, in gloo and (on GPUs) NCCL groups."""
    status, detail = run_collectives("gloo", 2)
    checks = [Check("collectives_gloo", status, detail)]
    if not ctx.cuda:
        checks.append(Check("collectives_nccl", "skip", f"{NO_GPU}: NCCL not checked"))
    else:
        # NCCL refuses two ranks on one GPU: one process per visible GPU, at most 2.
        status, detail = run_collectives("nccl", min(2, torch.cuda.device_count()))
        checks.append(Check("collectives_nccl", status, detail))
    return checks


# ------------------------------------------------------------------------------------------ training


def train_config(overrides: list[str]) -> DictConfig:
    """repro-train's config with these overrides (composed as repro-train composes it)."""
    from hydra import compose

    return compose(config_name="train", overrides=["trainer.progress=false", *overrides])


class RecordLoss(nn.Module):
    """Wraps the run's criterion: keeps every loss; optionally asks the run to stop after `stop_after` calls."""

    def __init__(self, criterion: nn.Module, run: Any = None, stop_after: int | None = None) -> None:
        super().__init__()
        self.criterion, self.run, self.stop_after = criterion, run, stop_after
        self.losses: list[torch.Tensor] = []

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The wrapped loss."""
        loss = self.criterion(logits, y)
        self.losses.append(loss.detach())
        if self.stop_after is not None and len(self.losses) == self.stop_after:
            self.run.stop_signal = "selfcheck stop"  # the path a SIGTERM takes
        return loss


def _device_overrides(ctx: Context) -> list[str]:
    """trainer.device for the training config."""
    return [f"trainer.device={ctx.device.type}"]


def gpu_train_overrides(ctx: Context) -> list[str]:
    """ResNet-50 on synthetic ImageNet-sized images, 10 classes (so a few dozen steps lower the loss)."""
    workers = min(8, os.cpu_count() or 1)
    return ["model=resnet50", "data=synthetic", "recipe=resnet_imagenet", "data.num_classes=10", "data.length=512",
            f"data.num_workers={workers}", f"recipe.batch_size={ctx.cfg.gpu_batch}", "val_split=null",
            "test_split=null", *_device_overrides(ctx)]


def cpu_train_overrides(ctx: Context) -> list[str]:
    """The offline default: ResNet-20 on the bundled digits, at a small batch (seconds on a CPU)."""
    return ["val_split=null", "test_split=null", f"recipe.batch_size={ctx.cfg.cpu_batch}", *_device_overrides(ctx)]


def train_steps(ctx: Context, overrides: list[str], steps: int, name: str) -> tuple[Any, RecordLoss, int]:
    """`steps` optimizer steps through repro.train's setup and train_one_epoch; (run, losses, optimizer steps)."""
    from repro.distributed import Dist
    from repro.train import setup

    cfg = train_config([*overrides, f"trainer.max_steps={steps}"])
    run = setup(cfg, Dist(), ctx.device, ctx.out / name)
    try:
        rec = RecordLoss(run.criterion)
        run.criterion = rec
        taken = [0]
        handle = run.state.optimizer.register_step_post_hook(lambda *_: taken.__setitem__(0, taken[0] + 1))
        while run.state.progress.step < run.run.total_steps:
            run.epoch()
        handle.remove()
    finally:
        run.close()
    return run, rec, taken[0]


def loss_verdict(losses: list[float], window: int = 5) -> tuple[bool, str]:
    """Finite everywhere, and the mean of the last `window` losses below the mean of the first `window`."""
    if not losses:
        return False, "no loss recorded"
    if not all(math.isfinite(v) for v in losses):
        return False, f"non-finite loss at step {next(i for i, v in enumerate(losses) if not math.isfinite(v))}"
    w = max(1, min(window, len(losses) // 3))
    first, last = sum(losses[:w]) / w, sum(losses[-w:]) / w
    return last < first, f"loss {first:.3f} -> {last:.3f} (mean of first/last {w} of {len(losses)} steps)"


def check_training(ctx: Context) -> list[Check]:
    """A few dozen steps per precision: finite, falling loss; fp16's scale and skipped steps; compile's recompiles."""
    steps = ctx.cfg.train_steps
    checks = []
    if not ctx.cuda:
        run, rec, _ = train_steps(ctx, [*cpu_train_overrides(ctx), "trainer.amp=off"], steps, "train_fp32")
        steps_note = f"batch {ctx.cfg.cpu_batch}"
        ok, detail = loss_verdict([float(v) for v in rec.losses])
        ctx.trained = {"state": {k: v.detach().cpu().clone() for k, v in run.state.model.state_dict().items()}}
        checks.append(Check("train_fp32", "pass" if ok else "fail",
                            f"resnet20 on digits, {steps_note}, fp32: {detail}"))
        for name in ("train_bf16", "train_fp16", "train_bf16_compile"):
            checks.append(Check(name, "skip", f"{NO_GPU}: mixed precision and compile are checked on a GPU"))
        return checks
    for name, amp, compile_ in (("train_fp32", "off", False), ("train_bf16", "bf16", False),
                                ("train_fp16", "fp16", False), ("train_bf16_compile", "bf16", True)):
        try:
            extra = ""
            if compile_:
                import torch._dynamo

                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
            t0 = time.perf_counter()
            run, rec, taken = train_steps(ctx, [*gpu_train_overrides(ctx), f"trainer.amp={amp}",
                                                f"trainer.compile={str(compile_).lower()}"], steps, name)
            ok, detail = loss_verdict([float(v) for v in rec.losses])
            if amp == "fp16":
                skipped = run.state.progress.step - taken
                extra = f"; grad scale {run.state.scaler.get_scale():g}, {skipped} skipped steps"
            if compile_:
                c = torch._dynamo.utils.counters
                graphs = c["stats"].get("unique_graphs", 0)
                recompiles = sum(c["recompiles"].values()) if "recompiles" in c else 0
                extra = f"; {graphs} graphs compiled, {recompiles} recompiles"
            checks.append(Check(name, "pass" if ok else "fail",
                                f"resnet50, synthetic, batch {ctx.cfg.gpu_batch}, {amp}: {detail}{extra} "
                                f"({time.perf_counter() - t0:.0f} s)"))
        except Exception as e:
            checks.append(Check(name, "fail", _error(e)))
    return checks


# ------------------------------------------------------------------------------------------ evaluation parity


def _eval_pass(model: nn.Module, normalize: nn.Module, loader: Any, device: torch.device, amp: bool,
               paths: list[str]) -> tuple[dict[str, Any], list[int], torch.Tensor]:
    """repro.scoring.evaluate's counts and top-1 predictions, and the logits of a direct forward (CPU, fp32)."""
    from repro.scoring import evaluate

    model = model.to(device).to(memory_format=torch.channels_last)
    normalize = normalize.to(device)
    res = evaluate(model, normalize, loader, device, ["center"], paths=paths, amp=amp, progress=False)
    preds = [r["pred1"] for r in res.predictions]  # in loader order (one process, sequential sampler)
    logits = []
    with torch.inference_mode():
        for batch in loader:
            x = normalize(batch["views"]["center"].flatten(0, 1).to(device))
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits.append(model(x).float().cpu())
    return res.metrics()["center"], preds, torch.cat(logits)


@contextlib.contextmanager
def tf32(enabled: bool) -> Any:
    """TF32 matmuls and convolutions on or off, restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def check_eval_parity(ctx: Context) -> list[Check]:
    """One checkpoint on CPU fp32 and the device in fp32, TF32, bf16: equal counts in fp32, flips and logit gaps."""
    from torch.utils.data import DataLoader

    from repro.data import Normalize, ShardSampler, collate
    from repro.data.build import build_data
    from repro.data.transforms import EvalViews
    from repro.distributed import Dist
    from repro.models import create_model_from_config

    # The digits test split and a ResNet-20 with the CPU training check's weights (or trained here, on the device).
    cfg = train_config([*cpu_train_overrides(ctx), "test_split=test"])
    cfg.data.batch_size = 120  # evaluation batches
    data = build_data(cfg, cfg.model.resolution, cfg.recipe.batch_size, Dist(), torch.device("cpu"))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg["num_classes"] = len(data.classes)
    model = create_model_from_config(model_cfg)
    if ctx.trained is None:  # a digits model trained a few steps in fp32 (a random one would predict one class)
        run, _, _ = train_steps(ctx, [*cpu_train_overrides(ctx), "trainer.amp=off"], ctx.cfg.train_steps, "parity")
        ctx.trained = {"state": {k: v.detach().cpu().clone() for k, v in run.state.model.state_dict().items()}}
    model.load_state_dict(ctx.trained["state"])
    ds = data.test
    ds.transform = EvalViews(["center"], resize=data.eval_size[0], crop=data.eval_size[1])
    loader = DataLoader(ds, batch_size=cfg.data.batch_size, sampler=ShardSampler(len(ds), 0, 1), collate_fn=collate)
    paths = list(ds.paths)
    normalize = Normalize(data.preprocessing)
    ref, ref_pred, ref_logits = _eval_pass(model, normalize, loader, torch.device("cpu"), False, paths)
    # Independent count: argmax of the direct forward (ties are measure-zero for trained float logits).
    labels = torch.tensor(ds.labels)
    direct = int((ref_logits.argmax(1) == labels).sum())
    base = f"cpu fp32 top-1 err {ref['top1_err']:.2f}% ({ref['images']} images)"
    if round(ref["images"] * (1 - ref["top1_err"] / 100)) != direct or ref_pred != ref_logits.argmax(1).tolist():
        return [Check("eval_parity", "fail", f"{base}: evaluate counts {ref} disagree with a direct forward's "
                                             f"{direct} correct")]
    if not ctx.cuda:
        return [Check("eval_parity", "pass", f"{base}, equal to a direct forward's count; device modes: {NO_GPU}")]
    parts, status = [base], "pass"
    for mode, tf, amp in (("fp32", False, False), ("tf32", True, False), ("bf16", False, True)):
        with tf32(tf):
            got, pred, logits = _eval_pass(model, normalize, loader, ctx.device, amp, paths)
        flips = sum(a != b for a, b in zip(pred, ref_pred))
        gap = float((logits - ref_logits).abs().max())
        parts.append(f"{mode}: {flips} flipped, max |dlogit| {gap:.2e}")
        if mode == "fp32" and (got["top1_err"], got["top5_err"]) != (ref["top1_err"], ref["top5_err"]):
            status = "fail"
            parts.append(f"fp32 counts differ from the CPU: {got} vs {ref}")
    return [Check("eval_parity", status, "; ".join(parts))]


# ------------------------------------------------------------------------------------------ throughput, memory


def _sync(device: torch.device) -> None:
    """Wait for the device."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_steps(run: Any, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Seconds per optimizer step on one device-resident batch (no loader): the median of `steps` timed steps."""
    def step() -> None:
        dtype = run.numerics.amp_dtype
        with torch.autocast(run.run.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = run.criterion(run.model(x).float(), y)
        run.state.scaler.scale(loss).backward()
        run.state.scaler.step(run.state.optimizer)
        run.state.scaler.update()
        run.state.optimizer.zero_grad(set_to_none=True)

    run.model.train()
    for _ in range(3):  # warm-up (cuDNN benchmark, oneDNN primitives, allocator)
        step()
    times = []
    for _ in range(max(1, steps)):
        _sync(run.run.device)
        t0 = time.perf_counter()
        step()
        _sync(run.run.device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def device_batch(run: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch on the device, augmented and normalized as the loop does it."""
    from repro.data.loaders import sample_seed

    run.data.loader.sampler.set_epoch(0, 0)
    batch = next(iter(run.data.loader))
    x = batch["views"].to(run.run.device)
    if run.data.batch_aug is not None:
        x = run.data.batch_aug(x, sample_seed(0, 0, 0))
    x = run.normalize(x)
    if run.run.cfg.trainer.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, batch["labels"].to(run.run.device)


def loader_rate(cfg: DictConfig, device: torch.device, batches: int) -> float:
    """Images per second the training loader delivers with cfg.data.num_workers workers."""
    from repro.data.build import build_data
    from repro.distributed import Dist
    from repro.train import batch_plan

    per = batch_plan(cfg, 1)["per_process"]
    data = build_data(cfg, cfg.model.resolution, per, Dist(), device)
    data.loader.sampler.set_epoch(0, 0)
    it = iter(data.loader)
    next(it)  # workers started
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            n += len(next(it)["labels"])
        except StopIteration:
            break
    return n / max(time.perf_counter() - t0, 1e-9)


def check_throughput(ctx: Context) -> list[Check]:
    """Bare-step img/s beside loader img/s, and the loader workers the step needs."""
    from repro.data.datasets import spec_of
    from repro.distributed import Dist
    from repro.train import setup

    overrides = ([*gpu_train_overrides(ctx), "trainer.amp=auto"] if ctx.cuda else
                 [*cpu_train_overrides(ctx), "trainer.amp=off"])
    cfg = train_config([*overrides, "trainer.max_steps=10"])
    run = setup(cfg, Dist(), ctx.device, ctx.out / "throughput")
    run.close()
    x, y = device_batch(run)
    step_rate = len(y) / bare_steps(run, x, y, ctx.cfg.throughput_steps)
    workers = cfg.data.num_workers
    batches = ctx.cfg.throughput_steps
    rate = loader_rate(cfg, ctx.device, batches)
    one = loader_rate(train_config([*overrides, "data.num_workers=0"]), ctx.device, max(2, batches // 4)) \
        if workers > 0 else rate
    need = math.ceil(step_rate / one) if one > 0 else -1
    detail = (f"{cfg.model.name}, batch {len(y)}, amp {cfg.trainer.amp}: bare step {step_rate:.0f} img/s; loader "
              f"{rate:.0f} img/s with {workers or 'no'} worker processes ({one:.0f} img/s in one process): "
              f"~{need} workers keep up ({os.cpu_count()} CPUs)")
    if spec_of(cfg.data.name).in_memory:
        detail += "; in-memory data, batches augmented on the device"
    return [Check("throughput", "pass", detail), check_device_batches(ctx), check_device_decode(ctx)]


def check_device_batches(ctx: Context) -> Check:
    """In-memory data (digits, as CIFAR) on the GPU: batches, labels and crop offsets never leave it, no host sync."""
    if not ctx.cuda:
        return Check("device_batches", "skip", f"{NO_GPU}: in-memory data stays on the CPU")
    from repro.data.loaders import sample_seed
    from repro.distributed import Dist
    from repro.train import setup

    run = setup(train_config(cpu_train_overrides(ctx)), Dist(), ctx.device, ctx.out / "device_batches")
    run.close()
    run.data.loader.sampler.set_epoch(0, 0)
    it = iter(run.data.loader)
    first = next(it)  # the epoch's order is copied to the device here, once per epoch
    where = {first["views"].device.type, first["labels"].device.type, first["indices"].device.type}
    _sync(ctx.device)
    batches = min(5, len(run.data.loader) - 1)
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises from here on
    try:
        for b in range(1, 1 + batches):
            batch = next(it)
            x = run.data.batch_aug(batch["views"], sample_seed(0, 0, b))
            run.normalize(x)
    except RuntimeError as e:
        return Check("device_batches", "fail", f"a host-device sync in the in-memory batch path: {e}")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    if where != {ctx.device.type}:
        return Check("device_batches", "fail", f"in-memory batches come from {sorted(where)}, not the GPU")
    return Check("device_batches", "pass", f"{batches} batches indexed, cropped, flipped and normalized on the GPU "
                                           f"with no host-device sync")


def check_device_decode(ctx: Context) -> Check:
    """data.decode=gpu: nvJPEG batches against the CPU decoder on the same windows (pixels, img/s per process)."""
    if not ctx.cuda:
        return Check("device_decode", "skip", f"{NO_GPU}: data.decode=gpu not tried")
    import numpy as np
    from PIL import Image

    from repro.data import collate
    from repro.data.datasets import ImageFiles, scan_folder
    from repro.data.device_decode import DeviceDecode, EncodedFiles
    from repro.data.loaders import SeededSamples
    from repro.data.transforms import ScaleAugCrop

    folder = ctx.out / "jpegs" / "a"  # 64 photo-sized JPEGs of smooth noise
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(64):
        arr = np.clip(rng.normal(128, 60, (94, 125, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).resize((500, 375), Image.BILINEAR).save(folder / f"{i}.jpg", quality=90)
    paths, labels, classes = scan_folder(folder.parent)
    t = ScaleAugCrop(224)
    cpu_set = SeededSamples(ImageFiles(paths, labels, classes, t), seed=0)
    enc_set = SeededSamples(EncodedFiles(ImageFiles(paths, labels, classes), t), seed=0)
    t0 = time.perf_counter()
    want = collate([cpu_set[(0, i)] for i in range(len(paths))])["views"]
    cpu_rate = len(paths) / (time.perf_counter() - t0)
    batch = collate([enc_set[(0, i)] for i in range(len(paths))])
    decoder = DeviceDecode(t, ctx.device)
    decoder(batch)  # warm-up (nvJPEG handles, kernels)
    _sync(ctx.device)
    t0 = time.perf_counter()
    got = decoder(batch)["views"]
    _sync(ctx.device)
    gpu_rate = len(paths) / (time.perf_counter() - t0)
    diff = (got.cpu().float() - want.float()).abs()
    ok = got.shape == want.shape and diff.mean().item() < 2.0
    return Check("device_decode", "pass" if ok else "fail",
                 f"nvJPEG + crop of {len(paths)} 500x375 JPEGs: {gpu_rate:.0f} img/s in the main process vs "
                 f"{cpu_rate:.0f} img/s decoding on one CPU core; same windows, pixels {diff.mean().item():.2f} "
                 f"apart on average (max {diff.max().item():.0f}) of 255")


def check_memory(ctx: Context) -> list[Check]:
    """Peak GPU memory of a training step at the recipe's batch and of a 10-crop evaluation batch."""
    if not ctx.cuda:
        return [Check("memory_train", "skip", f"{NO_GPU}: GPU memory not measured"),
                Check("memory_ten_crop", "skip", f"{NO_GPU}: GPU memory not measured")]
    from repro.distributed import Dist
    from repro.train import setup

    total = torch.cuda.get_device_properties(ctx.device).total_memory
    checks = []
    # The recipe's global batch on one GPU, in repro-train's default precision.
    cfg = train_config(["model=resnet50", "data=synthetic", "recipe=resnet_imagenet", "val_split=null",
                        "test_split=null", "data.length=512", "trainer.max_steps=2", *_device_overrides(ctx)])
    batch = cfg.recipe.batch_size
    try:
        cfg.data.length = max(512, batch)
        run = setup(cfg, Dist(), ctx.device, ctx.out / "memory")
        run.close()
        x = torch.randn(batch, 3, 224, 224, device=ctx.device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, len(run.data.classes), (batch,), device=ctx.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
        bare_steps(run, x, y, 1)
        peak = torch.cuda.max_memory_allocated(ctx.device)
        checks.append(Check("memory_train", "pass", f"resnet50 training step, batch {batch} (recipe resnet_imagenet),"
                                                    f" amp {cfg.trainer.amp}: peak {peak / 2**30:.1f} GiB of "
                                                    f"{total / 2**30:.0f} GiB"))
        del run, x, y
    except Exception as e:
        checks.append(Check("memory_train", "fail", f"batch {batch}: {_error(e)}"))
    # repro-eval's 10-crop: data.batch_size images x 10 views through the net at once (fp32, eval.amp=false).
    from hydra import compose

    from repro.models import create_model_from_config

    ecfg = compose(config_name="eval", overrides=["model=resnet50", "data=imagenet"])
    b = ecfg.data.batch_size
    try:
        model = create_model_from_config(OmegaConf.to_container(ecfg.model, resolve=True)).to(ctx.device).eval()
        model = model.to(memory_format=torch.channels_last)
        x = torch.randn(b * 10, 3, 224, 224, device=ctx.device).contiguous(memory_format=torch.channels_last)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
        with torch.inference_mode():
            model(x).float().view(b, 10, -1).softmax(-1).mean(1)
        _sync(ctx.device)
        peak = torch.cuda.max_memory_allocated(ctx.device)
        checks.append(Check("memory_ten_crop", "pass", f"resnet50 ten_crop batch {b} x 10 views, fp32: peak "
                                                       f"{peak / 2**30:.1f} GiB of {total / 2**30:.0f} GiB"))
        del model, x
    except Exception as e:
        checks.append(Check("memory_ten_crop", "fail", f"batch {b} x 10: {_error(e)}"))
    torch.cuda.empty_cache()
    return checks


# ------------------------------------------------------------------------------------------ resume


def check_resume(ctx: Context) -> list[Check]:
    """repro-train's fit: stop (the SIGTERM path) after a few steps, resume=auto, versus an uninterrupted run."""
    from repro.checkpoint import resume
    from repro.distributed import Dist
    from repro.train import fit, setup

    steps, stop_at = ctx.cfg.resume_steps, max(1, ctx.cfg.resume_steps // 2)
    overrides = [*cpu_train_overrides(ctx), f"trainer.max_steps={steps}", "trainer.cudnn_benchmark=false",
                 "resume=auto", "val_split=val", "test_split=test"]
    old = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # cuDNN's algorithm choice must not differ between the runs
    try:
        def new_run(where: str) -> Any:
            return setup(train_config(overrides), Dist(), ctx.device, ctx.out / "resume" / where)

        def finish(run: Any) -> None:
            try:
                fit(run)
            finally:
                run.close()

        whole = new_run("whole")
        finish(whole)
        cut = new_run("cut")
        cut.criterion = RecordLoss(cut.criterion, cut.run, stop_after=stop_at)
        finish(cut)
        stopped = cut.state.progress.step
        cut = new_run("cut")
        r = cut.run
        if not resume(r.out / "checkpoints" / "last.pt", cut.state, r.cfg, r.dist, r.device):
            return [Check("resume", "fail", f"no checkpoint to resume after the stop at step {stopped}")]
        resumed_at = cut.state.progress.step
        finish(cut)
    finally:
        torch.backends.cudnn.deterministic = old
    a, b = whole.state.model.state_dict(), cut.state.model.state_dict()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    ma = json.loads((whole.run.out / "metrics.json").read_text())
    mb = json.loads((cut.run.out / "metrics.json").read_text())
    same_metrics = ma["center"] == mb["center"] and ma["best_val_top1_err"] == mb["best_val_top1_err"]
    detail = (f"resnet20 on digits, batch {ctx.cfg.cpu_batch}, {steps} steps; stopped at step {stopped}, "
              f"resumed at {resumed_at}: "
              f"{len(a) - len(differ)}/{len(a)} tensors bit-identical, test top-1 err {ma['center']['top1_err']:.2f}% "
              f"vs {mb['center']['top1_err']:.2f}%")
    ok = not differ and same_metrics and stopped == stop_at == resumed_at
    if differ:
        detail += f"; differ: {', '.join(differ[:5])}"
    return [Check("resume", "pass" if ok else "fail", detail)]


# ------------------------------------------------------------------------------------------ report


CHECKS: dict[str, Callable[[Context], list[Check]]] = {
    "environment": check_environment,
    "collectives": check_collectives,
    "training": check_training,
    "eval_parity": check_eval_parity,
    "throughput": check_throughput,
    "memory": check_memory,
    "resume": check_resume,
}


def _error(e: BaseException) -> str:
    """One line for an exception, with where it happened."""
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    loc = f" ({Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{loc}"


def run_checks(ctx: Context, groups: list[str]) -> list[Check]:
    """Run each group of checks; an exception is that group's FAIL, not the end of the report."""
    results: list[Check] = []
    for group in groups:
        t0 = time.perf_counter()
        log.info("selfcheck: %s ...", group)
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the report
                got = CHECKS[group](ctx)
        except Exception as e:
            log.error("selfcheck %s failed:\n%s", group, traceback.format_exc())
            got = [Check(group, "fail", _error(e))]
        for c in got:
            log.info("selfcheck %s: %s  %s", c.name, c.status.upper(), c.detail)
        log.info("selfcheck: %s took %.1f s", group, time.perf_counter() - t0)
        results += got
    return results


def format_report(report: dict[str, Any]) -> str:
    """The PASS/FAIL/SKIP table."""
    m = report["machine"]
    gpus = ", ".join(g["name"] for g in m["gpus"]) or "no GPU"
    head = f"repro-selfcheck on {m['hostname']}: torch {m['torch']}, CUDA {m['cuda']}, {gpus}"
    w = max(len(c["name"]) for c in report["checks"])
    lines = [head, ""] + [f"{c['name']:<{w}}  {c['status'].upper():<4}  {c['detail']}" for c in report["checks"]]
    n = {s: sum(c["status"] == s for c in report["checks"]) for s in STATUSES}
    lines += ["", f"{n['pass']} passed, {n['fail']} failed, {n['skip']} skipped"]
    return "\n".join(lines)


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=CONFIG_DIR, config_name="selfcheck")
def _selfcheck(cfg: DictConfig) -> None:
    """Run the checks, print the report, keep it in the run dir as selfcheck.json; exit 1 on any FAIL."""
    from repro.distributed import select_device

    groups = list(cfg.checks) if cfg.checks is not None else list(CHECKS)
    unknown = [g for g in groups if g not in CHECKS]
    if unknown:
        fail(f"checks={unknown} are not known; choose from {list(CHECKS)}")
    try:
        device = select_device(cfg.device)
    except ValueError as e:
        fail(str(e))
    out = save_run_info(cfg)
    ctx = Context(cfg, device, out)
    t0 = time.perf_counter()
    checks = run_checks(ctx, groups)
    report = {"machine": machine_info(), "checks": [asdict(c) for c in checks],
              "seconds": round(time.perf_counter() - t0, 1)}
    (out / "selfcheck.json").write_text(json.dumps(report, indent=2) + "\n")
    if cfg.format == "json":
        print(json.dumps(report))
    else:
        print(format_report(report))
    log.info("report written to %s", out / "selfcheck.json")
    if any(c.status == "fail" for c in checks):
        raise SystemExit(1)


def main() -> None:
    """Console entry point of `repro-selfcheck`."""
    register_configs()
    check_overrides("selfcheck")
    _selfcheck()


if __name__ == "__main__":
    main()
