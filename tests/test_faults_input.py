"""Fault injection, bad input: corrupt, truncated and missing shards, and invalid configs (values and files).

Each must stop the run with a message naming the shard, sample or key, before any work is lost and,
for configs, before any process group starts. Runs as in test_faults.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fault_helpers import assert_complete, latest, run, steps_logged, train_main

pytestmark = pytest.mark.faults


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
