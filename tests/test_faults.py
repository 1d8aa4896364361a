"""Fault injection on real runs: killed and hung ranks, a kill during a checkpoint save, a full or read-only
checkpoint directory, bad shards, a NaN loss, invalid configs and a resume with another world size.

Every fault is real (SIGKILL/SIGSTOP of a training process found through /proc, a tmpfs that fills up, a
read-only mount, bytes cut off a shard, an lr that overflows fp32); nothing of DeepSpeed or the data
pipeline is mocked. Runs train pvt_v2_b0 at 32x32 on Fashion-MNIST (fp32, ZeRO-1, gloo) for a few steps.
Multi-rank runs start through torchrun or the deepspeed launcher, as users start them; the tests print the
measured figures (run with -s) that docs/reliability.md reports.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch_helpers import ROOT, TRAIN, free_port, rank_env

STEPS = 8
pytestmark = pytest.mark.faults


# ------------------------------------------------------------------------------------------------ helpers


@functools.cache
def train_main():
    """`main` of launch/train.py (a script, not a package), to run config checks in this process."""
    spec = importlib.util.spec_from_file_location("pvt_dist_launch_train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def launch(launcher: str, config: Path, *overrides: str, log: Path, nproc: int = 2) -> subprocess.Popen:
    """Start a training run in its own session (so a failed test can end all of it), output to `log`."""
    port = f"--master_port={free_port()}"
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", port, str(TRAIN)]
    elif launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}", port, str(TRAIN)]
    else:  # one plain process (world size 1)
        cmd = [sys.executable, str(TRAIN)]
    cmd += ["--config", str(config), *overrides]
    out = open(log, "w")  # noqa: SIM115 - closed by finish()
    proc = subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, env=rank_env(), cwd=ROOT, start_new_session=True
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


def run(launcher: str, config: Path, *overrides: str, log: Path, nproc: int = 2, timeout: float = 300):
    proc = launch(launcher, config, *overrides, log=log, nproc=nproc)
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


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the training processes under a launcher, from their environment (RANK=)."""
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
        if rank and any(c.endswith(b"train.py") for c in cmdline) and b"torch.distributed.run" not in cmdline:
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
        if rec["kind"] == "step":
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


@pytest.fixture(scope="module")
def fault_config(tmp_path_factory, fmnist_shards) -> Path:
    path = tmp_path_factory.mktemp("faults-cfg") / "tiny.yaml"
    path.write_text(
        f"""
model: {{name: pvt_v2_b0, drop_path_rate: 0.0}}
data:
  train_shards: {fmnist_shards}
  val_shards: {fmnist_shards}
  num_classes: 10
  train_size: 32
  val_size: 32
  crop_pct: 1.0
  num_threads: 1
  label_smoothing: 0.0
optim: {{lr: 2.0e-3, scale_lr: false, weight_decay: 0.01}}
schedule: {{total_steps: {STEPS}, warmup_steps: 1, min_lr: 1.0e-4}}
deepspeed: {{zero_stage: 1, precision: fp32, micro_batch: 16, grad_accum: 1}}
eval: {{every_steps: 1000, at_end: false}}
checkpoint: {{every_steps: 2, keep_last: 2}}
logging: {{log_every: 1, tensorboard: false}}
dist: {{backend: gloo, timeout_s: 20}}
"""
    )
    return path


@pytest.fixture
def mount_tmpfs():
    """mount_tmpfs(dir, "size=80m" | "ro"): a real filesystem with its own limits, unmounted afterwards."""
    mounted: list[Path] = []

    def mount(path: Path, options: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


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


# ------------------------------------------------------------------------------------------------- data


def _shard_from(src: Path, dst: Path, n: int, corrupt: set[int] = frozenset()) -> list[str]:
    """Write the first n samples of `src` to `dst` (+ DALI index); samples in `corrupt` get their JPEG
    cut in half (a partially written file). Returns the keys."""
    import webdataset as wds
    from wds2idx import IndexCreator

    keys = []
    with wds.TarWriter(str(dst)) as sink:
        for i, sample in enumerate(wds.WebDataset(str(src), shardshuffle=False)):
            if i == n:
                break
            jpg = sample["jpg"][: len(sample["jpg"]) // 2] if i in corrupt else sample["jpg"]
            sink.write({"__key__": sample["__key__"], "jpg": jpg, "cls": sample["cls"]})
            keys.append(sample["__key__"])
    with IndexCreator(str(dst), str(dst.with_suffix(".idx")), verbose=False) as ic:
        ic.create_index()
    return keys


def test_corrupt_jpeg_stops_naming_shard_and_key(fault_config, fmnist_shards, tmp_path):
    """Policy: a JPEG the decoder rejects fails the run at that batch, naming config key, shard and key;
    nothing is skipped silently, and checkpoints taken before stay complete."""
    shard = tmp_path / "train-000000.tar"
    keys = _shard_from(fmnist_shards / "train-000000.tar", shard, 96, corrupt={40})
    run_dir = tmp_path / "run"
    rc, out = run(
        "single", fault_config, f"run_dir={run_dir}", f"data.train_shards={shard}", log=tmp_path / "c.log"
    )
    assert rc != 0
    assert f"data.train_shards: DALI failed on shard {shard}, sample '{keys[40]}' (.jpg)" in out, out[-4000:]
    done = steps_logged(run_dir)
    assert not done or max(done) < 6, "an epoch of 6 batches cannot complete around a corrupt sample"
    if latest(run_dir):
        assert_complete(run_dir, latest(run_dir))
    print(f"\n[faults] corrupt JPEG: run stopped after {max(done, default=0)} steps")


def test_truncated_shard_fails_at_start(fault_config, fmnist_shards, tmp_path):
    """A shard cut short (copy interrupted) is caught from its index before the first step."""
    for i in range(2):
        _shard_from(fmnist_shards / f"train-00000{i}.tar", tmp_path / f"train-00000{i}.tar", 64)
    tar = tmp_path / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    run_dir = tmp_path / "run"
    spec = tmp_path / "train-{000000..000001}.tar"
    rc, out = run(
        "single", fault_config, f"run_dir={run_dir}", f"data.train_shards={spec}", log=tmp_path / "t.log"
    )
    assert rc != 0
    assert f"data.train_shards: shard {tar} is truncated: sample" in out, out[-4000:]
    assert not steps_logged(run_dir) and latest(run_dir) is None


def test_missing_shard_is_a_config_error(fault_config, fmnist_shards, tmp_path, capsys):
    """A shard named by the pattern but absent: exit 2 at config time, no process group, no run dir."""
    import torch.distributed as dist

    main = train_main()
    run_dir = tmp_path / "run"
    spec = fmnist_shards / "train-{000000..000004}.tar"  # the set has 000000..000003
    assert main(["--config", str(fault_config), f"run_dir={run_dir}", f"data.train_shards={spec}"]) == 2
    err = capsys.readouterr().err
    assert f"data.train_shards: shard {fmnist_shards / 'train-000004.tar'} does not exist" in err
    assert not dist.is_initialized() and not run_dir.exists()


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


# ------------------------------------------------------------------------------------- invalid configs

INVALID = [
    # (overrides, the message must contain)
    (["optim.lr=-1"], "optim.lr: must be positive"),
    (["optim.lr=fast"], "optim.lr: expected a number"),
    (["optim.lrate=1e-3"], "optim.lrate: unknown key"),
    (["trainer.epochs=3"], "trainer: unknown key"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage: must be 0, 1, 2 or 3"),
    (["deepspeed.zero_stage=two"], "deepspeed.zero_stage: expected an integer"),
    (["deepspeed.precision=fp8"], "deepspeed.precision: must be one of"),
    (["deepspeed.global_batch=48"], "deepspeed.global_batch: 48 != micro_batch 16 x grad_accum 1"),
    (["deepspeed.micro_batch=0"], "deepspeed.micro_batch: must be positive"),
    (["deepspeed.grad_clip=-1"], "deepspeed.grad_clip: must be > 0 or null"),
    (["deepspeed.offload_optimizer=cpu", "deepspeed.zero_stage=0"], "deepspeed.offload_optimizer: needs"),
    (["deepspeed.config_file=/nonexistent/ds.json"], "deepspeed.config_file: file not found"),
    (["deepspeed=3"], "deepspeed: expected a mapping"),
    (["model.name=pvt_huge"], "model.name: unknown model 'pvt_huge'"),
    (["model.num_classes=5"], "model.num_classes: 5 != data.num_classes 10"),
    (["model.img_size=30"], "model.img_size: must be a positive multiple of 32"),
    (["model.drop_path_rate=1.5"], "model.drop_path_rate: must be in [0, 1)"),
    (["model.pretrained=/nonexistent/w.pth"], "model.pretrained: file not found"),
    (["model.grad_checkpointing=maybe"], "model.grad_checkpointing: expected true or false"),
    (["optim.betas=[0.9]"], "optim.betas: expected 2 entries"),
    (["optim.weight_decay=-0.05"], "optim.weight_decay: must be >= 0"),
    (["schedule.total_steps=-5"], "schedule.total_steps: must be positive"),
    (["schedule.min_lr=1.0"], "schedule.min_lr: 1.0 exceeds the peak lr"),
    (["data.train_shards=/nonexistent/shards"], "data.train_shards:"),
    (["data.val_shards="], "data.val_shards:"),
    (["data.num_classes=0"], "data.num_classes: must be a positive integer"),
    (["data.crop_pct=1.5"], "data.crop_pct: must be in (0, 1]"),
    (["data.backend=opencv"], "data.backend:"),
    (["data.num_threads=1.5"], "data.num_threads: expected an integer"),
    (["data.rand_augment=rand-x9"], "data.rand_augment: cannot parse"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last: must be >= 1"),
    (
        ["ema.enabled=true", "deepspeed.zero_stage=3"],
        "ema.enabled: not supported with deepspeed.zero_stage 3",
    ),
    (["ema.decay=1.5"], "ema.decay: must be in (0, 1)"),
    (["logging.log_every=0"], "logging.log_every: must be positive"),
    (["dist.timeout_s=0"], "dist.timeout_s: must be positive"),
    (["dist.master_port=70000"], "dist.master_port: not a port number"),
    (["dist.backend=mpi"], "dist.backend: must be one of"),
    (["dist.backend=nccl"], "dist.backend: nccl needs CUDA"),
    (["optim.lr"], "override 'optim.lr': expected key=value"),
]


@pytest.mark.parametrize("overrides,message", INVALID, ids=[" ".join(o) for o, _ in INVALID])
def test_invalid_config_is_rejected_before_any_process_group(
    fault_config, tmp_path, capsys, overrides, message
):
    """Each bad value: exit 2, the message names the key, no process group, no run directory."""
    import torch.distributed as dist

    main = train_main()
    if "dist.backend=nccl" in overrides and torch.cuda.is_available():
        pytest.skip("nccl is valid on a GPU machine")
    run_dir = tmp_path / "run"
    assert main(["--config", str(fault_config), f"run_dir={run_dir}", *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err, err[-2000:]
    assert not dist.is_initialized()
    assert not run_dir.exists()


def test_invalid_config_files_are_rejected(fault_config, tmp_path, capsys):
    """Errors inside the YAML file itself: a nested unknown key, a wrong type, broken YAML, a missing file."""
    import torch.distributed as dist

    main = train_main()
    cases = {
        "nested unknown key": ("optim: {lr: 1.0e-3, lr_decay: 0.9}\n", "optim.lr_decay: unknown key"),
        "wrong type": ("schedule: {total_steps: [1, 2]}\n", "schedule.total_steps: expected"),
        "broken YAML": ("optim: {lr: 1.0e-3\n", "is not valid YAML"),
    }
    for name, (body, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.yaml"
        path.write_text(f"_base_: {fault_config}\n{body}")
        assert main(["--config", str(path), f"run_dir={tmp_path / 'run'}"]) == 2, name
        assert message in capsys.readouterr().err, name
    assert main(["--config", str(tmp_path / "absent.yaml"), f"run_dir={tmp_path / 'run'}"]) == 2
    assert "config: file not found" in capsys.readouterr().err
    assert not dist.is_initialized() and not (tmp_path / "run").exists()
