"""The documented benchmark scripts run and report figures that agree with themselves (their speeds are
measured elsewhere: README "Speed")."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from common import IMAGENET_SAMPLE, ROOT, clean_env


def _script(name: str, *args: str, cwd) -> subprocess.CompletedProcess:
    """Run scripts/<name> with `args` in `cwd` (the installed package, a fresh interpreter)."""
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=cwd, capture_output=True,
                          text=True, env=clean_env(), timeout=300)


def test_bench_train_reports_bare_and_full_steps(tmp_path):
    """bench_train.py on synthetic CIFAR-sized data: the JSON holds both rates, their ratio, and the device-side
    stages of the in-memory path; ratio = full / bare per round and the median of the rounds."""
    out = tmp_path / "bench.json"
    res = _script("bench_train.py", "--synthetic", "--steps", "2", "--rounds", "1", "--warmup", "1", "--limit", "256",
                  "--batch-size", "32", "--json", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert (r["model"], r["device"], r["batch_size"], r["steps"], r["rounds"]) == ("resnet20", "cpu", 32, 2, 1)
    assert r["bare_img_s_median"] > 0 and r["full_img_s_median"] > 0
    assert r["ratios"] == pytest.approx([f / b for f, b in zip(r["full_img_s"], r["bare_img_s"])])
    assert r["ratio_median"] == pytest.approx(r["ratios"][0])
    assert {"BatchPadCrop", "Normalize"} <= set(r["stages_ms"]) and all(v >= 0 for v in r["stages_ms"].values())
    assert r["bare_ms_per_step"] == pytest.approx(1000 * 32 / r["bare_img_s_median"], rel=1e-6)
    assert (r["amp"], r["channels_last"], r["compile"], r["overrides"]) == (None, True, False, [])  # train's defaults


def test_bench_train_takes_repro_train_overrides(tmp_path):
    """Trailing KEY=VALUE arguments reach the run being timed (bf16 autocast, NCHW); a bad value is one line."""
    out = tmp_path / "bench.json"
    res = _script("bench_train.py", "--synthetic", "--steps", "1", "--rounds", "1", "--warmup", "0", "--limit", "64",
                  "--batch-size", "32", "--json", str(out), "trainer.amp=bf16", "trainer.channels_last=false",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert (r["amp"], r["channels_last"], r["overrides"]) == ("bfloat16", False,
                                                              ["trainer.amp=bf16", "trainer.channels_last=false"])
    assert "amp bfloat16, channels_last False" in res.stdout
    bad = _script("bench_train.py", "--synthetic", "trainer.amp=bf61", cwd=tmp_path)
    assert bad.returncode == 2 and "trainer.amp='bf61' is not valid; choose one of" in bad.stderr, bad.stderr[-2000:]


def test_bench_data_compares_every_pipeline_with_torchvision(tmp_path):
    """bench_data.py on the shared ImageNet photographs: every pipeline has our rate, torchvision's and their ratio."""
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"ImageNet sample photographs not found in {IMAGENET_SAMPLE}")
    out = tmp_path / "data.json"
    res = _script("bench_data.py", "--images", str(IMAGENET_SAMPLE), "--reps", "1", "--json", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["num_images"] == sum(1 for p in IMAGENET_SAMPLE.rglob("*") if p.is_file() and p.suffix.lower() in
                                  (".jpeg", ".jpg", ".png"))
    assert r["results"] and r["unit"] == "images/s per worker"
    for name, fig in r["results"].items():
        assert fig["ours_median"] > 0 and fig["torchvision_median"] > 0, name
        assert fig["ratio_best"] == pytest.approx(fig["ours_best"] / fig["torchvision_best"]), name
