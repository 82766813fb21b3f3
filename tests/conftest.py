"""Fixtures shared by the test modules."""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra


@pytest.fixture(scope="module")
def one_thread():
    """Run a module single-threaded: on tiny models and images oneDNN's threads only add (noisy) overhead."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Result:
    """What a command left: exit code and output."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def in_process(monkeypatch, capfd):
    """Run a console script's main() in this process (no interpreter start-up), leaving no Hydra/logging state."""

    def run(main, prog: str, *args: str, cwd: Path) -> Result:
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", [prog, *args])
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        handlers_before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
        capfd.readouterr()
        code = 0
        try:
            main()
        except SystemExit as e:
            code = 0 if e.code is None else e.code
        finally:
            GlobalHydra.instance().clear()
            for h in [h for h in root.handlers if h not in handlers]:
                root.removeHandler(h)
                h.close()
            root.setLevel(level)
            for s, h in handlers_before.items():
                signal.signal(s, h)
        out, err = capfd.readouterr()
        return Result(code, out, err)

    return run


@pytest.fixture
def repro_eval(in_process):
    """Run `repro-eval ARGS` in this process (the console script's code path) in folder `cwd`, made if missing."""
    from repro.eval import main

    return console(in_process, main, "repro-eval")


@pytest.fixture
def repro_bench(in_process):
    """Run `repro-bench ARGS` in this process in folder `cwd`, made if missing."""
    from repro.bench import main

    return console(in_process, main, "repro-bench")


@pytest.fixture
def repro_export(in_process):
    """Run `repro-export ARGS` in this process in folder `cwd`, made if missing."""
    from repro.export import main

    return console(in_process, main, "repro-export")


def console(in_process, main, prog: str):
    """`run(*args, cwd=...)`: the console script `prog` (its `main`) run in this process in folder `cwd`."""

    def run(*args: str, cwd: Path) -> Result:
        cwd.mkdir(parents=True, exist_ok=True)
        return in_process(main, prog, *args, cwd=cwd)

    return run
