"""Evaluation options: TF-slim's central-crop view (`slim_center`) and BN recalibration (`eval.bn_recalibrate`)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from common import IMAGENET_SAMPLE, MEAN, STD
from repro.data import EvalViews, Normalize, Preprocessing, load_image
from repro.data.transforms import central_fraction_box
from repro.eval import BN_SUFFIX, recalibrate_bn
from repro.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
needs_sample = pytest.mark.skipif(not IMAGENET_SAMPLE.is_dir(), reason=f"{IMAGENET_SAMPLE} (real JPEGs) is absent")


# --------------------------------------------------------------------------------------- the slim view
@pytest.mark.parametrize(("h", "w", "fraction", "box"), [
    # tf.image.central_crop: offset = int(1 / ((1 - f) / 2)) = 16 for 0.875; start = side // 16; size = side - 2 start
    (375, 500, 0.875, (23, 31, 329, 438)),  # 375 // 16 = 23, 375 - 46 = 329; 500 // 16 = 31, 500 - 62 = 438
    (224, 224, 0.875, (14, 14, 196, 196)),  # 224 // 16 = 14: 196 = 0.875 x 224 exactly
    (100, 60, 0.5, (25, 15, 50, 30)),  # offset 4
    (33, 47, 1.0, (0, 0, 33, 47)),  # the whole image
])
def test_central_fraction_box_is_tfs(h, w, fraction, box):
    """The crop box equals TF's central_crop arithmetic, worked by hand."""
    assert central_fraction_box(h, w, fraction) == box


def test_slim_center_keeps_the_box_and_drops_the_aspect_ratio():
    """On a coordinate image (R = column, G = row), nearest resizing shows which pixels the 64x64 view took."""
    h, w = 150, 200  # box: rows 9 .. 140 (150 // 16 = 9, 132 rows), columns 12 .. 187 (200 // 16 = 12, 176 columns)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img = torch.stack([xs, ys, torch.zeros_like(xs)]).to(torch.uint8)
    view = EvalViews(["slim_center"], resize=None, crop=64, interpolation="nearest", antialias=False)(img)
    out = view["slim_center"]
    assert out.shape == (1, 3, 64, 64)  # square from a 176 x 132 box: aspect ratio not kept
    cols, rows = out[0, 0, 0].long(), out[0, 1, :, 0].long()
    assert cols[0] == 12 and rows[0] == 9  # the box's first column and row
    assert cols[-1] == 12 + (63 * 176) // 64 and rows[-1] == 9 + (63 * 132) // 64  # nearest: floor(i x scale)
    assert cols.max() <= 187 and rows.max() <= 140  # nothing outside the box


def test_slim_center_needs_a_crop_and_a_valid_fraction():
    """slim_center without an output size, or with a fraction outside (0, 1], is refused with the key named."""
    with pytest.raises(ValueError, match="slim_center but eval.crop is null"):
        EvalViews(["slim_center"], resize=None, crop=None)
    with pytest.raises(ValueError, match="eval.central_fraction=1.5"):
        EvalViews(["slim_center"], crop=224, central_fraction=1.5)


def _slim_reference(path: Path, size: int) -> torch.Tensor:
    """TF-slim's view computed independently: PIL decode, numpy slicing of TF's box, float antialiased resize."""
    arr = np.asarray(Image.open(path).convert("RGB"))
    h, w = arr.shape[:2]
    top, left = h // 16, w // 16  # central_fraction 0.875: offset int(1 / 0.0625) = 16
    box = torch.from_numpy(arr[top:h - top, left:w - left].copy()).permute(2, 0, 1).float()[None]
    out = F.interpolate(box, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)[0]


@needs_sample
def test_slim_center_matches_reference_on_real_jpegs():
    """On real ImageNet JPEGs the view equals the independent crop + resize within one grey level, and differs from
    the `center` protocol (shorter side 256, central 224) on non-square images."""
    paths = sorted(IMAGENET_SAMPLE.glob("*/*.JPEG"))[:6]
    views = EvalViews(["center", "slim_center"], resize=256, crop=224)
    for path in paths:
        out = views(load_image(str(path)))
        ours, ref = out["slim_center"][0].int(), _slim_reference(path, 224).int()
        assert ours.shape == ref.shape == (3, 224, 224)
        assert (ours - ref).abs().max() <= 1, path
        assert (ours - out["center"][0].int()).abs().float().mean() > 5, path  # another view of the image


# -------------------------------------------------------------------------------------------- repro-eval
def _code_out(res) -> tuple[int, str]:
    """A repro-eval run's exit code and all its output."""
    return res.returncode, res.stdout + res.stderr




def _run_dir(cwd: Path) -> Path:
    runs = [p for p in (cwd / "outputs" / "eval").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@needs_sample
def test_repro_eval_slim_center_predictions(tmp_path, repro_eval):
    """repro-eval eval.protocols=[center,slim_center]: the slim rows are the model's scores on the independently
    computed view (within the uint8 rounding of the resize), and differ from the center rows."""
    torch.manual_seed(0)
    classes = sorted(p.name for p in IMAGENET_SAMPLE.iterdir() if p.is_dir())
    model = create_model("resnet18", num_classes=len(classes)).eval()
    with torch.no_grad():  # scores spread enough for another view of the image to show in the probabilities
        model.fc.weight.mul_(5.0)
    ckpt = tmp_path / "r18.pt"
    torch.save({"model": model.state_dict(), "preprocessing": {"mean": list(MEAN), "std": list(STD)},
                "config": {"model": {"name": "resnet18", "resolution": 96, "num_classes": len(classes)}}}, ckpt)
    code, out = _code_out(repro_eval("data=folder", f"data.val_dir={IMAGENET_SAMPLE}", "data.limit=4",
                                     "data.num_workers=0", "data.batch_size=4", f"weights.path={ckpt}",
                                     "eval.progress=false", "eval.protocols=[center,slim_center]",
                                     "eval.save_predictions=true", cwd=tmp_path))
    assert code == 0, out
    metrics = json.loads((_run_dir(tmp_path) / "metrics.json").read_text())
    assert metrics["slim_center"]["images"] == metrics["center"]["images"] == 4
    with open(_run_dir(tmp_path) / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    slim = {r["path"]: r for r in rows if r["protocol"] == "slim_center"}
    center = {r["path"]: r for r in rows if r["protocol"] == "center"}
    assert len(slim) == len(center) == 4
    normalize = Normalize(Preprocessing(MEAN, STD))
    for path, row in slim.items():
        with torch.no_grad():
            probs = model(normalize(_slim_reference(Path(path), 96)[None])).softmax(-1)[0]
        top = probs.sort(descending=True).values[:5].tolist()
        assert [float(row[f"prob{i}"]) for i in range(1, 6)] == pytest.approx(top, abs=3e-3), path
        assert int(row["pred1"]) == int(probs.argmax()), path
    # another view than `center`: summed over the 4 images the top-1 probabilities differ clearly
    assert sum(abs(float(slim[p]["prob1"]) - float(center[p]["prob1"])) for p in slim) > 0.02


# ----------------------------------------------------------------------------------------- BN recalibration
class TwoBN(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> pool -> fc: the second BN sees the first's batch-normalized output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 3, bias=False), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


def _expected_stats(model: TwoBN, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """BN running statistics by hand: per batch, train-mode BN (biased variance normalizes, unbiased is kept);
    the kept mean / variance are the averages over batches weighted by their images."""
    sums: dict[str, torch.Tensor] = {}
    total = 0
    for x in batches:
        y1 = F.conv2d(x, model.conv1.weight)
        m1, v1 = y1.mean((0, 2, 3)), y1.var((0, 2, 3), unbiased=False)
        z = (y1 - m1.view(1, -1, 1, 1)) / torch.sqrt(v1.view(1, -1, 1, 1) + model.bn1.eps)
        z = torch.relu(z * model.bn1.weight.view(1, -1, 1, 1) + model.bn1.bias.view(1, -1, 1, 1))
        y2 = F.conv2d(z, model.conv2.weight)
        b = x.shape[0]
        stats = {"bn1.mean": m1, "bn1.var": y1.var((0, 2, 3), unbiased=True),
                 "bn2.mean": y2.mean((0, 2, 3)), "bn2.var": y2.var((0, 2, 3), unbiased=True)}
        for k, v in stats.items():
            sums[k] = sums.get(k, 0) + b * v
        total += b
    return {k: v / total for k, v in sums.items()}


def test_bn_recalibration_by_hand():
    """Batches of 4, 4 and 2 images: each BN's running mean / variance become the image-weighted averages of the
    train-mode batch statistics, the weights stay, the momentum is restored and the model is left in eval mode."""
    torch.manual_seed(0)
    model = TwoBN()
    with torch.no_grad():
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-0.5, 0.5)
        model.bn1.running_mean.fill_(7.0)  # stale statistics that must not leak into the new ones
        model.bn2.running_var.fill_(9.0)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "tracked" not in k}
    gen = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (b, 1, 3, 12, 12), generator=gen, dtype=torch.uint8) for b in (4, 4, 2)]
    loader = [{"failed": [], "views": {"center": v}} for v in images]
    normalize = Normalize(Preprocessing(MEAN, STD))
    used = recalibrate_bn(model, normalize, loader, CPU)
    assert used == 10
    want = _expected_stats(model, [normalize(v[:, 0]) for v in images])
    for bn, name in ((model.bn1, "bn1"), (model.bn2, "bn2")):
        assert torch.allclose(bn.running_mean, want[f"{name}.mean"], atol=1e-5)
        assert torch.allclose(bn.running_var, want[f"{name}.var"], rtol=1e-4, atol=1e-6)
        assert bn.momentum == 0.1
    assert not model.training
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # conv, BN affine and fc weights untouched


def test_bn_recalibration_refuses_a_model_without_bn():
    """A model with no BatchNorm layer has nothing to recalibrate: a clear error, not a silent no-op."""
    with pytest.raises(ValueError, match="no BatchNorm layers"):
        recalibrate_bn(nn.Linear(3, 2), Normalize(Preprocessing()), [], CPU)


def test_repro_eval_bn_recalibrate_reports_both(tmp_path, repro_eval):
    """eval.bn_recalibrate=N on the bundled digits: metrics.json keeps the plain numbers (equal to a run without it)
    and adds "<protocol>_bnrecal" and a "bn_recalibrate" record; the recalibrated scores differ."""
    torch.manual_seed(0)
    ckpt = tmp_path / "r20.pt"
    model = create_model("resnet20", num_classes=10)
    torch.save({"model": model.state_dict(), "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3},
                "config": {"model": {"name": "resnet20", "resolution": 32, "num_classes": 10, "shortcut": "A",
                                     "shortcut_pad": "after", "zero_init_residual": False}}}, ckpt)
    args = ["data=digits", "data.split=test", "data.limit=40", "data.batch_size=20", f"weights.path={ckpt}",
            "eval.progress=false", "eval.save_predictions=true"]
    code, out = _code_out(repro_eval(*args, cwd=tmp_path / "plain"))
    assert code == 0, out
    plain = json.loads((_run_dir(tmp_path / "plain") / "metrics.json").read_text())
    code, out = _code_out(repro_eval(*args, "eval.bn_recalibrate=60", cwd=tmp_path / "recal"))
    assert code == 0, out
    assert "center_bnrecal" in out  # the printed table has both rows
    run = _run_dir(tmp_path / "recal")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["center"] == plain["center"]
    assert metrics["center" + BN_SUFFIX]["images"] == 40
    assert metrics["bn_recalibrate"] == {"images": 40, "split": "train", "batch_size": 20, "view": "center",
                                         "protocols": ["center_bnrecal"]}  # data.limit=40 caps the train split too
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    probs = {p: [float(r["prob1"]) for r in rows if r["protocol"] == p] for p in ("center", "center_bnrecal")}
    assert len(probs["center"]) == len(probs["center_bnrecal"]) == 40
    assert probs["center"] != probs["center_bnrecal"]


def test_bn_recalibrate_under_torchrun_equals_one_process(tmp_path, repro_eval):
    """2 CPU ranks each recalibrate on their half of the images and combine: with one image per batch (statistics
    that do not depend on how images are grouped) the recalibrated numbers equal one process's."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    torch.manual_seed(0)
    ckpt = tmp_path / "r20.pt"
    torch.save({"model": create_model("resnet20", num_classes=10).state_dict(),
                "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3},
                "config": {"model": {"name": "resnet20", "resolution": 32, "num_classes": 10, "shortcut": "A",
                                     "shortcut_pad": "after", "zero_init_residual": False}}}, ckpt)
    args = ["data=digits", "data.split=test", "data.limit=12", "data.batch_size=1", f"weights.path={ckpt}",
            "eval.progress=false", "eval.save_predictions=true", "eval.bn_recalibrate=10"]
    (tmp_path / "multi").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "repro.eval", *args],
                         cwd=tmp_path / "multi", capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    code, out = _code_out(repro_eval(*args, cwd=tmp_path / "single"))
    assert code == 0, out
    multi, single = (json.loads((_run_dir(tmp_path / d) / "metrics.json").read_text()) for d in ("multi", "single"))
    assert multi["bn_recalibrate"]["images"] == single["bn_recalibrate"]["images"] == 10
    assert multi["center_bnrecal"] == single["center_bnrecal"] and multi["center"] == single["center"]
    rows = {}
    for d in ("multi", "single"):
        with open(_run_dir(tmp_path / d) / "predictions.csv", newline="") as f:
            rows[d] = sorted((r["protocol"], r["path"], r["pred1"], float(r["prob1"])) for r in csv.DictReader(f))
    assert [r[:3] for r in rows["multi"]] == [r[:3] for r in rows["single"]]
    assert [r[3] for r in rows["multi"]] == pytest.approx([r[3] for r in rows["single"]], abs=1e-5)


def test_repro_eval_refuses_negative_bn_recalibrate(tmp_path, repro_eval):
    """A negative image count is refused before any work, naming the key."""
    code, out = _code_out(repro_eval("data=digits", "weights.path=x.pt", "eval.bn_recalibrate=-1", cwd=tmp_path))
    assert code != 0 and "eval.bn_recalibrate=-1 is not valid" in out
