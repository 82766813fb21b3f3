"""torchrun support: one process per device, rank 0 speaks and writes, the others compute."""

from __future__ import annotations

import atexit
import datetime
import os
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where every collective's tensors live (NCCL: CUDA only)

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether several processes take part."""
        return self.world_size > 1


def launched_rank() -> int:
    """The RANK torchrun gave this process (0 when not under torchrun)."""
    return int(os.environ.get("RANK", "0"))


def quiet_hydra_on_other_ranks() -> None:
    """Under torchrun, let only rank 0 create the Hydra run dir: the others get a throwaway one, removed at exit.

    Their job log keeps only the console handler at WARNING (no log file, no duplicated INFO lines).
    (Not `hydra/job_logging=disabled`: configs/hydra/default.yaml sets the console handler's stream, and on
    top of the handler-less `disabled` config that leaves a handler without a class, which Hydra rejects.)
    Call before the Hydra app starts; the real run dir reaches every rank with `broadcast_object`.
    """
    rank = launched_rank()
    if rank != 0:
        scratch = tempfile.mkdtemp(prefix=f"repro-rank{rank}-")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        sys.argv += ["hydra.output_subdir=null", "hydra.job_logging.root.level=WARNING",
                     "hydra.job_logging.root.handlers=[console]", "hydra/hydra_logging=disabled",
                     f"hydra.run.dir={scratch}"]


def export_slurm_env() -> None:
    """In a multi-task SLURM job (hydra/launcher=slurm, or srun) set RANK, WORLD_SIZE, MASTER_ADDR, ... as torchrun.

    Call it before choosing the device: each task then takes GPU LOCAL_RANK of its node (all GPUs stay visible).
    Does nothing under torchrun (WORLD_SIZE set) or in a single-task job.
    """
    if "WORLD_SIZE" in os.environ or "SLURM_JOB_ID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    try:
        from submitit.slurm.slurm import SlurmJobEnvironment  # reads SLURM's variables and expands its node list
    except ImportError:
        raise ValueError("this SLURM job has several tasks, and joining them needs submitit: pip install -e "
                         "'.[slurm]' (or start one task per node and let torchrun start the ranks)") from None
    job = SlurmJobEnvironment()
    os.environ.setdefault("MASTER_ADDR", job.hostnames[0])
    os.environ.setdefault("MASTER_PORT", str(20000 + zlib.crc32(job.job_id.encode()) % 40000))  # same on every task
    os.environ.update(RANK=str(job.global_rank), WORLD_SIZE=str(job.num_tasks), LOCAL_RANK=str(job.local_rank),
                      LOCAL_WORLD_SIZE=str(job.num_tasks // job.num_nodes))


def init_distributed(device: torch.device, timeout_s: float | None = None) -> Dist:
    """Join the torchrun (or SLURM: export_slurm_env) process group if WORLD_SIZE > 1; on CUDA, make `device` current.

    The backend is NCCL on CUDA and gloo on CPU; REPRO_DIST_BACKEND overrides it (e.g. `cuda:gloo`, a gloo group
    that, as NCCL, takes CUDA tensors only: the tests use it to show every collective stays on the run's device).
    `timeout_s`: how long a collective waits for the other ranks before it fails (None: torch's default).
    """
    if device.type == "cuda":  # NCCL's object collectives (and the default CUDA stream) use the current device
        torch.cuda.set_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=device)
    if not dist.is_initialized():
        backend = os.environ.get("REPRO_DIST_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
        dist.init_process_group(backend=backend, timeout=timeout)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device)


DEVICE_KINDS = ("auto", "cpu", "cuda")  # what select_device takes
PEER_LOST = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "connection refused")


def peer_lost(e: BaseException) -> bool:
    """Whether a collective failed because another rank did not answer in time or went away (gloo, NCCL, store)."""
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in text for s in PEER_LOST)


def silent_ranks(d: Dist, wait_s: float) -> list[int] | None:
    """After a collective timed out: the ranks that do not answer, found through the job's key-value store.

    Every surviving rank writes its key, waits `wait_s` for the others' keys, and reports the ranks whose keys
    never came (None when the store cannot tell, e.g. when the rank holding it is the one stopped).
    """
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=max(1.0, wait_s)))
        store.set(f"repro/alive/{d.rank}", "1")
        keys = [f"repro/alive/{r}" for r in range(d.world_size)]
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not store.check(keys):
            time.sleep(0.1)
        return [r for r, k in enumerate(keys) if not store.check([k])]
    except Exception:  # the store itself does not answer
        return None


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's `obj` on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=d.device)
    return box[0]


def gather_objects(obj: Any, d: Dist) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """The sum of a tensor over ranks, computed on the run's device (`d.device`) and returned there."""
    if d.enabled:
        t = t.to(d.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_state(module: torch.nn.Module, d: Dist) -> None:
    """Give every rank rank 0's buffers (BN running statistics) and parameters of `module`, in place."""
    if not d.enabled:
        return
    for t in [*module.buffers(), *module.parameters()]:
        if t.device != d.device:
            raise ValueError(f"broadcast_state: a tensor is on {t.device}, the run on {d.device}")
        dist.broadcast(t.data, src=0)


def cleanup(d: Dist) -> None:
    """Leave the process group."""
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def select_device(kind: str, local_rank: int = 0) -> torch.device:
    """auto: CUDA when available, else CPU; under torchrun each process takes GPU LOCAL_RANK of those it sees.

    LOCAL_RANK modulo the visible GPUs (as torchvision's references): a job that gives each task one GPU
    (CUDA_VISIBLE_DEVICES of one device) and LOCAL_RANK=3 runs on cuda:0.
    """
    if kind not in DEVICE_KINDS:
        raise ValueError(f"device={kind!r} is not valid; choose one of {list(DEVICE_KINDS)}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible; use device=cpu (or auto)")
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", local_rank)) % max(torch.cuda.device_count(), 1))
