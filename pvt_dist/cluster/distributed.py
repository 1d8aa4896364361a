"""Launcher-agnostic process-group setup.

Rank and world size come from, in order: torchrun / the deepspeed launcher (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), Slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master
is the first host of the step's node list), or a single process. ``detect_env`` needs no process
group, so configs can be checked against the world size before anything starts.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pvt_dist.config import DistConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str
    """"env" (torchrun / deepspeed launcher), "slurm" or "single"."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list like ``n[1-2],gpu07``, expanded by ``scontrol show hostnames``."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"SLURM_JOB_NODELIST={nodelist!r}: `scontrol show hostnames` failed: {e}") from e
    if not out:
        raise RuntimeError(f"SLURM_JOB_NODELIST={nodelist!r}: `scontrol show hostnames` returned no host")
    return out[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_env(master_port: int = 29500) -> DistEnv:
    """Where this process sits in the job, without touching the network (except ``scontrol``)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=_int_env("RANK"),
            local_rank=_int_env("LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            world_size=_int_env("WORLD_SIZE"),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int_env("MASTER_PORT") if "MASTER_PORT" in env else master_port,
            launcher="env",
        )
    # Inside an srun step the step's task count is the world; a bare batch script is a single process.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        world = _int_env("SLURM_STEP_NUM_TASKS")
        port = (
            _int_env("MASTER_PORT")
            if "MASTER_PORT" in env
            # Distinct jobs sharing a node must not collide on the rendezvous port.
            else master_port + int(env.get("SLURM_JOB_ID", "0")) % 10000
        )
        return DistEnv(
            rank=_int_env("SLURM_PROCID"),
            local_rank=_int_env("SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            world_size=world,
            master_addr=env.get("MASTER_ADDR") or (first_slurm_host(nodelist) if world > 1 else "127.0.0.1"),
            master_port=port,
            launcher="slurm",
        )
    return DistEnv(0, 0, 1, "127.0.0.1", _free_port(), "single")


def cpu_budget() -> int:
    """CPU cores one rank may use: Slurm's ``--cpus-per-task``, else this process's cores shared by the ranks
    of its node (LOCAL_WORLD_SIZE from torchrun / the deepspeed launcher)."""
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
    local = next((int(os.environ[k]) for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if k in os.environ), 1)
    return max(1, len(os.sched_getaffinity(0)) // max(local, 1))


def torch_threads() -> int:
    """Intra-op threads for torch: OMP_NUM_THREADS when set (by the user or the launcher), else the budget."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else cpu_budget()


def set_thread_budget() -> int:
    """Make torch use ``torch_threads()`` intra-op threads, even where its pool already exists (a submitit
    task imports torch before our code runs, so an OMP_NUM_THREADS set then would be too late). Returns it."""
    n = torch_threads()
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def dali_threads(requested: int) -> int:
    """DALI CPU threads of one rank: the config's ``data.num_threads``, within the rank's CPU budget."""
    return max(1, min(requested, cpu_budget()))


def device_for(env: DistEnv) -> torch.device:
    """The GPU of this process when CUDA is present, else the CPU.

    Several visible GPUs: one process per GPU, by local rank. Exactly one visible GPU: index 0 whatever
    the local rank, since a site that binds one GPU per task (``--gpus-per-task=1``, or
    ``CUDA_VISIBLE_DEVICES`` set to one device per task) shows every task its own GPU as device 0.
    """
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count == 1:
            index = 0
        elif env.local_rank < count:
            index = env.local_rank
        else:
            raise RuntimeError(
                f"local rank {env.local_rank} has no GPU ({count} visible); "
                "launch one process per GPU, or bind one GPU per task"
            )
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def export_rendezvous(env: DistEnv, device: torch.device) -> None:
    """The env:// rendezvous DeepSpeed and torch.distributed read.

    DeepSpeed takes ``LOCAL_RANK`` as its CUDA device index (engine, ZeRO buffers), so on a GPU it gets
    the index ``device_for`` chose: 0 for every task of a one-GPU-per-task binding.
    """
    os.environ.update(
        RANK=str(env.rank),
        LOCAL_RANK=str(device.index if device.type == "cuda" else env.local_rank),
        WORLD_SIZE=str(env.world_size),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )


def init_distributed(cfg: DistConfig, env: DistEnv | None = None) -> tuple[DistEnv, torch.device]:
    """Start the process group (DeepSpeed's comm layer over torch.distributed) and pick the device."""
    env = env or detect_env(cfg.master_port)
    device = device_for(env)
    export_rendezvous(env, device)
    # Without a budget every rank would use every core: N ranks x N threads thrash a node (CPU-side ops of
    # GPU ranks too).
    set_thread_budget()
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise RuntimeError("dist.backend: nccl needs CUDA GPUs; use gloo (or auto) on CPU")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.getcwd(), "build", "torch_extensions"))
    import deepspeed

    timeout = timedelta(seconds=cfg.timeout_s)
    # DeepSpeed runs ZeRO's collectives on groups it makes with new_group() and no timeout, which torch
    # gives its 30-minute default: make timeout_s that default, or a hung peer stalls the others 30 min.
    dist.distributed_c10d.default_pg_timeout = timeout
    if hasattr(dist.distributed_c10d, "default_pg_nccl_timeout"):
        dist.distributed_c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        timeout=timeout,
        init_method="env://",
        verbose=False,
    )
    return env, device


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()
