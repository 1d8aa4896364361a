"""The DeepSpeed JSON config, generated from ``TrainConfig`` (a user's own JSON entries win)."""

from __future__ import annotations

import json
from typing import Any

from pvt_dist.config import TrainConfig


def _deep_update(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def build_deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """DeepSpeed config for a resolved ``cfg`` (batch triple already consistent with the world size)."""
    ds = cfg.deepspeed
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
    zero = out["zero_optimization"]
    if ds.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=False, reduce_scatter=True)
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
