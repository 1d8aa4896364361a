"""Helpers of the fault-injection tests: start runs as users do, find their ranks, read their results."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch_helpers import ROOT, TRAIN, free_port, rank_env

STEPS = 8  # optimizer steps of the fault runs (configs: the `fault_config` fixture in conftest.py)


@functools.cache
def train_main():
    """`main` of launch/train.py (a script, not a package), to run config checks in this process."""
    spec = importlib.util.spec_from_file_location("pvt_dist_launch_train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def launch(
    launcher: str, config: Path, *overrides: str, log: Path, nproc: int = 2, env: dict | None = None,
    script: Path = TRAIN,
) -> subprocess.Popen:  # fmt: skip
    """Start a training run in its own session (so a failed test can end all of it), output to `log`.

    ``env`` adds variables to the ranks' environment (e.g. the checkpoint pause hook of the tests);
    ``script`` is the entry point (launch/train.py, or launch/finetune_detr.py for stage 2)."""
    port = f"--master_port={free_port()}"
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", port, str(script)]
    elif launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}", port, str(script)]
    else:  # one plain process (world size 1)
        cmd = [sys.executable, str(script)]
    cmd += ["--config", str(config), *overrides]
    out = open(log, "w")  # noqa: SIM115 - closed by finish()
    proc = subprocess.Popen(
        cmd,
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**rank_env(), **(env or {})},
        cwd=ROOT,
        start_new_session=True,
    )
    proc.log_file, proc.log_path = out, log
    return proc


def finish(proc: subprocess.Popen, timeout: float) -> int:
    """Wait for the run; on timeout end its whole session (started by this test) and fail."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"run did not end within {timeout} s:\n{tail(proc)}")
    finally:
        proc.log_file.close()
    return rc


def run(
    launcher: str, config: Path, *overrides: str, log: Path, nproc: int = 2, timeout: float = 300,
    env: dict | None = None, script: Path = TRAIN,
):  # fmt: skip
    proc = launch(launcher, config, *overrides, log=log, nproc=nproc, env=env, script=script)
    return finish(proc, timeout), log.read_text()


def tail(proc: subprocess.Popen, n: int = 6000) -> str:
    proc.log_file.flush()
    return proc.log_path.read_text()[-n:]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def rank_pids(launcher_pid: int, script: str = "train.py") -> dict[int, int]:
    """{rank: pid} of the ``script`` processes under a launcher, from their environment (RANK=)."""
    kids, todo, found = _children(), [launcher_pid], {}
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [e[5:] for e in env if e.startswith(b"RANK=")]
        is_script = any(c.endswith(script.encode()) for c in cmdline)
        if rank and is_script and b"torch.distributed.run" not in cmdline:
            found[int(rank[0])] = pid
    return found


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, awaiting its parent's wait, counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def steps_logged(run_dir: Path) -> dict[int, float]:
    """{step: global mean loss} from metrics.jsonl (complete lines only); a step must appear once."""
    path, out = run_dir / "metrics.jsonl", {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        if not line.endswith("}"):
            continue
        rec = json.loads(line)
        if rec["kind"] == "step" and "train/loss_step" in rec:  # stage 2 logs its loss terms apart
            assert rec["step"] not in out, f"step {rec['step']} logged twice"
            out[rec["step"]] = rec["train/loss_step"]
    return out


def wait_until(cond, proc: subprocess.Popen, timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"run ended (exit {proc.returncode}) before {what}:\n{tail(proc)}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no {what} within {timeout} s:\n{tail(proc)}")
        time.sleep(poll)


def latest(run_dir: Path) -> str | None:
    path = run_dir / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else None


def assert_complete(run_dir: Path, tag: str) -> dict:
    """`tag` is a finished checkpoint: trainer_state.json last, every rank's state present."""
    state = json.loads((run_dir / "checkpoints" / tag / "trainer_state.json").read_text())
    for r in range(state["world_size"]):
        assert (run_dir / "checkpoints" / tag / f"rank_{r:05d}.pt").is_file()
    return state


def export_and_load(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """Follow the documented way out: `python -m pvt_dist.export`, then load strictly into a fresh model."""
    from pvt_dist.export import main as export_main
    from pvt_dist.models import build_model, load_pretrained

    assert export_main([str(run_dir), str(out)]) == 0
    sd = torch.load(out, map_location="cpu", weights_only=True)
    missing, unexpected = load_pretrained(build_model("pvt_v2_b0", num_classes=10, img_size=32), str(out))
    assert not missing and not unexpected
    return sd
