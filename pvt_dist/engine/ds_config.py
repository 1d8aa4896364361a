"""The DeepSpeed JSON config, generated from ``TrainConfig`` (a user's own JSON entries win)."""

from __future__ import annotations

import json
from typing import Any

import torch

from pvt_dist.config import DeepSpeedOptions, TrainConfig
from pvt_dist.config.train import fp32_accum_supported


def _deep_update(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def reduction_dtypes(ds: DeepSpeedOptions) -> tuple[str, str | None]:
    """(communication_data_type, grad_accum_dtype or None = DeepSpeed's default) for ``deepspeed.*``."""
    reduce = ds.reduce_dtype
    if reduce == "auto":
        reduce = "fp32" if ds.precision == "bf16" else ds.precision
    accum = ds.grad_accum_dtype
    if accum == "auto":
        fp32_accum = ds.precision != "fp32" and ds.grad_accum > 1 and fp32_accum_supported(ds)
        accum = "fp32" if fp32_accum else None
    elif accum == ds.precision:
        accum = None  # DeepSpeed's default is the training dtype; leaving it unset keeps its plain path
    return reduce, accum


def overlap_comm(ds: DeepSpeedOptions, device_type: str) -> bool:
    """ZeRO-1/2 reduction overlapped with backward: on a GPU by default (``deepspeed.overlap_comm``)."""
    if ds.overlap_comm is None:
        return device_type == "cuda" and ds.zero_stage in (1, 2)
    return ds.overlap_comm


def build_deepspeed_config(cfg: TrainConfig, device_type: str | None = None) -> dict[str, Any]:
    """DeepSpeed config for a resolved ``cfg`` (batch triple already consistent with the world size).

    ``device_type`` ("cuda" / "cpu") decides the ``auto`` options; default: cuda when torch sees a GPU.
    """
    ds = cfg.deepspeed
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    reduce_dtype, accum_dtype = reduction_dtypes(ds)
    out: dict[str, Any] = {
        "train_batch_size": ds.global_batch,
        "train_micro_batch_size_per_gpu": ds.micro_batch,
        "gradient_accumulation_steps": ds.grad_accum,
        # 0 disables clipping in DeepSpeed.
        "gradient_clipping": ds.grad_clip or 0.0,
        # Our logger prints progress; DeepSpeed's own step lines would only duplicate it.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": ds.zero_stage},
        "communication_data_type": reduce_dtype,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {
            "enabled": ds.precision == "fp16",
            # loss_scale 0 = dynamic scaling; overflowing steps are skipped and counted.
            "loss_scale": 0,
            "initial_scale_power": ds.initial_scale_power,
            "loss_scale_window": ds.loss_scale_window,
            "hysteresis": ds.hysteresis,
            "min_loss_scale": ds.min_loss_scale,
        },
    }
    if accum_dtype is not None:
        out["data_types"] = {"grad_accum_dtype": accum_dtype}
    zero = out["zero_optimization"]
    if ds.zero_stage >= 1:
        zero.update(
            contiguous_gradients=True, overlap_comm=overlap_comm(ds, device_type), reduce_scatter=True
        )
    if ds.zero_stage in (1, 2):
        zero.update(reduce_bucket_size=ds.reduce_bucket_size, allgather_bucket_size=ds.allgather_bucket_size)
    if ds.zero_stage == 3:
        # Export consolidates from the fp32 partitions, so 16-bit weights need not be gathered on save.
        # DeepSpeed's "memory efficient" F.linear replaces torch's process-wide and its backward escapes
        # cpu_bf16.fp32_gemm(): bf16 ZeRO-3 on CPU ran 3x slower (bench/train_step.py); no gain on GPU.
        zero.update(stage3_gather_16bit_weights_on_model_save=False, memory_efficient_linear=False)
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.config_file:
        with open(ds.config_file) as f:
            _deep_update(out, json.load(f))
    return out
