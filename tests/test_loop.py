"""The training loop's features, each watched from outside while it trains: gradient accumulation, bf16/fp16
autocast and the grad scaler, label smoothing, the ResNet-110 warm-up, the weight EMA, best.pt, torchrun."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from common import FakeDDP, clean_env
from repro.checkpoint import resume
from repro.cli import CONFIG_DIR
from repro.config import register_configs
from repro.data import build_dataset
from repro.distributed import Dist
from repro.models import create_model_from_config
from repro.train import Training, check_config, fit, setup

CPU = torch.device("cpu")
# Tiny models: one thread (oneDNN's spinning threads cost 10-50x on a loaded 2-core machine).
pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ("data.image_size=16", "model.resolution=16")  # digits at 16 x 16: a quarter of the default's work
DIGITS_MEAN = 0.5  # the digits recipe normalizes with mean 0.5, std 0.5


# ------------------------------------------------------------------------------------------------ helpers
def make_run(tmp_path: Path, *overrides: str) -> Training:
    """setup() of repro-train (digits at 16 x 16, CPU) on a composed config."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["name=loop", "trainer.progress=false", "trainer.device=cpu", *SMALL,
                                          *overrides])
    check_config(cfg)
    out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    out.mkdir()
    return setup(cfg, Dist(), CPU, out)


class Watch:
    """Records what the loop does, without changing it: each training forward's logits and its labels, the
    loss handed to the grad scaler, the lr and weights at each optimizer step, a convolution's output dtype."""

    def __init__(self, run: Training) -> None:
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []
        self.scaled: list[torch.Tensor] = []
        self.lrs: list[float] = []
        self.weights: list[dict[str, torch.Tensor]] = []
        self.conv_dtypes: list[torch.dtype] = []
        run.state.model.register_forward_hook(self._forward)
        conv = next(m for m in run.state.model.modules() if isinstance(m, nn.Conv2d))
        conv.register_forward_hook(lambda m, a, out: self.conv_dtypes.append(out.dtype) if m.training else None)
        run.state.optimizer.register_step_pre_hook(lambda opt, a, k: self.lrs.append(opt.param_groups[0]["lr"]))
        run.state.optimizer.register_step_post_hook(
            lambda opt, a, k: self.weights.append({n: v.detach().clone()
                                                   for n, v in run.state.model.state_dict().items()}))
        scale = run.state.scaler.scale

        def watched_scale(loss: torch.Tensor) -> torch.Tensor:
            out = scale(loss)
            self.losses.append(loss.detach().clone())
            self.scaled.append(out.detach().clone())
            return out

        run.state.scaler.scale = watched_scale
        run.data.loader = _WatchedLoader(run.data.loader, self.labels)

    def _forward(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        if module.training:
            self.logits.append(out.detach().float().clone())


class _WatchedLoader:
    """The run's training loader, its labels recorded as the loop reads them."""

    def __init__(self, loader: Any, labels: list[torch.Tensor]) -> None:
        self.loader, self.labels, self.sampler = loader, labels, loader.sampler

    def __iter__(self):
        for batch in self.loader:
            self.labels.append(batch["labels"].clone())
            yield batch


def close(*runs: Training) -> None:
    """Close the runs' TensorBoard writers."""
    for run in runs:
        run.close()


def freeze_bn(model: nn.Module) -> None:
    """Keep every BatchNorm in eval mode (running statistics) even when the loop calls model.train()."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
            m.train = lambda mode=True, m=m: m  # model.train() reaches children through their own train()


def params(run: Training) -> dict[str, torch.Tensor]:
    """The run's parameters (copies)."""
    return {n: p.detach().clone() for n, p in run.state.model.named_parameters()}


def digits_error(run: Training, split: str, state: dict[str, torch.Tensor]) -> float:
    """Top-1 error (%) of the weights `state` on a digits split, computed here (plain model, fp32, NCHW)."""
    ds = build_dataset(run.run.cfg.data, split)
    net = create_model_from_config({**dict(run.run.cfg.model), "num_classes": 10})
    net.load_state_dict(state)
    net.eval()
    x = (torch.stack([ds[i][0] for i in range(len(ds))]).float() / 255 - DIGITS_MEAN) / 0.5
    with torch.no_grad():
        pred = torch.cat([net(x[i:i + 120]) for i in range(0, len(x), 120)]).argmax(1)
    return 100.0 * float((pred != torch.tensor(ds.labels)).float().mean())


# -------------------------------------------------------------------------------- gradient accumulation
def test_accumulated_step_equals_one_big_step(tmp_path):
    """trainer.grad_accum=2 at a global batch of 64: two micro-batches of 32 make exactly the step one batch of
    64 makes (the same 64 images, uncropped: the crops are seeded per micro-batch; BN frozen so that the forward
    does not depend on the batch split)."""
    big = make_run(tmp_path, "recipe.batch_size=64", "trainer.max_steps=1", "recipe.augment.train=none")
    acc = make_run(tmp_path, "recipe.batch_size=64", "trainer.grad_accum=2", "trainer.max_steps=1",
                   "recipe.augment.train=none")
    try:
        start = params(big)
        assert all(torch.equal(start[n], p) for n, p in params(acc).items())  # same seed, same init
        watches = []
        for run in (big, acc):
            freeze_bn(run.state.model)
            watches.append(Watch(run))
            run.epoch()
    finally:
        close(big, acc)
    wb, wa = watches
    assert [len(y) for y in wb.labels] == [64] and [len(y) for y in wa.labels] == [32, 32]
    assert torch.equal(wb.labels[0], torch.cat(wa.labels))  # the same images, in the same order
    assert wb.lrs == wa.lrs == [pytest.approx(0.1)]
    moved = 0.0
    for n, p in params(big).items():
        step_big, step_acc = p - start[n], params(acc)[n] - start[n]
        torch.testing.assert_close(step_acc, step_big, rtol=1e-3, atol=1e-7, msg=n)
        moved = max(moved, float(step_big.abs().max()))
    assert moved > 1e-3  # a real step, not a no-op


# -------------------------------------------------------------------------------------------------- AMP
@pytest.mark.parametrize(("amp", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_is_active_and_steps_like_fp32(tmp_path, amp, dtype):
    """trainer.amp=bf16|fp16 on CPU: the convolutions compute in that dtype, the loss stays fp32, fp16 goes through
    the grad scaler (loss x 2^16, unscaled before the step), and the step is fp32's to low-precision accuracy."""
    ref = make_run(tmp_path, "recipe.batch_size=32", "trainer.max_steps=1", "trainer.amp=off")
    low = make_run(tmp_path, "recipe.batch_size=32", "trainer.max_steps=1", f"trainer.amp={amp}")
    try:
        start = params(ref)
        wr, wl = Watch(ref), Watch(low)
        ref.epoch()
        low.epoch()
    finally:
        close(ref, low)
    assert wr.conv_dtypes == [torch.float32] and wl.conv_dtypes == [dtype]
    assert wl.losses[0].dtype == torch.float32
    assert low.state.scaler.is_enabled() == (amp == "fp16")
    factor = float(wl.scaled[0] / wl.losses[0])
    assert factor == (65536.0 if amp == "fp16" else 1.0)
    assert low.state.progress.step == 1 and len(wl.lrs) == 1  # the step was taken, not skipped as non-finite
    a = torch.cat([(p - start[n]).flatten() for n, p in params(ref).items()])
    b = torch.cat([(p - start[n]).flatten() for n, p in params(low).items()])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.95  # bf16: 8 mantissa bits; we see 0.98
    assert 0.85 < float(b.norm() / a.norm()) < 1.15


@pytest.mark.slow
def test_compiled_model_steps_like_eager(tmp_path):
    """trainer.compile=true: the loop trains the torch.compile'd model, 2 steps land where eager's do, and the
    checkpoint is a plain state dict (no `_orig_mod.` keys) that loads into an uncompiled model."""
    eager = make_run(tmp_path, "recipe.batch_size=32", "trainer.max_steps=2")
    comp = make_run(tmp_path, "recipe.batch_size=32", "trainer.max_steps=2", "trainer.compile=true")
    try:
        start = params(eager)
        fit(eager)
        fit(comp)
    finally:
        close(eager, comp)
    assert comp.model is not comp.state.model and hasattr(comp.model, "_orig_mod")  # compile's wrapper was trained
    a = torch.cat([(p - start[n]).flatten() for n, p in params(eager).items()])
    b = torch.cat([(p - start[n]).flatten() for n, p in params(comp).items()])
    assert float(a.abs().max()) > 1e-3  # real steps
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9999  # fused kernels: we see 0.99999
    assert abs(float(b.norm() / a.norm()) - 1) < 0.01
    ck = torch.load(comp.run.out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ck["model"])
    create_model_from_config(ck["config"]["model"]).load_state_dict(ck["model"])


# --------------------------------------------------------------------------------------- label smoothing
def test_label_smoothing_is_the_loss_trained_on(tmp_path):
    """recipe.label_smoothing=0.2: the loss the loop backpropagates is the cross-entropy against the smoothed
    targets (1 - e + e/K on the label, e/K elsewhere), computed by hand from the logits the model produced."""
    run = make_run(tmp_path, "recipe.batch_size=32", "trainer.max_steps=2", "recipe.label_smoothing=0.2")
    try:
        watch = Watch(run)
        run.epoch()
    finally:
        close(run)
    assert len(watch.losses) == 2
    eps, k = 0.2, 10
    for logits, labels, loss in zip(watch.logits, watch.labels, watch.losses):
        logp = logits.double().log_softmax(1)
        target = torch.full_like(logp, eps / k)
        target[torch.arange(len(labels)), labels] += 1 - eps
        expected = float(-(target * logp).sum(1).mean())
        plain = float(-logp[torch.arange(len(labels)), labels].mean())
        assert float(loss) == pytest.approx(expected, rel=1e-5)
        assert abs(expected - plain) > 1e-3  # smoothing makes a difference the check can see


# ---------------------------------------------------------------------------------------------- warm-up
def test_warmup_holds_low_lr_until_training_error_falls(tmp_path):
    """ResNet §4.2 (ResNet-110): the warm-up lr (0.01 in the paper, 0.05 here) while the training error the loop
    reports is >= the threshold, the recipe's lr from the step after the first report below it; the errors are
    recomputed here from the logits."""
    run = make_run(tmp_path, "recipe.batch_size=32", "trainer.max_steps=16", "trainer.log_every=1",
                   "recipe.schedule.name=constant", "recipe.optimizer.lr=0.4", "recipe.schedule.warmup_lr=0.05",
                   "recipe.schedule.warmup_until_train_err=80")  # lr 0.4 at batch 64: 0.2 at 32
    try:
        watch = Watch(run)
        run.epoch()
    finally:
        close(run)
    errs = [100.0 * float((lg.argmax(1) != y).float().mean()) for lg, y in zip(watch.logits, watch.labels)]
    first_below = next(i for i, e in enumerate(errs) if e < 80)  # the warm-up must end inside this run (we see 5)
    expected = [0.05 if i <= first_below else 0.2 for i in range(len(errs))]
    assert watch.lrs == pytest.approx(expected), errs
    assert first_below < len(errs) - 2  # both phases happen


# ------------------------------------------------------------------------------------------ weight EMA
def test_ema_is_the_hand_computed_average_and_is_reported(tmp_path):
    """recipe.ema_decay=0.5, 5 steps: the averaged weights (BN statistics too) equal the average computed here
    from the weights after each step (timm's ModelEmaV3 with the loop's step count: the first two updates copy,
    then e = d e + (1 - d) w); metrics.json reports them as `center`, the raw weights as `center_noema`."""
    run = make_run(tmp_path, "recipe.batch_size=64", "trainer.max_steps=5", "recipe.ema_decay=0.5")
    try:
        watch = Watch(run)
        fit(run)
    finally:
        close(run)
    assert len(watch.weights) == 5
    expected = dict(watch.weights[1])
    for w in watch.weights[2:]:
        expected = {n: 0.5 * expected[n] + 0.5 * v if v.is_floating_point() else v for n, v in w.items()}
    ck = torch.load(run.run.out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    for n, v in expected.items():
        torch.testing.assert_close(ck["ema"][n], v, msg=n)
        torch.testing.assert_close(run.state.ema.module.state_dict()[n], v, msg=n)
    raw = watch.weights[-1]
    assert all(torch.equal(ck["model"][n], v) for n, v in raw.items())
    assert max(float((ck["ema"][n] - raw[n]).abs().max()) for n in raw if raw[n].is_floating_point()) > 1e-3
    metrics = json.loads((run.run.out / "metrics.json").read_text())
    assert metrics["split"] == "test"
    assert metrics["center"]["top1_err"] == pytest.approx(digits_error(run, "test", expected), abs=0.3)
    assert metrics["center_noema"]["top1_err"] == pytest.approx(digits_error(run, "test", raw), abs=0.3)


# --------------------------------------------------------------------------------------------- best.pt
def test_best_checkpoint_holds_the_best_validation_epoch(tmp_path):
    """3 epochs, the lr x30 in the last one (so it validates worse): best.pt holds the weights of the epoch with
    the lowest validation error, which reproduce that error when evaluated here; last.pt holds the last ones."""
    run = make_run(tmp_path, "recipe.batch_size=64", "data.limit=640", "trainer.max_epochs=3",
                   "recipe.schedule.milestones=[10.0]", "recipe.schedule.gamma=30")
    try:
        watch = Watch(run)
        fit(run)
    finally:
        close(run)
    history = [json.loads(line) for line in (run.run.out / "metrics.jsonl").read_text().splitlines()]
    errs = [h[h.get("split", "val")]["center"]["top1_err"] for h in history]
    assert len(errs) == 3 and len(watch.weights) == 30  # 3 epochs of 10 steps, evaluated after each
    best = min(range(3), key=lambda i: errs[i])
    assert errs[2] > errs[best]  # the test needs a best epoch that is not the last
    ck = torch.load(run.run.out / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert ck["progress"]["step"] == history[best]["step"] == 10 * (best + 1)
    after = watch.weights[10 * (best + 1) - 1]  # the weights after that epoch's last step
    assert all(torch.equal(ck["model"][n], v) for n, v in after.items())
    assert digits_error(run, "val", ck["model"]) == pytest.approx(errs[best], abs=0.6)
    last = torch.load(run.run.out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(last["model"][n], v) for n, v in watch.weights[-1].items())


# ------------------------------------------------------------------------------------------ stop and resume
def test_stop_mid_epoch_and_resume_is_bit_identical(tmp_path):
    """A run stopped at step 3 of a 39-step epoch (the signal path: last.pt written, fit returns) and resumed from
    last.pt in a fresh set-up ends with the weights, optimizer state and metrics of a run left alone, bit for bit.
    PCA lighting draws from torch's generator at every step, so the generator's state must come back too."""
    args = ("recipe.batch_size=32", "trainer.max_steps=6", "recipe.augment.lighting=0.1", "val_split=null")
    runs: list[Training] = []  # each set up just before it trains (set-up seeds the process's generators)
    steps = []

    def signal_at_step_3(opt: Any, a: Any, k: Any) -> None:
        steps.append(1)
        if len(steps) == 3:
            cut.run.stop_signal = "SIGTERM"  # what the signal handler sets

    try:
        runs.append(whole := make_run(tmp_path, *args))
        fit(whole)
        runs.append(cut := make_run(tmp_path, *args))
        cut.state.optimizer.register_step_post_hook(signal_at_step_3)
        fit(cut)
        p = cut.state.progress
        assert (p.step, p.epoch, p.batch) == (3, 0, 3) and not (cut.run.out / "metrics.json").exists()
        runs.append(again := make_run(tmp_path, *args))
        assert resume(cut.run.out / "checkpoints" / "last.pt", again.state, again.run.cfg, again.run.dist, CPU)
        assert again.state.progress.step == 3
        fit(again)
    finally:
        close(*runs)
    a, b = whole.state.model.state_dict(), again.state.model.state_dict()
    assert [n for n in a if not torch.equal(a[n], b[n])] == []
    ma, mb = (whole.state.optimizer.state_dict()["state"], again.state.optimizer.state_dict()["state"])
    assert all(torch.equal(ma[i]["momentum_buffer"], mb[i]["momentum_buffer"]) for i in ma)
    metrics = [json.loads((r.run.out / "metrics.json").read_text()) for r in (whole, again)]
    assert metrics[0]["center"] == metrics[1]["center"] and metrics[1]["steps"] == 6


# ---------------------------------------------------------------------------------------------- sync_bn
@pytest.mark.parametrize("sync", [True, False])
def test_sync_bn_converts_every_batchnorm(tmp_path, monkeypatch, sync):
    """trainer.sync_bn=true on 2 processes: every BatchNorm of the model the loop trains (and the optimizer
    updates) is a SyncBatchNorm inside DDP; false leaves them plain. Rank 0 of 2, DDP faked (no process group)."""
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["name=loop", "trainer.progress=false", "trainer.device=cpu", *SMALL,
                                          f"trainer.sync_bn={str(sync).lower()}"])
    run = setup(cfg, Dist(rank=0, world_size=2), CPU, tmp_path)
    close(run)
    plain = create_model_from_config({**dict(cfg.model), "num_classes": 10})
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    kinds = [type(m) for m in run.state.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [nn.SyncBatchNorm if sync else nn.BatchNorm2d] * n_bn and n_bn == 19
    assert isinstance(run.model, FakeDDP) and run.model.module is run.state.model
    trained = {id(p) for g in run.state.optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in run.state.model.parameters()}
    assert run.state.model.state_dict().keys() == plain.state_dict().keys()  # checkpoints load as a plain model


@pytest.mark.slow
def test_sync_bn_on_cpu_is_refused_with_a_message(tmp_path):
    """PyTorch's SyncBatchNorm needs GPUs: on 2 CPU processes the run stops with a message naming it, no checkpoint."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    res = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "repro.train", "trainer.max_steps=2",
                          "trainer.sync_bn=true", "name=sbn", "trainer.progress=false"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env=clean_env())
    assert res.returncode != 0
    assert "SyncBatchNorm" in res.stderr and "GPU" in res.stderr
    assert not list(tmp_path.rglob("*.pt"))


# -------------------------------------------------------------------------------------------- torchrun
DRIVER = """
import sys, torch
import repro.train as train

_fit = train.fit


def fit(run):
    _fit(run)
    torch.save({k: v.detach().clone() for k, v in run.state.model.state_dict().items()},
               f"rank{run.run.dist.rank}.pt")


train.fit = fit
train.main()
"""


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 40-step digits run under torchrun, 2 gloo processes x 2 micro-batches; each rank saves its final state."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    cwd = tmp_path_factory.mktemp("torchrun")
    (cwd / "driver.py").write_text(DRIVER)
    res = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "driver.py", "trainer.max_steps=40",
                          "trainer.checkpoint_every=5", "trainer.grad_accum=2", "name=ddp", "trainer.progress=false"],
                         cwd=cwd,
                         capture_output=True, text=True, timeout=400, env=clean_env())
    return cwd, res


def _rank_states(cwd: Path) -> list[dict[str, torch.Tensor]]:
    """Each rank's final state dict."""
    return [torch.load(cwd / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.slow
def test_torchrun_two_cpu_processes(torchrun_run):
    """torchrun, 2 gloo processes, grad_accum 2: the recipe's global batch 64 = 2 processes x 2 micro-batches x 16
    images at the recipe's lr 0.1, one run dir, each test image counted once, and both ranks end with the same
    parameters (checksums), rank 0's being the checkpoint's."""
    cwd, res = torchrun_run
    assert res.returncode == 0, res.stderr[-3000:]
    assert [p.name for p in (cwd / "outputs" / "train").iterdir()] == ["ddp"]
    run = cwd / "outputs" / "train" / "ddp"
    ck = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert (ck["progress"]["step"], ck["progress"]["batch"] % 2) == (40, 0)
    assert not any(k.startswith("module.") for k in ck["model"])
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.001)  # 0.1 / 100 past 75% of the run
    ranks = _rank_states(cwd)
    checksums = [{k: float(v.double().sum()) for k, v in s.items() if v.is_floating_point()} for s in ranks]
    names = {n for n, _ in create_model_from_config(ck["config"]["model"]).named_parameters()}
    assert {n: checksums[0][n] for n in names} == {n: checksums[1][n] for n in names}
    for n, v in ranks[0].items():
        assert torch.equal(v, ck["model"][n]), n
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 40 and metrics["center"]["images"] == 360
    assert metrics["batch"] == {"global": 64, "per_process": 16, "world_size": 2, "grad_accum": 2}
    assert metrics["lr"] == pytest.approx(0.1)
    assert "global batch 64 = 2 processes x 2 micro-batches x 16 images, lr 0.1;" in (run / "train.log").read_text()
    assert (run / "checkpoints" / "best.pt").is_file()
    assert metrics["center"]["top1_err"] < 50.0  # 40 steps of 64 digits (chance: 90%); we see 29%


@pytest.mark.slow
def test_torchrun_ranks_end_with_the_same_bn_statistics(torchrun_run):
    """Both ranks evaluate the model the checkpoint holds: BN running statistics equal on every rank too (rank 0's
    are broadcast before every evaluation and save; DDP itself broadcasts them only at a training forward)."""
    cwd, res = torchrun_run
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = _rank_states(cwd)
    for n, v in ranks[0].items():
        assert torch.equal(v, ranks[1][n]), n
