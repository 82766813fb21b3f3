"""Nothing lost, nothing silently wrong (issue 14): run dirs never overwritten nor shared, data errors counted,
per-image failures as ImageError, faults of the machine and of other ranks ending in one clear message."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.io import write_png

from common import clean_env, wait_for
from repro.checkpoint import WriteError, save_atomic
from repro.cli import LOCK_FILE, lock_run_dir, unlock_run_dir
from repro.data.datasets import ImageFiles
from repro.data.images import ImageError, decode
from repro.data.transforms import PadCrop
from repro.models import create_model
from repro.train import main as train_main

QUICK = ("trainer.progress=false",)
TINY = ("trainer.max_steps=2", "data.limit=64", "recipe.batch_size=16", *QUICK)  # digits: seconds


# ------------------------------------------------------------------------------------------------ helpers
def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `root` (relative path -> (bytes, mtime_ns)): what "nothing changed" compares."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def finished_run(root: Path) -> Path:
    """A run dir as a finished run leaves it (checkpoints, metrics), written by hand: what must never change."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "last.pt").write_bytes(b"the finished run's last.pt")
    (root / "checkpoints" / "best.pt").write_bytes(b"the finished run's best.pt")
    (root / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (root / "metrics.json").write_text('{"center": {"top1_err": 1.0}}\n')
    return root


def png_bytes(w: int, h: int, value: int = 90) -> bytes:
    """A real RGB PNG of w x h."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (value, value, value)).save(buf, "PNG")
    return buf.getvalue()


def png_claiming(w: int, h: int) -> bytes:
    """A small PNG whose header says w x h (the IHDR patched, its CRC fixed): a decompression bomb's header."""
    data = bytearray(png_bytes(4, 4))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_claiming(w: int, h: int) -> bytes:
    """A small baseline JPEG whose SOF0 header says w x h."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def image_folder(root: Path, good: int, bad: dict[str, bytes], classes: str = "ab", size: int = 32) -> Path:
    """root/<class>/ with `good` real PNGs per class, plus the `bad` files (name -> bytes) in the first class."""
    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(good):
            write_png(torch.full((3, size, size), 20 * c + 5 * i, dtype=torch.uint8), str(root / cls / f"{i}.png"))
    for name, data in bad.items():
        (root / classes[0] / name).write_bytes(data)
    return root


# ---------------------------------------------------------------------------- 1. a run dir holding a run
@pytest.mark.parametrize("via", ["name", "hydra.run.dir"])
def test_rerun_into_a_finished_run_is_refused_and_changes_nothing(in_process, tmp_path, via):
    """Without resume=auto, a run dir that holds a run is refused before Hydra writes anything there (no .hydra/,
    no log, no lock): the message names resume=auto and a new name= (or hydra.run.dir= when that chose the dir)."""
    run = finished_run(tmp_path / "outputs" / "train" / "done")
    arg = "name=done" if via == "name" else f"hydra.run.dir={run}"
    before = snapshot(tmp_path)
    res = in_process(train_main, "repro-train", arg, *TINY, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{run if via == 'hydra.run.dir' else 'outputs/train/done'} already holds a run (checkpoints/last.pt, " \
           f"checkpoints/best.pt, metrics.json, metrics.jsonl); nothing was written" in res.stderr
    if via == "name":
        assert "Continue it with resume=auto name=done, or start a new run with another name=" in res.stderr
    else:
        assert f"Continue it with resume=auto hydra.run.dir={run}, or start a new run with another hydra.run.dir=" \
               in res.stderr
    assert snapshot(tmp_path) == before


def test_metrics_jsonl_alone_marks_a_run(in_process, tmp_path):
    """A run stopped before its first checkpoint (only metrics.jsonl) is a run too: not appended to silently."""
    run = tmp_path / "outputs" / "train" / "early"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    before = snapshot(tmp_path)
    res = in_process(train_main, "repro-train", "name=early", *TINY, cwd=tmp_path)
    assert res.returncode == 2 and "already holds a run (metrics.jsonl)" in res.stderr
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------ 2. one writer per run dir
@pytest.mark.slow
def test_second_process_on_a_busy_run_dir_is_refused(in_process, tmp_path):
    """A training run holds its run dir's lock: resume=auto from a second process is refused, naming the owner's pid,
    and leaves the dir alone; once the owner is SIGKILLed the lock is free again (never stale)."""
    proc = subprocess.Popen([sys.executable, "-m", "repro.train", "trainer.max_steps=100000",
                             "trainer.checkpoint_every=2", "name=busy", *QUICK], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=clean_env())
    run = tmp_path / "outputs" / "train" / "busy"
    try:
        wait_for(run / "checkpoints" / "last.pt", proc)
        hydra_files = snapshot(run / ".hydra")
        res = in_process(train_main, "repro-train", "name=busy", "resume=auto", *QUICK, cwd=tmp_path)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert f"outputs/train/busy is in use by another process (pid {proc.pid}, which holds " \
               f"outputs/train/busy/{LOCK_FILE})" in res.stderr
        assert "start a new run with another name=" in res.stderr
        assert snapshot(run / ".hydra") == hydra_files  # Hydra did not rewrite the running run's config
        assert not (run / "run.json").read_text().count("resume=auto")
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert lock_run_dir(run) is None  # the dead owner's lock is gone with it
    unlock_run_dir(run)
    assert not (run / LOCK_FILE).exists()


def _lock_in_child(run: Path) -> str:
    """lock_run_dir's answer in a forked child (its own open of the lock file), read back through a pipe."""
    import repro.cli as cli

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: forget the parent's locks (the descriptors stay the parent's), try for itself
        cli._locks.clear()
        os.write(w, str(lock_run_dir(run)).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        answer = f.read()
    os.waitpid(pid, 0)
    return answer


def test_lock_is_exclusive_between_processes(tmp_path):
    """While this process holds a run dir's lock another process is refused, naming this pid; after the release
    (which removes the lock file) it gets the lock."""
    assert lock_run_dir(tmp_path) is None
    assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert f"is in use by another process (pid {os.getpid()}" in _lock_in_child(tmp_path)
    unlock_run_dir(tmp_path)
    assert not (tmp_path / LOCK_FILE).exists()
    assert _lock_in_child(tmp_path) == "None"


# ----------------------------------------------------------------- 4, 5. skipped images counted, ImageError
def test_decompression_bomb_headers_refused_before_decoding():
    """data.max_pixels is checked on the header, for PIL's formats and torchvision's alike: a 20000x20000 bilevel
    TIFF of a few KB, a PNG and a JPEG whose headers claim 400M and 144M pixels; PIL's own DecompressionBombError
    (no limit of ours) is an ImageError too."""
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "TIFF", compression="group4")
    tiff = buf.getvalue()
    assert len(tiff) < 100_000
    for data, claim in ((tiff, "20000x20000 = 400,000,000"), (png_claiming(20000, 20000), "20000x20000 = 400,000,000"),
                        (jpeg_claiming(12000, 12000), "12000x12000 = 144,000,000")):
        with pytest.raises(ImageError, match=f"the image is {claim} pixels, more than data.max_pixels=100,000,000"):
            decode(data, "bomb")
    with pytest.raises(ImageError, match="more than data.max_pixels=10,000"):
        decode(png_bytes(101, 100), "big.png", max_pixels=10_000)
    assert decode(png_bytes(100, 100), "ok.png", max_pixels=10_000).shape == (3, 100, 100)
    from repro.data.images import _decode_pil

    with pytest.raises(ImageError, match="too large to decode safely .*decompression bomb"):
        _decode_pil(png_claiming(20000, 20000), "bomb.png", max_pixels=None)


def test_per_image_failures_are_failed_records(tmp_path):
    """A training image smaller than the crop even padded, and any exception a transform raises on one image,
    become Failed records naming the file (never an exception out of the worker)."""
    with pytest.raises(ImageError, match=r"tiny.png: the image is 1x1, smaller than the 32x32 training crop even "
                                         r"with 4 pixels of padding"):
        PadCrop(32, 4)(torch.zeros(3, 1, 1, dtype=torch.uint8), "tiny.png")
    assert PadCrop(32, 4)(torch.zeros(3, 24, 24, dtype=torch.uint8), "ok.png").shape == (3, 32, 32)
    (tmp_path / "x.png").write_bytes(png_bytes(1, 1))
    item = ImageFiles([str(tmp_path / "x.png")], [0], ["a"], PadCrop(32, 4))[0]
    assert "x.png: the image is 1x1, smaller than the 32x32" in item.message

    def broken(img: torch.Tensor) -> torch.Tensor:
        return img[0] / 0 if img.numel() > 100 else img.view(-1, 7)  # an exception no decoder planned for

    item = ImageFiles([str(tmp_path / "x.png")], [0], ["a"], broken)[0]
    assert "x.png: cannot use the image (RuntimeError:" in item.message and "data.on_error=skip" in item.message


def _folder_run(in_process, tmp_path, bad: dict[str, bytes], *args: str):
    """Train resnet20 on a 2-class folder of 32x32 PNGs (4 good per class) plus `bad` files; returns (res, run)."""
    train = image_folder(tmp_path / "data" / "train", 4, bad)
    val = image_folder(tmp_path / "data" / "val", 2, {})
    res = in_process(train_main, "repro-train", "model=resnet20", "data=folder", f"data.train_dir={train}",
                     f"data.val_dir={val}", "data.num_classes=null", "data.num_workers=0", "data.batch_size=8",
                     "test_split=null", "recipe.batch_size=4", "name=folder", *QUICK, *args, cwd=tmp_path)
    return res, tmp_path / "outputs" / "train" / "folder"


BAD = {"corrupt.png": b"not an image at all", "tiny.png": png_bytes(1, 1), "bomb.png": png_claiming(20000, 20000),
       "huge.jpg": jpeg_claiming(12000, 12000)}


def test_training_skips_are_counted_once(in_process, tmp_path):
    """data.on_error=skip: four unusable training files (damaged, 1x1, two bomb headers), seen in every epoch, are
    logged once each and counted once in metrics.json's "train_skipped"."""
    res, run = _folder_run(in_process, tmp_path, BAD, "data.on_error=skip", "trainer.max_steps=7")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_skipped"] == len(BAD) == 4
    assert metrics["steps"] == 7 and metrics["center"]["skipped"] == 0  # 12 files, 3 batches a step: 3 epochs
    for name in BAD:
        assert res.stderr.count(f"skipping {tmp_path / 'data' / 'train' / 'a' / name}") == 1, name
    assert "more than data.max_pixels=100,000,000" in res.stderr
    assert "smaller than the 32x32 training crop" in res.stderr
    assert "train_skipped" in res.stderr  # the epoch's log line points at the count


@pytest.mark.parametrize("name", sorted(BAD))
def test_unusable_training_image_stops_naming_it(in_process, tmp_path, name):
    """data.on_error=raise (the default): the run stops before any checkpoint with the file named, no traceback."""
    res, run = _folder_run(in_process, tmp_path, {name: BAD[name]}, "trainer.max_steps=4")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{tmp_path / 'data' / 'train' / 'a' / name}: " in res.stderr and "data.on_error=skip" in res.stderr
    assert not list(run.rglob("*.pt")) and not (run / "metrics.json").exists()


def test_batch_of_only_unusable_images_is_dropped(in_process, tmp_path):
    """Batches of one image: a batch whose only image is unusable is dropped with its step (no AttributeError); the
    run reaches its length on the good images and counts the two bad ones."""
    res, run = _folder_run(in_process, tmp_path, {"corrupt.png": b"junk", "tiny.png": png_bytes(1, 1)},
                           "data.on_error=skip", "recipe.batch_size=1", "trainer.max_steps=8")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_skipped"] == 2 and metrics["steps"] == 8
    assert res.stderr.count("a training batch had no usable image; its step is dropped") == 2  # one epoch of 10


def _cifar_folders(root: Path, bad_train: int, bad_test: int) -> Path:
    """CIFAR-10 as image folders: 10 classes of three 32x32 PNGs in train/, one in test/, plus damaged files."""
    classes = "abcdefghij"
    image_folder(root / "train", 3, {f"bad{i}.png": b"junk" for i in range(bad_train)}, classes)
    image_folder(root / "test", 1, {f"bad{i}.png": b"junk" for i in range(bad_test)}, classes)
    return root


def test_cifar_image_folders_count_what_decoding_skipped(in_process, tmp_path):
    """CIFAR image folders are decoded into memory: with skip, the damaged test files are counted in the final
    "skipped", and the damaged training files in "train_skipped" or, when carved into val, in the val records."""
    root = _cifar_folders(tmp_path / "cifar", bad_train=2, bad_test=3)
    res = in_process(train_main, "repro-train", "data=cifar10", f"data.root={root}", "data.val_size=10",
                     "data.num_workers=0", "data.on_error=skip", "recipe.batch_size=4", "trainer.max_steps=2",
                     "name=cifar", *QUICK, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "outputs" / "train" / "cifar"
    metrics = json.loads((run / "metrics.json").read_text())
    val = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["val"]["center"]
    assert metrics["split"] == "test" and metrics["center"]["skipped"] == 3 and metrics["center"]["images"] == 10
    assert metrics["train_skipped"] + val["skipped"] == 2
    assert metrics["train_skipped"] + val["skipped"] + val["images"] + 4 * 5 >= 30  # nothing else vanished
    assert "test: skipped 3 unusable images of 13" in res.stderr


# ------------------------------------------------------------------------- 6. model resolution vs image size
@pytest.mark.parametrize(("args", "message"), [
    (("model=resnet50", "data=cifar10", "recipe=resnet_cifar"),
     "model=resnet50 would train on 224x224 crops (model.resolution=224) but data=cifar10's images are 32x32 (40 with "
     "the padding); use a model made for 32x32 images (model=resnet20 ... resnet1202, plain20 ... plain110) or "
     "model.resolution=32"),
    (("model=mobilenet_v1",), "model=mobilenet_v1 would train on 224x224 crops (model.resolution=224) but "
                              "data=digits's images are 32x32 (36 with the padding)"),
    (("recipe.augment.crop=48",), "(recipe.augment.crop=48) but data=digits's images are 32x32 (36 with the "
                                  "padding); set recipe.augment.crop=32"),
])
def test_crop_larger_than_the_images_refused_before_any_work(in_process, tmp_path, args, message):
    """A training crop that cannot come from the dataset's fixed-size images is refused before data is read."""
    res = in_process(train_main, "repro-train", *args, f"data.root={tmp_path / 'none'}", "name=crop", *QUICK,
                     cwd=tmp_path) if "data=cifar10" in args else \
        in_process(train_main, "repro-train", *args, "name=crop", *QUICK, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert message in res.stderr
    run = tmp_path / "outputs" / "train" / "crop"
    assert not list(run.rglob("*.pt")) and not (run / "tb").exists() and not (run / "metrics.jsonl").exists()


# -------------------------------------------------------------------------------- 7. an unreadable last.pt
def _foreign_pickle() -> bytes:
    import argparse

    buf = io.BytesIO()
    torch.save(argparse.Namespace(weights=torch.zeros(2)), buf)
    return buf.getvalue()


def _truncated_checkpoint() -> bytes:
    buf = io.BytesIO()
    torch.save({"model": create_model("resnet20").state_dict(), "progress": {"step": 3}}, buf)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.mark.parametrize(("kind", "message"), [
    ("truncated", "cannot be read as a checkpoint (RuntimeError: PytorchStreamReader failed"),
    ("empty", "cannot be read as a checkpoint"),
    ("foreign pickle", "cannot be read as a checkpoint (UnpicklingError: Weights only load failed"),
    ("other dict", "is not a repro-train checkpoint (it lacks ['model', 'optimizer', 'schedule', 'scaler', "
                   "'progress', 'config'])"),
])
def test_unreadable_last_pt_is_kept_and_named(in_process, tmp_path, kind, message):
    """resume=auto onto a damaged or foreign last.pt: one message naming the file and the ways out, the file kept
    byte for byte, nothing of a run written (no checkpoints, TensorBoard, metrics, run.json)."""
    data = {"truncated": _truncated_checkpoint, "empty": lambda: b"", "foreign pickle": _foreign_pickle,
            "other dict": lambda: _save_bytes({"state_dict": {}})}[kind]()
    run = tmp_path / "outputs" / "train" / "r"
    (run / "checkpoints").mkdir(parents=True)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(data)
    before = snapshot(run)
    res = in_process(train_main, "repro-train", "name=r", "resume=auto", *TINY, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{last} {message}" in res.stderr
    assert f"it is kept as it is. Move it away (e.g. mv {last} {last}.bad) and rerun with resume=auto name=r to " \
           f"start this run dir from step 0, or start a new run with another name=" in res.stderr
    after = {k: v for k, v in snapshot(run).items() if not k.startswith(".hydra") and k != "train.log"}
    assert after == before


def _save_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ------------------------------------------------------------------------------ 8. disk full, read-only dirs
def test_save_atomic_disk_full_keeps_the_last_good_checkpoint(tmp_path):
    """A write that fails with ENOSPC (the temporary file is /dev/full) removes the partial file and says where
    the last good checkpoint is; the previous file is untouched. Always runs (no mount needed)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    (ck / "last.pt").write_bytes(b"previous good checkpoint")
    (ck / "last.pt.tmp").symlink_to("/dev/full")  # every write to it fails: No space left on device
    with pytest.raises(WriteError) as e:
        save_atomic({"model": create_model("resnet20").state_dict()}, ck / "last.pt")
    assert str(e.value).startswith(f"no space left on {ck}; the last good checkpoint is kept at {ck / 'last.pt'}")
    assert (ck / "last.pt").read_bytes() == b"previous good checkpoint"
    assert not os.path.lexists(ck / "last.pt.tmp")
    (ck / "best.pt.tmp").symlink_to("/dev/full")
    with pytest.raises(WriteError, match=f"the last good checkpoint is kept at {ck / 'last.pt'}"):
        save_atomic({"x": torch.zeros(10)}, ck / "best.pt", kept=ck / "last.pt")
    assert not os.path.lexists(ck / "best.pt.tmp") and not (ck / "best.pt").exists()
    save_atomic({"x": torch.ones(3)}, ck / "last.pt")  # and a write that works replaces it, fsynced
    assert torch.equal(torch.load(ck / "last.pt", weights_only=True)["x"], torch.ones(3))


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (size given by the test) at tmp_path/mnt; skip where mounting is not permitted."""
    mounted = []

    def mount(size: str, *options: str) -> Path:
        mnt = tmp_path / f"mnt{len(mounted)}"
        mnt.mkdir()
        opts = ",".join([f"size={size}", *options])
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}); the ENOSPC path is "
                        f"covered by test_save_atomic_disk_full_keeps_the_last_good_checkpoint")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_during_training(in_process, tmpfs):
    """A run on a 4 MB tmpfs: its 2.2 MB last.pt at step 2 fits, the step-4 one does not. The run stops with
    "no space left on <dir>; the last good checkpoint is kept at <path>", no .tmp left, the step-2 file intact."""
    mnt = tmpfs("4m")
    run = mnt / "run"
    res = in_process(train_main, "repro-train", f"hydra.run.dir={run}", "val_split=null", "trainer.max_steps=6",
                     "trainer.checkpoint_every=2", "data.limit=64", "recipe.batch_size=16", *QUICK, cwd=mnt.parent)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    ck = run / "checkpoints"
    assert f"error: no space left on {ck}; the last good checkpoint is kept at {ck / 'last.pt'}" in res.stderr
    assert sorted(p.name for p in ck.iterdir()) == ["last.pt"]
    assert torch.load(ck / "last.pt", weights_only=True)["progress"]["step"] == 2
    assert not (run / "metrics.json").exists()


def test_read_only_output_dir_is_one_line(in_process, repro_eval, tmp_path, tmpfs):
    """An output folder that cannot be written: one line naming it and the fix, no Hydra logging traceback."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
    else:  # root writes through permissions: a read-only file system
        ro = tmpfs("1m", "ro")
    res = in_process(train_main, "repro-train", f"hydra.run.dir={ro / 'run'}", *TINY, cwd=tmp_path)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and lines == [f"error: cannot create the run dir {ro / 'run'} (" + lines[0].split(
        " (", 1)[1]], res.stderr
    assert "run from a writable folder or point hydra.run.dir= at one" in lines[0]
    res = repro_eval(f"hydra.run.dir={ro / 'ev'}", "weights.path=x.pt", cwd=tmp_path / "ev")
    assert res.returncode == 2 and res.stderr.startswith(f"error: cannot create the run dir {ro / 'ev'}")
    assert "Traceback" not in res.stderr


# ------------------------------------------------------------------------------- 9. a stopped rank, signals
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_stopped_rank_ends_the_others_with_a_message(tmp_path):
    """Two gloo ranks, trainer.dist_timeout_s=4: rank 1 SIGSTOPped after the first checkpoint. Rank 0 stops within
    seconds naming rank 1 and the timeout; rank 1, continued, stops too; both name the same way to continue (the
    hydra.run.dir= given, not a name), and the checkpoint is kept."""
    run = tmp_path / "custom-dir"
    env = {**clean_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "repro.train", "trainer.max_steps=100000", "trainer.checkpoint_every=2",
            "trainer.log_every=2", "trainer.dist_timeout_s=4", f"hydra.run.dir={run}", "data.limit=64",
            "recipe.batch_size=16", *QUICK]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    try:
        wait_for(run / "checkpoints" / "last.pt", procs[0])
        os.kill(procs[1].pid, signal.SIGSTOP)
        t0 = time.monotonic()
        _, err0 = procs[0].communicate(timeout=120)
        waited = time.monotonic() - t0
        os.kill(procs[1].pid, signal.SIGCONT)
        _, err1 = procs[1].communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[0].returncode == 2 and "Traceback" not in err0, err0[-3000:]
    assert waited < 60
    assert "error: rank 0: a collective got no answer from rank 1 within trainer.dist_timeout_s=4 s" in err0
    hint = f"continue with resume=auto hydra.run.dir={run} once every rank runs"
    assert hint in err0 and f"The last good checkpoint is kept at {run / 'checkpoints' / 'last.pt'}" in err0
    assert procs[1].returncode == 2 and "Traceback" not in err1, err1[-3000:]
    assert "error: rank 1: a collective got no answer from " in err1 and hint in err1
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["progress"]["step"] >= 2


@pytest.mark.slow
def test_signal_stop_names_the_run_dir_given(tmp_path):
    """After SIGTERM the way to continue is `resume=auto hydra.run.dir=DIR` when hydra.run.dir chose the run dir
    (name= would start a new run elsewhere)."""
    run = tmp_path / "elsewhere"
    proc = subprocess.Popen([sys.executable, "-m", "repro.train", "trainer.max_steps=100000",
                             "trainer.checkpoint_every=2", f"hydra.run.dir={run}", "data.limit=64",
                             "recipe.batch_size=16", *QUICK], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        wait_for(run / "checkpoints" / "last.pt", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM received: checkpoint written at step" in err
    assert f"continue with resume=auto hydra.run.dir={run}" in err and "name=" not in err.split("SIGTERM")[-1]


# ------------------------------------------------------------------------------------------- small ones
@pytest.fixture
def weights(tmp_path) -> Path:
    """A resnet20 state dict as a file (read as torchvision-format weights)."""
    path = tmp_path / "w.pth"
    torch.save(create_model("resnet20").state_dict(), path)
    return path


@pytest.mark.parametrize(("args", "message"), [
    (("data=synthetic", "data.batch_size=0"), "data.batch_size=0 is not valid; give the images per evaluation "
                                              "batch, > 0 (e.g. data.batch_size=64)"),
    (("data.batch_size=0",), "data.batch_size=0 is not valid; give the images per evaluation batch, > 0"),
    (("data=synthetic", "eval.resize=abc"), "eval.resize='abc' is not valid; give a size in pixels (e.g. "
                                            "eval.resize=256), auto (from the model's resolution) or null (none)"),
    (("data=synthetic", "eval.crop=-1"), "eval.crop=-1 is not valid; give a size in pixels (e.g. eval.crop=224)"),
    (("data=synthetic", "eval.protocols=[multi_scale]", "eval.scales=[]"),
     "eval.scales=[] leaves multi_scale no scales; give the shorter sides to test at, e.g. "
     "eval.scales=[224,256,384,480,640]"),
    (("data=synthetic", "model=base_resnet"), "model=base_resnet is a schema (the keys a family of models has), not "
                                              "a model; choose a model config: model=NAME with NAME one of ["),
])
def test_eval_option_messages(repro_eval, tmp_path, weights, args, message):
    """repro-eval's bad options stop with one message naming the fix; nothing is evaluated or written."""
    base = ("model=resnet20", "data.image_size=32", "data.length=4", "data.num_classes=10") \
        if "data=synthetic" in args else ()
    model = () if any(a.startswith("model=") for a in args) else base[:1]
    res = repro_eval(*model, *args, *base[1:], f"weights.path={weights}", "weights.format=torchvision",
                     "eval.progress=false", cwd=tmp_path / "ev")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert message in res.stderr, res.stderr
    assert not list((tmp_path / "ev").rglob("metrics.json"))


@pytest.mark.parametrize(("args", "message"), [
    (("data.val_dir=/x",), "data.val_dir is a key of data=folder and data=imagenet, not of data=digits (the "
                           "default); add data=folder (with data.train_dir= and data.val_dir=, or data.root=)"),
    (("data=cifar10", "data.train_dir=/x"), "data.train_dir is a key of data=folder and data=imagenet, not of "
                                            "data=cifar10; add data=folder"),
    (("model=base_resnet",), "model=base_resnet is a schema (the keys a family of models has), not a model; choose a "
                             "model config: model=NAME with NAME one of ['mobilenet_v1', "),
])
def test_train_option_messages(in_process, tmp_path, args, message):
    """repro-train: keys of another dataset, a model schema instead of a model: one message naming the fix."""
    res = in_process(train_main, "repro-train", *args, "name=opt", *QUICK, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert message in res.stderr, res.stderr
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("tb"))


def test_predictions_csv_keeps_non_utf8_file_names(repro_eval, tmp_path):
    """A file name that is not UTF-8 (Latin-1 bytes) is written to predictions.csv byte for byte, the file whole."""
    val = tmp_path / "val"
    for cls in "ab":
        (val / cls).mkdir(parents=True)
        (val / cls / "plain.png").write_bytes(png_bytes(32, 32, 40))
    raw = os.fsencode(str(val / "a")) + b"/caf\xe9.png"  # "café" in Latin-1: not UTF-8
    with open(raw, "wb") as f:
        f.write(png_bytes(32, 32, 200))
    ck = tmp_path / "ck.pt"
    torch.save({"model": create_model("resnet20", num_classes=2).state_dict(),
                "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3, "mean_image": None}}, ck)
    res = repro_eval("model=resnet20", "data=folder", f"data.val_dir={val}", "data.num_workers=0",
                     f"weights.path={ck}", "eval.save_predictions=true", "eval.progress=false", cwd=tmp_path / "ev")
    assert res.returncode == 0, res.stderr[-3000:]
    csv_bytes = next((tmp_path / "ev").rglob("predictions.csv")).read_bytes()
    lines = csv_bytes.splitlines()
    assert len(lines) == 1 + 3 and lines[0].startswith(b"path,protocol,label")
    assert sum(line.startswith(raw + b",center,0,") for line in lines) == 1
