"""data.decode=gpu (issue 17, item 13): workers read JPEG bytes and draw each crop from the header, the main
process decodes and crops on the device. On the CPU (torchvision's decode_jpeg there) the path must give exactly
the batches of data.decode=cpu: same windows, same decoder, same resize."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from PIL import Image

from common import IMAGENET_SAMPLE
from repro.cli import CONFIG_DIR, bad_choice
from repro.config import register_configs
from repro.data import collate
from repro.data.datasets import ImageFiles, scan_folder
from repro.data.device_decode import DeviceDecode, EncodedFiles, jpeg_size
from repro.data.loaders import SeededSamples
from repro.data.transforms import PadCrop, RandomResizedCrop, ScaleAugCrop
from repro.distributed import Dist
from repro.train import check_config, setup

CPU = torch.device("cpu")
TRANSFORMS = {"scale_aug": ScaleAugCrop(64, 72, 128), "inception": RandomResizedCrop(64, (0.08, 1.0)),
              "mobilenet": RandomResizedCrop(48, (0.35, 1.0), flip=False)}


def _sample() -> ImageFiles:
    """The shared ImageNet photographs (sorted synset folders), or skip."""
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"the shared ImageNet sample is not at {IMAGENET_SAMPLE}")
    paths, labels, classes = scan_folder(IMAGENET_SAMPLE)
    return ImageFiles(paths, labels, classes)


def _image(w: int, h: int, fmt: str, mode: str = "RGB", seed: int = 0) -> bytes:
    """A smooth random image encoded as `fmt` in `mode`."""
    rng = np.random.default_rng(seed)
    arr = np.clip(rng.normal(128, 50, (h // 4 + 1, w // 4 + 1, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr).resize((w, h), Image.BILINEAR).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("name", [*TRANSFORMS, "pad_crop"])
def test_window_then_apply_is_the_transform(name):
    """A transform's window() draws what its __call__ draws (same random numbers, same order), and apply() of that
    window is its output: a worker that knows only the header's size draws the CPU path's crop."""
    t = TRANSFORMS.get(name) or PadCrop(32, 4, True)
    img = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8)
    for seed in range(20):
        random.seed(seed)
        whole = t(img)
        after_call = random.random()
        random.seed(seed)
        win = t.window(37, 53)
        assert random.random() == after_call  # the same count of draws
        assert torch.equal(t.apply(img, win), whole)


def test_jpeg_size_reads_the_header():
    """(height, width) of RGB and grayscale JPEGs; None for PNG and CMYK (decoded in the worker) and non-images."""
    assert jpeg_size(_image(40, 24, "JPEG")) == (24, 40)
    assert jpeg_size(_image(40, 24, "JPEG", "L")) == (24, 40)
    assert jpeg_size(_image(40, 24, "JPEG", "CMYK")) is None
    assert jpeg_size(_image(40, 24, "PNG")) is None
    assert jpeg_size(b"\xff\xd8\xff not really") is None


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_device_decode_gives_the_cpu_paths_batch_on_real_jpegs(name):
    """On the shared ImageNet photographs, a batch through EncodedFiles + DeviceDecode (on the CPU) equals, image
    for image, the batch the data.decode=cpu loader makes with the same seed: same window, same pixels."""
    files, t = _sample(), TRANSFORMS[name]
    n = 24
    cpu = SeededSamples(ImageFiles(files.paths, files.labels, files.classes, t), seed=3)
    enc = SeededSamples(EncodedFiles(files, t), seed=3)
    want = collate([cpu[(1, i)] for i in range(n)])
    got = collate([enc[(1, i)] for i in range(n)])
    assert all(item.data is not None and item.image is None for item in got["views"])  # all decoded on the device
    done = DeviceDecode(t, CPU)(got)
    x = done["views"]
    assert done["indices"].tolist() == list(range(n)) and not done["failed"]
    assert torch.equal(done["labels"], want["labels"])
    assert x.shape == want["views"].shape and x.dtype == torch.uint8
    assert torch.equal(x, want["views"])


def test_png_cmyk_and_gray_files(tmp_path):
    """PNG and CMYK JPEGs are decoded and cropped in the worker, grayscale JPEGs on the device: all equal the CPU
    path's crops."""
    files = {"a/rgb.jpg": _image(60, 45, "JPEG"), "a/gray.jpg": _image(50, 70, "JPEG", "L", 1),
             "b/cmyk.jpg": _image(64, 48, "JPEG", "CMYK", 2), "b/pic.png": _image(48, 64, "PNG", seed=3)}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    paths, labels, classes = scan_folder(tmp_path)
    t = TRANSFORMS["scale_aug"]
    cpu = SeededSamples(ImageFiles(paths, labels, classes, t), seed=0)
    enc = SeededSamples(EncodedFiles(ImageFiles(paths, labels, classes), t), seed=0)
    batch = collate([enc[(0, i)] for i in range(len(paths))])
    in_worker = {Path(it.path).name for it in batch["views"] if it.image is not None}
    assert in_worker == {"cmyk.jpg", "pic.png"}
    x = DeviceDecode(t, CPU)(batch)["views"]
    assert torch.equal(x, collate([cpu[(0, i)] for i in range(len(paths))])["views"])


def test_damaged_jpeg_becomes_a_failed_record(tmp_path):
    """A JPEG with a good header and a cut body: the device decoder refuses it, the CPU decoder names why, and the
    batch goes on without it, the file a Failed record (which data.on_error then raises or counts as skipped)."""
    good, bad = _image(60, 45, "JPEG"), _image(256, 256, "JPEG", seed=5)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "good.jpg").write_bytes(good)
    (tmp_path / "a" / "cut.jpg").write_bytes(bad[: len(bad) * 2 // 3])  # the header is whole
    paths, labels, classes = scan_folder(tmp_path)
    t = TRANSFORMS["inception"]
    enc = SeededSamples(EncodedFiles(ImageFiles(paths, labels, classes), t), seed=0)
    batch = collate([enc[(0, i)] for i in range(2)])
    cut = [k for k, it in enumerate(batch["views"]) if it.path.endswith("cut.jpg")][0]
    assert batch["views"][cut].data is not None  # the worker read its header: left to the device decoder
    done = DeviceDecode(t, CPU)(batch)
    assert done["views"].shape == (1, 3, 64, 64) and done["indices"].tolist() == [1 - cut]
    assert done["labels"].tolist() == [labels[1 - cut]]
    assert [(f.index, f.path) for f in done["failed"]] == [(cut, str(tmp_path / "a" / "cut.jpg"))]
    assert "truncated" in done["failed"][0].message and "data.on_error=skip" in done["failed"][0].message


def _config(*overrides: str):
    """repro-train's composed config."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=["name=dd", "trainer.progress=false", *overrides])


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["data=cifar10", "data.decode=gpu"], "data=cifar10 has none to decode there: use data.decode=cpu"),
    (["data=folder", "data.root=/x", "test_split=val", "data.decode=gpu", "trainer.device=cpu"],
     "data.decode=gpu needs a GPU"),
    (["data=folder", "data.root=/x", "test_split=val", "data.decode=nvjpeg"],
     "data.decode='nvjpeg' is not valid; choose one of ['cpu', 'gpu']"),
])
def test_decode_gpu_refusals(overrides, fragment, capsys):
    """data.decode=gpu on in-memory data or on a CPU run, or an unknown decoder, are refused before any work (an
    unknown decoder by the schema, as the config is built, in the words repro-train prints)."""
    try:
        check_config(_config(*overrides))
    except ConfigCompositionException as e:
        message = bad_choice(e)
    except SystemExit:
        message = capsys.readouterr().err
    else:
        pytest.fail(f"{overrides} was not refused")
    assert fragment in message


def test_two_steps_with_device_decode_equal_cpu_decode(tmp_path):
    """repro-train's loop with data.decode=gpu (its device decoder on the CPU here) feeds the model exactly the
    inputs of data.decode=cpu: two steps of the ResNet recipe on the shared photographs."""
    files = _sample()
    inputs: dict[str, list[torch.Tensor]] = {}
    for decode in ("cpu", "gpu"):
        cfg = _config("model=resnet18", "model.resolution=64", "recipe=resnet_imagenet", "data=folder",
                      f"data.train_dir={IMAGENET_SAMPLE}", f"data.val_dir={IMAGENET_SAMPLE}", "data.num_workers=0",
                      "recipe.batch_size=8", "train_split=train", "val_split=null", "test_split=val",
                      "trainer.max_steps=2", "trainer.device=auto", f"data.decode={decode}")
        check_config(cfg)
        run = setup(cfg, Dist(), CPU, tmp_path / decode)
        assert (run.data.decoder is not None) == (decode == "gpu")
        seen = inputs[decode] = []
        run.state.model.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0].detach().clone()))
        try:
            run.epoch()
        finally:
            run.close()
        assert run.state.progress.step == 2
    assert len(inputs["gpu"]) == 2 and len(files.paths) >= 16
    for a, b in zip(inputs["cpu"], inputs["gpu"]):
        assert torch.equal(a, b)
