"""Slurm: sbatch and submitit training on the local two-node cluster, preemption + requeue, a dying rank.

The `slurm` tests need the cluster from slurm/local-cluster/up.sh (`make cluster`; CI brings it up) and
are skipped, saying so, without it. Every job trains pvt_v2_b0 on 32x32 Fashion-MNIST on 2 nodes x 1 task
(CPU, gloo, fp32). The PreemptionHandler tests at the top need no cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvt_dist.cluster.preemption import PreemptionHandler

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
STEPS = 24
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


# ------------------------------------------------------------------------------ PreemptionHandler, no cluster


def test_signal_requests_stop_single_process():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as handler:
        assert not handler.stop_requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.received == signal.SIGUSR1
        assert handler.stop_requested()
        assert handler.stop_requested(), "a stop stays requested"
    assert signal.getsignal(signal.SIGUSR1) is before, "close() restores the previous handler"


def test_signal_after_the_last_step_does_not_requeue(monkeypatch):
    from pvt_dist.cluster import preemption

    requeues = []  # stands for submitit's handler, which checkpoints and requeues on its signal
    displaced = signal.signal(signal.SIGUSR1, lambda sig, frame: requeues.append(sig))
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        handler = PreemptionHandler()
        handler.run_finished()  # the trainer's last optimizer step is done
        os.kill(os.getpid(), signal.SIGUSR1)  # e.g. the time limit during the final validation
        handler.close()
        os.kill(os.getpid(), signal.SIGUSR1)  # again while the finished process exits
        assert requeues == [], "a finished run was handed to the requeuing handler"
        assert not preemption.requeue_requested()
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, displaced)


@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_only_the_grace_signal_requeues_a_slurm_job(monkeypatch, tmp_path, sig, requeued):
    """USR1 (the sbatch grace signal) saves and requeues; SIGTERM (scancel, the time limit, preemption)
    saves and must not requeue, or a cancelled job would come back. The scontrol on PATH records calls."""
    from pvt_dist.cluster import preemption

    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr(preemption, "_requeue_requested", False)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with PreemptionHandler() as handler:
            os.kill(os.getpid(), sig)
            assert handler.stop_requested(step=3)
            handler.on_checkpoint_saved()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert preemption.requeue_requested() is requeued
    assert (calls.read_text().split() if calls.exists() else []) == (["requeue", "4242"] if requeued else [])


def _agree_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    handler = PreemptionHandler()
    stopped_at = None
    for step in range(10):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is signalled, mid-"step"
        if handler.stop_requested():
            stopped_at = step
            break
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"stopped_at": stopped_at}))
    dist.destroy_process_group()


def test_stop_is_agreed_by_all_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_agree_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text())["stopped_at"] for r in range(2)]
    # Rank 1's signal lands before its check at step 3; rank 0, never signalled, stops at the same step.
    assert got == [3, 3]


# ------------------------------------------------------------------------------------------- cluster helpers


def _cluster_problem() -> str | None:
    try:
        subprocess.run(["scontrol", "ping"], check=True, capture_output=True, timeout=20)
        nodes = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"], check=True, capture_output=True, text=True, timeout=20
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError) as e:
        return f"local Slurm cluster not up (`make cluster` or slurm/local-cluster/up.sh): {e}"
    up = {line.split()[0] for line in nodes if line.split() and line.split()[1] in ("idle", "mix", "alloc")}
    if not {"n1", "n2"} <= up:
        return f"local Slurm cluster needs nodes n1 and n2 up, sinfo says: {nodes}"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


def write_config(path: Path, shards: Path, run_dir: Path, steps: int = STEPS) -> Path:
    cfg = {
        "run_dir": str(run_dir),
        "seed": 0,
        "model": {"name": "pvt_v2_b0", "num_classes": 10, "img_size": 32},
        "data": {
            "train_shards": str(shards),
            "val_shards": str(shards),
            "num_classes": 10,
            "train_size": 32,
            "val_size": 32,
            "crop_pct": 1.0,
            "num_threads": 1,
        },
        "optim": {"lr": 1e-3},
        "schedule": {"total_steps": steps, "warmup_steps": 2},
        "deepspeed": {"zero_stage": 1, "precision": "fp32", "global_batch": 16, "micro_batch": 8},
        "eval": {"at_end": False},
        "checkpoint": {"every_steps": 8},
        "logging": {"log_every": 4},
        "dist": {"backend": "gloo", "timeout_s": 60},
    }
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def _submit_env(omp: str | None, **extra: str) -> dict:
    """The submitting shell's environment; ``omp=None``: no OMP_NUM_THREADS, as a new user's shell."""
    env = dict(os.environ, **extra)
    env.pop("OMP_NUM_THREADS", None)
    return env if omp is None else dict(env, OMP_NUM_THREADS=omp)


def sbatch(config: Path, log: Path, *flags: str, cwd: Path = ROOT, omp: str | None = "1") -> str:
    """`sbatch slurm/pretrain.sh` on 2 nodes x 1 CPU task; from `cwd` (outside the repo: absolute path)."""
    env = _submit_env(omp, CONFIG=str(config), OVERRIDES="", PYTHON=PYTHON)
    env["RELAY_INTERVAL"] = "5"  # slurm/srun_train.sh: repeat a relayed USR1 every 5 s (default 15)
    script = "slurm/pretrain.sh" if cwd == ROOT else str(ROOT / "slurm" / "pretrain.sh")
    cmd = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0"]
    cmd += ["--cpus-per-task=1", "--time=15", f"--output={log}", *flags, script]
    out = subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout
    return out.strip().split(";")[0]


def job_state(job: str) -> tuple[str, str]:
    """(state, exit code) of the job's latest run, from accounting (sacct)."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job, "-o", "State,ExitCode"], capture_output=True, text=True
    ).stdout.splitlines()  # lines, not words: a cancelled job reads "CANCELLED by 0|0:0"
    if not out:
        return "UNKNOWN", ""
    state, code = out[-1].split("|")
    return state.split()[0], code


def wait_final(job: str, timeout: float, log: Path | None = None) -> tuple[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state, code = job_state(job)
        if state in FINAL_STATES:
            return state, code
        time.sleep(1)
    subprocess.run(["scancel", job])
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"job {job} not finished after {timeout:.0f} s (state {job_state(job)}):\n{tail}")


def wait_gone(job: str, timeout: float) -> None:
    """Wait until the job has left the queue, COMPLETING included: a cancelled job reads CANCELLED in
    accounting at once, while its tasks may still be saving within KillWait."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout
        if not out.strip():
            return
        time.sleep(1)
    pytest.fail(f"job {job} still in the queue after {timeout:.0f} s")


def metrics_step(run_dir: Path) -> int:
    """Last optimizer step rank 0 logged to metrics.jsonl (0 before the first)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def wait_step(run_dir: Path, step: int, job: str, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while metrics_step(run_dir) < step:
        state, _ = job_state(job)
        if state in FINAL_STATES or time.time() > deadline:
            tail = log.read_text()[-3000:] if log.exists() else ""
            pytest.fail(f"job {job} ({state}) did not reach step {step}:\n{tail}")
        time.sleep(0.2)


def tb_losses(run_dir: Path) -> list[tuple[int, float]]:
    """Every train/loss_step event in every TensorBoard file of the run (raw: a repeated step shows twice)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = []
    for f in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        for ev in EventFileLoader(str(f)).Load():
            for v in ev.summary.value:
                if v.tag == "train/loss_step":
                    out.append((ev.step, v.tensor.float_val[0] if v.HasField("tensor") else v.simple_value))
    return sorted(out)


def assert_finished_run(run_dir: Path, steps: int = STEPS) -> None:
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{steps:08d}", "latest names the final checkpoint"
    assert (ckpt / f"step_{steps:08d}").is_dir()
    losses = tb_losses(run_dir)
    assert [s for s, _ in losses] == list(range(1, steps + 1)), "one loss per optimizer step, none repeated"


def assert_same_losses(run_dir: Path, reference: Path) -> None:
    """A resumed run continues the loss curve of the uninterrupted run (same config, same world size)."""
    got, ref = tb_losses(run_dir), tb_losses(reference)
    assert [s for s, _ in got] == [s for s, _ in ref]
    for (step, a), (_, b) in zip(got, ref):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), f"step {step}: {a} vs uninterrupted {b}"


def rank_pid(job: str, rank: int) -> int | None:
    """PID of the training process of global `rank` in `job` (the top one, not a data worker)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if (
            f"SLURM_JOB_ID={job}".encode() in env
            and f"SLURM_PROCID={rank}".encode() in env
            and b"launch/train.py" in cmdline
        ):
            found[int(entry.name)] = ppid
    tops = [pid for pid, ppid in found.items() if ppid not in found]
    return tops[0] if tops else None


def submit(config: Path, folder: Path, *extra: str, omp: str | None = "1") -> str:
    """`launch/submit.py` on the local cluster (2 nodes x 1 task); returns the job id it printed."""
    cmd = [PYTHON, "launch/submit.py", "--config", str(config), "--nodes", "2", "--gpus-per-node", "0"]
    cmd += ["--tasks-per-node", "1", "--cpus-per-task", "1", "--timeout-min", "15", "--folder", str(folder)]
    env = _submit_env(omp)
    proc = subprocess.run(cmd + list(extra), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.split("submitted job ")[1].split(";")[0]


# --------------------------------------------------------------------------------------------- cluster tests


@pytest.mark.slurm
@pytest.mark.parametrize("script", ["slurm/pretrain.sh", "slurm/finetune_detr.sh"])
def test_batch_script_defaults(cluster, script):
    text = (ROOT / script).read_text()
    flags = [line.split(None, 1)[1].lstrip("-") for line in text.splitlines() if line.startswith("#SBATCH")]
    defaults = dict(flag.split("=", 1) if "=" in flag else (flag, "") for flag in flags)
    assert defaults["ntasks-per-node"] == defaults["gpus-per-node"], "one process per GPU"
    assert defaults["signal"].startswith("B:USR1@") and "requeue" in defaults and "%j" in defaults["output"]
    # Slurm itself accepts the directives; resource flags on the command line override the defaults
    # (this cluster has 2 CPUs and 2 fake GPUs per node).
    small = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1", "--time=5"]
    proc = subprocess.run(["sbatch", "--test-only", *small, script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr
    too_big = subprocess.run(["sbatch", "--test-only", script], cwd=ROOT, capture_output=True, text=True)
    assert too_big.returncode != 0, "the 8-GPU defaults cannot fit this 2-GPU-per-node cluster"


@pytest.fixture(scope="module")
def sbatch_run(cluster, fmnist_shards, tmp_path_factory):
    """The uninterrupted reference: `sbatch slurm/pretrain.sh`, 2 nodes x 1 task, to completion."""
    tmp = tmp_path_factory.mktemp("sbatch")
    run_dir = tmp / "run"
    log = tmp / "job.out"
    t0 = time.time()
    job = sbatch(write_config(tmp / "tiny.yaml", fmnist_shards, run_dir), log)
    state, code = wait_final(job, 600, log)
    print(f"sbatch 2x1 run: {time.time() - t0:.0f} s")
    return {"run_dir": run_dir, "log": log, "job": job, "state": state, "code": code}


@pytest.mark.slurm
def test_sbatch_pretrain_two_nodes_completes(sbatch_run):
    assert (sbatch_run["state"], sbatch_run["code"]) == ("COMPLETED", "0:0"), sbatch_run["log"].read_text()
    assert_finished_run(sbatch_run["run_dir"])
    text = sbatch_run["log"].read_text()
    assert "2 tasks on n[1-2]" in text and "world 2" in text
    assert f"finished at step {STEPS}" in text


@pytest.mark.slurm
def test_submitit_launcher_completes(sbatch_run, fmnist_shards, tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.time()
    job = submit(
        write_config(tmp_path / "tiny.yaml", fmnist_shards, run_dir), tmp_path / "submitit", "--wait"
    )
    print(f"submitit 2x1 run: {time.time() - t0:.0f} s")
    assert job_state(job) == ("COMPLETED", "0:0")
    assert_finished_run(run_dir)
    assert_same_losses(run_dir, sbatch_run["run_dir"])


THREADS_LINE = "threads torch 1 (OMP_NUM_THREADS=1), DALI 1, cpu budget 1"


@pytest.mark.slurm
@pytest.mark.parametrize("launcher", ["sbatch", "submitit"])
def test_every_rank_keeps_to_its_cpus_per_task(cluster, launcher, fmnist_shards, tmp_path):
    """--cpus-per-task 1 with no OMP_NUM_THREADS in the submitting shell and data.num_threads 4: inside
    each rank torch runs 1 intra-op thread and DALI 1 thread (the budget), under both launchers."""
    cfg = write_config(tmp_path / "tiny.yaml", fmnist_shards, tmp_path / "run", steps=3)  # warmup is 2
    cfg.write_text(cfg.read_text().replace('"num_threads": 1', '"num_threads": 4'))
    if launcher == "sbatch":
        log = tmp_path / "job.out"
        job = sbatch(cfg, log, omp=None)
        assert wait_final(job, 600, log) == ("COMPLETED", "0:0"), log.read_text()[-3000:]
        text = log.read_text()
    else:
        job = submit(cfg, tmp_path / "submitit", "--wait", omp=None)
        assert job_state(job) == ("COMPLETED", "0:0")
        text = "".join(p.read_text() for p in sorted((tmp_path / "submitit").glob("*_log.out")))
    for rank in (0, 1):
        assert f"rank {rank}: {THREADS_LINE}" in text, text[-3000:]


@pytest.mark.slurm
def test_sbatch_preempted_job_requeues_and_resumes(sbatch_run, fmnist_shards, tmp_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "job.out"
    t0 = time.time()
    # Submitted from outside the repository: the batch script finds it through `scontrol show job`.
    job = sbatch(write_config(tmp_path / "tiny.yaml", fmnist_shards, run_dir), log, cwd=tmp_path)
    wait_step(run_dir, 6, job, 400, log)
    # What Slurm does at `--signal=B:USR1@120`: signal the batch shell only; it relays to the step.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    # The requeued run is signalled again while its tasks are still starting up (importing torch):
    # they ignore USR1 until the trainer's handler is installed, and the batch script repeats it.
    deadline = time.time() + 300
    while f"job {job} restart 1:" not in log.read_text():
        assert time.time() < deadline and job_state(job)[0] not in FINAL_STATES, log.read_text()[-3000:]
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    state, code = wait_final(job, 600, log)
    print(f"sbatch run preempted twice: {time.time() - t0:.0f} s")
    text = log.read_text()
    assert (state, code) == ("COMPLETED", "0:0"), text
    first, second, third = text.split(f"job {job} restart ")[1:]
    assert first.startswith("0:") and second.startswith("1:") and third.startswith("2:"), "requeued twice"
    assert "batch script got SIGUSR1" in first and "batch script got SIGUSR1" in second
    stopped = int(first.split("stopped for preemption at step ")[1].split()[0])
    assert 6 <= stopped < STEPS
    assert f"at step {stopped}" in second, "resumed from the stop checkpoint"
    # Signalled before its handler existed, the second run survived; a repeated USR1 then stopped it (at
    # which step depends on how long start-up took), and the third run resumed from there.
    assert "repeating SIGUSR1" in second
    stopped2 = int(second.split("stopped for preemption at step ")[1].split()[0])
    assert stopped <= stopped2 < STEPS and f"at step {stopped2}" in third
    assert_finished_run(run_dir)  # exactly STEPS optimizer steps, none repeated across the requeues
    assert_same_losses(run_dir, sbatch_run["run_dir"])


@pytest.mark.slurm
def test_submitit_preempted_job_requeues_and_resumes(sbatch_run, fmnist_shards, tmp_path):
    run_dir = tmp_path / "run"
    folder = tmp_path / "submitit"
    t0 = time.time()
    job = submit(write_config(tmp_path / "tiny.yaml", fmnist_shards, run_dir), folder)
    log = folder / f"{job}_0_log.err"
    wait_step(run_dir, 6, job, 400, log)
    # submitit's own test hook (SlurmJob._interrupt) does the same: the preemption signal to every task.
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    state, code = wait_final(job, 600, log)
    print(f"submitit preempted + requeued run: {time.time() - t0:.0f} s")
    out = (folder / f"{job}_0_log.out").read_text()
    assert (state, code) == ("COMPLETED", "0:0"), out + log.read_text()
    assert "restart 1:" in out and "Requeued job" in out
    assert_finished_run(run_dir)
    assert_same_losses(run_dir, sbatch_run["run_dir"])
    import submitit

    results = submitit.SlurmJob(folder, job, tasks=(0, 1)).results()
    assert len(results) == 2


@pytest.mark.slurm
def test_dead_rank_fails_job_promptly_and_restart_resumes(sbatch_run, fmnist_shards, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "tiny.yaml", fmnist_shards, run_dir)
    log = tmp_path / "job.out"
    job = sbatch(config, log, "--no-requeue")
    wait_step(run_dir, 10, job, 400, log)  # past the step-8 checkpoint
    pid = rank_pid(job, 1)
    assert pid is not None, f"no rank-1 training process of job {job} found"
    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    state, code = wait_final(job, 120, log)
    ended_s = time.time() - t0
    print(f"job ended {ended_s:.1f} s after rank 1 was SIGKILLed: {state} {code}")
    assert state == "FAILED" and code != "0:0", log.read_text()
    # Promptly: srun --kill-on-bad-exit ends the step at once (measured ~1 s); without it, rank 0 would wait
    # for its collective until dist.timeout_s (60 s here).
    assert ended_s < 30, f"the job took {ended_s:.0f} s to fail after a rank died"
    killed_at = metrics_step(run_dir)
    assert killed_at < STEPS, "the job must not have finished"
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()

    # Resubmitting the same run resumes from the last complete checkpoint and ends where the
    # uninterrupted run ended, with the same losses (the steps after `latest` are recomputed).
    log2 = tmp_path / "job2.out"
    t0 = time.time()
    state, code = wait_final(sbatch(config, log2), 600, log2)
    print(f"restart after the crash: {time.time() - t0:.0f} s")
    assert (state, code) == ("COMPLETED", "0:0"), log2.read_text()
    assert f"resumed from {run_dir / 'checkpoints' / latest}" in log2.read_text()
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {m["step"]: m["train/loss_step"] for m in steps if m["kind"] == "step"}
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [m["step"] for m in steps if m["kind"] == "step"] == list(range(1, STEPS + 1)), (
        "no step logged twice"
    )
    for step, ref in tb_losses(sbatch_run["run_dir"]):
        assert losses[step] == pytest.approx(ref, rel=1e-4, abs=1e-5), f"step {step}"


@pytest.mark.slurm
def test_sbatch_finetune_detr_preempted_resumes(cluster, tmp_path):
    from detection_helpers import labelme_example

    data = labelme_example()
    run_dir = tmp_path / "run"
    log = tmp_path / "job.out"
    steps = 16
    overrides = [
        f"run_dir={run_dir}",
        f"schedule.total_steps={steps}",
        "eval.every_steps=1000",
        "eval.at_end=false",
        "checkpoint.every_steps=1000",
        "deepspeed.micro_batch=1",
    ]
    for split in ("train", "val"):
        overrides += [f"data.{split}_ann={data / 'annotations.json'}", f"data.{split}_images={data}"]
    env = dict(os.environ, CONFIG="configs/detr/labelme_overfit.yaml", OVERRIDES=" ".join(overrides))
    env.update(OMP_NUM_THREADS="1", PYTHON=PYTHON)
    # Fake GPUs (gres) are requested as on a GPU cluster; without CUDA the tasks train on CPU with gloo.
    cmd = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1"]
    cmd += ["--cpus-per-task=1", "--time=15", f"--output={log}", "slurm/finetune_detr.sh"]
    t0 = time.time()
    job = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout.strip()
    wait_step(run_dir, 4, job, 400, log)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    state, code = wait_final(job, 600, log)
    print(f"finetune_detr.sh preempted + requeued run: {time.time() - t0:.0f} s")
    text = log.read_text()
    assert (state, code) == ("COMPLETED", "0:0"), text
    first, second = text.split(f"job {job} restart ")[1:]
    assert "launch/finetune_detr.py" in first and "world 2" in first
    stopped = int(first.split("stopped for preemption at step ")[1].split()[0])
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:08d}'}" in second
    assert_finished_run(run_dir, steps)
    assert (run_dir / "detector.pth").is_file()


@pytest.mark.slurm
def test_scancel_without_signal_saves_and_resubmission_resumes(cluster, fmnist_shards, tmp_path):
    """`scancel JOB` with no --signal: Slurm sends SIGTERM to the tasks and the batch shell, then SIGKILL
    after KillWait (10 s on the local cluster, 30 s by default). The tasks agree on the stop within
    preemption.check_every_s, save and exit before KillWait; the job must not be requeued; resubmitting
    the same run resumes from the stop checkpoint and finishes exactly."""
    import re

    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "tiny.yaml", fmnist_shards, run_dir)
    log = tmp_path / "job.out"
    job = sbatch(config, log)
    wait_step(run_dir, 6, job, 400, log)
    t0 = time.time()
    subprocess.run(["scancel", job], check=True)
    state, _ = wait_final(job, 120, log)
    wait_gone(job, 60)
    ended_s = time.time() - t0
    text = log.read_text()
    assert state == "CANCELLED", text[-3000:]
    m = re.search(r"stopped for preemption at step (\d+)", text)
    assert m, f"the cancelled job did not save:\n{text[-4000:]}"
    stopped = int(m.group(1))
    tag = f"step_{stopped:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text() == tag
    assert (run_dir / "checkpoints" / tag / "trainer_state.json").is_file()
    assert "resubmit to resume from the checkpoint" in text, text[-3000:]
    assert not (run_dir / ".lease").exists(), "the cancelled run did not release its lease"
    print(f"scancel (SIGTERM): stopped at step {stopped}, checkpoint saved, job ended {ended_s:.1f} s later")

    log2 = tmp_path / "job2.out"
    state, code = wait_final(sbatch(config, log2), 600, log2)
    assert (state, code) == ("COMPLETED", "0:0"), log2.read_text()[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / tag} at step {stopped}" in log2.read_text()
    assert_finished_run(run_dir)


@pytest.mark.slurm
@pytest.mark.slow
def test_job_resubmitted_on_fewer_nodes_resumes_elastically(cluster, fmnist_shards, tmp_path):
    """A 2-node job is cancelled (scancel: SIGTERM, checkpoint saved, not requeued) and the same run is
    resubmitted with --nodes 1: the global batch 16 is kept (8 x 2 x 1 instead of 8 x 1 x 2), the stop
    checkpoint is converted to a universal one (2 ranks ZeRO-1 -> 1 rank), the data continue from the
    global samples consumed, and the run ends at STEPS with every optimizer step once."""
    import re

    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "tiny.yaml", fmnist_shards, run_dir)
    log = tmp_path / "job.out"
    t0 = time.time()
    job = sbatch(config, log)
    wait_step(run_dir, 6, job, 400, log)
    subprocess.run(["scancel", job], check=True)
    state, _ = wait_final(job, 120, log)
    wait_gone(job, 60)
    text = log.read_text()
    assert state == "CANCELLED" and "2 tasks on n[1-2]" in text and "world 2" in text, text[-3000:]
    m = re.search(r"stopped for preemption at step (\d+)", text)
    assert m, f"the cancelled job did not save:\n{text[-4000:]}"
    stopped = int(m.group(1))
    tag = f"step_{stopped:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text() == tag and stopped < STEPS

    log2 = tmp_path / "job2.out"
    state, code = wait_final(sbatch(config, log2, "--nodes=1"), 600, log2)
    print(f"2 nodes, cancelled at step {stopped}, resubmitted on 1 node: {time.time() - t0:.0f} s")
    text = log2.read_text()
    assert (state, code) == ("COMPLETED", "0:0"), text[-4000:]
    assert re.search(r"restart 0: 1 tasks on n[12],", text) and "batch 16 = 8 x 2 x 1" in text, text[-4000:]
    m = re.search(
        rf"elastic resume: 2 ranks, ZeRO-1 -> 1 ranks, ZeRO-1, converted {tag} to universal checkpoint "
        r"\S+ in ([\d.]+) s",
        text,
    )
    assert m, text[-4000:]
    print(f"ds_to_universal 2 ranks ZeRO-1 -> 1 rank ZeRO-1: {m.group(1)} s")
    samples = stopped * 16
    assert f"the data continue at epoch 0 + {samples} samples (global order) on 1 ranks" in text
    assert f"resumed from {run_dir / 'checkpoints' / tag} at step {stopped}" in text
    assert_finished_run(run_dir)  # latest = the final step, one TensorBoard loss per step, none repeated
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s["kind"] == "step"] == list(range(1, STEPS + 1))
