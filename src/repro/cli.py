"""What every `repro-*` command shares: the configs folder, the run dir and its metadata, clean errors."""

from __future__ import annotations

import atexit
import dataclasses
import fcntl
import json
import os
import re
import subprocess
import sys
import typing
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from repro.distributed import launched_rank

# The Hydra config folder ships inside the package (a wheel carries it); the checkout's top-level `configs/` is a
# link to it, the place people edit.
CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")
HYDRA_VERSION_BASE = "1.3"
# What makes a run dir hold a run: another run is never written into it (only continued, with resume=auto).
RUN_MARKERS = ("checkpoints/last.pt", "checkpoints/best.pt", "metrics.json", "metrics.jsonl")
LOCK_FILE = ".lock"  # flock()ed by the process writing the run dir (released when it ends, however it ends)
_locks: dict[str, tuple[int, Path]] = {}  # run dir (real path) -> (open lock file, its path) this process holds


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


def dir_arg(hydra_node: Any) -> str | None:
    """The `hydra.run.dir=...` (`hydra.sweep.dir=...` in a sweep) override that chose the run dir, if one did."""
    key = "hydra.sweep.dir=" if hydra_node.mode == RunMode.MULTIRUN else "hydra.run.dir="
    given = [o for o in hydra_node.overrides.hydra if o.startswith(key)]
    return given[-1] if given else None


def resume_args(name: str, hydra_node: Any) -> str:
    """The arguments that continue this run dir: `resume=auto name=NAME`, or with the hydra.run.dir= that chose it."""
    return f"resume=auto {dir_arg(hydra_node) or f'name={name}'}"


def holds_run(out: Path) -> list[str]:
    """The files that show `out` holds a run (checkpoints, metrics), relative to it."""
    return [m for m in RUN_MARKERS if (out / m).exists()]


def writable_problem(out: Path) -> str | None:
    """Why the run dir `out` cannot be created or written (None when it can); may create it, as Hydra would."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return (f"cannot create the run dir {out} ({e.strerror}); run from a writable folder or point "
                f"hydra.run.dir= at one")
    if not os.access(out, os.W_OK | os.X_OK):
        return f"the run dir {out} is not writable; run from a writable folder or point hydra.run.dir= at one"
    return None


def lock_run_dir(out: Path) -> str | None:
    """Hold an exclusive lock on the run dir for this process's lifetime; why not, when another process holds it.

    flock() on `out/.lock`: the kernel releases it when the holder ends, even by SIGKILL, so a lock is never stale
    (the file a killed holder leaves is simply locked again). The file is removed when the lock is released.
    """
    key = os.path.realpath(out)
    if key in _locks:
        return None
    path = out / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            return (f"{out} is in use by another process (pid {owner}, which holds {path}); two runs would "
                    f"overwrite each other's checkpoints. Wait for it to end, or start a new run with another name=")
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder released (and removed) the file between our open and flock: try again
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _locks[key] = (fd, path)
    return None


def unlock_run_dir(out: Path) -> None:
    """Release the run dir's lock if this process holds it, removing the lock file."""
    held = _locks.pop(os.path.realpath(out), None)
    if held is not None:
        _release(*held)


def _release(fd: int, path: Path) -> None:
    """Remove the lock file, then close it (closing the only descriptor releases the flock)."""
    try:
        os.unlink(path)
    except OSError:
        pass
    os.close(fd)


@atexit.register
def unlock_all() -> None:
    """Release every run-dir lock this process holds (at exit, or when a command returns in-process)."""
    for key in list(_locks):
        _release(*_locks.pop(key))


def check_model_name(model: Any) -> None:
    """Refuse a model config without a model name (`model=base_resnet` picks a schema), naming the model configs."""
    if model is None or not OmegaConf.is_missing(model, "name"):
        return
    choice = HydraConfig.get().runtime.choices.get("model") if HydraConfig.initialized() else None
    fail(f"model={choice or '?'} is a schema (the keys a family of models has), not a model; choose a model config: "
         f"model=NAME with NAME one of {group_options('model')}")


def claim_run_dir(out: Path, resume: str, name: str, hydra_node: Any) -> str | None:
    """Make `out` this process's run dir, or say why not: not writable, holding a run (without resume=auto), or
    written by another process. Nothing is written when it is refused."""
    if out.exists() and resume != "auto":
        found = holds_run(out)
        if found:
            other = "hydra.run.dir" if dir_arg(hydra_node) else "name"
            return (f"{out} already holds a run ({', '.join(found)}); nothing was written. Continue it with "
                    f"{resume_args(name, hydra_node)}, or start a new run with another {other}=")
    return writable_problem(out) or lock_run_dir(out)


class RunDirGuard(Callback):
    """Hydra callback: before Hydra writes anything there (.hydra/, the log file), refuse a run dir that cannot be
    written with one line instead of a logging traceback; with `claim` (repro-train) also one that holds a run
    (unless resume=auto) or that another process is writing (see claim_run_dir)."""

    def __init__(self, claim: bool = False) -> None:
        self.claim = claim

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check (and for repro-train, lock) the run dir of a single run."""
        out = Path(str(OmegaConf.select(config, "hydra.run.dir")))
        if not self.claim or launched_rank() != 0:  # other torchrun ranks write a scratch dir, never the run's
            problem = writable_problem(out)
        else:
            problem = claim_run_dir(out, config.resume, config.name, config.hydra)
        if problem:
            fail(problem)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A sweep's folder must be writable (each job claims its own run dir when it starts)."""
        problem = writable_problem(Path(str(OmegaConf.select(config, "hydra.sweep.dir"))))
        if problem:
            fail(problem)


def check_overrides(config_name: str, data_owners: dict[str, tuple[str, ...]] | None = None,
                    argv: list[str] | None = None) -> None:
    """Compose the config of the command line (`argv`, default sys.argv[1:]) once, so that an override the schemas
    refuse stops the command with one clear line (exit code 2) instead of Hydra's report.

    A value outside an option's choices (typed by repro.config.Choice): `KEY='VALUE' is not valid; choose one of
    [...]`. A `data.KEY=` the chosen dataset does not have (`data_owners`: key -> the datasets that have it): the
    `data=` that has it. Any other problem is left to Hydra, which composes the config again and reports it.
    """
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a for a in argv if not a.startswith(("hydra.", "hydra/", "-"))]
    if not overrides:
        return
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=HYDRA_VERSION_BASE):
            compose(config_name, overrides=overrides)
    except Exception as e:  # Hydra's composition error, caused by OmegaConf's
        problem = (bad_choice(e) or missing_option(e, argv) or null_choice(e)
                   or (data_key_problem(str(e), argv, data_owners) if data_owners else None))
        if problem:
            fail(problem)


def bad_choice(e: BaseException) -> str | None:
    """`KEY='VALUE' is not valid; choose one of [...]` when `e` (or its cause) refuses a value outside a Choice."""
    while e is not None:
        found = re.match(r"Invalid value '.*', expected one of \[(.*)\]", str(getattr(e, "msg", "")))
        if found and getattr(e, "full_key", None):
            return f"{e.full_key}={e.value!r} is not valid; choose one of {found.group(1).split(', ')}"
        e = e.__cause__
    return None


def group_options(group: str) -> list[str]:
    """The configs of a Hydra group (`model`, `data`, `recipe`, ...): its YAML files, without the schemas."""
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def missing_option(e: BaseException, argv: list[str]) -> str | None:
    """`model=resnet21 is not a model config; choose one of [...]` when `e` is Hydra's missing group option."""
    missing = getattr(e, "missing_cfg_file", None)
    if not missing or "/" not in missing:
        return None
    group, name = missing.rsplit("/", 1)
    given = next((a for a in argv if a.split("=", 1)[0].lstrip("+~") == group), f"{group}={name}")
    return f"{given}: configs/{group}/ has no {name}.yaml; choose one of {group_options(group)}"


def null_choice(e: BaseException) -> str | None:
    """`KEY=null is not valid; choose one of [...]` when `e` (or its cause) refuses null for a typed choice."""
    while e is not None:
        key, owner = getattr(e, "full_key", None), getattr(e, "object_type", None)
        if key and "is not Optional" in str(getattr(e, "msg", "")):
            typed = typing.get_type_hints(owner).get(str(e.key)) if dataclasses.is_dataclass(owner) else None
            choices = [m.value for m in typed] if isinstance(typed, type) and issubclass(typed, Enum) else None
            return f"{key}=null is not valid; " + (f"choose one of {choices}" if choices else "give it a value")
        e = e.__cause__
    return None


def data_key_problem(error: str, argv: list[str], owners: dict[str, tuple[str, ...]]) -> str | None:
    """Why a `data.KEY=` override that Hydra refused (`error`) does not fit: the dataset that has KEY, or None."""
    for arg in argv:
        key = arg.split("=", 1)[0]
        name = key.removeprefix("data.")
        if key.startswith("data.") and name in owners and (f"'{key}'" in error or f"'{name}'" in error):
            data = [a.split("=", 1)[1] for a in argv if a.startswith("data=")]
            return (f"{key} is a key of {' and '.join(f'data={o}' for o in owners[name])}, not of "
                    f"data={data[-1] if data else 'digits (the default)'}; add data={owners[name][0]} (with "
                    f"data.train_dir= and data.val_dir=, or data.root=)")
    return None
