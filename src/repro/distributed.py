"""torchrun support: one process per device, rank 0 speaks and writes, the others compute."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
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


def init_distributed(device: torch.device) -> Dist:
    """Join the torchrun (or SLURM: export_slurm_env) process group (NCCL on CUDA, gloo on CPU) if WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's `obj` on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, d: Dist) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum a tensor over ranks (in place) and return it."""
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def cleanup(d: Dist) -> None:
    """Leave the process group."""
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def select_device(kind: str, local_rank: int = 0) -> torch.device:
    """auto: CUDA when available, else CPU; under torchrun each process takes GPU LOCAL_RANK."""
    if kind not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={kind!r} is not valid; choose one of ['auto', 'cpu', 'cuda']")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible; use device=cpu (or auto)")
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", local_rank)))
