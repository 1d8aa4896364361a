"""The shipped recipes, rehearsed on the local two-node cluster through the shipped sbatch scripts.

Only the data paths, the image size and the number of steps differ from the recipe: PVT-Large with the
authors' ImageNet recipe (RandAugment, Mixup/CutMix, random erasing, repeated augmentation x3, drop path
0.3, clipping 1.0, ZeRO-2 bf16, global batch 1024) on the Fashion-MNIST shards at 32 px, and the PVT paper's
DETR recipe (`configs/detr/pvt_small_coco.yaml`, global batch 16, ZeRO-1 bf16) on the labelme photos at a
quarter of the recipe's scales. 2 nodes x 2 tasks (4 ranks) on the cluster's 2 x 2 CPUs, as
`sbatch --nodes 2 --ntasks-per-node 2 --gpus-per-node 0` (plus `--cpus-per-task 1`: the script's default 10
does not fit these nodes).

Each run takes 3-5 minutes on 2 cores (a PVT-Large step is 1024 images; measured times in slurm/README.md),
16 minutes for the four, so they are `slow` as well as `slurm`: `pytest -m slow tests/test_rehearsals.py`.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from test_slurm import PYTHON, ROOT, assert_finished_run, cluster, wait_final, wait_step  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("cluster")]


def rehearse(script: str, config: str, overrides: list[str], log: Path) -> str:
    """`CONFIG=config OVERRIDES=... sbatch --nodes 2 --ntasks-per-node 2 --gpus-per-node 0 script`."""
    env = dict(os.environ, CONFIG=config, OVERRIDES=" ".join(overrides), PYTHON=PYTHON, RELAY_INTERVAL="5")
    env.pop("OMP_NUM_THREADS", None)  # as a user's shell: the script derives it from --cpus-per-task
    cmd = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0"]
    cmd += ["--cpus-per-task=1", "--time=30", f"--output={log}", script]
    out = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    return out.strip().split(";")[0]


def pvt_large_overrides(shards: Path, run_dir: Path, steps: int) -> list[str]:
    data = [f"data.train_shards={shards}", f"data.val_shards={shards}", "data.num_classes=10"]
    size = ["data.train_size=32", "data.val_size=32", "model.img_size=32"]
    # Two steps per epoch here (2048 images / 1024): the recipe's 5 warmup epochs would outlast the run.
    sched = [f"schedule.total_steps={steps}", "schedule.warmup_steps=1"]
    return [f"run_dir={run_dir}", *data, *size, *sched]


def detr_overrides(data: Path, run_dir: Path, steps: int) -> list[str]:
    paths = []
    for split in ("train", "val"):
        paths += [f"data.{split}_ann={data / 'annotations.json'}", f"data.{split}_images={data}"]
    return [f"run_dir={run_dir}", *paths, "data.scale_factor=0.25", f"schedule.total_steps={steps}"]


@pytest.mark.parametrize("preempt", [False, True], ids=["completes", "preempted"])
def test_pvt_large_recipe_on_two_nodes(fmnist_shards, tmp_path, preempt):
    steps = 4
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    t0 = time.time()
    job = rehearse(
        "slurm/pretrain.sh",
        "configs/pretrain/pvt_large.yaml",
        pvt_large_overrides(fmnist_shards, run_dir, steps),
        log,
    )
    if preempt:
        wait_step(run_dir, 2, job, 1200, log)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    state, code = wait_final(job, 1800, log)
    print(f"pvt_large rehearsal ({'preempted' if preempt else 'uninterrupted'}): {time.time() - t0:.0f} s")
    text = log.read_text()
    assert (state, code) == ("COMPLETED", "0:0"), text[-4000:]
    assert "world 4 = 2 nodes x 2" in text and "batch 128 x 2 x 4 = 1024" in text, text[-4000:]
    if preempt:
        assert f"job {job} restart 1:" in text and "stopped for preemption at step" in text
    assert f"finished at step {steps}" in text
    assert_finished_run(run_dir, steps)  # every step once in TensorBoard, `latest` is the last


@pytest.mark.parametrize("preempt", [False, True], ids=["completes", "preempted"])
def test_pvt_small_detr_recipe_on_two_nodes(tmp_path, preempt):
    from detection_helpers import labelme_example

    steps = 6
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    overrides = detr_overrides(labelme_example(), run_dir, steps)
    overrides.append("model.backbone.pretrained=null")  # the recipe's authors' .pth is not on this machine
    t0 = time.time()
    job = rehearse("slurm/finetune_detr.sh", "configs/detr/pvt_small_coco.yaml", overrides, log)
    if preempt:
        wait_step(run_dir, 2, job, 1200, log)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    state, code = wait_final(job, 1800, log)
    print(
        f"pvt_small DETR rehearsal ({'preempted' if preempt else 'uninterrupted'}): {time.time() - t0:.0f} s"
    )
    text = log.read_text()
    assert (state, code) == ("COMPLETED", "0:0"), text[-4000:]
    assert "world 4 = 2 nodes x 2" in text and "= 16 (micro x accum x world)" in text, text[-4000:]
    if preempt:
        assert f"job {job} restart 1:" in text and "stopped for preemption at step" in text
    assert_finished_run(run_dir, steps)
    assert (run_dir / "detector.pth").is_file()
