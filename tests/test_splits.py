"""Splits that never overlap (issue 19): a run never evaluates on its own training images, and every record of
an evaluation names its split."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torchvision.io import write_png

import repro.data.datasets as datasets
from common import CIFAR_ROOT
from repro.data.datasets import shared_images
from repro.eval import main as eval_main
from repro.train import main as train_main

QUICK = ("trainer.progress=false",)


def _count_decodes(monkeypatch) -> list[str]:
    """Record every image file decoded from now on (ImageFiles reads through datasets.load_image)."""
    calls: list[str] = []
    real = datasets.load_image

    def counting(path, *args):
        calls.append(str(path))
        return real(path, *args)

    monkeypatch.setattr(datasets, "load_image", counting)
    return calls


def _written(run: Path) -> list[str]:
    """What a run dir holds beyond Hydra's own start-up files (.hydra/, the log)."""
    if not run.exists():
        return []
    return sorted(p.name for p in run.iterdir() if p.name not in (".hydra", "train.log"))


def _tags(run: Path) -> set[str]:
    """The scalar tags of a run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


# ------------------------------------------------------------------------------------------- the check
def test_shared_images_counts_cifar_and_digits_overlaps():
    """CIFAR's carved val lies inside trainval (5,000 of 5,000), not inside train or test; digits alike."""
    digits = SimpleNamespace(name="digits", image_size=8, test_size=360, split_seed=0, num_classes=10)
    assert shared_images(digits, "val", "trainval") == (180, 180)
    assert shared_images(digits, "val", "train") == (0, 180)
    assert shared_images(digits, "test", "trainval") == (0, 360)
    if not (CIFAR_ROOT / "test").is_dir():
        pytest.skip(f"CIFAR-10 train/ and test/ images not found in {CIFAR_ROOT}")
    cifar = SimpleNamespace(name="cifar10", root=str(CIFAR_ROOT), num_classes=10, val_size=5000, split_seed=0,
                            download=False)
    assert shared_images(cifar, "val", "trainval") == (5000, 5000)
    assert shared_images(cifar, "val", "train") == (0, 5000)
    assert shared_images(cifar, "test", "trainval") == (0, 10000)


def test_trainval_with_val_refused_before_decoding(in_process, tmp_path, monkeypatch):
    """CIFAR JPEGs, train_split=trainval with the default val_split=val: refused with both splits and the fixes
    named, no image decoded, no checkpoint, metrics or TensorBoard file written."""
    if not (CIFAR_ROOT / "test").is_dir():
        pytest.skip(f"CIFAR-10 train/ and test/ images not found in {CIFAR_ROOT}")
    decoded = _count_decodes(monkeypatch)
    res = in_process(train_main, "repro-train", "model=resnet20", "data=cifar10", f"data.root={CIFAR_ROOT}",
                     "recipe=resnet_cifar", "train_split=trainval", "name=overlap", *QUICK, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert ("val_split='val' shares 5000 of its 5000 images with train_split='trainval' (data=cifar10)"
            in res.stderr)
    assert "val_split=null" in res.stderr and "val_split=test" in res.stderr
    assert decoded == []
    assert _written(tmp_path / "outputs" / "train" / "overlap") == []


def _folder(root: Path, n: int = 2, size: int = 8) -> Path:
    """A class-folder tree of tiny real PNGs: root/<a|b>/<i>.png."""
    for c, cls in enumerate("ab"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            write_png(torch.full((3, size, size), 40 * c + i, dtype=torch.uint8), str(root / cls / f"{i}.png"))
    return root


def test_a_run_walks_each_data_folder_once(in_process, tmp_path, monkeypatch):
    """repro-train checks the splits (listing train and val) and then builds their loaders: each folder is walked
    once for both, while outside a run every build_dataset lists afresh and sees files added since."""
    train, val = _folder(tmp_path / "train", 4, size=32), _folder(tmp_path / "val", 2, size=32)
    walked: list[str] = []
    real = datasets._scan_folder
    monkeypatch.setattr(datasets, "_scan_folder", lambda root, names: walked.append(str(root)) or real(root, names))
    res = in_process(train_main, "repro-train", "model=resnet20", "data=folder", f"data.train_dir={train}",
                     f"data.val_dir={val}", "data.num_classes=null", "data.num_workers=0", "data.batch_size=4",
                     "test_split=null", "recipe.batch_size=4", "trainer.max_steps=1", "name=once", *QUICK,
                     cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(walked) == [str(train), str(val)]
    cfg = SimpleNamespace(name="folder", root=None, train_dir=str(train), val_dir=str(val), num_classes=None)
    assert len(datasets.build_dataset(cfg, "train")) == 8
    write_png(torch.zeros((3, 32, 32), dtype=torch.uint8), str(train / "a" / "new.png"))
    assert len(datasets.build_dataset(cfg, "train")) == 9
    with datasets.list_once():
        first = datasets.build_dataset(cfg, "train")
        (train / "a" / "new.png").unlink()
        assert datasets.build_dataset(cfg, "train").paths == first.paths  # the listing of this run


@pytest.mark.parametrize("layout", ["symlinked_files", "same_folder", "inside_train"])
def test_folder_val_files_that_are_training_files_refused(in_process, tmp_path, monkeypatch, layout):
    """data=folder whose validation images are training images (linked files, the same folder under another path,
    a folder inside the training folder) is refused before anything is decoded or written."""
    train = _folder(tmp_path / "data" / "train")
    if layout == "symlinked_files":
        val = tmp_path / "data" / "val"
        for cls in "ab":
            (val / cls).mkdir(parents=True)
            (val / cls / "x.png").symlink_to(train / cls / "0.png")
        shared, total = 2, 2
    elif layout == "same_folder":
        val = tmp_path / "data" / "train-link"
        val.symlink_to(train, target_is_directory=True)
        shared, total = 4, 4
    else:  # data.val_dir inside the training folder: its class folders are train/<cls>/
        nested = train / "a" / "sub"
        for cls in "ab":
            (nested / cls).mkdir(parents=True)
            write_png(torch.zeros((3, 8, 8), dtype=torch.uint8), str(nested / cls / "x.png"))
        val = nested
        shared, total = 2, 2
    decoded = _count_decodes(monkeypatch)
    res = in_process(train_main, "repro-train", "model=resnet18", "data=folder", f"data.train_dir={train}",
                     f"data.val_dir={val}", "data.num_classes=null", "test_split=null", "recipe=resnet_imagenet",
                     "name=folder", *QUICK, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"val_split='val' shares {shared} of its {total} images with train_split='train' (data=folder)" in res.stderr
    assert decoded == [] and _written(tmp_path / "outputs" / "train" / "folder") == []


def test_disjoint_folders_pass_the_check(tmp_path):
    """Separate train and val folders of distinct files share nothing."""
    train, val = _folder(tmp_path / "train"), _folder(tmp_path / "val")
    cfg = SimpleNamespace(name="folder", root=None, train_dir=str(train), val_dir=str(val), num_classes=None)
    assert shared_images(cfg, "val", "train") == (0, 4)


# --------------------------------------------------------------------------------------------- val_split=null
def test_val_split_null_reports_the_final_weights(in_process, tmp_path):
    """val_split=null: no per-epoch evaluation (no metrics.jsonl, no best.pt, no val/test curve), and metrics.json
    is the final weights' test error, as `repro-eval` of last.pt gives it."""
    res = in_process(train_main, "repro-train", "trainer.max_steps=12", "val_split=null", "name=noval", *QUICK,
                     cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "outputs" / "train" / "noval"
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints" / "best.pt").exists()
    assert not any(t.startswith(("val/", "test/")) for t in _tags(run))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["best_val_top1_err"] is None and metrics["steps"] == 12
    res = in_process(eval_main, "repro-eval", f"weights.path={run / 'checkpoints' / 'last.pt'}", "eval.progress=false",
                     "hydra.run.dir=outputs/eval/noval", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads((tmp_path / "outputs" / "eval" / "noval" / "metrics.json").read_text())
    assert again["center"] == metrics["center"]


def test_nothing_to_evaluate_refused(in_process, tmp_path):
    """val_split=null and test_split=null leave no evaluation: refused, naming both keys."""
    res = in_process(train_main, "repro-train", "val_split=null", "test_split=null", "name=none", *QUICK, cwd=tmp_path)
    assert res.returncode == 2 and "val_split=null and test_split=null leave nothing to evaluate" in res.stderr


# ------------------------------------------------------------------------------------- records name their split
@pytest.mark.parametrize("val_split", ["val", "test"])
def test_evaluation_records_name_their_split(in_process, tmp_path, val_split):
    """metrics.jsonl lines, the log line and the TensorBoard tags carry the split's name; best.pt is chosen on a
    validation split only, never on the reported test split."""
    res = in_process(train_main, "repro-train", "trainer.max_epochs=2", f"val_split={val_split}", "name=named",
                     *QUICK, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "outputs" / "train" / "named"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"], r["split"]) for r in lines] == [(1, 19, val_split), (2, 38, val_split)]
    size = {"val": 180, "test": 360}[val_split]
    assert all(r[val_split]["center"]["images"] == size for r in lines)
    other = {"val": "test", "test": "val"}[val_split]
    assert all(other not in r for r in lines)
    log = (run / "train.log").read_text()
    assert f"epoch 2 step 38: {val_split} top-1 err {lines[-1][val_split]['center']['top1_err']:.2f}%" in log
    tags = _tags(run)
    assert {f"{val_split}/top1_err", f"{val_split}/top5_err"} <= tags
    assert not {f"{other}/top1_err", f"{other}/top5_err"} & tags
    assert (run / "checkpoints" / "best.pt").exists() == (val_split == "val")


def test_a_split_that_is_val_and_test_is_listed_and_built_once(in_process, tmp_path, monkeypatch):
    """val_split=test_split=test (ResNet Fig. 6's protocol): the test split is checked against the training split
    once and built (decoded, for in-memory data) once, and the same images serve the curve and the final number."""
    import repro.data.build as build

    listed, built = [], []
    real_shared, real_tensors = build.shared_images, build._tensors
    monkeypatch.setattr(build, "shared_images", lambda cfg, split, train: listed.append(split) or
                        real_shared(cfg, split, train))
    monkeypatch.setattr(build, "_tensors", lambda cfg, split: built.append(split) or real_tensors(cfg, split))
    res = in_process(train_main, "repro-train", "trainer.max_epochs=1", "val_split=test", "test_split=test",
                     "name=once", *QUICK, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert listed == ["test"] and sorted(built) == ["test", "train"]
    run = tmp_path / "outputs" / "train" / "once"
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert json.loads((run / "metrics.json").read_text())["center"] == last["test"]["center"]


# ------------------------------------------------------------------------------------- folder classes
def test_folder_class_lists_must_agree(in_process, tmp_path):
    """data=folder: an extra (empty) class folder in training only would shift every label; an empty class folder
    or a validation folder with other classes is refused, naming the folders, before anything is decoded."""
    train, val = _folder(tmp_path / "train"), _folder(tmp_path / "val")
    cfg = SimpleNamespace(name="folder", root=None, train_dir=str(train), val_dir=str(val), num_classes=None)
    (train / "0extra").mkdir()  # sorts first: without the check, val's "a" would be label 0, train's "a" label 1
    with pytest.raises(datasets.DataError, match=r"class folders without images: \['0extra'\]"):
        datasets.build_dataset(cfg, "train")
    write_png(torch.zeros((3, 8, 8), dtype=torch.uint8), str(train / "0extra" / "0.png"))
    with pytest.raises(datasets.DataError, match=r"differ: only in training \['0extra'\], only in validation \[\]"):
        datasets.build_dataset(cfg, "val")
    res = in_process(train_main, "repro-train", "model=resnet18", "data=folder", f"data.train_dir={train}",
                     f"data.val_dir={val}", "data.num_classes=null", "test_split=null", "recipe=resnet_imagenet",
                     "name=classes", *QUICK, cwd=tmp_path)
    assert res.returncode == 2 and "only in training ['0extra']" in res.stderr and "Traceback" not in res.stderr


def test_unreadable_class_folder_refused(tmp_path):
    """A class folder the process cannot read is named, not silently dropped (skipped when running as a user who
    can read anything)."""
    import os

    train = _folder(tmp_path / "train")
    (train / "b" / "sub").mkdir()
    os.chmod(train / "b" / "sub", 0)
    try:
        if os.access(train / "b" / "sub", os.R_OK):
            pytest.skip("this user reads folders without read permission (root): the case cannot be made here")
        cfg = SimpleNamespace(name="folder", root=None, train_dir=str(train), val_dir=None, num_classes=None)
        with pytest.raises(datasets.DataError, match="cannot read .*sub.*fix its permissions"):
            datasets.build_dataset(cfg, "train")
    finally:
        os.chmod(train / "b" / "sub", 0o755)
