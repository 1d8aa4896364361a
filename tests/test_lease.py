"""The run directory's lease (pvt_dist/cluster/lease.py): refusal of a live holder, the three takeovers of a
dead one, release, and racing takers. Holders are real processes (started, killed, frozen); a holder on
another node is a lease file as that node would write it. The whole-run case (a training run keeps
training while a second launch is refused) is in tests/test_faults.py."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_helpers import ROOT, rank_env

from pvt_dist.cluster.lease import LEASE_FILE, LeaseHeldError, RunDirLease

HOLD = """
import sys, time, logging
logging.basicConfig(level=logging.INFO)
from pvt_dist.cluster.lease import RunDirLease
lease = RunDirLease(sys.argv[1], heartbeat_s=float(sys.argv[2]), stale_after=2).acquire()
print("held", flush=True)
time.sleep(120)
"""


def hold(run_dir: Path, heartbeat_s: float = 30.0, **env) -> subprocess.Popen:
    """A process that takes the lease and keeps it (heartbeating) until it is ended."""
    e = rank_env()
    for k in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        e.pop(k, None)
    e.update(env, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir), str(heartbeat_s)],
        env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    for k in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
        p.wait()


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / LEASE_FILE).read_text())


def test_live_holder_is_refused_naming_it(tmp_path, procs):
    procs.append(holder := hold(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(LeaseHeldError) as e:
        RunDirLease(str(tmp_path)).acquire()
    refuse_s = time.monotonic() - t0
    msg = str(e.value)
    assert f"host {socket.gethostname()}, pid {holder.pid}, no Slurm job, started " in msg, msg
    assert str(tmp_path / LEASE_FILE) in msg
    assert record(tmp_path)["pid"] == holder.pid, "the refused acquirer changed the holder's lease"
    assert refuse_s < 1.0
    print(f"\n[lease] live holder: refused in {refuse_s * 1000:.1f} ms")


def test_dead_pid_on_same_host_is_taken_over(tmp_path, procs, caplog):
    procs.append(holder := hold(tmp_path))
    holder.kill()
    holder.wait()
    assert record(tmp_path)["pid"] == holder.pid  # a SIGKILLed holder leaves its lease behind
    with caplog.at_level(logging.WARNING, "pvt_dist.cluster.lease"):
        lease = RunDirLease(str(tmp_path)).acquire()
    try:
        assert lease.took_over is not None and lease.took_over.pid == holder.pid
        assert f"pid {holder.pid} on {socket.gethostname()} is gone" in caplog.text
        assert record(tmp_path)["pid"] == os.getpid()
    finally:
        lease.release()
    assert not (tmp_path / LEASE_FILE).exists()


def test_stale_heartbeat_is_taken_over_and_the_old_holder_learns_it(tmp_path, procs, caplog):
    """A frozen holder (SIGSTOP: alive, flock held, as a hung job or a node cut off from NFS) stops
    heartbeating; after stale_after x heartbeat_s its lease is taken. Resumed, it finds out and says so."""
    procs.append(holder := hold(tmp_path, heartbeat_s=0.3))
    os.kill(holder.pid, signal.SIGSTOP)
    with pytest.raises(LeaseHeldError):  # fresh heartbeat: alive although frozen
        RunDirLease(str(tmp_path)).acquire()
    time.sleep(2 * 0.3 + 0.5)
    with caplog.at_level(logging.WARNING, "pvt_dist.cluster.lease"):
        lease = RunDirLease(str(tmp_path)).acquire()
    assert lease.took_over.pid == holder.pid
    assert "its heartbeat is" in caplog.text and "(> 2 x 0.3 s)" in caplog.text, caplog.text
    os.kill(holder.pid, signal.SIGCONT)
    time.sleep(1.0)  # a few of its heartbeats
    holder.kill()
    err = holder.communicate()[1]
    assert f"was taken over; it is now held by host {socket.gethostname()}, pid {os.getpid()}" in err, err
    assert record(tmp_path)["token"] == lease.holder.token, "the old holder overwrote the new lease"
    lease.release()


def fake_scontrol(tmp_path, monkeypatch, state: str | None) -> None:
    """`scontrol show job` answering JobState=STATE (None: "Invalid job id", as for a purged job)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    body = f"echo 'JobId=$4 JobState={state} Reason=None'" if state else "echo 'Invalid job id' >&2; exit 1"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\n{body}\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_holder_on_another_node_is_judged_by_its_heartbeat(tmp_path):
    """The lease file as a torchrun job on node `gpu17` writes it on the shared filesystem."""
    other = {
        "host": "gpu17", "pid": 1, "job_id": None, "restart_count": 0, "started": time.time() - 600,
        "heartbeat": time.time() - 5, "heartbeat_s": 30.0, "stale_after": 10.0, "token": "a" * 32,
    }  # fmt: skip
    (tmp_path / LEASE_FILE).write_text(json.dumps(other))
    with pytest.raises(LeaseHeldError, match="host gpu17, pid 1, no Slurm job"):
        RunDirLease(str(tmp_path)).acquire()  # pid 1 exists here too, but on another host it says nothing
    other["heartbeat"] = time.time() - 301
    (tmp_path / LEASE_FILE).write_text(json.dumps(other))
    lease = RunDirLease(str(tmp_path)).acquire()
    assert lease.took_over.host == "gpu17"
    lease.release()


def test_requeued_slurm_job_takes_over_its_own_hold(tmp_path, procs, monkeypatch):
    """The previous run of job 4242 still heartbeats (e.g. within KillWait); restart 1 of the same job takes
    the lease, another launch inside the same run (restart 0) and another job are refused."""
    fake_scontrol(tmp_path, monkeypatch, "RUNNING")
    procs.append(holder := hold(tmp_path, SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="0"))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(LeaseHeldError, match="Slurm job 4242 \\(restart 0\\)"):
        RunDirLease(str(tmp_path)).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(LeaseHeldError):
        RunDirLease(str(tmp_path)).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lease = RunDirLease(str(tmp_path)).acquire()
    assert lease.took_over.pid == holder.pid and record(tmp_path)["restart_count"] == 1
    lease.release()


@pytest.mark.parametrize("state", ["FAILED", "CANCELLED", None])
def test_lease_of_an_ended_slurm_job_on_another_node_is_taken_over(tmp_path, monkeypatch, state):
    """A job whose rank 0 was SIGKILLed on node gpu17 left a fresh-looking lease; Slurm says it ended."""
    fake_scontrol(tmp_path, monkeypatch, state)
    other = {
        "host": "gpu17", "pid": 1, "job_id": "901", "restart_count": 0, "started": time.time() - 600,
        "heartbeat": time.time() - 5, "heartbeat_s": 30.0, "stale_after": 10.0, "token": "a" * 32,
    }  # fmt: skip
    (tmp_path / LEASE_FILE).write_text(json.dumps(other))
    lease = RunDirLease(str(tmp_path)).acquire()
    assert lease.took_over.job_id == "901"
    lease.release()


def test_released_lease_is_free_and_heartbeat_advances(tmp_path):
    lease = RunDirLease(str(tmp_path), heartbeat_s=0.2).acquire()
    first = record(tmp_path)["heartbeat"]
    time.sleep(0.7)
    assert record(tmp_path)["heartbeat"] > first
    lease.release()
    assert not (tmp_path / LEASE_FILE).exists()
    again = RunDirLease(str(tmp_path)).acquire()
    assert again.took_over is None
    again.release()


RACE = """
import sys, time
from pvt_dist.cluster.lease import RunDirLease, LeaseHeldError
while time.time() < float(sys.argv[2]):
    pass
try:
    RunDirLease(sys.argv[1]).acquire()
    print("won", flush=True)
    time.sleep(3)
except LeaseHeldError:
    print("refused", flush=True)
"""


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_racing_takers_one_wins(tmp_path, stale):
    """Six processes released at the same instant on a free lease, or on one left by a dead pid."""
    if stale:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        RunDirLease(str(tmp_path))._try_link()
        rec = record(tmp_path)
        rec["pid"] = dead.pid
        (tmp_path / LEASE_FILE).write_text(json.dumps(rec))
    start = time.time() + 3.0
    env = dict(rank_env(), PYTHONPATH=str(ROOT))
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(tmp_path), str(start)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(6)
    ]
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in racers)
    assert outcomes == ["refused"] * 5 + ["won"], outcomes
