"""Elastic resume: a 2-rank ZeRO-2 bf16 run, stopped mid-epoch by the preemption signal, continues on another
world size or ZeRO stage through DeepSpeed's universal checkpoint (pvt_dist/engine/universal.py).

The runs are real (torchrun / one process, gloo, pvt_v2_b0 at 32 px on the Fashion-MNIST shards). The stop
lands exactly on the step-STOP checkpoint: the tests' pause hook holds every rank inside that save and
SIGUSR1 arrives meanwhile. Run with -s for the loss table and the conversion time.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
from fault_helpers import export_and_load, finish, latest, launch, rank_pids, run, steps_logged, wait_until
from launch_helpers import tiny_run_yaml

STEPS, STOP = 24, 16  # the epoch is 2048 / 64 = 32 steps: the stop is mid-epoch
# Same world, other ZeRO stage: the data position and every rank's RNG continue, so the losses differ from
# the uninterrupted run's only by the order of bf16 reductions and the ZeRO-3 parameter gathers.
SAME_DATA_TOL = 0.02
# Another world: the per-rank data plan of the interrupted epoch cannot continue (the run goes on with the
# next epoch), so the next losses are of other batches: their mean over the 8 steps after the stop is
# compared (the loss of one batch of 64 spreads by ~0.13 around the trend here, a mean of 8 by ~0.05). A
# resume that lost the weights or Adam moments would be back at the loss of the first steps (~2.3, against
# ~2.0 after the stop), which the test checks lies outside.
OTHER_DATA_TOL = 0.15


@pytest.fixture(scope="module")
def elastic_config(tmp_path_factory, fmnist_shards) -> Path:
    path = tmp_path_factory.mktemp("elastic-cfg") / "tiny.yaml"
    rest = f"""
optim: {{lr: 3.0e-3, scale_lr: false, weight_decay: 0.01}}
schedule: {{total_steps: {STEPS}, warmup_steps: 1, min_lr: 1.0e-4}}
deepspeed: {{zero_stage: 2, precision: bf16, global_batch: 64, micro_batch: 32}}
eval: {{every_steps: 1000, at_end: false}}
checkpoint: {{every_steps: {STOP}, keep_last: 2}}
logging: {{log_every: 4, tensorboard: false}}
dist: {{timeout_s: 120}}
"""
    path.write_text(tiny_run_yaml(fmnist_shards, rest))
    return path


@pytest.fixture(scope="module")
def baseline(elastic_config, tmp_path_factory) -> dict[int, float]:
    """Per-step losses of the uninterrupted 2-rank run."""
    tmp = tmp_path_factory.mktemp("baseline")
    rc, out = run("torchrun", elastic_config, f"run_dir={tmp / 'run'}", log=tmp / "run.log")
    assert rc == 0, out[-6000:]
    losses = steps_logged(tmp / "run")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


@pytest.fixture(scope="module")
def preempted(elastic_config, tmp_path_factory) -> Path:
    """Run dir of the same run stopped by SIGUSR1 at step STOP (mid-epoch); tests resume copies of it."""
    tmp = tmp_path_factory.mktemp("preempted")
    run_dir, marker = tmp / "run", tmp / "paused"
    pause = {"PVT_DIST_TEST_PAUSE_BEFORE_LATEST": f"{STOP}:3:{marker}"}
    proc = launch("torchrun", elastic_config, f"run_dir={run_dir}", log=tmp / "run.log", env=pause)
    wait_until(lambda: Path(f"{marker}.rank0").is_file(), proc, 300, f"the step-{STOP} save")
    for pid in rank_pids(proc.pid).values():
        os.kill(pid, signal.SIGUSR1)
    rc = finish(proc, 120)
    out = proc.log_path.read_text()
    assert rc == 0 and f"stopped for preemption at step {STOP} " in out, out[-4000:]
    assert latest(run_dir) == f"step_{STOP:08d}" and max(steps_logged(run_dir)) == STOP
    return run_dir


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*")
            if p.is_file()}  # fmt: skip


def resume(preempted: Path, tmp_path: Path, config: Path, nproc: int, *overrides: str) -> tuple[Path, str]:
    run_dir = tmp_path / "run"
    shutil.copytree(preempted, run_dir)
    original = run_dir / "checkpoints" / f"step_{STOP:08d}"
    before = tree_digest(original)
    launcher = "torchrun" if nproc > 1 else "single"
    rc, out = run(
        launcher, config, f"run_dir={run_dir}", *overrides, log=tmp_path / "resume.log", nproc=nproc
    )
    assert rc == 0, out[-6000:]
    assert tree_digest(original) == before, "the conversion modified the original checkpoint"
    return run_dir, out


def loss_table(baseline: dict, resumed: dict, label: str) -> list[tuple[int, float, float]]:
    rows = [(s, baseline[s], resumed[s]) for s in range(STOP + 1, STOP + 6)]
    print(f"\n[elastic] {label}: step | baseline | resumed | diff")
    for s, a, b in rows:
        print(f"[elastic]   {s} | {a:.4f} | {b:.4f} | {b - a:+.4f}")
    return rows


def check_resumed_steps(run_dir: Path, baseline: dict) -> dict[int, float]:
    """Every step once, the run ends at STEPS, the steps before the stop are the baseline's own."""
    losses = steps_logged(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(losses[s] == baseline[s] for s in range(1, STOP + 1))
    assert latest(run_dir) == f"step_{STEPS:08d}"
    return losses


def conversion_seconds(out: str, source: str, target: str) -> float:
    m = re.search(
        rf"elastic resume: {source} -> {target}, converted step_{STOP:08d} to universal checkpoint (\S+) "
        r"in ([\d.]+) s",
        out,
    )
    assert m, out[-4000:]
    assert (Path(m.group(1)) / "zero").is_dir()
    return float(m.group(2))


@pytest.mark.parametrize(
    "stage", [2, pytest.param(1, marks=pytest.mark.slow)], ids=["zero2-to-zero2", "zero2-to-zero1"]
)
def test_preempted_run_resumes_on_one_rank(stage, elastic_config, baseline, preempted, tmp_path):
    """2 ranks -> 1 rank (global batch 64 = 32 x accum 2): the universal checkpoint is made once, next to
    the untouched original; the run ends at STEPS with every step once; its next losses continue the
    trained state (within OTHER_DATA_TOL of the baseline, far from the first steps); the export loads."""
    run_dir, out = resume(preempted, tmp_path, elastic_config, 1, f"deepspeed.zero_stage={stage}")
    seconds = conversion_seconds(out, "2 ranks, ZeRO-2", f"1 ranks, ZeRO-{stage}")
    print(f"\n[elastic] ds_to_universal 2 ranks ZeRO-2 -> 1 rank ZeRO-{stage}: {seconds:.1f} s")
    assert "batch 64 = 32 x 2 x 1" in out
    assert "mid-epoch 0 (batch 16 per rank)" in out
    assert "continues at the start of epoch 1 and its last 16 batches per rank of epoch 0 are not read" in out
    losses = check_resumed_steps(run_dir, baseline)
    loss_table(baseline, losses, f"2 ranks ZeRO-2 -> 1 rank ZeRO-{stage}")
    after = range(STOP + 1, STEPS + 1)  # the means over all 8 steps after the stop
    resumed_mean = sum(losses[s] for s in after) / len(after)
    baseline_mean = sum(baseline[s] for s in after) / len(after)
    first_mean = sum(baseline[s] for s in range(1, 6)) / 5  # the state of an untrained model
    print(
        f"[elastic]   means: baseline {baseline_mean:.4f}, resumed {resumed_mean:.4f}, "
        f"steps 1-5 {first_mean:.4f}"
    )
    assert abs(resumed_mean - baseline_mean) < OTHER_DATA_TOL
    assert first_mean - baseline_mean > OTHER_DATA_TOL, "the control must fall outside the tolerance"
    sd = export_and_load(run_dir, tmp_path / "weights.pth")
    assert len(sd) > 100


@pytest.mark.slow
def test_preempted_run_resumes_at_zero3_with_the_same_losses(elastic_config, baseline, preempted, tmp_path):
    """2 ranks ZeRO-2 -> 2 ranks ZeRO-3: the data position and RNG continue, so the next 5 losses are the
    baseline's within SAME_DATA_TOL, while a run with another seed (other batches, other init) is not."""
    run_dir, out = resume(preempted, tmp_path, elastic_config, 2, "deepspeed.zero_stage=3")
    seconds = conversion_seconds(out, "2 ranks, ZeRO-2", "2 ranks, ZeRO-3")
    print(f"\n[elastic] ds_to_universal 2 ranks ZeRO-2 -> 2 ranks ZeRO-3: {seconds:.1f} s")
    losses = check_resumed_steps(run_dir, baseline)
    rows = loss_table(baseline, losses, "2 ranks ZeRO-2 -> 2 ranks ZeRO-3")
    assert max(abs(b - a) for _, a, b in rows) < SAME_DATA_TOL
    other = tmp_path / "seed1"
    rc, out = run(
        "torchrun", elastic_config, f"run_dir={other}", "seed=1", f"schedule.total_steps={STEPS}",
        f"checkpoint.every_steps={STEPS}", log=tmp_path / "seed1.log",
    )  # fmt: skip
    assert rc == 0, out[-4000:]
    control = loss_table(baseline, steps_logged(other), "control: another seed, uninterrupted")
    assert max(abs(b - a) for _, a, b in control) > SAME_DATA_TOL
