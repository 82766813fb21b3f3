"""Sweeps: a 2-job multirun through submitit's local executor read back by repro-tables (issue 17), and a sweep
continued with resume=auto in its own subdirectories (issue 18). Tiny digits runs, a few steps each."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from repro.report.results import discover_runs

# Every job of these sweeps: the offline default (ResNet-20 on digits), small batches, no progress bars.
QUICK = ["trainer.progress=false", "recipe.batch_size=16", "trainer.device=cpu"]


def run(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """A command as a user types it (no surrounding torchrun variables)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def job_dirs(sweep: Path) -> list[Path]:
    """The sweep's job subdirectories (Hydra's and submitit's dot-folders left out)."""
    return sorted(d for d in sweep.iterdir() if d.is_dir() and not d.name.startswith("."))


def checkpoint_step(job: Path) -> tuple[int, int]:
    """(optimizer step, seed) of a job's checkpoints/last.pt."""
    ck = torch.load(job / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    return ck["progress"]["step"], ck["config"]["seed"]


@pytest.mark.slow
def test_submitit_local_sweep_read_by_tables(tmp_path):
    """hydra/launcher=submitit_local runs both jobs to complete run dirs; repro-tables runs=<sweep> reads both."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[dev]' (submitit launcher)")
    res = run("repro-train", "-m", "hydra/launcher=submitit_local", "name=sub", "seed=0,1", "trainer.max_steps=3",
              *QUICK, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = tmp_path / "multirun" / "train" / "sub"
    jobs = job_dirs(sweep)
    assert [j.name for j in jobs] == ["recipe.batch_size=16,seed=0,trainer.max_steps=3",
                                      "recipe.batch_size=16,seed=1,trainer.max_steps=3"]
    assert (sweep / ".submitit").is_dir()  # the jobs went through submitit, not the basic launcher
    for seed, job in enumerate(jobs):
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["steps"] == 3 and metrics["config"]["seed"] == seed
        assert metrics["center"]["images"] == 360  # digits' test split, evaluated whole
        assert checkpoint_step(job) == (3, seed)
        assert (job / "config.yaml").is_file() and (job / "run.json").is_file()
    # The two seeds trained differently.
    a, b = (torch.load(j / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"] for j in jobs)
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    # repro-tables reads the sweep dir: both runs found and finished (digits fill no paper table).
    out = tmp_path / "tables"
    res = run("repro-tables", f"runs={sweep}", f"out={out}", "figures=false", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 run dir(s) found (2 finished)" in res.stderr
    assert (out / "RESULTS.md").is_file() and "written to" in res.stdout
    found = discover_runs([str(sweep)])
    assert sorted(r.path.name for r in found) == [j.name for j in jobs]
    assert all(r.metrics is not None for r in found)


@pytest.mark.slow
def test_sweep_resumes_in_its_subdirectories(tmp_path):
    """A 1-step sweep over two seeds, then the same command with resume=auto: each job resumes its own subdir."""
    cmd = ["repro-train", "-m", "name=sw", "seed=0,1", "trainer.max_steps=1", *QUICK]
    res = run(*cmd, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = tmp_path / "multirun" / "train" / "sw"
    jobs = job_dirs(sweep)
    names = ["recipe.batch_size=16,seed=0,trainer.max_steps=1", "recipe.batch_size=16,seed=1,trainer.max_steps=1"]
    assert [j.name for j in jobs] == names
    before = {j.name: (j / "metrics.json").read_text() for j in jobs}
    weights = {j.name: torch.load(j / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
               for j in jobs}
    res = run(*cmd, "resume=auto", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    # resume (like name) is not part of the subdirectory name: no new job dirs, each job found its own checkpoint.
    assert [j.name for j in job_dirs(sweep)] == names
    resumed = re.findall(r"resumed (\S+) at step (\d+)", res.stderr)
    assert sorted((Path(p).name, int(s)) for p, s in resumed) == [(n, 1) for n in names]
    for seed, job in enumerate(jobs):
        assert checkpoint_step(job) == (1, seed)  # seed 0's job did not pick up seed 1's checkpoint
        after = torch.load(job / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
        assert all(torch.equal(after[k], weights[job.name][k]) for k in after)  # nothing left to train: unchanged
        m0, m1 = json.loads(before[job.name]), json.loads((job / "metrics.json").read_text())
        assert m1["steps"] == 1 and m1["center"] == m0["center"]
