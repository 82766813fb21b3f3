"""`repro-bench`: inference latency and throughput of one model per backend and batch size (timm's benchmark.py,
simpler): median and p90 latency (ms) of timed calls after warm-up, images/s, and the machine it ran on.

Backends: `eager` (PyTorch, channels_last by default), `compile` (torch.compile of the same), `onnxruntime` (the
graph `repro-export` writes, CPU provider) and `executorch` (ExecuTorch with the XNNPACK delegate, the runtime
closest to TF-Lite on a phone CPU; static batch, one program per batch size). Torch's intra/inter-op threads and
ONNX Runtime's / ExecuTorch's threads are set alike (`bench.threads`). `format=json` prints only the report:
`{"machine": {...}, "results": [{"model", "backend", "batch_size", "threads", "latency_ms", "latency_ms_p90",
"images_per_s", ...}]}`; logs go to stderr. The report is also kept in the run dir as `bench.json`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from repro.cli import CONFIG_DIR, HYDRA_VERSION_BASE, check_overrides, fail, save_run_info
from repro.config import Backend, register_configs
from repro.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    ExportError,
    export_onnx,
    load_model,
    ort_session,
    require,
    stdout_to_stderr,
    versions,
)

log = logging.getLogger("repro.bench")

EXECUTORCH_INSTALL = "pip install -e '.[executorch]'"
# A runner takes one input batch and returns a function that runs the model on it once (nothing timed outside it).
Runner = Callable[[torch.Tensor], Callable[[], Any]]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else platform.processor())."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(threads: int, device: torch.device) -> dict[str, Any]:
    """CPU model and cores, the thread setting, the GPU when benchmarking one, library versions."""
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": threads,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "versions": versions("torch", "torchvision", "onnx", "onnxruntime", "executorch", "numpy"),
    }
    return info


def set_threads(threads: int) -> None:
    """Torch's intra-op threads, and inter-op threads where this process has not fixed them yet."""
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # set once per process, before any inter-op work
        torch.set_num_interop_threads(threads)


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eager_runner(model: nn.Module, device: torch.device, channels_last: bool, compiled: bool = False) -> Runner:
    """PyTorch in inference mode, optionally channels_last and torch.compile'd."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = copy.deepcopy(model).eval().to(device, memory_format=fmt)  # the other backends keep the original
    fn = torch.compile(model) if compiled else model

    def prepare(x: torch.Tensor) -> Callable[[], Any]:
        x = x.to(device).contiguous(memory_format=fmt)

        def call() -> Any:
            with torch.inference_mode():
                return fn(x)

        return call

    return prepare


def onnxruntime_runner(model: nn.Module, resolution: int, threads: int, workdir: Path) -> Runner:
    """The model exported as repro-export exports it, run by ONNX Runtime's CPU provider with `threads` threads."""
    require("onnx", "onnxscript", "onnxruntime", what="bench.backends=[onnxruntime]")
    path = export_onnx(model, resolution, workdir / "model.onnx")
    session = ort_session(path, threads)

    def prepare(x: torch.Tensor) -> Callable[[], Any]:
        feed = {INPUT_NAME: x.cpu().contiguous().numpy()}
        return lambda: session.run([OUTPUT_NAME], feed)

    return prepare


def executorch_runner(model: nn.Module, threads: int, workdir: Path) -> Runner:
    """ExecuTorch with the XNNPACK delegate: one .pte program per batch size, its thread pool at `threads`."""
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime
    except ImportError:
        raise ExportError(f"bench.backends=[executorch] needs ExecuTorch, which is not installed: "
                          f"{EXECUTORCH_INSTALL} (or leave executorch out of bench.backends)") from None
    portable_lib._unsafe_reset_threadpool(threads)
    runtime = Runtime.get()

    def prepare(x: torch.Tensor) -> Callable[[], Any]:
        x = x.cpu().contiguous()
        with stdout_to_stderr(), torch.no_grad():
            program = to_edge_transform_and_lower(torch.export.export(model.eval(), (x,)),
                                                  partitioner=[XnnpackPartitioner()]).to_executorch()
        path = workdir / f"model_b{len(x)}.pte"
        path.write_bytes(program.buffer)
        method = runtime.load_program(str(path)).load_method("forward")
        return lambda: method.execute([x])

    return prepare


def make_runner(backend: str, model: nn.Module, resolution: int, threads: int, device: torch.device,
                channels_last: bool, workdir: Path) -> Runner:
    """The runner of `backend` (refusing one that cannot run on `device`)."""
    if backend in ("onnxruntime", "executorch") and device.type != "cpu":
        raise ExportError(f"bench.backends=[{backend}] runs on the CPU here; use bench.device=cpu, or only "
                          f"eager/compile on {device}")
    if backend == "eager":
        return eager_runner(model, device, channels_last)
    if backend == "compile":
        return eager_runner(model, device, channels_last, compiled=True)
    if backend == "onnxruntime":
        return onnxruntime_runner(model, resolution, threads, workdir)
    return executorch_runner(model, threads, workdir)


def time_calls(call: Callable[[], Any], warmup: int, iters: int, device: torch.device) -> list[float]:
    """Milliseconds of each of `iters` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def summarize_times(times: list[float], batch_size: int) -> dict[str, float]:
    """Median and 90th percentile (linear interpolation) latency in ms, and images/s at the median."""
    ordered = sorted(times)
    pos = 0.9 * (len(ordered) - 1)
    lo = int(pos)
    p90 = ordered[lo] + (ordered[min(lo + 1, len(ordered) - 1)] - ordered[lo]) * (pos - lo)
    median = statistics.median(ordered)
    return {"latency_ms": round(median, 4), "latency_ms_p90": round(p90, 4),
            "images_per_s": round(batch_size * 1000.0 / median, 2)}


def check_options(cfg: DictConfig) -> None:
    """Refuse bad option values before any work starts."""
    b = cfg.bench
    if not b.backends:
        fail(f"bench.backends=[] is not valid; give backends to time, some of {[str(x) for x in Backend]}")
    if not b.batch_sizes or any(int(n) < 1 for n in b.batch_sizes):
        fail(f"bench.batch_sizes={list(b.batch_sizes)} is not valid; give positive batch sizes, e.g. [1,64]")
    if b.threads < 1:
        fail(f"bench.threads={b.threads} is not valid; give a positive number of threads (1 = one core)")
    if b.device == "cuda" and not torch.cuda.is_available():
        fail("bench.device=cuda but no CUDA GPU is visible; use bench.device=cpu")
    if b.warmup < 0 or b.iters < 1:
        fail(f"bench.warmup={b.warmup}, bench.iters={b.iters}: give warmup >= 0 and iters >= 1")


def run_bench(cfg: DictConfig) -> dict[str, Any]:
    """Time every backend x batch size of the configured model; the report {"machine", "results"}."""
    b = cfg.bench
    device = torch.device(b.device)
    set_threads(b.threads)
    loaded = load_model(cfg)
    r = loaded.config["resolution"]
    results = []
    with tempfile.TemporaryDirectory(prefix="repro-bench-") as tmp:
        for backend in b.backends:
            log.info("%s: preparing %s at %d x %d", backend, loaded.config["name"], r, r)
            runner = make_runner(backend, loaded.model, r, b.threads, device, b.channels_last, Path(tmp))
            for n in b.batch_sizes:
                x = torch.randn(int(n), 3, r, r, generator=torch.Generator().manual_seed(0))
                times = time_calls(runner(x), b.warmup, b.iters, device)
                rec = {"model": loaded.config["name"], "backend": backend, "batch_size": int(n),
                       "threads": b.threads, **summarize_times(times, int(n)), "model_config": loaded.config,
                       "device": str(device), "warmup": b.warmup, "iters": b.iters}
                log.info("%s batch %d: median %.2f ms, p90 %.2f ms, %.1f images/s", backend, n, rec["latency_ms"],
                         rec["latency_ms_p90"], rec["images_per_s"])
                results.append(rec)
    return {"machine": machine_info(b.threads, device), "results": results}


def format_table(report: dict[str, Any]) -> str:
    """A readable table of the report."""
    m = report["machine"]
    first = report["results"][0]["model_config"]
    opts = ", ".join(f"{k}={v}" for k, v in first.items() if k not in ("name", "resolution", "num_classes"))
    head = (f"{first['name']} ({opts}) at {first['resolution']}x{first['resolution']} on {m['gpu'] or m['cpu']}, "
            f"{m['threads']} thread(s); torch {m['versions']['torch']}, onnxruntime {m['versions']['onnxruntime']}")
    lines = [head, "", f"{'backend':<12} {'batch':>5} {'median ms':>10} {'p90 ms':>9} {'images/s':>10}"]
    for rec in report["results"]:
        lines.append(f"{rec['backend']:<12} {rec['batch_size']:>5} {rec['latency_ms']:>10.2f} "
                     f"{rec['latency_ms_p90']:>9.2f} {rec['images_per_s']:>10.1f}")
    return "\n".join(lines)


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=CONFIG_DIR, config_name="bench")
def _bench(cfg: DictConfig) -> None:
    """Benchmark, print the table or the JSON, keep bench.json in the run dir."""
    check_options(cfg)
    out = save_run_info(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)))
    try:
        report = run_bench(cfg)
    except ExportError as e:
        fail(str(e))
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    if cfg.format == "json":
        print(json.dumps(report))
    else:
        print(format_table(report))
    log.info("report written to %s", out / "bench.json")


def main() -> None:
    """Console entry point of `repro-bench`."""
    register_configs()
    check_overrides("bench")
    _bench()


if __name__ == "__main__":
    main()
