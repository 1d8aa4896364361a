"""Mixup / CutMix with label smoothing on device batches (timm's implementation)."""

from __future__ import annotations

from timm.data import Mixup

from pvt_dist.data.config import DataConfig


def build_mixup(cfg: DataConfig) -> Mixup | None:
    """None when Mixup and CutMix are both off; then the loss applies `cfg.label_smoothing` itself.

    Otherwise a callable `(images [B,3,H,W], labels int64 [B]) -> (images, soft_targets [B,num_classes])`
    that mixes in place on the batch's device; soft targets already include label smoothing, so train
    with soft-target cross-entropy. The "batch" and "pair" modes need an even batch size.
    """
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode=cfg.mixup_mode,
        label_smoothing=cfg.label_smoothing,
        num_classes=cfg.num_classes,
    )
