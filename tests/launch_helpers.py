"""What the multi-process tests share: a free rendezvous port and a clean environment for the ranks."""

from __future__ import annotations

import os
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "launch" / "train.py"
# Set by an outer launcher (a test run under torchrun or srun); the ranks a test starts must not see them.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def free_port() -> int:
    """A TCP port nobody listens on now (for --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env() -> dict:
    """Environment for started ranks: one thread each (2 cores), the shared JIT cache, no launcher vars."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(ROOT / "build" / "torch_extensions"))
    for k in LAUNCHER_VARS:
        env.pop(k, None)
    return env
