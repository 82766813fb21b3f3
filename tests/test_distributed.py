"""The GPU cluster path (issue 17), shown on CPU: collectives on the run's device, the device each rank takes,
per-rank RNG state, bounded evaluation forwards, decisions every rank takes alike, per-rank random streams,
whole optimizer steps per epoch, the evaluation precision, time-based checkpoints; and a 2-process torchrun
whose reported numbers a 1-process repro-eval of its checkpoint reproduces."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

import repro.data.build as build
import repro.distributed as rd
import repro.train as tr
from common import FakeDDP, clean_env
from repro.checkpoint import NonFiniteLoss, checkpoint, resume, rng_state, save_atomic
from repro.cli import CONFIG_DIR
from repro.config import register_configs
from repro.data import Normalize, Preprocessing
from repro.data.loaders import sample_seed
from repro.distributed import Dist
from repro.scoring import evaluate

CPU = torch.device("cpu")
META = torch.device("meta")  # a device other than the CPU, for a group that (as NCCL) takes no CPU tensor
pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ("data.image_size=16", "model.resolution=16")


# ------------------------------------------------------------------------------------------------ helpers
def config(*overrides: str) -> Any:
    """repro-train's composed config (digits at 16 x 16, CPU)."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["name=dist", "trainer.progress=false", "trainer.device=cpu", *SMALL,
                                          *overrides])
    tr.check_config(cfg)
    return cfg


class OtherRank:
    """torch.distributed faked for rank 0 of 2: the other rank's contribution to an all-reduce comes from
    `other(t)` (default: zeros); broadcasts keep rank 0's; object gathers repeat this rank's object. Records the
    device of every tensor a collective gets."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, other: Any = None) -> None:
        self.devices: list[torch.device] = []
        self.other = other or (lambda t: torch.zeros_like(t))
        monkeypatch.setattr(rd.dist, "all_reduce", self.all_reduce)
        monkeypatch.setattr(rd.dist, "broadcast", lambda t, src=0: self.devices.append(t.device))
        monkeypatch.setattr(rd.dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None),
                                                                                           [obj] * len(out)))
        monkeypatch.setattr(rd.dist, "broadcast_object_list", lambda box, src=0, device=None: None)
        monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)

    def all_reduce(self, t: torch.Tensor, op: Any = None) -> None:
        self.devices.append(t.device)
        if t.device.type != "meta":
            t += self.other(t)


def two_rank_run(tmp_path: Path, rank: int, *overrides: str) -> tr.Training:
    """setup() of rank `rank` of 2 (DDP faked by OtherRank)."""
    out = tmp_path / f"run{rank}-{len(list(tmp_path.glob('run*')))}"
    out.mkdir()
    return tr.setup(config(*overrides), Dist(rank=rank, world_size=2), CPU, out)


def close(*runs: tr.Training) -> None:
    """Close the runs' TensorBoard writers."""
    for run in runs:
        run.close()


# ---------------------------------------------------------------------------- 1. collectives' device
def test_collectives_take_tensors_on_the_run_device(monkeypatch):
    """An NCCL group reduces CUDA tensors only: all_reduce_sum and evaluate's count reduction hand the backend
    tensors on the run's device (`Dist.device`; here meta, standing in for cuda), whatever device they start on."""
    fake = OtherRank(monkeypatch)
    d = Dist(rank=0, world_size=2, device=META)
    out = rd.all_reduce_sum(torch.ones(3), d)
    assert out.device == META and fake.devices == [META]
    # evaluate(): the per-protocol counts, from a tiny model on the CPU, reduced on the run's device.
    seen: list[torch.device] = []
    monkeypatch.setattr("repro.scoring.all_reduce_sum", lambda t, dist: seen.append(t.device) or torch.zeros(
        t.shape, dtype=t.dtype))
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    batch = {"failed": [], "views": {"center": torch.zeros(6, 1, 3, 4, 4, dtype=torch.uint8)},
             "labels": torch.arange(6), "indices": torch.arange(6)}
    evaluate(model, Normalize(Preprocessing()), [batch], CPU, ["center"], dist=d, progress=False)
    assert seen == [META]


# ------------------------------------------------------------------------------ 2 and 4. device per rank
@pytest.mark.parametrize("local_rank, visible, expected", [(3, 1, 0), (3, 4, 3), (5, 4, 1)])
def test_each_rank_takes_its_gpu_and_makes_it_current(monkeypatch, local_rank, visible, expected):
    """LOCAL_RANK modulo the visible GPUs (one GPU per task: LOCAL_RANK=3 sees cuda:0), and init_distributed (train
    and eval alike) makes it the current device, which NCCL's object collectives use."""
    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: current.append(torch.device(dev)))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", "1")
    device = rd.select_device("auto")
    assert device == torch.device("cuda", expected)
    d = rd.init_distributed(device)
    assert current == [torch.device("cuda", expected)] and d.device == device


# ------------------------------------------------------------------------------------ 3. per-rank RNG
def test_resume_gives_each_rank_its_own_rng_state(tmp_path, monkeypatch):
    """A 2-rank checkpoint holds each rank's own generator states; on resume rank 1 takes rank 1's (not rank 0's),
    and on another world size rank 0 continues rank 0's while rank 1 starts a stream of its own."""
    OtherRank(monkeypatch)
    run = two_rank_run(tmp_path, 1, "trainer.max_steps=1")
    close(run)
    states = []
    for s in (11, 22):
        torch.manual_seed(s)
        states.append(rng_state(CPU))
    ck = checkpoint(run.state, run.run.cfg, run.data.preprocessing, run.run.commit, states)
    assert [torch.equal(a["torch"], b["torch"]) for a, b in zip(ck["rng_ranks"], states)] == [True, True]
    last = run.run.out / "checkpoints" / "last.pt"
    save_atomic(ck, last)
    torch.manual_seed(0)  # a state of neither rank's
    assert resume(last, run.state, run.run.cfg, run.run.dist, CPU)
    assert torch.equal(torch.get_rng_state(), states[1]["torch"])  # its own, not rank 0's
    # Saved on 3 ranks, resumed on 2: rank 1 neither repeats rank 0's stream nor keeps today's.
    save_atomic(checkpoint(run.state, run.run.cfg, run.data.preprocessing, run.run.commit, [*states, states[0]]), last)
    assert resume(last, run.state, run.run.cfg, run.run.dist, CPU)
    assert not torch.equal(torch.get_rng_state(), states[0]["torch"])
    assert not torch.equal(torch.get_rng_state(), states[1]["torch"])


# ------------------------------------------------------------------------------------- 5. eval chunks, OOM
def test_evaluation_forwards_are_bounded_and_oom_names_the_batch_size(monkeypatch):
    """10 crops x 6 images: forwards of at most MAX_VIEWS views (here 8), the same counts as one forward; a GPU
    out-of-memory error becomes a message naming data.batch_size."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10)).eval()
    sizes: list[int] = []
    model.register_forward_hook(lambda m, a, out: sizes.append(a[0].shape[0]))
    views = torch.randint(0, 256, (6, 10, 3, 4, 4), dtype=torch.uint8)
    batch = {"failed": [], "views": {"ten_crop": views}, "labels": torch.arange(6), "indices": torch.arange(6)}
    pre = Normalize(Preprocessing())
    whole = evaluate(model, pre, [batch], CPU, ["ten_crop"], progress=False).tallies["ten_crop"]
    monkeypatch.setattr("repro.scoring.MAX_VIEWS", 8)
    monkeypatch.setattr("repro.scoring._forward.__defaults__", (8,))
    sizes.clear()
    chunked = evaluate(model, pre, [batch], CPU, ["ten_crop"], progress=False).tallies["ten_crop"]
    assert max(sizes) <= 8 and sum(sizes) == 60
    assert (chunked.top1, chunked.top5, chunked.images) == (whole.top1, whole.top5, whole.images)

    def oom(m: nn.Module, a: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    model.register_forward_pre_hook(oom)
    with pytest.raises(ValueError, match="lower data.batch_size"):
        evaluate(model, pre, [batch], CPU, ["ten_crop"], progress=False)


# ----------------------------------------------------------------------- 6 and 10. decisions on every rank
def test_warmup_ends_on_the_global_training_error(tmp_path, monkeypatch):
    """ResNet-110's warm-up rule on 2 ranks: the other rank reports as many images, all right, so the global error
    is half this rank's (below 80% from the first log step, though this rank's own is ~90%): warm-up ends there."""
    OtherRank(monkeypatch, other=lambda t: torch.tensor([0.0, 0.0, float(t[2]), float(t[3])], dtype=t.dtype)
              if t.numel() == 4 else torch.zeros_like(t))
    run = two_rank_run(tmp_path, 0, "recipe.batch_size=64", "trainer.max_steps=3", "trainer.log_every=1",
                       "recipe.schedule.name=constant", "recipe.schedule.warmup_lr=0.05",
                       "recipe.schedule.warmup_until_train_err=80", "trainer.checkpoint_every_s=null")
    lrs: list[float] = []
    run.state.optimizer.register_step_pre_hook(lambda opt, a, k: lrs.append(opt.param_groups[0]["lr"]))
    try:
        run.epoch()
    finally:
        close(run)
    assert lrs == pytest.approx([0.05, 0.1, 0.1])  # 0.1: the recipe's lr at the global batch 64


def test_a_nonfinite_loss_on_another_rank_stops_this_one(tmp_path, monkeypatch):
    """The other rank's loss is NaN: this rank (finite loss) stops at the same step with the message."""
    OtherRank(monkeypatch, other=lambda t: torch.tensor([float("nan"), 0.0, 0.0, 0.0], dtype=t.dtype)
              if t.numel() == 4 else torch.zeros_like(t))
    run = two_rank_run(tmp_path, 0, "recipe.batch_size=64", "trainer.max_steps=3")
    try:
        with pytest.raises(NonFiniteLoss, match="the training loss is nan at step 1"):
            run.epoch()
    finally:
        close(run)


# ------------------------------------------------------------------------ 8. whole steps per epoch
def test_an_epoch_is_a_whole_number_of_optimizer_steps(tmp_path):
    """trainer.grad_accum=2 on 1,000-odd digits in micro-batches of 64 (an odd count of full batches): the epoch
    drops its last micro-batch, so every optimizer step takes exactly 2 micro-batches and none leaks on."""
    cfg = config("recipe.batch_size=128", "trainer.grad_accum=2", "trainer.max_epochs=1", "val_split=null",
                 "test_split=test")
    run = tr.setup(cfg, Dist(), CPU, tmp_path)
    full = len(run.data.loader.images) // 64
    assert full % 2 == 1  # the case the rule is for
    forwards: list[int] = []
    steps: list[int] = []
    run.state.model.register_forward_hook(lambda m, a, o: forwards.append(1) if m.training else None)
    run.state.optimizer.register_step_pre_hook(lambda opt, a, k: steps.append(len(forwards)))
    try:
        run.epoch()
    finally:
        close(run)
    assert run.data.loader.sampler.batches == full - 1 and run.run.steps_per_epoch == (full - 1) // 2
    assert steps == [2 * (i + 1) for i in range(len(steps))] and len(forwards) == 2 * len(steps)
    assert (run.state.progress.epoch, run.state.progress.batch) == (1, 0)


# ------------------------------------------------------------------------------- 9. per-rank streams
def test_ranks_share_initial_weights_but_not_random_streams(tmp_path, monkeypatch):
    """Rank 1 of 2 starts from rank 0's weights, but its crop offsets and its torch stream (dropout, lighting,
    color jitter) are its own; rank 0's crop seeds are today's single-process ones (sample_seed(seed, epoch, b))."""
    OtherRank(monkeypatch)
    runs, streams = [], []
    for r in (0, 1):  # the torch stream each rank's loop starts from (one process here: read it after each set-up)
        runs.append(two_rank_run(tmp_path, r, "recipe.batch_size=64", "trainer.max_steps=2"))
        streams.append(torch.get_rng_state())
    close(*runs)
    for n, v in runs[0].state.model.state_dict().items():
        assert torch.equal(v, runs[1].state.model.state_dict()[n]), n
    seeds: list[list[int]] = []
    for run in runs:
        mine: list[int] = []
        seeds.append(mine)
        run.data.batch_aug = lambda x, seed, mine=mine: mine.append(seed) or x
        run.epoch()
    assert not torch.equal(streams[0], streams[1])
    assert seeds[0] == [sample_seed(0, 0, b) for b in range(2)]
    assert len(seeds[1]) == 2 and not set(seeds[0]) & set(seeds[1])


# ------------------------------------------------------------------------------------ 11. precision
def test_evaluation_is_fp32_under_autocast_training(tmp_path):
    """trainer.amp=bf16 trains under autocast, but per-epoch evaluation runs fp32 (trainer.eval_precision)."""
    run = tr.setup(config("recipe.batch_size=32", "trainer.max_steps=1", "trainer.amp=bf16"), Dist(), CPU, tmp_path)
    dtypes: dict[bool, set[torch.dtype]] = {True: set(), False: set()}
    conv = next(m for m in run.state.model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda m, a, out: dtypes[m.training].add(out.dtype))
    try:
        run.epoch()
        tr.validate(run, run.data.val)
    finally:
        close(run)
    assert dtypes == {True: {torch.bfloat16}, False: {torch.float32}}


def test_amp_auto_picks_bf16_only_where_the_gpu_has_it(monkeypatch):
    """trainer.amp=auto: bf16 on GPUs with native bf16, fp16 (with the grad scaler) on older ones, off on CPU."""
    for native, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n)
        assert tr.amp_dtype("auto", torch.device("cuda", 0)) == dtype
    assert tr.amp_dtype("auto", CPU) is None


# ------------------------------------------------------------------------------- 15. time checkpoints
def test_checkpoints_on_a_time_interval_read_git_once(tmp_path, monkeypatch):
    """trainer.checkpoint_every_s: last.pt also after that many seconds (here every step, the step interval being
    far off); the git commit is read once per run, not per save."""
    calls: list[int] = []
    monkeypatch.setattr(tr, "git_commit", lambda: calls.append(1) or "abc")
    run = tr.setup(config("recipe.batch_size=32", "trainer.max_steps=3", "trainer.checkpoint_every_s=1e-9",
                          "trainer.checkpoint_every=1000", "val_split=null", "test_split=test"), Dist(), CPU, tmp_path)
    saved: list[int] = []
    save = tr.save
    monkeypatch.setattr(tr, "save", lambda out, name, state, *a: saved.append(state.progress.step) or
                        save(out, name, state, *a))
    try:
        run.epoch()
    finally:
        close(run)
    assert saved == [1, 2, 3] and len(calls) == 1
    ck = torch.load(tmp_path / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ck["git_commit"] == "abc" and ck["progress"]["step"] == 3


# ----------------------------------------------------------------------------------- 2-process torchrun
@pytest.fixture(scope="module")
def torchrun_and_eval(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """A 6-step digits run under torchrun (2 gloo processes), then a 1-process repro-eval of its last.pt."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    cwd = tmp_path_factory.mktemp("torchrun")
    train = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "repro.train", "name=ddp",
                            "trainer.max_steps=6", "trainer.progress=false", *SMALL], cwd=cwd, capture_output=True,
                           text=True, timeout=400, env=clean_env(OMP_NUM_THREADS="1"))
    ck = cwd / "outputs" / "train" / "ddp" / "checkpoints" / "last.pt"
    ev = subprocess.run([sys.executable, "-m", "repro.eval", f"weights.path={ck}", "hydra.run.dir=eval",
                         "eval.progress=false"], cwd=cwd, capture_output=True, text=True, timeout=300,
                        env=clean_env(OMP_NUM_THREADS="1"))
    return cwd, train, ev


@pytest.mark.slow
def test_torchrun_metrics_are_what_one_process_measures(torchrun_and_eval):
    """The 2-process run's final metrics.json (fp32) counts the same images and top-1 hits as a 1-process repro-eval
    of its checkpoint (fp32 as well), and the checkpoint holds each rank's own generator states."""
    cwd, train, ev = torchrun_and_eval
    assert train.returncode == 0, train.stderr[-3000:]
    assert ev.returncode == 0, ev.stderr[-3000:]
    run = cwd / "outputs" / "train" / "ddp"
    trained = json.loads((run / "metrics.json").read_text())
    evaluated = json.loads((cwd / "eval" / "metrics.json").read_text())
    assert trained["eval_precision"] == evaluated["eval_precision"] == "fp32"
    assert trained["split"] == "test" and trained["center"]["images"] == 360  # the digits test split
    for key in ("images", "top1_err", "top5_err"):
        assert trained["center"][key] == evaluated["center"][key], key
    ck = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    a, b = ck["rng_ranks"]
    assert not torch.equal(a["torch"], b["torch"]) and torch.equal(ck["rng"]["torch"], a["torch"])


@pytest.mark.parametrize(("rank", "drawn"), [("0", True), ("1", False)])
def test_only_rank_0_draws_the_decoding_bar(tmp_path, monkeypatch, capfd, rank, drawn):
    """CIFAR image folders decoded into memory: under torchrun only rank 0 draws the "decoding" progress bar."""
    from PIL import Image

    for c in range(10):
        (tmp_path / "train" / f"c{c}").mkdir(parents=True)
        Image.new("RGB", (32, 32), (c * 20, 0, 0)).save(tmp_path / "train" / f"c{c}" / "0.png")
    monkeypatch.setenv("RANK", rank)
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["data=cifar10", f"data.root={tmp_path}", "data.num_workers=0",
                                          "trainer.progress=true", "name=bar"])
    capfd.readouterr()
    assert len(build._tensors(cfg, "trainval").labels) == 10
    assert ("decoding trainval" in capfd.readouterr().err) == drawn
