"""End-to-end pretraining with 2 ranks (gloo, CPU): ZeRO 0-3 with bf16 on a tiny PVT over Fashion-MNIST.

Each stage: train, stop, resume from a mid-run checkpoint (the next losses must be identical), export
the weights, read the TensorBoard events back. Processes are started with torchrun, as users do.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch_helpers import ROOT, evaluate, export_weights, free_port, rank_env, tiny_run_yaml

STEPS, CKPT_EVERY = 12, 6


def torchrun(
    config: Path, *overrides: str, nproc: int = 2, timeout: int = 300
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd += [f"--master_port={free_port()}", str(ROOT / "launch" / "train.py"), "--config", str(config)]
    proc = subprocess.run(
        [*cmd, *overrides], capture_output=True, text=True, env=rank_env(), timeout=timeout, cwd=ROOT
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def step_losses(run_dir: Path) -> dict[int, float]:
    """Per-step global mean loss from metrics.jsonl; each step must appear exactly once."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "step":
            assert rec["step"] not in out, f"step {rec['step']} logged twice"
            out[rec["step"]] = rec["train/loss_step"]
    return out


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory, fmnist_shards) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    rest = f"""
optim: {{lr: 3.0e-3, scale_lr: false, weight_decay: 0.01}}
schedule: {{total_steps: {STEPS}, warmup_steps: 1, min_lr: 1.0e-4}}
deepspeed: {{precision: bf16, micro_batch: 32, grad_accum: 1}}
eval: {{every_steps: 1000, at_end: true}}
checkpoint: {{every_steps: {CKPT_EVERY}, keep_last: 3}}
logging: {{log_every: 3}}
dist: {{timeout_s: 120}}
"""
    path.write_text(tiny_run_yaml(fmnist_shards, rest, scale="[0.7, 1.0]"))
    return path


# `slow` for ZeRO-1 and 2, to keep the default run within its time budget; the default run still covers
# both: ZeRO-1 train / bit-exact resume / export in every fault test (tests/test_faults.py), ZeRO-2 bit-exact
# resume in test_bf16_fp32_reduce_and_accum_with_overlap_resumes_exactly[2] and ZeRO-2 + EMA export scored
# against the run's own validation in tests/test_evaluate.py.
@pytest.mark.parametrize(
    "stage", [pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow), 3]
)
def test_zero_stage_train_resume_export(stage, tiny_config, fmnist_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pvt_dist.models import build_model, load_pretrained

    run = tmp_path / "run"
    # EMA rides along on stages 1-2 (stage 3 refuses it); stage 3 also clips gradients.
    extra = ("ema.enabled=true", "ema.decay=0.9") if stage < 3 else ("deepspeed.grad_clip=1.0",)
    if stage == 2:  # the losses read back 5 steps at a time (GPU default: every log step) are the same
        extra += ("logging.sync_every=5",)
    proc = torchrun(tiny_config, f"run_dir={run}", f"deepspeed.zero_stage={stage}", *extra)
    assert "final top-1" in proc.stdout and f"tensorboard --logdir {run / 'tensorboard'}" in proc.stdout

    # Loss goes down and the model beats chance (10%) on the 512 held-out images.
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = [losses[s] for s in (1, 2, 3)], [losses[s] for s in range(STEPS - 2, STEPS + 1)]
    assert sum(last) / 3 < sum(first) / 3 - 0.3, losses
    val = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"kind": "val"' in x]
    assert val[-1]["val/count"] == 512 and val[-1]["val/top1"] > 25, val

    # Checkpoints: keep_last complete ones, `latest` names the final step.
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text() == f"step_{STEPS:08d}"
    assert sorted(p.name for p in ckpt.glob("step_*")) == [f"step_{CKPT_EVERY:08d}", f"step_{STEPS:08d}"]

    # Stop-and-resume: a copy of the run rewound to the mid-run checkpoint continues identically.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS:08d}")
    (resumed / "checkpoints" / "latest").write_text(f"step_{CKPT_EVERY:08d}")
    proc = torchrun(tiny_config, f"run_dir={resumed}", f"deepspeed.zero_stage={stage}", *extra)
    assert f"resumed from {resumed / 'checkpoints' / f'step_{CKPT_EVERY:08d}'}" in proc.stderr + proc.stdout
    again = step_losses(resumed)
    for s in range(CKPT_EVERY + 1, STEPS + 1):
        assert again[s] == losses[s], (s, again[s], losses[s])

    # TensorBoard: scalars readable; the resumed run appended without duplicating steps.
    acc = EventAccumulator(str(resumed / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/lr", "perf/images_per_s", "perf/step_time_s", "perf/data_wait_s"}
    assert expected | {"perf/memory_mb", "val/top1", "val/top5", "train/grad_norm"} <= tags
    if stage < 3:
        assert "val_ema/top1" in tags
    loss_steps = [e.step for e in acc.Scalars("train/loss_step")]
    assert sorted(set(loss_steps)) == list(range(1, STEPS + 1))
    # The raw events too (EventAccumulator's purge would hide duplicates): each step once over all files.
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    raw = [
        ev.step
        for f in sorted((resumed / "tensorboard").glob("*tfevents*"))
        for ev in EventFileLoader(str(f)).Load()
        if any(v.tag == "train/loss_step" for v in ev.summary.value)
    ]
    assert sorted(raw) == list(range(1, STEPS + 1)), raw
    assert [e.value for e in acc.Scalars("train/loss_step") if e.step > CKPT_EVERY] == pytest.approx(
        [losses[s] for s in range(CKPT_EVERY + 1, STEPS + 1)]
    )

    # Export consolidates the ZeRO partitions into fp32 weights that load strictly into the model.
    out = tmp_path / "weights.pth"
    sd = export_weights(run, out)
    assert all(v.dtype == torch.float32 for v in sd.values())
    model = build_model("pvt_v2_b0", num_classes=10, img_size=32)
    missing, unexpected = load_pretrained(model, out)
    assert not missing and not unexpected
    # The export is the engine's final weights: under ZeRO 1-2 every rank's bf16 module is the cast of the
    # fp32 master weights, saved whole in the checkpoint's module states (ZeRO-3 saves only partitions).
    final = run / "checkpoints" / f"step_{STEPS:08d}"
    if stage < 3:
        module = torch.load(final / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        module = {k.removeprefix("module."): v for k, v in module["module"].items()}
        assert set(module) == set(sd)
        for k, v in module.items():
            assert v.dtype == torch.bfloat16 and torch.equal(sd[k].to(torch.bfloat16), v), k
    else:
        # ZeRO-3 has no whole module on disk: the engine's own weights are those its final validation ran
        # with (bf16 casts of the fp32 masters). Scoring the export with the run's config must give exactly
        # that validation's top-1 / top-5 on the same 512 images.
        scored = tmp_path / "scored.json"
        evaluate("--weights", str(out), "--shards", str(fmnist_shards), "--config", str(run / "config.yaml"),
                 "--json", str(scored))  # fmt: skip
        res = json.loads(scored.read_text())
        assert res["count"] == 512 and res["precision"] == "bf16", res
        assert (res["top1"], res["top5"]) == (val[-1]["val/top1"], val[-1]["val/top5"]), (res, val[-1])
    init = build_model("pvt_v2_b0", num_classes=10, img_size=32).state_dict()
    assert not torch.equal(sd["head.weight"], init["head.weight"])  # trained weights, not the init
    if stage < 3:
        ema = export_weights(run, tmp_path / "ema.pth", "--ema")
        model.load_state_dict(ema, strict=True)
        assert not torch.equal(ema["head.weight"], sd["head.weight"])


# ZeRO-1 (`slow`): the same bf16 path as ZeRO-2 without partitioned gradients.
@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_bf16_fp32_reduce_and_accum_with_overlap_resumes_exactly(stage, tiny_config, tmp_path):
    """The GPU defaults on 2 CPU ranks: bf16 gradients reduced in fp32 (and, at ZeRO-2, accumulated in
    fp32 over the 2 micro batches), with overlap_comm forced on (auto turns it on on GPU only); stop,
    resume, same losses; the export loads."""
    from pvt_dist.models import build_model, load_pretrained

    run = tmp_path / "run"
    over = (f"deepspeed.zero_stage={stage}", "deepspeed.grad_accum=2", "deepspeed.overlap_comm=true",
            "deepspeed.reduce_bucket_size=200000", "schedule.total_steps=8",
            "checkpoint.every_steps=4")  # fmt: skip
    torchrun(tiny_config, f"run_dir={run}", *over)
    config = (run / "config.yaml").read_text()
    assert "overlap_comm: true" in config and "grad_accum: 2" in config and "reduce_dtype: auto" in config
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, 9))
    assert sum(losses[s] for s in (6, 7, 8)) < sum(losses[s] for s in (1, 2, 3)) - 0.2, losses
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000008")
    (resumed / "checkpoints" / "latest").write_text("step_00000004")
    torchrun(tiny_config, f"run_dir={resumed}", *over)
    again = step_losses(resumed)
    assert [again[s] for s in range(5, 9)] == [losses[s] for s in range(5, 9)]
    out = tmp_path / "weights.pth"
    export_weights(run, out)
    missing, unexpected = load_pretrained(build_model("pvt_v2_b0", num_classes=10, img_size=32), out)
    assert not missing and not unexpected


# `slow`: ~3 min (on a fresh machine mostly JIT-building DeepSpeedCPUAdam), over the default budget.
@pytest.mark.slow
def test_zero2_cpu_offload_with_repeated_augmentation(tiny_config, tmp_path):
    """ZeRO-Offload (DeepSpeedCPUAdam, JIT-built once) and repeated augmentation: trains, resumes exactly."""
    from pvt_dist.models import build_model

    run = tmp_path / "offload"
    extra = ("deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu", "data.repeated_aug=2")
    torchrun(tiny_config, f"run_dir={run}", *extra, timeout=600)
    losses = step_losses(run)
    assert sum(losses[s] for s in range(STEPS - 2, STEPS + 1)) < sum(losses[s] for s in (1, 2, 3)) - 0.3, (
        losses
    )
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS:08d}")
    (resumed / "checkpoints" / "latest").write_text(f"step_{CKPT_EVERY:08d}")
    torchrun(tiny_config, f"run_dir={resumed}", *extra)
    again = step_losses(resumed)
    assert [again[s] for s in range(CKPT_EVERY + 1, STEPS + 1)] == [
        losses[s] for s in range(CKPT_EVERY + 1, STEPS + 1)
    ]
    model = build_model("pvt_v2_b0", num_classes=10, img_size=32)
    model.load_state_dict(export_weights(run, tmp_path / "weights.pth"), strict=True)


def test_zero0_export_and_bad_launch(tiny_config, tmp_path):
    """Stage 0 has no ZeRO partitions: export takes the bf16 optimizer's fp32 masters."""
    from pvt_dist.models import build_model

    run = tmp_path / "run0"
    torchrun(
        tiny_config,
        f"run_dir={run}",
        "deepspeed.zero_stage=0",
        "schedule.total_steps=3",
        "checkpoint.every_steps=3",
    )
    sd = export_weights(run, tmp_path / "w0.pth")
    model = build_model("pvt_v2_b0", num_classes=10, img_size=32)
    model.load_state_dict(sd, strict=True)
    # The fp32 masters, each matched to its name: within bf16 rounding of the trained bf16 module.
    module = torch.load(
        run / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt", weights_only=False
    )
    for name, bf16 in module["module"].items():
        assert sd[name].dtype == torch.float32
        torch.testing.assert_close(sd[name].to(torch.bfloat16), bf16, rtol=0, atol=0)

    # A global batch that the world size cannot produce fails fast on every rank, naming the key.
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
    ]
    cmd += [str(ROOT / "launch" / "train.py"), "--config", str(tiny_config), f"run_dir={tmp_path / 'bad'}"]
    cmd += ["deepspeed.global_batch=96"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=rank_env(), timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    assert "deepspeed.global_batch: 96 != micro_batch 32 x grad_accum 1 x world size 2" in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_nonfinite_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
    """lr 1e30 from step 2 on: the weights explode, the step-3 loss is NaN. The run stops naming the
    intact checkpoint, and none is written for the failed step."""
    run = tmp_path / "nan"
    # One plain process, so that its own exit code is the command's (torchrun reports any failure as 1).
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(tiny_config), f"run_dir={run}"]
    cmd += ["optim.lr=1e30", "schedule.total_steps=5", "checkpoint.every_steps=2", "deepspeed.zero_stage=2"]
    cmd += ["logging.sync_every=4"]  # the step-3 loss is read back with the log line of step 3 (log_every 3)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=rank_env(), timeout=300, cwd=ROOT)
    assert proc.returncode == 3, proc.stderr[-3000:]  # the documented exit code of a non-finite loss
    assert "non-finite loss at step 3 under bf16" in proc.stderr, proc.stderr[-3000:]
    assert "(step_00000002)" in proc.stderr
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
    # Step 4 would be the next save (every 2 steps, 5 in all): the run stopped at step 3, before it.
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000002"]
    assert max(step_losses(run)) == 2, "the non-finite step 3 is not recorded, nothing after it runs"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_dynamic_loss_scale_gpu(tiny_config, tmp_path):
    """fp16 (refused by DeepSpeed on CPU): loss scale and skipped steps are logged, the loss goes down."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "fp16"
    torchrun(tiny_config, f"run_dir={run}", "deepspeed.precision=fp16", "deepspeed.zero_stage=2", nproc=1)
    losses = step_losses(run)
    assert sum(losses[s] for s in range(STEPS - 2, STEPS + 1)) < sum(losses[s] for s in (1, 2, 3))
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert {"train/loss_scale", "train/skipped_steps"} <= set(acc.Tags()["scalars"])
