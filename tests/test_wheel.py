"""A regular install works (issue 13): the wheel carries the configs, and its commands run from a fresh venv with
no editable path and the working directory elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from common import ROOT


def _run(*cmd: str | Path, cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command, its output captured as text."""
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_wheel_installs_and_runs_from_a_fresh_venv(tmp_path):
    """pip wheel -> a venv (torch & co. from the system site, no editable path, no PYTHONPATH) -> repro-summary,
    a 2-step repro-train and repro-tables, run from a folder outside the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    built = _run(sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation", "-w",
                 tmp_path / "dist", cwd=tmp_path, env=env)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("repro-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.removeprefix("repro/configs/") for n in names if n.startswith("repro/configs/")}
    source = {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")}
    assert source and source <= shipped, f"configs missing from the wheel: {sorted(source - shipped)[:5]}"
    venv = tmp_path / "venv"
    assert _run(sys.executable, "-m", "venv", "--system-site-packages", venv, cwd=tmp_path, env=env).returncode == 0
    py, bin_dir = venv / "bin" / "python", venv / "bin"
    installed = _run(py, "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", wheel,
                     cwd=tmp_path, env=env)
    assert installed.returncode == 0, installed.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(py, "-c", "import repro; print(repro.__file__)", cwd=elsewhere, env=env)
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr  # not the checkout's src/
    summary = _run(bin_dir / "repro-summary", "model=resnet20", cwd=elsewhere, env=env)
    assert summary.returncode == 0 and "(0.27 M" in summary.stdout, summary.stderr[-3000:]  # the paper: 0.27M
    train = _run(bin_dir / "repro-train", "trainer.max_steps=2", "recipe.batch_size=16", "trainer.device=cpu",
                 "trainer.progress=false", "name=wheel", cwd=elsewhere, env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    metrics = json.loads((elsewhere / "outputs" / "train" / "wheel" / "metrics.json").read_text())
    assert metrics["steps"] == 2
    tables = _run(bin_dir / "repro-tables", "runs=outputs/train", "out=tables", "figures=false", cwd=elsewhere,
                  env=env)
    assert tables.returncode == 0, tables.stderr[-3000:]
    assert (elsewhere / "tables" / "resnet_table6.md").is_file()
