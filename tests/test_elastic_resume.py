"""Elastic resume: a 2-rank ZeRO-2 bf16 run, stopped mid-epoch by the preemption signal, continues on another
world size or ZeRO stage through DeepSpeed's universal checkpoint (pvt_dist/engine/universal.py), reading
exactly the samples the uninterrupted run reads (the global order, pvt_dist/data/order.py).

The runs are real (torchrun / one process, gloo, pvt_v2_b0 at 32 px on the Fashion-MNIST shards). The stop
lands exactly on the step-STOP checkpoint: the tests' pause hook holds every rank inside that save and
SIGUSR1 arrives meanwhile. Every rank records the keys of the batches it reads (PVT_DIST_TEST_RECORD_KEYS).
Run with -s for the loss tables and the conversion time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from detection_helpers import labelme_example
from fault_helpers import export_and_load, finish, latest, launch, rank_pids, run, steps_logged, wait_until
from launch_helpers import ROOT, rank_env, tiny_run_yaml

STEPS, STOP = 32, 16  # one epoch: 2048 samples / global batch 64; the stop is half way through it
GLOBAL, TRAIN_SAMPLES = 64, 2048
# The fallback backend augments each sample from (seed, epoch, its global number), so the resumed run
# computes on the same tensors at any world size: its losses differ from the uninterrupted run's only by
# the order of bf16 gradient reductions (2 ranks' all-reduce vs 2 micro batches accumulated on one, or
# ZeRO-3's gathers), which grows over the steps; 0.02 over the first 5 steps after the stop.
SAME_TENSORS_TOL = 0.02
KEYS = "PVT_DIST_TEST_RECORD_KEYS"


def elastic_yaml(shards, backend: str, offload: bool = False) -> str:
    """``offload``: the optimizer states on CPU (ZeRO-Offload, DeepSpeedCPUAdam)."""
    cpu = ", offload_optimizer: cpu" if offload else ""
    rest = f"""
optim: {{lr: 3.0e-3, scale_lr: false, weight_decay: 0.01}}
schedule: {{total_steps: {STEPS}, warmup_steps: 1, min_lr: 1.0e-4}}
deepspeed: {{zero_stage: 2, precision: bf16, global_batch: {GLOBAL}, micro_batch: 32{cpu}}}
eval: {{every_steps: 1000, at_end: false}}
checkpoint: {{every_steps: {STOP}, keep_last: 2}}
logging: {{log_every: 4, tensorboard: false}}
dist: {{timeout_s: 120}}
"""
    return tiny_run_yaml(shards, rest, backend=backend, fallback_workers=0)


class Runs:
    """The baseline and the preempted run of one data backend, made once per module."""

    def __init__(self, root: Path, shards):
        self.root, self.shards, self.made = root, shards, {}

    def config(self, backend: str) -> Path:
        """``backend``: the data backend, "+offload" appended for the optimizer states on CPU."""
        path = self.root / f"{backend}.yaml"
        if not path.is_file():
            name, _, offload = backend.partition("+")
            path.write_text(elastic_yaml(self.shards, name, offload == "offload"))
        return path

    def baseline(self, backend: str, stage: int = 2) -> tuple[dict, Path]:
        """(per-step losses, keys prefix) of the uninterrupted 2-rank run at ZeRO-``stage``."""
        if ("base", backend, stage) not in self.made:
            d = self.root / f"base-{backend}-{stage}"
            log, env = self.root / f"base-{backend}-{stage}.log", {KEYS: str(d / "keys")}
            args = (f"run_dir={d / 'run'}", f"deepspeed.zero_stage={stage}")
            rc, out = run("torchrun", self.config(backend), *args, log=log, env=env)
            assert rc == 0, out[-6000:]
            losses = steps_logged(d / "run")
            assert sorted(losses) == list(range(1, STEPS + 1))
            self.made["base", backend, stage] = losses, d / "keys"
        return self.made["base", backend, stage]

    def other_seed(self, backend: str) -> dict:
        """Per-step losses of the uninterrupted run with seed 1 (the control of the loss tolerance)."""
        if ("seed1", backend) not in self.made:
            d = self.root / f"seed1-{backend}"
            log = self.root / f"seed1-{backend}.log"
            rc, out = run("torchrun", self.config(backend), f"run_dir={d}", "seed=1", log=log)
            assert rc == 0, out[-4000:]
            self.made["seed1", backend] = steps_logged(d)
        return self.made["seed1", backend]

    def preempted(self, backend: str, stage: int = 2) -> tuple[Path, Path]:
        """(run dir, keys prefix) of the same run stopped by SIGUSR1 at step STOP; tests resume copies."""
        if ("stop", backend, stage) not in self.made:
            d = self.root / f"stop-{backend}-{stage}"
            run_dir, marker = d / "run", d / "paused"
            env = {"PVT_DIST_TEST_PAUSE_BEFORE_LATEST": f"{STOP}:3:{marker}", KEYS: str(d / "keys")}
            d.mkdir()
            args = (f"run_dir={run_dir}", f"deepspeed.zero_stage={stage}")
            proc = launch("torchrun", self.config(backend), *args, log=d / "run.log", env=env)
            wait_until(lambda: Path(f"{marker}.rank0").is_file(), proc, 300, f"the step-{STOP} save")
            for pid in rank_pids(proc.pid).values():
                os.kill(pid, signal.SIGUSR1)
            rc = finish(proc, 120)
            out = proc.log_path.read_text()
            assert rc == 0 and f"stopped for preemption at step {STOP} " in out, out[-4000:]
            assert latest(run_dir) == f"step_{STOP:08d}" and max(steps_logged(run_dir)) == STOP
            self.made["stop", backend, stage] = run_dir, d / "keys"
        return self.made["stop", backend, stage]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fmnist_shards) -> Runs:
    return Runs(tmp_path_factory.mktemp("elastic"), fmnist_shards)


def step_keys(prefix: Path, world: int, accum: int, first_step: int) -> dict[int, Counter]:
    """{step: keys read by all ranks in that step} from the ranks' key records."""
    out: dict[int, Counter] = {}
    for r in range(world):
        lines = Path(f"{prefix}.rank{r}").read_text().splitlines()
        for i, line in enumerate(lines):
            out.setdefault(first_step + i // accum, Counter()).update(json.loads(line)["keys"])
    return out


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*")
            if p.is_file()}  # fmt: skip


def resume(
    runs: Runs, backend: str, tmp_path: Path, nproc: int, *overrides: str, stage: int = 2
) -> tuple[Path, str, Path]:
    """Resume a copy of the ZeRO-``stage`` preempted run on ``nproc`` ranks: (run dir, output, keys)."""
    preempted, _ = runs.preempted(backend, stage)
    run_dir, keys = tmp_path / "run", tmp_path / "keys"
    shutil.copytree(preempted, run_dir)
    original = run_dir / "checkpoints" / f"step_{STOP:08d}"
    before = tree_digest(original)
    rc, out = run("torchrun" if nproc > 1 else "single", runs.config(backend), f"run_dir={run_dir}",
                  *overrides, log=tmp_path / "resume.log", nproc=nproc, env={KEYS: str(keys)})  # fmt: skip
    assert rc == 0, out[-6000:]
    assert tree_digest(original) == before, "the conversion modified the original checkpoint"
    return run_dir, out, keys


def conversion_seconds(out: str, source: str, target: str, stop: int = STOP) -> float:
    m = re.search(
        rf"elastic resume: {source} -> {target}, converted step_{stop:08d} to universal checkpoint (\S+) "
        r"in ([\d.]+) s",
        out,
    )
    assert m, out[-4000:]
    assert (Path(m.group(1)) / "zero").is_dir()
    return float(m.group(2))


def check_steps_and_keys(
    runs: Runs, backend: str, run_dir: Path, keys: Path, world: int, stage: int = 2
) -> dict[int, float]:
    """Every step once, ending at STEPS, the steps before the stop the baseline's own; over the epoch the
    keys read are the split's, each once, and every step reads the baseline's step's samples."""
    baseline, base_keys = runs.baseline(backend, stage)
    _, stop_keys = runs.preempted(backend, stage)
    losses = steps_logged(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(losses[s] == baseline[s] for s in range(1, STOP + 1))
    assert latest(run_dir) == f"step_{STEPS:08d}"
    expected = step_keys(base_keys, 2, 1, 1)
    micro = min(32, GLOBAL // world)  # the config's cap, resolved for this world (resolve_batch)
    read = step_keys(stop_keys, 2, 1, 1) | step_keys(keys, world, GLOBAL // (world * micro), STOP + 1)
    assert sorted(read) == list(range(1, STEPS + 1))
    epoch = sum(read.values(), Counter())
    assert len(epoch) == TRAIN_SAMPLES and set(epoch.values()) == {1}, "each sample of the epoch once"
    assert all(read[s] == expected[s] for s in read), "a step read other samples than the baseline's"
    print(f"\n[elastic] {backend}: epoch 0 read {len(epoch)} distinct keys, each once; all {STEPS} steps "
          "read the baseline's samples")  # fmt: skip
    return losses


def loss_rows(baseline: dict, losses: dict, label: str) -> list[tuple[int, float, float]]:
    rows = [(s, baseline[s], losses[s]) for s in range(STOP + 1, STOP + 6)]
    print(f"[elastic] {label}: step | baseline | resumed | diff")
    for s, a, b in rows:
        print(f"[elastic]   {s} | {a:.4f} | {b:.4f} | {b - a:+.4f}")
    return rows


@pytest.mark.parametrize(
    "stage", [2, pytest.param(1, marks=pytest.mark.slow)], ids=["zero2-to-zero2", "zero2-to-zero1"]
)
def test_preempted_run_resumes_on_one_rank(stage, runs, tmp_path):
    """DALI, 2 ranks -> 1 rank (global batch 64 = 32 x accum 2): the universal checkpoint is made once,
    next to the untouched original; the run ends at STEPS with every step once; every step reads the
    baseline's samples and the epoch's keys are each read once; the export loads. (DALI's augmentation
    RNGs are per rank and start afresh, so the losses are compared on the fallback backend below.)"""
    run_dir, out, keys = resume(runs, "dali", tmp_path, 1, f"deepspeed.zero_stage={stage}")
    seconds = conversion_seconds(out, "2 ranks, ZeRO-2", f"1 ranks, ZeRO-{stage}")
    print(f"\n[elastic] ds_to_universal 2 ranks ZeRO-2 -> 1 rank ZeRO-{stage}: {seconds:.1f} s")
    assert "batch 64 = 32 x 2 x 1" in out
    assert "elastic resume: the data continue at epoch 0 + 1024 samples (global order) on 1 ranks" in out
    losses = check_steps_and_keys(runs, "dali", run_dir, keys, 1)
    loss_rows(runs.baseline("dali")[0], losses, f"dali 2 ranks ZeRO-2 -> 1 rank ZeRO-{stage}")
    sd = export_and_load(run_dir, tmp_path / "weights.pth")
    assert len(sd) > 100


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_resumed_losses_match_the_uninterrupted_run(stage, runs, tmp_path):
    """Fallback backend (augmentation by global sample number), 2 ranks -> 1 rank at the same ZeRO stage:
    the next 5 losses are the uninterrupted run's within SAME_TENSORS_TOL; a run with another seed is not.
    ZeRO-3 -> ZeRO-2 is refused before anything is converted (DeepSpeed cannot load it)."""
    if stage == 3:
        refused = tmp_path / "refused"
        shutil.copytree(runs.preempted("fallback", 3)[0], refused)
        rc, out = run("single", runs.config("fallback"), f"run_dir={refused}", "deepspeed.zero_stage=2",
                      log=tmp_path / "refused.log")  # fmt: skip
        assert rc != 0 and "do not cross between ZeRO-1/2 and ZeRO-3" in out, out[-4000:]
        assert not (refused / "checkpoints" / f"step_{STOP:08d}_universal").exists()
        assert max(steps_logged(refused)) == STOP
    run_dir, out, keys = resume(runs, "fallback", tmp_path, 1, f"deepspeed.zero_stage={stage}", stage=stage)
    seconds = conversion_seconds(out, f"2 ranks, ZeRO-{stage}", f"1 ranks, ZeRO-{stage}")
    print(f"\n[elastic] ds_to_universal 2 ranks ZeRO-{stage} -> 1 rank ZeRO-{stage}: {seconds:.1f} s")
    losses = check_steps_and_keys(runs, "fallback", run_dir, keys, 1, stage)
    baseline = runs.baseline("fallback", stage)[0]
    rows = loss_rows(baseline, losses, f"fallback 2 ranks ZeRO-{stage} -> 1 rank ZeRO-{stage}")
    assert max(abs(b - a) for _, a, b in rows) < SAME_TENSORS_TOL
    control = loss_rows(baseline, runs.other_seed("fallback"), "control: seed 1, uninterrupted")
    assert max(abs(b - a) for _, a, b in control) > SAME_TENSORS_TOL


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_preempted_run_resumes_on_four_ranks(stage, runs, tmp_path):
    """Fallback backend, 2 ranks -> 4 ranks (torchrun 4 x 1 thread) at the same ZeRO stage: the global batch
    64 is re-derived as 16 x 1 x 4; every step reads the baseline's samples, the next 5 losses are the
    uninterrupted run's within SAME_TENSORS_TOL (4 ranks' bf16 all-reduce instead of 2), the export loads."""
    run_dir, out, keys = resume(runs, "fallback", tmp_path, 4, f"deepspeed.zero_stage={stage}", stage=stage)
    seconds = conversion_seconds(out, f"2 ranks, ZeRO-{stage}", f"4 ranks, ZeRO-{stage}")
    print(f"\n[elastic] ds_to_universal 2 ranks ZeRO-{stage} -> 4 ranks ZeRO-{stage}: {seconds:.1f} s")
    assert "batch 64 = 16 x 1 x 4" in out
    assert "elastic resume: the data continue at epoch 0 + 1024 samples (global order) on 4 ranks" in out
    losses = check_steps_and_keys(runs, "fallback", run_dir, keys, 4, stage)
    rows = loss_rows(runs.baseline("fallback", stage)[0], losses, f"fallback 2 ranks ZeRO-{stage} -> 4 ranks")
    assert max(abs(b - a) for _, a, b in rows) < SAME_TENSORS_TOL
    assert len(export_and_load(run_dir, tmp_path / "weights.pth")) > 100


DETR = ROOT / "launch" / "finetune_detr.py"
DETR_STEPS, DETR_STOP = 6, 3  # 3 photos, global batch 2: 2 steps per epoch; the stop is mid-epoch 1


@pytest.mark.slow
def test_detr_preempted_on_two_ranks_resumes_on_one(tmp_path):
    """Stage 2 through stage 1's elastic path: DETR on the labelme photos, 2 ranks ZeRO-2 bf16 (global batch
    2 = 1 x 1 x 2), stopped by SIGUSR1 on its step-3 checkpoint, resumes on 1 rank with the global batch
    kept (1 x 2 x 1): the checkpoint is converted to a universal one next to the untouched original, the
    run ends at step 6 with every step once, and its export scores the run's own final COCO AP.

    Stage 2's loaders keep a per-rank position (no global order), so a mid-epoch checkpoint resumes at the
    next epoch's start, and the log says what of the interrupted epoch is not read."""
    root = labelme_example()
    run_dir, marker = tmp_path / "run", tmp_path / "paused"
    ann = root / "annotations.json"
    config = ROOT / "configs" / "detr" / "labelme_overfit.yaml"
    overrides = [
        f"run_dir={run_dir}",
        f"data.train_ann={ann}",
        f"data.train_images={root}",
        f"data.val_ann={ann}",
        f"data.val_images={root}",
        f"schedule.total_steps={DETR_STEPS}",
        f"checkpoint.every_steps={DETR_STOP}",
        "checkpoint.keep_last=2",  # the step-3 original stays next to step 6, to be compared
        "eval.every_steps=1000",
        "logging.log_every=1",
        "deepspeed.zero_stage=2",
        "deepspeed.precision=bf16",
        "deepspeed.global_batch=2",
        "deepspeed.micro_batch=1",
        "dist.timeout_s=120",
    ]
    env = {"PVT_DIST_TEST_PAUSE_BEFORE_LATEST": f"{DETR_STOP}:3:{marker}"}
    proc = launch("torchrun", config, *overrides, log=tmp_path / "two.log", env=env, script=DETR)
    wait_until(lambda: Path(f"{marker}.rank0").is_file(), proc, 300, f"the step-{DETR_STOP} save")
    for pid in rank_pids(proc.pid, DETR.name).values():
        os.kill(pid, signal.SIGUSR1)
    rc = finish(proc, 120)
    out = proc.log_path.read_text()
    assert rc == 0 and f"stopped for preemption at step {DETR_STOP} " in out, out[-4000:]
    assert "world 2 | ZeRO-2 bf16 | batch 2 = 1 x 1 x 2" in out
    assert latest(run_dir) == f"step_{DETR_STOP:08d}" and sorted(steps_logged(run_dir)) == [1, 2, 3]
    original = run_dir / "checkpoints" / f"step_{DETR_STOP:08d}"
    before = tree_digest(original)

    rc, out = run("single", config, *overrides, log=tmp_path / "one.log", script=DETR)
    assert rc == 0, out[-6000:]
    assert tree_digest(original) == before, "the conversion modified the original checkpoint"
    seconds = conversion_seconds(out, "2 ranks, ZeRO-2", "1 ranks, ZeRO-2", DETR_STOP)
    print(f"\n[elastic] DETR ds_to_universal 2 ranks ZeRO-2 -> 1 rank ZeRO-2: {seconds:.1f} s")
    assert "world 1 | ZeRO-2 bf16 | batch 2 = 1 x 2 x 1" in out
    assert f"resumed from {original} at step {DETR_STOP}" in out
    assert "elastic resume: 2 -> 1 ranks mid-epoch 1 (batch 1 per rank)" in out
    assert f"finished at step {DETR_STEPS}" in out
    assert sorted(steps_logged(run_dir)) == list(range(1, DETR_STEPS + 1))  # each once (steps_logged)
    assert latest(run_dir) == f"step_{DETR_STEPS:08d}"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["step"] == DETR_STEPS and result["AP"] is not None, result

    scores = tmp_path / "eval.json"
    export = run_dir / "detector.pth"
    cmd = [sys.executable, str(ROOT / "launch" / "evaluate_detr.py"), "--weights", str(export),
           "--ann", str(ann), "--images", str(root), "--json", str(scores)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=rank_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(scores.read_text())["AP"] == pytest.approx(result["AP"], abs=1e-6)


@pytest.mark.slow
def test_offloaded_optimizer_resumes_on_one_rank(runs, tmp_path):
    """ZeRO-2 with the optimizer states offloaded to CPU (DeepSpeedCPUAdam), fallback backend, 2 ranks ->
    1 rank: converted like GPU-resident states; every step once, every step reads the uninterrupted
    offloaded run's samples, the next 5 losses are that run's within SAME_TENSORS_TOL, the export loads."""
    backend = "fallback+offload"
    run_dir, out, keys = resume(runs, backend, tmp_path, 1)
    assert "offload_optimizer: cpu" in (run_dir / "config.yaml").read_text()  # the resolved config
    seconds = conversion_seconds(out, "2 ranks, ZeRO-2", "1 ranks, ZeRO-2")
    print(f"\n[elastic] ds_to_universal 2 ranks ZeRO-2 + CPU offload -> 1 rank: {seconds:.1f} s")
    assert "batch 64 = 32 x 2 x 1" in out
    losses = check_steps_and_keys(runs, backend, run_dir, keys, 1)
    rows = loss_rows(runs.baseline(backend)[0], losses, "fallback + CPU offload, 2 ranks ZeRO-2 -> 1 rank")
    assert max(abs(b - a) for _, a, b in rows) < SAME_TENSORS_TOL
    assert len(export_and_load(run_dir, tmp_path / "weights.pth")) > 100
