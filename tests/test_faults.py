"""Fault injection on real runs, processes and checkpoints: killed and hung ranks, a kill during a checkpoint
save, a full or read-only checkpoint directory, a NaN loss and a resume with another world size.

Every fault is real (SIGKILL/SIGSTOP of a training process found through /proc, a tmpfs that fills up, a
read-only mount, an lr that overflows fp32); nothing of DeepSpeed or the data pipeline is mocked. Runs train
pvt_v2_b0 at 32x32 on Fashion-MNIST (fp32, ZeRO-1, gloo) for a few steps. Multi-rank runs start through
torchrun or the deepspeed launcher, as users start them; the tests print the measured figures (run with -s)
that docs/reliability.md reports. Bad input (shards, configs): test_faults_input.py.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import torch
from fault_helpers import (
    STEPS,
    alive,
    assert_complete,
    export_and_load,
    finish,
    latest,
    launch,
    rank_pids,
    run,
    steps_logged,
    tail,
    train_main,
    wait_until,
)

pytestmark = pytest.mark.faults


# ------------------------------------------------------------------------------------ dead and hung ranks


def test_sigkilled_rank_ends_every_rank_and_restart_resumes(fault_config, tmp_path):
    """torchrun, 2 ranks: rank 1 SIGKILLed mid-step -> all ranks gone, non-zero exit, within seconds; the
    same command resumes from the last complete checkpoint and recomputes the lost steps identically.
    A resume with 1 rank is then refused, pointing to `python -m pvt_dist.export`, which works."""
    run_dir = tmp_path / "run"
    proc = launch("torchrun", fault_config, f"run_dir={run_dir}", log=tmp_path / "run1.log")
    wait_until(lambda: 3 in steps_logged(run_dir), proc, 300, "step 3")  # past the step-2 checkpoint
    pids = rank_pids(proc.pid)
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    rc = finish(proc, 120)
    exit_s = time.monotonic() - t0
    print(f"\n[faults] torchrun: rank 1 SIGKILLed -> launcher exit {rc} after {exit_s:.1f} s")
    assert rc != 0
    assert not any(alive(p) for p in pids.values()), "a rank outlived the launcher"
    assert exit_s < 60
    before = steps_logged(run_dir)
    assert max(before) < STEPS, "the killed run must not have finished"
    tag = latest(run_dir)
    saved = assert_complete(run_dir, tag)["step"]
    assert saved in before

    rc, out = run("torchrun", fault_config, f"run_dir={run_dir}", log=tmp_path / "run2.log")
    assert rc == 0, out[-6000:]
    assert f"resumed from {run_dir / 'checkpoints' / tag} at step {saved}" in out
    after = steps_logged(run_dir)
    assert sorted(after) == list(range(1, STEPS + 1))
    for step, loss in before.items():  # steps past the checkpoint are recomputed bit for bit
        assert after[step] == loss, (step, after[step], loss)
    assert latest(run_dir) == f"step_{STEPS:08d}"

    # Resume with another world size: refused before any step, naming both sizes and the export.
    config_before = (run_dir / "config.yaml").read_text()
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    rc, out = run(
        "single", fault_config, f"run_dir={run_dir}", "schedule.total_steps=12", log=tmp_path / "ws.log"
    )
    assert rc != 0
    assert "was written by 2 ranks, this run has 1" in out, out[-4000:]
    assert f"python -m pvt_dist.export {run_dir}" in out
    assert latest(run_dir) == f"step_{STEPS:08d}"
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before
    assert (run_dir / "config.yaml").read_text() == config_before, "a refused resume rewrote config.yaml"
    sd = export_and_load(run_dir, tmp_path / "weights.pth")
    assert all(torch.isfinite(v).all() for v in sd.values())


def test_hung_rank_times_out_every_rank(fault_config, tmp_path):
    """deepspeed launcher, 2 ranks: rank 1 frozen (SIGSTOP) mid-step. Rank 0 stops waiting after
    dist.timeout_s and exits non-zero; the launcher then ends the frozen rank: no job hangs."""
    timeout_s = 8
    run_dir = tmp_path / "run"
    proc = launch(
        "deepspeed", fault_config, f"run_dir={run_dir}", f"dist.timeout_s={timeout_s}", log=tmp_path / "r.log"
    )
    wait_until(lambda: 3 in steps_logged(run_dir), proc, 300, "step 3")
    pids = rank_pids(proc.pid)
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[1], signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        deadline = t0 + 60
        while alive(pids[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        rank0_s = time.monotonic() - t0
        rc = finish(proc, 90)
        all_s = time.monotonic() - t0
    finally:
        if alive(pids[1]):
            os.kill(pids[1], signal.SIGKILL)
    out = proc.log_path.read_text()
    print(
        f"\n[faults] deepspeed launcher: rank 1 SIGSTOPped -> rank 0 exited after {rank0_s:.1f} s "
        f"(dist.timeout_s={timeout_s}), launcher exit {rc} after {all_s:.1f} s"
    )
    assert rc != 0
    assert timeout_s - 1 < rank0_s < timeout_s + 15, out[-4000:]
    assert "timed out" in out.lower() or "timeout" in out.lower(), out[-4000:]
    assert all_s < 60
    assert not any(alive(p) for p in pids.values())


# ------------------------------------------------------------------------------------------ checkpointing


def test_kill_during_checkpoint_save_keeps_previous_latest(fault_config, tmp_path):
    """torchrun: rank 0 SIGKILLed while step 4's checkpoint is being written. `latest` still
    names step 2, complete; restarting loads it, redoes steps 3-4 identically and replaces the partial
    step-4 directory."""
    run_dir = tmp_path / "run"
    target = run_dir / "checkpoints" / "step_00000004"
    proc = launch("torchrun", fault_config, f"run_dir={run_dir}", log=tmp_path / "run1.log")
    wait_until(lambda: 1 in steps_logged(run_dir), proc, 300, "step 1")
    pids = rank_pids(proc.pid)
    assert sorted(pids) == [0, 1], pids
    wait_until(target.is_dir, proc, 120, "the step-4 checkpoint directory", poll=0.002)
    os.kill(pids[0], signal.SIGKILL)
    rc = finish(proc, 120)
    assert rc != 0
    files = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    print(f"\n[faults] rank 0 SIGKILLed during the step-4 save; partial directory held {files}")
    assert "trainer_state.json" not in files, "the kill came too late: the save had completed"
    assert latest(run_dir) == "step_00000002"
    assert_complete(run_dir, "step_00000002")
    before = steps_logged(run_dir)

    rc, out = run("torchrun", fault_config, f"run_dir={run_dir}", log=tmp_path / "run2.log")
    assert rc == 0, out[-6000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000002'} at step 2" in out
    after = steps_logged(run_dir)
    assert sorted(after) == list(range(1, STEPS + 1))
    for step, loss in before.items():
        assert after[step] == loss, (step, after[step], loss)
    assert latest(run_dir) == f"step_{STEPS:08d}"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        "step_00000006",
        "step_00000008",
    ]


def test_full_checkpoint_disk_stops_the_run(fault_config, tmp_path, mount_tmpfs):
    """checkpoints/ on an 80 MB tmpfs: step 2's checkpoint (~55 MB) fits, step 4's hits ENOSPC. The run
    stops with an error naming the path, trains no further, and `latest` stays at step 2."""
    run_dir = tmp_path / "run"
    mount_tmpfs(run_dir / "checkpoints", "size=80m")
    rc, out = run("single", fault_config, f"run_dir={run_dir}", log=tmp_path / "full.log")
    assert rc != 0
    target = run_dir / "checkpoints" / "step_00000004"
    # torch.save reports ENOSPC only as a stream error; the message adds the path and the free space.
    m = re.search(
        rf"checkpoint: saving step 4 to {re.escape(str(target))} failed \((\d+) MiB free there\)", out
    )
    assert m and int(m.group(1)) < 8, out[-4000:]
    assert max(steps_logged(run_dir)) == 4, "the run went on training without its checkpoint"
    assert latest(run_dir) == "step_00000002"
    assert_complete(run_dir, "step_00000002")
    print("\n[faults] full checkpoint disk: " + [ln for ln in out.splitlines() if "saving step 4" in ln][-1])


def test_unwritable_checkpoint_dir_fails_before_training(fault_config, tmp_path, mount_tmpfs, capsys):
    """checkpoints/ on a read-only mount (root ignores file modes): refused at start-up, exit 2, no
    process group."""
    import torch.distributed as dist

    main = train_main()
    run_dir = tmp_path / "run"
    mount_tmpfs(run_dir / "checkpoints", "ro,size=1m")
    assert main(["--config", str(fault_config), f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint directory {run_dir / 'checkpoints'} is not writable" in err
    assert "Read-only file system" in err
    assert not dist.is_initialized()
    assert not (run_dir / "config.yaml").exists()


# ------------------------------------------------------------------------------------------------- NaN


def test_nan_loss_fp32_stops_and_last_good_checkpoint_loads(fault_config, tmp_path):
    """fp32: lr 1e30 (an lr blow-up, as a bad sweep value would give) sends the weights to ~1e30 in step
    2's update and the next forward overflows to a NaN loss. The run stops (exit 3) naming the last
    checkpoint with finite weights, never saves past it, and that checkpoint exports finite weights."""
    run_dir = tmp_path / "run"
    rc, out = run(
        "single", fault_config, f"run_dir={run_dir}", "optim.lr=1e30", "checkpoint.every_steps=1",
        log=tmp_path / "nan.log",
    )  # fmt: skip
    assert rc == 3, out[-4000:]
    m = re.search(
        r"non-finite (?:loss at|by) step (\d+)\b.*The last good checkpoint \((step_\d+)\) in (\S+) is intact",
        out,
    )
    assert m, out[-4000:]
    bad_step, tag = int(m.group(1)), m.group(2)
    assert m.group(3) == str(run_dir / "checkpoints")
    assert latest(run_dir) == tag and assert_complete(run_dir, tag)["step"] == bad_step - 1
    assert not (run_dir / "checkpoints" / f"step_{bad_step:08d}" / "trainer_state.json").exists()
    assert max(steps_logged(run_dir)) == bad_step - 1, "the non-finite step is not logged, none runs after"
    sd = export_and_load(run_dir, tmp_path / "good.pth")
    assert all(torch.isfinite(v).all() for v in sd.values())
    print(f"\n[faults] NaN (fp32, lr 1e30): stopped at step {bad_step}, exit 3, latest = {tag}")


# ------------------------------------------------------------------------------------ one job per run_dir


def test_second_launch_on_a_live_run_dir_is_refused(fault_config, tmp_path):
    """torchrun, 2 ranks, trains 40 steps. Meanwhile the same command is started again on the same
    run_dir, as one process and through torchrun (2 ranks) at once. Both are refused (exit 2 / a failed
    launch) naming the holder, within seconds; the first run finishes all its steps, each logged once, with
    its own checkpoints, and releases the lease."""
    run_dir = tmp_path / "run"
    steps = 40
    first = launch(
        "torchrun",
        fault_config,
        f"run_dir={run_dir}",
        f"schedule.total_steps={steps}",
        log=tmp_path / "a.log",
    )
    wait_until(lambda: 1 in steps_logged(run_dir), first, 300, "step 1")
    holder = rank_pids(first.pid)[0]
    t0 = time.monotonic()
    single = launch("single", fault_config, f"run_dir={run_dir}", log=tmp_path / "single.log")
    second = launch("torchrun", fault_config, f"run_dir={run_dir}", log=tmp_path / "torchrun.log")
    rc = finish(single, 120)
    single_s = time.monotonic() - t0
    rc2 = finish(second, 120)
    torchrun_s = time.monotonic() - t0
    out, out2 = single.log_path.read_text(), second.log_path.read_text()
    named = f"is in use by another job (host {os.uname().nodename}, pid {holder}, no Slurm job, started "
    assert rc == 2 and named in out, out[-4000:]
    assert rc2 != 0 and named in out2, out2[-4000:]
    assert first.poll() is None, "the first run ended before the second launches were refused"
    assert max(steps_logged(run_dir)) < steps
    assert finish(first, 300) == 0, tail(first)
    assert sorted(steps_logged(run_dir)) == list(range(1, steps + 1))
    assert latest(run_dir) == f"step_{steps:08d}"
    assert not (run_dir / ".lease").exists(), "the finished run left its lease behind"
    print(
        f"\n[faults] second launch on a live run_dir: 1 process refused (exit 2) after {single_s:.1f} s, "
        f"torchrun x2 refused (exit {rc2}) after {torchrun_s:.1f} s, both started together (process start, "
        "imports and config check included)"
    )
