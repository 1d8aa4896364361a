"""The GPU path's own decisions, checked on CPU: optimizer choice, device binding, reduction dtypes,
communication overlap and TF32. These test our selection logic with a faked device; the dependencies
(DeepSpeed, CUDA) themselves run in the integration tests and in bench/gpu_check.py."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pvt_dist.cluster.distributed import DistEnv, device_for, export_rendezvous
from pvt_dist.config import ConfigError, load_config, resolve_config
from pvt_dist.engine import tf32
from pvt_dist.engine.ds_config import build_deepspeed_config
from pvt_dist.engine.optim import build_optimizer, select_optimizer


def resolved(shards, *overrides: str, world: int = 2):
    over = [f"data.train_shards={shards}", f"data.val_shards={shards}", "data.num_classes=10"]
    over += ["model.name=pvt_v2_b0", "deepspeed.micro_batch=8", *overrides]
    return resolve_config(load_config(None, over), world)


def test_optimizer_choice_by_device():
    assert select_optimizer("auto", "cuda", offload=False) == "torch_fused"
    assert select_optimizer("auto", "cpu", offload=False) == "torch"
    assert select_optimizer("fused", "cuda", offload=False) == "fused"
    assert select_optimizer("torch", "cuda", offload=False) == "torch"
    assert select_optimizer("auto", "cuda", offload=True) == "cpu_adam"
    with pytest.raises(ValueError, match="optim.impl: fused"):
        select_optimizer("fused", "cpu", offload=False)


def test_torch_fused_adamw_is_built_and_steps(fmnist_shards):
    model = torch.nn.Linear(4, 3)
    cfg = resolved(fmnist_shards, "optim.impl=torch_fused")
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True
    before = model.weight.detach().clone()
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    assert not torch.equal(before, model.weight)
    auto = build_optimizer(model, resolved(fmnist_shards), torch.device("cpu"))
    assert type(auto) is torch.optim.AdamW and not auto.defaults["fused"]


def test_offload_refuses_an_explicit_gpu_optimizer(fmnist_shards):
    with pytest.raises(ConfigError, match="optim.impl: fused cannot step offloaded"):
        resolved(fmnist_shards, "optim.impl=fused", "deepspeed.offload_optimizer=cpu")


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch.cuda reporting ``n`` visible GPUs; returns the list of set_device() calls."""
    calls: list[int] = []

    def install(n: int) -> list[int]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", calls.append)
        return calls

    return install


def env(local_rank: int) -> DistEnv:
    return DistEnv(rank=local_rank, local_rank=local_rank, world_size=4, master_addr="h", master_port=1,
                   launcher="slurm")  # fmt: skip


def test_one_visible_gpu_is_device_0_for_any_local_rank(fake_gpus):
    calls = fake_gpus(1)
    assert device_for(env(3)) == torch.device("cuda", 0)
    assert calls == [0]


def test_several_visible_gpus_by_local_rank_and_too_few_raise(fake_gpus):
    calls = fake_gpus(4)
    assert device_for(env(3)) == torch.device("cuda", 3)
    assert calls == [3]
    fake_gpus(2)
    with pytest.raises(RuntimeError, match="local rank 3 has no GPU \\(2 visible\\)"):
        device_for(env(3))


def test_deepspeed_gets_the_chosen_device_as_local_rank(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        # setenv records the variable, so teardown removes what export_rendezvous writes (later tests, and
        # webdataset, would otherwise see a 4-rank job).
        monkeypatch.setenv(k, "unset")
    export_rendezvous(env(3), torch.device("cuda", 0))
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("3", "0", "4")
    export_rendezvous(env(3), torch.device("cpu"))
    assert os.environ["LOCAL_RANK"] == "3"


def test_reduction_and_accumulation_dtype_defaults(fmnist_shards):
    # bf16: fp32 reduction always, fp32 accumulation once there is something to accumulate (ZeRO-1/2).
    ds = build_deepspeed_config(resolved(fmnist_shards, "deepspeed.grad_accum=2"), "cpu")
    assert ds["communication_data_type"] == "fp32" and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    ds = build_deepspeed_config(resolved(fmnist_shards, "deepspeed.grad_accum=1"), "cpu")
    assert ds["communication_data_type"] == "fp32" and "data_types" not in ds
    # DeepSpeed refuses (0), ignores (3), or at stage 1 moves to an optimizer export cannot read.
    for stage in (0, 1, 3):
        ds = build_deepspeed_config(
            resolved(fmnist_shards, "deepspeed.grad_accum=2", f"deepspeed.zero_stage={stage}")
        )
        assert "data_types" not in ds
    ds = build_deepspeed_config(resolved(fmnist_shards, "deepspeed.precision=fp16", "deepspeed.grad_accum=2"))
    assert ds["communication_data_type"] == "fp16" and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    ds = build_deepspeed_config(resolved(fmnist_shards, "deepspeed.reduce_dtype=bf16"))
    assert ds["communication_data_type"] == "bf16"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["deepspeed.precision=fp16", "deepspeed.reduce_dtype=bf16"], "deepspeed.reduce_dtype: bf16 under"),
        (["deepspeed.precision=fp32", "deepspeed.grad_accum_dtype=bf16"], "deepspeed.grad_accum_dtype: bf16"),
        (["deepspeed.grad_accum_dtype=fp32", "deepspeed.zero_stage=3"], "needs zero_stage 2, got stage 3"),
        (["deepspeed.grad_accum_dtype=fp32", "deepspeed.zero_stage=0"], "needs zero_stage 2, got stage 0"),
        (["deepspeed.grad_accum_dtype=fp32", "deepspeed.zero_stage=1"], "BF16_Optimizer"),
        (["deepspeed.reduce_dtype=fp8"], "deepspeed.reduce_dtype"),
        (["deepspeed.reduce_bucket_size=0"], "deepspeed.reduce_bucket_size: must be a positive"),
        (["deepspeed.overlap_comm=maybe"], "deepspeed.overlap_comm"),
    ],
)
def test_bad_gpu_options_name_the_key(overrides, message, fmnist_shards):
    with pytest.raises(ConfigError, match=message):
        resolved(fmnist_shards, *overrides)


def test_overlap_comm_on_gpu_with_configured_buckets(fmnist_shards):
    cfg = resolved(fmnist_shards, "deepspeed.reduce_bucket_size=1000", "deepspeed.allgather_bucket_size=2000")
    gpu, cpu = build_deepspeed_config(cfg, "cuda"), build_deepspeed_config(cfg, "cpu")
    assert (
        gpu["zero_optimization"]["overlap_comm"] is True and cpu["zero_optimization"]["overlap_comm"] is False
    )
    assert gpu["zero_optimization"]["reduce_bucket_size"] == 1000
    assert gpu["zero_optimization"]["allgather_bucket_size"] == 2000
    forced = build_deepspeed_config(resolved(fmnist_shards, "deepspeed.overlap_comm=true"), "cpu")
    assert forced["zero_optimization"]["overlap_comm"] is True
    stage3 = build_deepspeed_config(resolved(fmnist_shards, "deepspeed.zero_stage=3"), "cuda")
    assert stage3["zero_optimization"]["overlap_comm"] is False
    assert "allgather_bucket_size" not in stage3["zero_optimization"]


@pytest.fixture
def tf32_flags():
    """Restores torch's process-wide TF32 switches after the test."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)  # fmt: skip
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1], saved[2]


def test_tf32_on_ampere_and_newer_only(monkeypatch, tf32_flags):
    torch.set_float32_matmul_precision("highest")
    assert tf32.apply_tf32(True, torch.device("cpu")) is False
    assert torch.get_float32_matmul_precision() == "highest"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # Volta
    assert tf32.apply_tf32(True, torch.device("cuda", 0)) is False
    assert torch.get_float32_matmul_precision() == "highest"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # Hopper
    assert tf32.apply_tf32(True, torch.device("cuda", 0)) is True
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    assert tf32.apply_tf32(False, torch.device("cuda", 0)) is False
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32


def test_missing_dali_names_the_extras():
    code = (
        "import sys; sys.modules['nvidia.dali'] = None\n"
        "try:\n    import pvt_dist.data.dali_pipeline\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "NVIDIA DALI is not importable" in out and ".[cuda13]" in out and ".[cuda12]" in out, out


# --- DALI decoders and pipelines (CPU) ---


def test_mixed_decoder_hints_exist_in_the_installed_dali():
    from nvidia.dali import backend

    from pvt_dist.data.dali_pipeline import decoder_args

    mixed, cpu = decoder_args("mixed"), decoder_args("cpu")
    assert mixed == {
        "jpeg_fancy_upsampling": True, "device_memory_padding": 211025920, "host_memory_padding": 140544512,
        "preallocate_width_hint": 5980, "preallocate_height_hint": 6430,
    }  # fmt: skip
    assert cpu == {"jpeg_fancy_upsampling": True}  # padding/preallocation are nvJPEG (GPU) memory
    for op in ("decoders__Image", "decoders__ImageRandomCrop"):
        assert set(mixed) <= set(backend.GetSchema(op).GetArgumentNames()), op


def _loader_cfg(shards, **kw):
    from pvt_dist.data import DataConfig

    base = dict(train_shards=str(shards), val_shards=str(shards), num_classes=10, train_size=32, val_size=32,
                crop_pct=1.0, num_threads=1, shuffle_buffer=64)  # fmt: skip
    return DataConfig(**{**base, **kw})


def test_built_pipelines_carry_the_decoder_arguments(fmnist_shards):
    """The serialized graphs of the train, repeated-augmentation and val pipelines (what DALI runs)."""
    from pvt_dist.data import build_loader

    for split, kw in (("train", {}), ("train", {"repeated_aug": 2}), ("val", {})):
        loader = build_loader(_loader_cfg(fmnist_shards, **kw), split, 0, 1, seed=0, micro_batch=8)
        graph = loader._build(0, 0, None).serialize()
        assert b"jpeg_fancy_upsampling" in graph, (split, kw)


def test_val_pipeline_is_kept_and_repeats_its_batches(fmnist_shards):
    from pvt_dist.data import build_loader

    cfg = _loader_cfg(fmnist_shards)
    loader = build_loader(cfg, "val", 1, 2, seed=0, micro_batch=100, return_keys=True)
    first = list(loader)
    kept = loader._val_pipe
    assert kept is not None
    loader.set_epoch(5)
    second = list(loader)
    assert loader._val_pipe is kept  # the same pipeline served the second evaluation
    fresh = list(build_loader(cfg, "val", 1, 2, seed=0, micro_batch=100, return_keys=True))
    for a, b, c in zip(first, second, fresh, strict=True):
        assert a[2] == b[2] == c[2] and torch.equal(a[0], b[0]) and torch.equal(a[0], c[0])
        assert torch.equal(a[1], b[1])
    # A pass left halfway is not kept: the next evaluation starts again from the first batch.
    next(iter(loader))
    assert loader._val_pipe is None
    third = list(loader)
    assert [k for *_, k in third] == [k for *_, k in first]


def test_detection_targets_built_on_device_match_per_sample_conversion():
    """The batched conversion against the per-sample one it replaced, on the same DALI outputs."""
    from detection_helpers import labelme_example

    from pvt_dist.detection.box_ops import box_xyxy_to_cxcywh
    from pvt_dist.detection.data import DetectionDataConfig, build_detection_loader

    root = labelme_example()
    ann = str(root / "annotations.json")
    cfg = DetectionDataConfig(train_ann=ann, train_images=str(root), val_ann=ann, val_images=str(root),
                              scale_factor=0.25, device="cpu", num_threads=1)  # fmt: skip
    for split in ("train", "val"):
        loader = build_detection_loader(cfg, split, micro_batch=2)
        outs = loader._build().run()
        images, mask, targets, infos = loader._convert(outs)
        _, size_hw, _, boxes, cats, _ = outs
        sizes = torch.from_numpy(size_hw.as_array().astype("int64"))
        for b in range(images.shape[0]):
            h, w = sizes[b].tolist()
            ref = torch.ones(images.shape[2:], dtype=torch.bool)
            ref[:h, :w] = False
            assert torch.equal(mask[b], ref)
            ltrb = torch.from_numpy(np.array(boxes[b], dtype=np.float32).reshape(-1, 4))
            cat = np.array(cats[b], dtype=np.int64).reshape(-1)
            lut = {c: i for i, c in enumerate(loader.annotations.label_to_cat)}
            assert targets[b]["labels"].tolist() == [lut[int(c)] for c in cat]
            assert torch.equal(
                targets[b]["boxes"], box_xyxy_to_cxcywh(ltrb.reshape(-1, 4).float().clamp(0, 1))
            )
            assert infos[b]["size"] == [h, w]


def test_detection_val_pipeline_is_kept_between_evaluations():
    from detection_helpers import labelme_example

    from pvt_dist.detection.data import DetectionDataConfig, build_detection_loader

    root = labelme_example()
    ann = str(root / "annotations.json")
    cfg = DetectionDataConfig(train_ann=ann, train_images=str(root), val_ann=ann, val_images=str(root),
                              scale_factor=0.25, device="cpu", num_threads=1)  # fmt: skip
    loader = build_detection_loader(cfg, "val", micro_batch=2)
    loader.set_epoch(0)
    first = list(loader)
    kept = loader._pipe
    loader.set_epoch(0)
    second = list(loader)
    assert loader._pipe is kept
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert [i["image_id"] for i in a[3]] == [i["image_id"] for i in b[3]]
