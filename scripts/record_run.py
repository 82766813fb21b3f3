"""Copy a finished repro-train run into the project as a run record (what `results/runs/` holds).

    python scripts/record_run.py RUN_DIR [--dest results/runs] [--force]

A record is what `repro-tables` reads and a reader needs to check the number, without optimizer state:
`metrics.json`, `config.yaml`, `run.json` (the commit it ran on), `metrics.jsonl` (the per-epoch curve),
`train.log`, the TensorBoard events (`tb/`), and `model.pt` — the final weights with the model, data and
preprocessing config (`repro-eval weights.path=.../model.pt` evaluates it). It goes to
`<dest>/<experiment>/<row>/seed<seed>/`, named from the run's Hydra choices. Only a finished run (metrics.json
written, every step of the run done) is recorded; a mid-run copy is refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
# The checkpoint entries a record keeps: the weights and what evaluation needs, not the state to resume.
KEEP = ("model", "ema", "config", "preprocessing", "git_commit")
COPIED = ("metrics.json", "config.yaml", "run.json", "metrics.jsonl", "train.log")


def record_path(run: Path, dest: Path) -> Path:
    """<dest>/<experiment>/<row>/seed<seed>/ from the run's Hydra choices and seed."""
    hydra_cfg = yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text())
    choices = hydra_cfg["hydra"]["runtime"]["choices"]
    experiment, row = choices.get("experiment"), choices.get("row")
    if not experiment or not row:
        raise ValueError(f"{run} was not started as experiment=<table> row=<row>; a record belongs to a paper table")
    seed = yaml.safe_load((run / "config.yaml").read_text())["seed"]
    return dest / experiment / row / f"seed{seed}"


def final_weights(run: Path) -> dict[str, Any]:
    """checkpoints/last.pt without optimizer, schedule, scaler, RNG and progress: the final weights and config."""
    ck = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    return {k: ck[k] for k in KEEP if k in ck} | {"steps": ck["progress"]["step"]}


def record(run: Path, dest: Path, force: bool = False) -> Path:
    """Write the record of a finished run; returns its folder."""
    metrics_file = run / "metrics.json"
    if not metrics_file.is_file():
        raise ValueError(f"{run} has no metrics.json: the run has not finished; record it when it has")
    metrics = json.loads(metrics_file.read_text())
    weights = final_weights(run)
    if weights["steps"] != metrics["steps"]:
        raise ValueError(f"{run}: last.pt is at step {weights['steps']} but metrics.json at {metrics['steps']}")
    out = record_path(run, dest)
    if out.exists():
        if not force:
            raise ValueError(f"{out} exists; pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in COPIED:
        if (run / name).is_file():
            shutil.copy2(run / name, out / name)
    if (run / "tb").is_dir():
        shutil.copytree(run / "tb", out / "tb")
    torch.save(weights, out / "model.pt")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: record RUN_DIR under --dest."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished repro-train run dir (outputs/train/<name>)")
    ap.add_argument("--dest", type=Path, default=ROOT / "results" / "runs")
    ap.add_argument("--force", action="store_true", help="replace an existing record")
    args = ap.parse_args(argv)
    try:
        out = record(args.run, args.dest, args.force)
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"recorded {args.run} in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
