"""repro-tables row matching (issue 12 §3): a row counts only runs of its own experiment; the others are listed.

Runs are fabricated as repro-train / repro-eval leave them (config composed by Hydra from the project's configs,
metrics.json, metrics.jsonl); the expectations are hand-written: which run is ours, the mean of ours, the keys
and values a deviating run is listed with.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from repro.report.results import (
    RESULT_NEUTRAL,
    RunRecord,
    build_table,
    discover_runs,
    experiment_config,
    reads_jpeg,
    run_deviations,
)
from test_tables import TABLES, csv_rows, eval_run, train_run

T6 = TABLES["resnet_table6"]
R20 = next(r for r in T6.rows if r.label == "ResNet-20")
EXP = ["experiment=resnet_table6", "row=cifar_resnet20", "data.root=/data/cifar10"]


def record(root: Path, name: str, *overrides: str, err: float = 8.0, **kw) -> RunRecord:
    """One fabricated finished ResNet-20 Table 6 run with extra overrides, loaded as repro-tables reads it."""
    path = train_run(root, name, [*EXP, *overrides], {"center": (err, 0.5)}, **kw)
    return next(r for r in discover_runs([str(path)]) if r.path == path)


# ------------------------------------------------------------------------------------------ the row's config
def test_row_experiment_config_is_what_repro_train_composes():
    """Table 6's ResNet-20 row: resnet20, option A, CIFAR-10, the resnet_cifar recipe, splits of the experiment."""
    cfg = experiment_config(T6, R20)
    assert (cfg["model"]["name"], cfg["model"]["shortcut"], cfg["data"]["name"]) == ("resnet20", "A", "cifar10")
    assert (cfg["recipe"]["name"], cfg["recipe"]["optimizer"]["lr"], cfg["recipe"]["length"]) == (
        "resnet_cifar", 0.1, 64000)
    assert cfg["recipe"]["schedule"]["milestones"] == [32000, 48000]
    assert (cfg["train_split"], cfg["test_split"]) == ("trainval", "test")  # the paper's final nets: all 50k


# --------------------------------------------------------------------------------- faithful and deviating
NEUTRAL = ["data.num_workers=7", "data.batch_size=32", "trainer.device=cpu", "trainer.progress=false",
           "trainer.log_every=5", "trainer.checkpoint_every=7", "trainer.compile=true", "trainer.channels_last=false",
           "trainer.cudnn_benchmark=false", "trainer.eval_every=3", "trainer.grad_accum=4", "val_split=val",
           "val_split=null", "name=other", "resume=auto", "seed=3", "data.download=true", "data.root=/elsewhere",
           "final_protocols=[center,ten_crop]"]


@pytest.mark.parametrize("override", NEUTRAL)
def test_result_neutral_keys_keep_a_run_faithful(tmp_path, override):
    """Paths, workers, device, logging, checkpoint cadence, eval batch, grad_accum, name, seed: still the row's run
    (val_split and eval_every too: Table 6's multistep schedule never reads the validation error)."""
    run = record(tmp_path, "r", override)
    assert run_deviations(run, T6, R20) == {}


DEVIATING = [
    ("recipe.optimizer.lr=0.2", {"recipe.optimizer.lr": (0.2, 0.1)}),
    ("trainer.max_steps=1000", {"trainer.max_steps": (1000, None)}),
    ("trainer.max_epochs=3", {"trainer.max_epochs": (3, None)}),
    ("recipe.batch_size=256", {"recipe.batch_size": (256, 128)}),  # the global batch; lr_batch_size stays 128
    ("trainer.sync_bn=true", {"trainer.sync_bn": (True, False)}),
    ("trainer.amp=bf16", {"trainer.amp": ("bf16", "auto")}),
    ("train_split=train", {"train_split": ("train", "trainval")}),
    ("model.shortcut=B", {"model.shortcut": ("B", "A")}),
    ("model.shortcut_pad=split", {"model.shortcut_pad": ("split", "after")}),
    ("recipe.schedule.milestones=[30000,48000]", {"recipe.schedule.milestones": ([30000, 48000], [32000, 48000])}),
    ("recipe.augment.flip=false", {"recipe.augment.flip": (False, True)}),
]


@pytest.mark.parametrize("override, expected", DEVIATING, ids=[o for o, _ in DEVIATING])
def test_result_changing_keys_make_a_deviating_run(tmp_path, override, expected):
    """Any recipe, model, split or length change is named with the run's and the experiment's values."""
    run = record(tmp_path, "r", override)
    assert run_deviations(run, T6, R20) == expected


def test_another_recipe_deviates_in_every_key_it_changes(tmp_path):
    """recipe=digits: its name, lr, length, schedule and augmentation all differ; each is listed."""
    diffs = run_deviations(record(tmp_path, "r", "recipe=digits"), T6, R20)
    assert diffs["recipe.name"] == ("digits", "resnet_cifar")
    assert {"recipe.length", "recipe.schedule.milestones", "recipe.augment.per_pixel_mean"} <= set(diffs)


def test_table_counts_the_faithful_run_and_lists_the_deviating_ones(tmp_path):
    """Faithful seeds 0 and 1 make ours (mean 8.25); lr 0.2 (err 5.0) and max_steps (err 30.0) never enter it."""
    record(tmp_path, "s0", "seed=0", "trainer.device=cpu", err=8.0)
    record(tmp_path, "s1", "seed=1", "data.num_workers=8", "trainer.grad_accum=2", err=8.5)
    record(tmp_path, "lr", "recipe.optimizer.lr=0.2", err=5.0)
    record(tmp_path, "short", "trainer.max_steps=1000", err=30.0)
    record(tmp_path, "r56", "row=cifar_resnet56", "recipe.optimizer.lr=0.2", err=6.0)  # another row's model
    res = build_table(T6, discover_runs([str(tmp_path)]))
    rows = csv_rows(res.csv())
    r20 = rows["ResNet-20"]
    assert (r20["runs"], float(r20["ours_top1_err"]), r20["deviating_runs"]) == ("2", 8.25, "2")
    assert sorted(Path(p).name for p in r20["run"].split(";")) == ["s0", "s1"]
    assert (rows["ResNet-56"]["runs"], rows["ResNet-56"]["deviating_runs"]) == ("0", "1")
    assert rows["ResNet-32"]["deviating_runs"] == "0"
    md = res.markdown()
    assert "| ResNet-20 | 32 | 8.75 | 8.25 ± 0.35 |" in md
    assert f"- ResNet-20: top-1 err 5.00 ({tmp_path / 'lr'}): recipe.optimizer.lr=0.2 (0.1)" in md
    assert f"- ResNet-20: top-1 err 30.00 ({tmp_path / 'short'}): trainer.max_steps=1000 (null)" in md
    assert f"- ResNet-56: top-1 err 6.00 ({tmp_path / 'r56'}): recipe.optimizer.lr=0.2 (0.1)" in md


def test_smoke_tests_and_other_splits(tmp_path):
    """data.limit runs count nowhere (not even as deviating); a run reporting val is listed with the split."""
    record(tmp_path, "limit", "data.limit=500")
    record(tmp_path, "val", "test_split=null", "val_split=val")
    res = build_table(T6, discover_runs([str(tmp_path)]))
    r20 = res.rows[0]
    assert r20.runs == [] and [d.run.path.name for d in r20.deviating] == ["val"]
    assert r20.deviating[0].diffs == {"test_split": ("val", "test"), "measured split": ("val", "test")}


# ------------------------------------------------------------------------- a plateau schedule reads val
T3 = TABLES["resnet_table3"]
R50 = next(r for r in T3.rows if r.label == "ResNet-50")
IMAGENET = ["experiment=resnet_table3", "row=resnet50", "data.root=/data/imagenet"]


@pytest.mark.parametrize("overrides, expected", [
    (["trainer.eval_every=2"], {"trainer.eval_every": (2, 1)}),
    (["val_split=null", "test_split=val"], {"val_split": (None, "val")}),  # val still reported, never read
    (["trainer.device=cuda"], {}),
])
def test_plateau_schedule_makes_the_val_keys_count(tmp_path, overrides, expected):
    """resnet_imagenet drops the lr when the val error plateaus: val_split and eval_every change the weights."""
    assert OmegaConf.load(Path(__file__).parents[1] / "configs/recipe/resnet_imagenet.yaml").schedule.name == "plateau"
    path = train_run(tmp_path, "r", [*IMAGENET, *overrides], {"center": (24.0, 7.0), "ten_crop": (22.5, 6.5)})
    run = discover_runs([str(path)])[0]
    assert run_deviations(run, T3, R50) == expected


# ------------------------------------------------------------------------------- runs of older commits
def test_keys_an_older_commit_did_not_write_compare_with_the_schema_default(tmp_path):
    """A missing key equal to the schema's default is no deviation; one the experiment sets otherwise is."""
    def old(cfg):
        del cfg["recipe"]["label_smoothing"], cfg["trainer"]["sync_bn"], cfg["model"]["zero_init_residual"]

    assert run_deviations(record(tmp_path, "old", edit=old), T6, R20) == {}

    def no_mean(cfg):  # resnet_cifar sets per_pixel_mean: true; the schema's default is false
        del cfg["recipe"]["augment"]["per_pixel_mean"]

    assert run_deviations(record(tmp_path, "nomean", edit=no_mean), T6, R20) == {
        "recipe.augment.per_pixel_mean": (False, True)}


def _before_lr_batch_size(cfg):
    """The config as written before recipe.lr_batch_size: recipe.batch_size was the batch the lr is quoted for."""
    del cfg["recipe"]["lr_batch_size"]


def test_runs_before_the_global_batch_change(tmp_path):
    """Then the global batch was data.batch_size x processes x grad_accum (train.log says it): 128 is faithful,
    64 on one process is not, 64 on two processes (train.log: global batch 128) is."""
    assert run_deviations(record(tmp_path, "b128", edit=_before_lr_batch_size), T6, R20) == {}
    half = record(tmp_path, "b64", "data.batch_size=64", edit=_before_lr_batch_size)
    assert run_deviations(half, T6, R20) == {"recipe.batch_size": (64, 128)}
    (half.path / "train.log").write_text("resnet20 on cifar10/trainval: 50000 images, 64000 steps (390 per epoch, "
                                         "global batch 128, lr 0.1), device cuda x2\n")
    assert run_deviations(half, T6, R20) == {}


# ------------------------------------------------------------------------------------------- evaluations
def test_evaluations_judged_by_their_training_run_and_protocol(tmp_path):
    """A repro-eval of a faithful run's checkpoint counts once; averaging logits, or a deviating run's
    checkpoint, makes it a deviating run; with no run dir the checkpoint's own config is read."""
    cifar = ["model=resnet20", "data=cifar10", "data.root=/data/cifar10", "data.split=test"]
    good = record(tmp_path, "good", err=8.0)
    bad = record(tmp_path, "bad", "recipe.optimizer.lr=0.2", err=5.0)
    plain = eval_run(tmp_path, "ev_good", cifar, {"center": (8.1, 0.5)}, good.path / "checkpoints" / "last.pt")
    logits = eval_run(tmp_path, "ev_logits", [*cifar, "eval.average=logits"], {"center": (7.9, 0.5)},
                      good.path / "checkpoints" / "last.pt")
    of_bad = eval_run(tmp_path, "ev_bad", cifar, {"center": (5.1, 0.5)}, bad.path / "checkpoints" / "last.pt")
    runs = {r.path.name: r for r in discover_runs([str(tmp_path)])}
    assert run_deviations(runs[plain.name], T6, R20) == {}
    assert run_deviations(runs[logits.name], T6, R20) == {"eval.average": ("logits", "softmax")}
    assert run_deviations(runs[of_bad.name], T6, R20) == {"recipe.optimizer.lr": (0.2, 0.1)}
    # A checkpoint moved away from its run dir: its stored config decides.
    elsewhere = tmp_path / "moved" / "r20.pt"
    elsewhere.parent.mkdir()
    torch.save({"config": good.config, "model": {}}, elsewhere)
    moved = eval_run(tmp_path / "ev", "moved", cifar, {"center": (8.2, 0.5)}, elsewhere)
    assert run_deviations(discover_runs([str(moved)])[0], T6, R20) == {}
    moved_bad = tmp_path / "moved_bad" / "r20.pt"
    moved_bad.parent.mkdir()
    torch.save({"config": bad.config, "model": {}}, moved_bad)
    ev_bad = eval_run(tmp_path / "ev_bad", "moved", cifar, {"center": (5.2, 0.5)}, moved_bad)
    assert run_deviations(discover_runs([str(ev_bad)])[0], T6, R20) == {"recipe.optimizer.lr": (0.2, 0.1)}
    # In the table: the good run once (its own metrics, not its eval's 8.1) and the moved checkpoint (a model of its
    # own); the eval with logits and the bad run (deduplicated with its eval) listed as deviating, and the moved bad
    # checkpoint.
    r20 = csv_rows(build_table(T6, discover_runs([str(tmp_path)])).csv())["ResNet-20"]
    assert (r20["runs"], float(r20["ours_top1_err"]), r20["deviating_runs"]) == ("2", (8.0 + 8.2) / 2, "3")


# ------------------------------------------------------------------------ the committed ResNet-20 record
R20_COMMAND = ["experiment=resnet_table6", "row=cifar_resnet20", "seed=0", "train_split=trainval", "val_split=test",
               "test_split=test", "data.num_workers=2", "trainer.device=cpu", "trainer.compile=true",
               "trainer.progress=false", "name=resnet_table6_cifar_resnet20_seed0", "resume=auto"]


def test_committed_run_record_fills_table6_and_fig6(tmp_path, monkeypatch):
    """results/runs/resnet_table6/cifar_resnet20/seed0 (written before lr_batch_size, old metrics.jsonl lines on
    val_split=test, a JPEG data.root) is read by default: Table 6's ResNet-20 row, the JPEG note, Fig. 6's curve."""
    from repro.tables import generate

    rec = tmp_path / "results" / "runs" / "resnet_table6" / "cifar_resnet20"
    path = train_run(rec, "seed0", [*R20_COMMAND, "data.root=/work/shared/data/cifar10-jpeg"], {"center": (8.6, 0.4)},
                     val_curve=[(390, 59.11), (780, 40.5)], edit=_before_lr_batch_size)
    (path / "model.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    pages = {p.id: p for p in generate(None, tmp_path / "out", ["resnet_table6"], figures=False)}
    row = pages["resnet_table6"].rows[0]
    assert [r.path.resolve() for r in row.runs] == [path.resolve()] and row.ours["top1_err"] == [8.6]
    md = (tmp_path / "out" / "resnet_table6.md").read_text()
    assert "| ResNet-20 | 32 | 8.75 | 8.60 |" in md
    assert "- Data: our runs of ResNet-20 read JPEG re-encodings of CIFAR-10 (image folders)" in md
    from repro.report.figures import resnet_fig6

    runs = discover_runs(["results/runs"])
    fig = resnet_fig6(runs, tmp_path / "f6.png").figure
    ax = fig.axes[1]
    line = next(ln for ln in ax.get_lines() if ln.get_gid() == f"eval:{runs[0].path}")
    assert list(line.get_xdata()) == [0.039, 0.078] and list(line.get_ydata()) == [59.11, 40.5]
    assert ax.get_ylabel().startswith("test error (%)")


def test_jpeg_rule(tmp_path):
    """JPEG re-encodings: image folders of .jpg files, or (root not on this machine) a root named *jpeg*; not
    torchvision's batches nor PNG folders; never for other datasets."""
    def run(root: Path | str, name: str = "cifar10") -> RunRecord:
        return RunRecord(tmp_path, {"model": {"name": "resnet20"}, "data": {"name": name, "root": str(root)}}, None,
                         "train")

    for sub, file in (("jpg", "test/cat/0001.jpg"), ("png", "test/cat/0001.png"), ("tv", "cifar-10-batches-py/x")):
        (tmp_path / sub / file).parent.mkdir(parents=True)
        (tmp_path / sub / file).write_bytes(b"")
    assert reads_jpeg(run(tmp_path / "jpg")) and not reads_jpeg(run(tmp_path / "png"))
    assert not reads_jpeg(run(tmp_path / "tv"))
    assert reads_jpeg(run("/elsewhere/cifar10-jpeg")) and not reads_jpeg(run("/elsewhere/cifar10"))
    assert not reads_jpeg(run("/elsewhere/imagenet-jpeg", "imagenet"))


def test_neutral_keys_are_the_documented_ones():
    """The allowed keys are exactly those that cannot change the weights or the number (README lists them)."""
    assert {"trainer.sync_bn", "trainer.amp", "trainer.max_steps", "train_split", "test_split",
            "recipe.batch_size"}.isdisjoint(RESULT_NEUTRAL)
