"""Fault injection on real runs, processes and checkpoints: killed and hung ranks, a kill during a checkpoint
save, a full or read-only checkpoint directory, a NaN loss and a resume with another world size (refused
when it would change the global batch, else through a universal checkpoint).

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
from pathlib import Path

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
    A resume with 1 rank that would change the global batch is then refused; keeping it, the run resumes on
    1 rank (universal checkpoint) and its export loads."""
    run_dir = tmp_path / "run"
    every = "checkpoint.every_steps=4"  # saves at 4 and 8: the kill after step 5 leaves 3 steps' margin
    proc = launch("torchrun", fault_config, f"run_dir={run_dir}", every, log=tmp_path / "run1.log")
    wait_until(lambda: 5 in steps_logged(run_dir), proc, 300, "step 5", poll=0.01)  # past step 4's save
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
    lost = [s for s in before if s > saved]
    assert lost, f"the kill landed after the step-{saved} save: no step to recompute ({sorted(before)})"

    rc, out = run("torchrun", fault_config, f"run_dir={run_dir}", every, log=tmp_path / "run2.log")
    assert rc == 0, out[-6000:]
    assert f"resumed from {run_dir / 'checkpoints' / tag} at step {saved}" in out
    after = steps_logged(run_dir)
    assert sorted(after) == list(range(1, STEPS + 1))
    for step in lost:  # the lost steps past the checkpoint are recomputed bit for bit
        assert after[step] == before[step], (step, after[step], before[step])
    print(f"[faults] restart resumed at step {saved} and recomputed steps {lost} identically")
    assert latest(run_dir) == f"step_{STEPS:08d}"

    # Resume with another world size. The global batch (2 x 16) would silently become 1 x 16: refused
    # before anything is loaded or written, naming the key that keeps it.
    config_before = (run_dir / "config.yaml").read_text()
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    more = "schedule.total_steps=12"
    rc, out = run("single", fault_config, f"run_dir={run_dir}", more, log=tmp_path / "ws.log")
    assert rc != 0
    assert "was trained with a global batch of 32, this run has 16" in out, out[-4000:]
    assert "deepspeed.global_batch=32" in out
    assert latest(run_dir) == f"step_{STEPS:08d}"
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before
    assert (run_dir / "config.yaml").read_text() == config_before, "a refused resume rewrote config.yaml"
    assert not (run_dir / "checkpoints" / f"step_{STEPS:08d}_universal").exists()
    # Keeping it (micro 16 x accum 2 on 1 rank): the ZeRO-1 partitions of 2 ranks load on 1 through a
    # universal checkpoint, and the run goes on to its new end with every step once.
    keep = ("deepspeed.global_batch=32", "deepspeed.grad_accum=null")
    rc, out = run("single", fault_config, f"run_dir={run_dir}", more, *keep, log=tmp_path / "ws2.log")
    assert rc == 0, out[-6000:]
    assert "elastic resume: 2 ranks, ZeRO-1 -> 1 ranks, ZeRO-1, converted" in out, out[-4000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{STEPS:08d}'} at step {STEPS}" in out
    assert sorted(steps_logged(run_dir)) == list(range(1, 13))
    assert latest(run_dir) == "step_00000012"
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
    # gloo's own message from rank 0's failed collective (the launcher echoes "timeout_s" in its command
    # line, so a bare "timeout" would always match).
    assert re.search(r"\[rank0\]:.*Timed out waiting \d+ms", out) or re.search(
        r"^.*rank 0.*Timed out waiting", out, re.M | re.I
    ), out[-4000:]
    assert all_s < 60
    assert not any(alive(p) for p in pids.values())


# ------------------------------------------------------------------------------------------ checkpointing


@pytest.mark.parametrize("killed", [0, 1], ids=["rank0", "rank1"])
def test_kill_during_checkpoint_save_keeps_previous_latest(fault_config, tmp_path, killed):
    """torchrun: one rank SIGKILLed while step 4's checkpoint is on disk but not yet complete: the pause hook
    of CheckpointManager.save (PVT_DIST_TEST_PAUSE_BEFORE_LATEST) holds every rank after DeepSpeed's files
    and the rank states are written, before trainer_state.json and `latest`. `latest` still names step 2,
    complete; restarting loads it, redoes steps 3-4 identically and replaces the partial step-4 directory."""
    run_dir = tmp_path / "run"
    target = run_dir / "checkpoints" / "step_00000004"
    marker = tmp_path / "paused"
    pause = {"PVT_DIST_TEST_PAUSE_BEFORE_LATEST": f"4:60:{marker}"}
    proc = launch("torchrun", fault_config, f"run_dir={run_dir}", log=tmp_path / "run1.log", env=pause)
    wait_until(lambda: 1 in steps_logged(run_dir), proc, 300, "step 1")
    pids = rank_pids(proc.pid)
    assert sorted(pids) == [0, 1], pids
    paused = lambda: all(Path(f"{marker}.rank{r}").is_file() for r in (0, 1))
    wait_until(paused, proc, 120, "both ranks paused in the step-4 save")
    os.kill(pids[killed], signal.SIGKILL)
    t0 = time.monotonic()
    rc = finish(proc, 120)
    exit_s = time.monotonic() - t0
    print(f"\n[faults] rank {killed} SIGKILLed before `latest`: launcher exit {rc} after {exit_s:.1f} s")
    assert rc != 0
    files = sorted(p.name for p in target.iterdir())
    print(f"[faults] partial step-4 directory: {files}")
    assert {"mp_rank_00_model_states.pt", "rank_00000.pt", "rank_00001.pt"} <= set(files), files
    assert any(f.endswith("optim_states.pt") for f in files), files
    assert "trainer_state.json" not in files
    assert latest(run_dir) == "step_00000002"
    assert_complete(run_dir, "step_00000002")
    before = steps_logged(run_dir)
    assert max(before) == 4

    rc, out = run("torchrun", fault_config, f"run_dir={run_dir}", log=tmp_path / "run2.log")
    assert rc == 0, out[-6000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000002'} at step 2" in out
    after = steps_logged(run_dir)
    assert sorted(after) == list(range(1, STEPS + 1))
    for step in (3, 4):
        assert after[step] == before[step], (step, after[step], before[step])
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
        r"non-finite loss at step (\d+) under fp32; .*"
        r"The last good checkpoint \((step_\d+)\) in (\S+) is intact",
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


def test_nonfinite_weights_are_never_checkpointed(fault_config, tmp_path):
    """fp32, weight decay 1e42 with a warmup from lr 0: step 1 leaves the weights as they were, step 2's
    decoupled decay (w *= 1 - lr * wd) overflows them to inf while step 2's loss (computed before the
    update) is finite. So the loss check passes and the weights guard before step 2's save is what stops
    the run: exit 3, `latest` = step 1, no step-2 checkpoint, nothing logged after step 2."""
    run_dir = tmp_path / "run"
    rc, out = run(
        "single", fault_config, f"run_dir={run_dir}", "optim.weight_decay=1e42", "schedule.warmup_lr=0",
        "checkpoint.every_steps=1", log=tmp_path / "inf.log",
    )  # fmt: skip
    assert rc == 3, out[-4000:]
    msg = (
        "weights became non-finite by step 2; stopping without saving. The last good checkpoint "
        f"(step_00000001) in {run_dir / 'checkpoints'} is intact"
    )
    assert msg in out, out[-4000:]
    assert latest(run_dir) == "step_00000001"
    assert not (run_dir / "checkpoints" / "step_00000002" / "trainer_state.json").exists()
    assert max(steps_logged(run_dir)) == 2
    sd = export_and_load(run_dir, tmp_path / "good.pth")
    assert all(torch.isfinite(v).all() for v in sd.values())
    print(
        "\n[faults] inf weights (fp32, weight decay 1e42): the weights guard stopped the step-2 save, exit 3"
    )


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


# --------------------------------------------------------------------------------------------- preemption


def _saved_at(run_dir: Path, tag: str) -> float | None:
    state = run_dir / "checkpoints" / tag / "trainer_state.json"
    return state.stat().st_mtime if state.is_file() else None


def test_stop_signal_is_agreed_within_check_every_s(fault_config, tmp_path):
    """torchrun, 2 ranks, logging.sync_every=1000 (the host syncs alone would check the stop flag only at
    step 1000), preemption.check_every_s=1: SIGUSR1 to rank 1 only, after step 5. Both ranks stop at the same
    step, well before the end, with that step's checkpoint complete and saved once; exit 0."""
    run_dir = tmp_path / "run"
    overrides = ("schedule.total_steps=400", "logging.sync_every=1000", "preemption.check_every_s=1")
    proc = launch("torchrun", fault_config, f"run_dir={run_dir}", *overrides, log=tmp_path / "r.log")
    wait_until(lambda: 5 in steps_logged(run_dir), proc, 300, "step 5")
    pids = rank_pids(proc.pid)
    os.kill(pids[1], signal.SIGUSR1)
    t_signal = time.time()
    rc = finish(proc, 120)
    exit_s = time.time() - t_signal
    out = proc.log_path.read_text()
    assert rc == 0, out[-4000:]
    m = re.search(r"stopped for preemption at step (\d+)", out)
    assert m, out[-4000:]
    stopped = int(m.group(1))
    tag = f"step_{stopped:08d}"
    assert latest(run_dir) == tag and assert_complete(run_dir, tag)["step"] == stopped
    assert out.count(f"saved checkpoint {run_dir / 'checkpoints' / tag} ") == 1
    assert max(steps_logged(run_dir)) == stopped < 100, stopped
    saved_s = _saved_at(run_dir, tag) - t_signal
    print(
        f"\n[faults] SIGUSR1 to rank 1 (sync_every 1000, check_every_s 1): stopped at step {stopped}, "
        f"checkpoint complete {saved_s:.1f} s after the signal, exit after {exit_s:.1f} s"
    )


def test_signal_during_a_checkpoint_save_neither_corrupts_nor_saves_twice(fault_config, tmp_path):
    """SIGUSR1 to both ranks while the step-4 checkpoint is being written (held by the pause hook): the
    save completes, the ranks stop at the step-4 boundary, the checkpoint is not written again."""
    run_dir = tmp_path / "run"
    marker = tmp_path / "paused"
    pause = {"PVT_DIST_TEST_PAUSE_BEFORE_LATEST": f"4:3:{marker}"}
    proc = launch(
        "torchrun",
        fault_config,
        f"run_dir={run_dir}",
        "logging.sync_every=2",
        log=tmp_path / "r.log",
        env=pause,
    )
    wait_until(lambda: Path(f"{marker}.rank0").is_file(), proc, 300, "the step-4 save")
    for pid in rank_pids(proc.pid).values():
        os.kill(pid, signal.SIGUSR1)
    rc = finish(proc, 120)
    out = proc.log_path.read_text()
    assert rc == 0, out[-4000:]
    assert "stopped for preemption at step 4 " in out, out[-4000:]
    tag = "step_00000004"
    assert latest(run_dir) == tag and assert_complete(run_dir, tag)["step"] == 4
    assert out.count(f"saved checkpoint {run_dir / 'checkpoints' / tag} ") == 1, out[-4000:]
    assert max(steps_logged(run_dir)) == 4
    # The checkpoint is readable: it resumes (on 1 rank, the same global batch) and the run completes.
    keep = ("deepspeed.global_batch=32", "deepspeed.grad_accum=null")
    rc, out = run("single", fault_config, f"run_dir={run_dir}", *keep, log=tmp_path / "resume.log")
    assert rc == 0 and "resumed from" in out and "at step 4" in out, out[-4000:]
    assert sorted(steps_logged(run_dir)) == list(range(1, STEPS + 1))
