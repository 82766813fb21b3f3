"""What every `repro-*` command shares: the configs folder, the run dir and its metadata, clean errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

# The Hydra config folder ships inside the package (a wheel carries it); the checkout's top-level `configs/` is a
# link to it, the place people edit.
CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")
HYDRA_VERSION_BASE = "1.3"


def fail(message: str) -> NoReturn:
    """Stop the command with a one-line error on stderr (exit code 2), no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_dir() -> Path:
    """The Hydra run dir of the current job (everything a run writes goes here)."""
    return Path(HydraConfig.get().runtime.output_dir)


def git_commit() -> str | None:
    """The commit of the checkout this package runs from, with '-dirty' when it has local changes; None when the
    package is installed from a wheel (no checkout: a git repository around site-packages is someone else's)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file() or Path(__file__).resolve().parent != root / "src" / "repro":
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def save_run_info(cfg: DictConfig, **extra: Any) -> Path:
    """Write the resolved config (`config.yaml`) and `run.json` (git commit, command line) to the run dir."""
    out = run_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    info = {"git_commit": git_commit(), "argv": sys.argv, **extra}
    (out / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
