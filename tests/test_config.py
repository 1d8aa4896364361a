"""Config loading, validation and the pieces of the engine that need no process group."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pvt_dist.cluster.distributed import detect_env
from pvt_dist.config import (
    ConfigError,
    TrainConfig,
    dump_config,
    load_config,
    peak_lr,
    resolve_batch,
    resolve_config,
)
from pvt_dist.engine.ds_config import build_deepspeed_config
from pvt_dist.engine.optim import build_param_groups, build_scheduler, resolve_schedule

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(glob.glob(str(ROOT / "configs" / "pretrain" / "[!_]*.yaml")))


def data_overrides(shards: Path) -> list[str]:
    return [f"data.train_shards={shards}", f"data.val_shards={shards}", "data.num_classes=10"]


def test_every_variant_has_a_config():
    from pvt_dist.models import list_models

    names = {Path(p).stem for p in CONFIGS}
    assert set(list_models()) <= names, set(list_models()) - names
    assert "demo_fashion_mnist" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: Path(p).stem)
def test_configs_resolve(path, fmnist_shards):
    cfg = resolve_config(
        load_config(path, data_overrides(fmnist_shards)), world_size=8 if "demo" not in path else 2
    )
    if "demo" not in path:
        # The authors' recipe: batch 1024 -> lr 1e-3, wd 0.05, 300 epochs, 5 warmup, mixup/cutmix.
        assert cfg.deepspeed.global_batch == 1024 and cfg.deepspeed.grad_accum == 1
        assert peak_lr(cfg) == pytest.approx(1e-3)
        assert (cfg.optim.weight_decay, cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (0.05, 300, 5)
        assert (cfg.data.mixup, cfg.data.cutmix, cfg.data.label_smoothing) == (0.8, 1.0, 0.1)
        assert cfg.model.name == Path(path).stem
        deep = cfg.model.name in ("pvt_medium", "pvt_large", "pvt_v2_b3", "pvt_v2_b4", "pvt_v2_b5")
        assert cfg.deepspeed.grad_clip == (1.0 if deep else None)
    else:
        assert cfg.deepspeed.zero_stage == 2 and cfg.deepspeed.precision == "bf16"


def test_overrides_types_and_base(tmp_path, fmnist_shards):
    base = tmp_path / "base.yaml"
    base.write_text("optim:\n  lr: 1.0e-4\n  weight_decay: 0.1\ndeepspeed:\n  micro_batch: 4\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\noptim:\n  lr: 2.0e-4\nmodel:\n  name: pvt_v2_b0\n")
    cfg = load_config(str(child), ["optim.eps=1e-6", "deepspeed.zero_stage=3", "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == 2e-4 and cfg.optim.weight_decay == 0.1  # child wins, base fills in
    assert cfg.optim.eps == 1e-6  # YAML reads "1e-6" as a string; the float field converts it
    assert cfg.optim.betas == (0.8, 0.9) and cfg.deepspeed.zero_stage == 3
    cfg = resolve_config(
        load_config(str(child), data_overrides(fmnist_shards) + ["deepspeed.grad_accum=2"]), 4
    )
    assert (cfg.deepspeed.global_batch, cfg.deepspeed.micro_batch, cfg.deepspeed.grad_accum) == (32, 4, 2)
    assert cfg.model.num_classes == 10 and cfg.model.img_size == cfg.data.train_size
    # The resolved config written into a run directory loads back to the same values.
    dump_config(cfg, str(tmp_path / "resolved.yaml"))
    again = load_config(str(tmp_path / "resolved.yaml"))
    assert again == cfg


def test_batch_triple():
    from pvt_dist.config import DeepSpeedOptions

    assert resolve_batch(DeepSpeedOptions(global_batch=1024, micro_batch=128), 8) == (1024, 128, 1)
    assert resolve_batch(DeepSpeedOptions(global_batch=1024, micro_batch=128), 2) == (1024, 128, 4)
    assert resolve_batch(DeepSpeedOptions(global_batch=1024, grad_accum=2), 4) == (1024, 128, 2)
    assert resolve_batch(DeepSpeedOptions(micro_batch=16, grad_accum=3), 2) == (96, 16, 3)
    # An explicit grad_accum is honoured; it fails only when the micro batch it implies exceeds the cap.
    assert resolve_batch(DeepSpeedOptions(global_batch=1024, micro_batch=128, grad_accum=2), 8) == (
        1024,
        64,
        2,
    )
    with pytest.raises(ConfigError, match=r"^deepspeed.global_batch: 1024 != micro_batch 128 x grad_accum 2"):
        resolve_batch(DeepSpeedOptions(global_batch=1024, micro_batch=128, grad_accum=2), 2)
    with pytest.raises(
        ConfigError, match=r"^deepspeed.global_batch: 1000 cannot be split over world size 16"
    ):
        resolve_batch(DeepSpeedOptions(global_batch=1000, micro_batch=128), 16)


def test_micro_batch_is_a_cap_and_the_global_batch_is_kept():
    from pvt_dist.config import DeepSpeedOptions

    recipe = DeepSpeedOptions(global_batch=1024, micro_batch=128)
    # (world, micro, accum): the largest micro <= 128 with 1024 % (micro x world) == 0.
    for world, micro, accum in [(1, 128, 8), (16, 64, 1), (32, 32, 1), (128, 8, 1), (1024, 1, 1)]:
        assert resolve_batch(recipe, world) == (1024, micro, accum), world
    # A per-rank batch with no power-of-two factor: 1000 / 8 = 125 images -> micro 25 x accum 5 under cap 64.
    assert resolve_batch(DeepSpeedOptions(global_batch=1000, micro_batch=64), 8) == (1000, 25, 5)
    # Impossible: fewer images than ranks; the message says which world sizes and global batches work.
    split = r"^deepspeed.global_batch: 1024 cannot be split over world size 2048"
    with pytest.raises(ConfigError, match=split + r".*divide it: 256, 512, 1024; or a global batch of 2048"):
        resolve_batch(recipe, 2048)
    with pytest.raises(ConfigError, match=r"or a global batch of 1008 or 1056"):
        resolve_batch(recipe, 48)


BAD = [
    (["bogus=1"], r"^bogus: unknown key"),
    (["optim.momentum=0.9"], r"^optim.momentum: unknown key"),
    (["optim.lr=fast"], r"^optim.lr: expected a number"),
    (["optim.lr=-1"], r"^optim.lr: must be positive"),
    (["deepspeed.zero_stage=4"], r"^deepspeed.zero_stage: must be 0, 1, 2 or 3"),
    (["deepspeed.zero_stage=two"], r"^deepspeed.zero_stage: expected an integer"),
    (["deepspeed.precision=fp8"], r"^deepspeed.precision: must be one of"),
    (
        ["deepspeed.global_batch=100", "deepspeed.micro_batch=8", "deepspeed.grad_accum=1"],
        r"^deepspeed.global_batch",
    ),
    (["deepspeed.micro_batch=null", "deepspeed.global_batch=null"], r"^deepspeed.micro_batch"),
    (["deepspeed.micro_batch=0"], r"^deepspeed.micro_batch: must be positive"),
    (["deepspeed.offload_optimizer=cpu", "deepspeed.zero_stage=0"], r"^deepspeed.offload_optimizer"),
    (["deepspeed.offload_optimizer=nvme"], r"^deepspeed.offload_optimizer: must be one of"),
    (["model.name=resnet50"], r"^model.name: unknown model"),
    (["model.img_size=30"], r"^model.img_size"),
    (["model.num_classes=7"], r"^model.num_classes"),
    (["model.pretrained=/nonexistent.pth"], r"^model.pretrained: file not found"),
    (["data.train_shards=/nonexistent/shards"], r"^data.train_shards"),
    (["data.val_shards="], r"^data.val_shards"),
    (["data.crop_pct=2"], r"^data.crop_pct"),
    (["data.num_classes=many"], r"^data.num_classes: expected an integer"),
    (["schedule.total_steps=0"], r"^schedule.total_steps: must be positive"),
    (["schedule.min_lr=1"], r"^schedule.min_lr"),
    (["checkpoint.keep_last=0"], r"^checkpoint.keep_last"),
    (["ema.enabled=true", "deepspeed.zero_stage=3"], r"^ema.enabled: not supported"),
    (["ema.decay=1.5"], r"^ema.decay"),
    (["dist.timeout_s=0"], r"^dist.timeout_s"),
    (["logging.log_every=yes"], r"^logging.log_every: expected an integer"),
    (["eval.at_end=maybe"], r"^eval.at_end: expected true or false"),
    (["deepspeed.config_file=/nonexistent.json"], r"^deepspeed.config_file: file not found"),
    (["optim.lr"], r"override 'optim.lr': expected key=value"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_values_name_the_key(overrides, message, fmnist_shards):
    base = ["model.name=pvt_v2_b0", "deepspeed.micro_batch=8"] + data_overrides(fmnist_shards)
    with pytest.raises(ConfigError, match=message):
        resolve_config(load_config(None, base + overrides), world_size=2)


def test_unknown_key_in_yaml_and_user_json(tmp_path, fmnist_shards):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: pvt_v2_b0\n  depth: 3\n")
    with pytest.raises(ConfigError, match=r"^model.depth: unknown key"):
        load_config(str(bad))
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8}))
    over = data_overrides(fmnist_shards) + ["model.name=pvt_v2_b0", f"deepspeed.config_file={ds_json}"]
    cfg = resolve_config(load_config(None, over), world_size=2)
    assert (cfg.deepspeed.global_batch, cfg.deepspeed.micro_batch, cfg.deepspeed.grad_accum) == (64, 8, 4)
    ds_json.write_text(json.dumps({"train_batch_size": 60, "train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(ConfigError, match=r"^deepspeed.global_batch: 60"):
        resolve_config(load_config(None, over), world_size=2)


def test_launch_rejects_bad_config_before_any_process_group(tmp_path, fmnist_shards):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "train.py"),
        "--config",
        str(ROOT / "configs/pretrain/pvt_tiny.yaml"),
    ]
    cmd += data_overrides(fmnist_shards) + [f"run_dir={run_dir}", "deepspeed.global_batch=1000"]
    # 1000 images cannot be split evenly over 16 ranks (on 8 they can: 125 x 1 x 8).
    env = dict(os.environ, RANK="0", WORLD_SIZE="16", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    env["MASTER_PORT"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert "deepspeed.global_batch: 1000 cannot be split over world size 16" in proc.stderr
    assert not run_dir.exists()  # nothing was started or written


def test_launch_refuses_a_warmup_as_long_as_the_run_before_any_process_group(tmp_path, fmnist_shards):
    """What --plan refuses, a launch refuses at the same point: exit 2 naming the key, nothing started."""
    run_dir = tmp_path / "run"
    demo = str(ROOT / "configs/pretrain/demo_fashion_mnist.yaml")
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", demo, f"run_dir={run_dir}"]
    cmd += ["schedule.epochs=0.1", f"data.train_shards={fmnist_shards}", f"data.val_shards={fmnist_shards}"]
    # MASTER_PORT 1: a process group could not even start.
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2, proc.stderr
    # 2048 samples / 2 ranks / 64 = 16 steps per epoch: 0.1 epoch = 2 steps, warmup 0.1 epoch = 2 steps.
    assert "schedule.warmup_epochs: warmup (2 steps) must be shorter than training (2 steps" in proc.stderr
    assert "Traceback" not in proc.stderr and not run_dir.exists()


def test_deepspeed_config_builder(fmnist_shards):
    over = data_overrides(fmnist_shards) + ["model.name=pvt_v2_b0", "deepspeed.micro_batch=8"]
    cfg = resolve_config(load_config(None, over + ["deepspeed.precision=fp16", "deepspeed.grad_clip=1.0"]), 2)
    ds = build_deepspeed_config(cfg)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 1
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and not ds["bf16"]["enabled"]
    assert ds["gradient_clipping"] == 1.0 and ds["zero_optimization"]["stage"] == 2
    cfg = resolve_config(
        load_config(None, over + ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu"]), 2
    )
    ds = build_deepspeed_config(cfg)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["gradient_clipping"] == 0.0
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_param_groups_and_schedule():
    from pvt_dist.models import build_model

    model = build_model("pvt_tiny", num_classes=10, img_size=32)
    groups = build_param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    # The authors' rule: no decay on 1-D parameters and the cls token; position embeddings are decayed.
    assert {"cls_token", "head.bias", "norm.weight", "block1.0.norm1.weight"} <= no_decay
    assert {"head.weight", "block1.0.attn.q.weight", "pos_embed1"} <= decay
    assert len(no_decay) + len(decay) == len(names)

    cfg = TrainConfig()
    cfg.deepspeed.global_batch, cfg.deepspeed.micro_batch, cfg.deepspeed.grad_accum = 1024, 64, 2
    cfg.schedule.epochs, cfg.schedule.warmup_epochs = 10, 1
    # 102,400 samples / 8 ranks = 200 micro batches of 64 per rank, 2 per optimizer step.
    steps_per_epoch, total, warmup = resolve_schedule(cfg, train_samples=102_400, world_size=8)
    assert (steps_per_epoch, total, warmup) == (100, 1000, 100)
    opt = torch.optim.AdamW(groups, lr=peak_lr(cfg))
    sched = build_scheduler(opt, cfg, total, warmup)
    lrs = []
    for step in range(total):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[warmup] == pytest.approx(1e-3)  # 5e-4 x 1024 / 512
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1 : warmup + 1]))  # linear warmup rises
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))  # cosine decays
    assert lrs[-1] == pytest.approx(1e-5, rel=0.05)


def test_detect_env(monkeypatch, tmp_path):
    for k in list(os.environ):
        if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(k)
    single = detect_env()
    assert (single.rank, single.world_size, single.launcher) == (0, 1, "single")

    # srun: ranks from SLURM_*, master = first host that `scontrol show hostnames` expands.
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "nodeA\\nnodeB\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[A-B]")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    env = detect_env(29500)
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == (3, 1, 4, "slurm")
    assert (env.master_addr, env.master_port) == ("nodeA", 29542)

    # torchrun / deepspeed launcher variables win over Slurm's.
    for k, v in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="h0", MASTER_PORT="1234").items():
        monkeypatch.setenv(k, v)
    env = detect_env()
    assert (env.rank, env.world_size, env.master_addr, env.master_port, env.launcher) == (
        1,
        2,
        "h0",
        1234,
        "env",
    )


def test_launch_rejects_unwritable_run_dir(tmp_path, fmnist_shards):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "train.py"),
        "--config",
        str(ROOT / "configs/pretrain/pvt_tiny.yaml"),
    ]
    cmd += data_overrides(fmnist_shards) + [f"run_dir={blocker / 'run'}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert f"run_dir: cannot create {blocker / 'run'}" in proc.stderr
