"""``build_detector(cfg)``: the detector named by ``model.head`` (``detr`` or ``deformable``)."""

from __future__ import annotations

from torch import nn

from .backbone import build_backbone
from .deformable_detr import DeformableDETR
from .deformable_transformer import build_deformable_transformer
from .detr import DETRConfig, build_detr


def build_detector(cfg: DETRConfig) -> nn.Module:
    """DETR (softmax heads, 100 queries, stage 4) or Deformable-DETR (sigmoid heads, 300 queries, stages
    2-4 plus extra levels), both with ``forward(images, mask)`` and ``param_groups()``."""
    cfg.validate()
    if cfg.head == "detr":
        return build_detr(cfg)
    d = cfg.deformable
    return DeformableDETR(
        build_backbone(cfg.backbone),
        build_deformable_transformer(d, cfg.num_queries),
        cfg.num_classes,
        cfg.num_queries,
        d.num_feature_levels,
        cfg.aux_loss,
        d.with_box_refine,
        d.two_stage,
    )


def num_decoder_layers(cfg: DETRConfig) -> int:
    """Decoder depth of the configured head (the number of supervised layers)."""
    return (
        cfg.deformable.num_decoder_layers if cfg.head == "deformable" else cfg.transformer.num_decoder_layers
    )
