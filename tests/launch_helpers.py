"""What the multi-process tests share: a free rendezvous port and a clean environment for the ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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


def tiny_run_yaml(shards, rest: str, **data) -> str:
    """Config of a few-step pvt_v2_b0 run at 32 px on the Fashion-MNIST `shards`.

    ``data`` adds or replaces entries of the data section; ``rest`` is YAML for the other sections.
    """
    section = dict(
        train_shards=str(shards), val_shards=str(shards), num_classes=10, train_size=32, val_size=32,
        crop_pct=1.0, num_threads=1, label_smoothing=0.0,
    )  # fmt: skip
    section.update(data)
    entries = ", ".join(f"{k}: {v}" for k, v in section.items())
    return f"model: {{name: pvt_v2_b0, drop_path_rate: 0.0}}\ndata: {{{entries}}}\n{rest.strip()}\n"


def export_weights(run_dir, out, *flags: str) -> dict:
    """`python -m pvt_dist.export RUN_DIR OUT [flags]` as users run it; returns the written state dict."""
    import torch

    cmd = [sys.executable, "-m", "pvt_dist.export", str(run_dir), str(out), *flags]
    subprocess.run(cmd, check=True, env=rank_env(), cwd=ROOT, timeout=300)
    return torch.load(out, map_location="cpu", weights_only=True)


def evaluate(*args: str, nproc: int = 1, expect: int = 0) -> subprocess.CompletedProcess:
    """`launch/evaluate.py ARGS` (torchrun with nproc > 1); asserts its exit code."""
    cmd = [sys.executable, str(ROOT / "launch" / "evaluate.py")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        cmd += [f"--master_port={free_port()}", str(ROOT / "launch" / "evaluate.py")]
    proc = subprocess.run(
        [*cmd, *args], capture_output=True, text=True, env=rank_env(), cwd=ROOT, timeout=300
    )
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc
