"""AdamW with the authors' parameter groups, and the per-step warmup + cosine learning rate."""

from __future__ import annotations

import logging
import math

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn

from pvt_dist.config import ConfigError, TrainConfig, peak_lr

log = logging.getLogger(__name__)


def build_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and 1-D params + ``model.no_weight_decay()`` (pos embeds, cls token)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


def select_optimizer(impl: str, device_type: str, offload: bool) -> str:
    """Which AdamW implementation a run gets: ``torch``, ``torch_fused``, ``fused`` or ``cpu_adam``.

    ``auto`` picks torch's fused AdamW on GPU (a CUDA kernel shipped with torch: no compiler at run time)
    and torch's foreach AdamW elsewhere. ZeRO-Offload steps on the host with DeepSpeedCPUAdam whatever
    ``impl`` says; ``fused`` (DeepSpeed FusedAdam, JIT-built with an nvcc matching torch's CUDA) needs a GPU.
    """
    if offload:
        return "cpu_adam"
    if impl == "auto":
        return "torch_fused" if device_type == "cuda" else "torch"
    if impl == "fused" and device_type != "cuda":
        raise ValueError(
            "optim.impl: fused (DeepSpeed FusedAdam) needs a GPU; use auto, torch or torch_fused"
        )
    return impl


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the authors' parameter groups, in the implementation ``select_optimizer`` picks."""
    o = cfg.optim
    groups = build_param_groups(model, o.weight_decay)
    lr = peak_lr(cfg)
    kwargs = dict(lr=lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    impl = select_optimizer(o.impl, device.type, cfg.deepspeed.offload_optimizer == "cpu")
    if impl == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if impl == "fused":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=impl == "torch_fused" or None, **kwargs)


def resolve_schedule(cfg: TrainConfig, train_samples: int, world_size: int) -> tuple[int, int, int]:
    """(steps_per_epoch, total_steps, warmup_steps) in optimizer steps; ConfigError naming the key.

    An epoch is ``(train_samples // world) // micro_batch // grad_accum`` optimizer steps, i.e. the recipe's
    samples / global batch at every world size. Repeated augmentation does not shorten it: the loader's
    own epochs are shorter then (it reads 1 / repeated_aug of the images, fewer still when repeated_aug does
    not divide the micro batch) and the data stream runs on across them. Runs before any process group
    (``pvt_dist.cluster.plan``) and again in the trainer, with the same numbers.
    """
    s, ds = cfg.schedule, cfg.deepspeed
    batches = (train_samples // world_size) // ds.micro_batch
    steps_per_epoch = s.steps_per_epoch or batches // ds.grad_accum
    if steps_per_epoch < 1:
        raise ConfigError(
            f"schedule.steps_per_epoch: {train_samples} training samples give {batches} micro batches of "
            f"{ds.micro_batch} per rank on {world_size} ranks, fewer than deepspeed.grad_accum "
            f"{ds.grad_accum}; lower deepspeed.global_batch or set schedule.steps_per_epoch"
        )
    total = s.total_steps or max(1, math.ceil(s.epochs * steps_per_epoch))
    warmup = s.warmup_steps if s.warmup_steps is not None else round(s.warmup_epochs * steps_per_epoch)
    if warmup >= total:
        key = "schedule.warmup_steps" if s.warmup_steps is not None else "schedule.warmup_epochs"
        length = "schedule.total_steps" if s.total_steps else "schedule.epochs"
        raise ConfigError(
            f"{key}: warmup ({warmup} steps) must be shorter than training ({total} steps from {length}; "
            f"{steps_per_epoch} steps per epoch); shorten the warmup or lengthen the run"
        )
    return steps_per_epoch, total, warmup


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int, warmup_steps: int):
    """Per-step schedule: linear warmup from ``warmup_lr``, then cosine to ``min_lr`` at ``total_steps``.

    Stateless in practice: ``step_update(step)`` sets the lr from the step alone, so a resumed run
    needs nothing but its step counter.
    """
    s = cfg.schedule
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps - warmup_steps),
        lr_min=s.min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=s.warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )
