"""repro-export: zoo models to ONNX, ONNX Runtime's logits against PyTorch's on real photos, export.json, refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from common import AKAMASTER_DIR, CIFAR_ROOT, IMAGENET_SAMPLE, MEAN, STD
from repro.data import Preprocessing
from repro.export import EXTRA_INSTALL
from repro.models import create_model, load_weights

ort = pytest.importorskip("onnxruntime", reason=f"the export extra is not installed ({EXTRA_INSTALL})")
pytest.importorskip("onnxscript", reason=f"the export extra is not installed ({EXTRA_INSTALL})")
tv = pytest.importorskip("torchvision.transforms")

TOL = 1e-4  # the issue's: ORT logits within 1e-4 of PyTorch's


def calibrated_checkpoint(name: str, resolution: int, path: Path, mean=MEAN, std=STD) -> Path:
    """A repro checkpoint of `name` whose BN statistics were recomputed on random images, so that its logits are of
    order one (randomly initialized MobileNets give logits ~1e-9, where any two runtimes agree trivially)."""
    torch.manual_seed(0)
    model = create_model(name)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
        elif isinstance(m, torch.nn.Linear):  # classifiers start near zero (std 0.01); spread the logits
            torch.nn.init.normal_(m.weight, std=m.in_features ** -0.5)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, resolution, resolution))
    cfg = {"name": name, "resolution": resolution, "num_classes": 1000 if resolution == 224 else 10}
    torch.save({"model": model.state_dict(), "preprocessing": Preprocessing(mean, std).to_dict(),
                "config": {"model": cfg}}, path)
    return path


def photos(folder: Path, n: int) -> list[Path]:
    """n image files of folder, sorted, spread evenly (as the export's check picks them)."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    return [files[i * len(files) // n] for i in range(n)]


def reference_inputs(files: list[Path], resolution: int, cifar: bool) -> torch.Tensor:
    """The network inputs as torchvision builds them: Resize(r/0.875) + CenterCrop(r) (CIFAR: the image itself),
    ToTensor, Normalize(ImageNet mean/std): independent of repro's own pipeline."""
    steps = [] if cifar else [tv.Resize(round(resolution / 0.875)), tv.CenterCrop(resolution)]
    t = tv.Compose([*steps, tv.ToTensor(), tv.Normalize(MEAN, STD)])
    return torch.stack([t(Image.open(f).convert("RGB")) for f in files])


CASES = {  # model -> (resolution, image folder, published weights or None)
    "mobilenet_v1": (224, IMAGENET_SAMPLE, None),
    "mobilenet_v2": (224, IMAGENET_SAMPLE, None),
    "resnet18": (224, IMAGENET_SAMPLE, None),
    "resnet20": (32, CIFAR_ROOT / "test", AKAMASTER_DIR / "resnet20-12fca82f.th"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_export_matches_pytorch_on_real_images(name, repro_export, tmp_path, one_thread):
    """The ONNX graph (dynamic batch) gives PyTorch's logits within 1e-4 and the same top-1 on real photos; the check
    and the preprocessing are in export.json, and the graph's input is the normalized NCHW float32 batch."""
    resolution, folder, published = CASES[name]
    if not folder.is_dir():
        pytest.skip(f"shared images absent: {folder}")
    if published is not None and published.is_file():
        weights = ["weights.path=" + str(published), "weights.format=akamaster", f"model={name}"]
        model = load_weights(create_model(name, shortcut_pad="split"), published, "akamaster")
    else:
        ckpt = calibrated_checkpoint(name, resolution, tmp_path / "ckpt.pt")
        weights = ["weights.path=" + str(ckpt)]  # model config from the checkpoint, as repro-eval reads it
        model = load_weights(create_model(name, num_classes=1000 if resolution == 224 else 10), ckpt, "repro")
    out = tmp_path / f"{name}.onnx"
    r = repro_export(*weights, f"export.out={out}", "export.check_count=16", "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "export.json").read_text())
    assert json.loads(out.with_suffix(".json").read_text()) == report  # the same record beside the graph
    check = report["check"]
    assert check["passed"] and check["images"] == 16 and check["top1_agreement"] == 1.0
    assert check["max_abs_diff"] <= TOL and check["source"] == str(folder.resolve())
    assert report["input"] == {"name": "input", "shape": ["batch", 3, resolution, resolution], "dtype": "float32",
                               "layout": "NCHW"}
    pre = report["preprocessing"]
    assert pre["mean"] == pytest.approx(MEAN) and pre["std"] == pytest.approx(STD) and pre["mean_image"] is None
    assert (pre["resize_shorter_side"], pre["center_crop"]) == ((resolution, resolution) if resolution == 32
                                                                else (round(resolution / 0.875), resolution))

    # Independently of the export's own check: torchvision's inputs, a fresh session, two batch sizes.
    x = reference_inputs(photos(folder, 6), resolution, cifar=resolution == 32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("input", ["batch", 3, resolution, resolution])]
    with torch.no_grad():
        ref = model.eval()(x)
    got = torch.cat([torch.from_numpy(session.run(None, {"input": x[:1].numpy()})[0]),
                     torch.from_numpy(session.run(None, {"input": x[1:].numpy()})[0])])
    assert ref.abs().max() > 1.0  # real logits, not the vanishing ones of an uncalibrated random net
    assert (got - ref).abs().max().item() <= TOL
    assert torch.equal(got.argmax(1), ref.argmax(1))


def test_failed_check_is_reported_and_kept(repro_export, tmp_path):
    """A graph that misses the tolerance is not a success: exit code 2, the numbers, export.json with passed=false."""
    out = tmp_path / "r20.onnx"
    r = repro_export("model=resnet20", f"export.out={out}", "export.tolerance=0", "export.check_count=4",
                     "hydra.run.dir=run", cwd=tmp_path)
    report = json.loads((tmp_path / "run" / "export.json").read_text())
    if report["check"]["max_abs_diff"] == 0.0:
        pytest.skip("ONNX Runtime reproduced PyTorch bit for bit here; tolerance 0 cannot fail")
    assert r.returncode == 2 and "does not compute what PyTorch computes" in r.stderr
    assert "tolerance 0" in r.stderr and report["check"]["passed"] is False and out.is_file()


@pytest.mark.parametrize("args, message", [
    (["export.out=missing/dir/m.onnx"], "the folder missing/dir does not exist"),
    (["export.out=."], "is a folder; give a file name inside it"),
    (["export.out=m.pt"], "must end in .onnx for export.format=onnx"),
    (["export.out=m.onnx", "export.format=tflite"], "export.format='tflite' is not valid; choose one of ['onnx']"),
    ([], "give the file to write: export.out=FILE.onnx"),
    (["export.out=m.onnx", "weights.format=caffe"], "weights.format='caffe' is not valid"),
])
def test_refused_exports_say_why(args, message, repro_export, tmp_path):
    """Bad output paths and unknown formats are refused before any work, naming the problem; nothing is written."""
    r = repro_export("model=resnet20", *args, "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-1000:]
    assert not list(tmp_path.rglob("*.onnx"))


def test_missing_extra_names_the_install_command(repro_export, tmp_path, monkeypatch):
    """Without onnxruntime the command stops at once and says how to install the extra."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    r = repro_export("model=resnet20", "export.out=m.onnx", "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 2
    assert "needs onnxruntime, which is not installed" in r.stderr and "pip install -e '.[export]'" in r.stderr


def test_check_falls_back_to_random_inputs_without_shared_images(repro_export, tmp_path, monkeypatch):
    """Where ../shared/data is absent the check runs on seeded random inputs and export.json says so."""
    import repro.export

    monkeypatch.setattr(repro.export, "CHECK_FOLDERS", {"photos": tmp_path / "none", "cifar": tmp_path / "none"})
    r = repro_export("model=resnet20", f"export.out={tmp_path / 'r20.onnx'}", "export.check_count=5",
                     "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    check = json.loads((tmp_path / "run" / "export.json").read_text())["check"]
    assert check["source"] == "random" and check["images"] == 5 and check["passed"]
    assert check["batch_sizes"] == [5] and "checking on 5 random inputs instead" in r.stderr
