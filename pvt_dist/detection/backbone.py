"""PVT backbone for DETR: selected pyramid maps with their downsampled padding masks."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pvt_dist.models import build_model, load_pretrained

log = logging.getLogger(__name__)

DETR_STAGES = [4]
DEFORMABLE_STAGES = [2, 3, 4]


@dataclass
class BackboneConfig:
    """Which PVT feeds the detector and where its weights come from."""

    name: str = "pvt_small"
    """Model name: ``pvt_tiny`` .. ``pvt_large``, ``pvt_v2_b0`` .. ``pvt_v2_b5``, ``pvt_v2_b2_li``."""
    stages: list[int] | None = None
    """Pyramid stages (1..4, strides 4/8/16/32) fed to the transformer. Null: the head's own choice, [4] for
    DETR (the PVT paper) and [2, 3, 4] for Deformable-DETR (strides 8/16/32, as the reference)."""
    pretrained: str | None = None
    """Stage-1 export or the authors' ``.pth``; None keeps the random init (tests only)."""
    img_size: int = 224
    """Size the PVT v1 position embeddings are stored for (224 for the authors' weights); they are
    resized to each batch's grid on the fly."""
    drop_path_rate: float = 0.1
    """Stochastic depth in the backbone blocks."""
    grad_checkpointing: bool = False
    """Recompute backbone activations in backward (saves memory at 800x1333)."""
    freeze: bool = False
    """Train the transformer and heads only (``requires_grad=False`` on the backbone)."""

    def validate(self) -> None:
        if self.stages is None:
            return
        if not self.stages or any(s not in (1, 2, 3, 4) for s in self.stages):
            raise ValueError(
                f"model.backbone.stages: must be a non-empty subset of 1..4, got {self.stages!r}"
            )
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"model.backbone.stages: repeated stage in {self.stages!r}")


class Backbone(nn.Module):
    """Wraps ``build_model(name, features_only=True).forward_pyramid`` for padded batches."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        cfg.validate()
        self.stages = sorted(cfg.stages if cfg.stages is not None else DETR_STAGES)
        self.body = build_model(
            cfg.name,
            features_only=True,
            out_indices=tuple(s - 1 for s in self.stages),
            img_size=cfg.img_size,
            drop_path_rate=cfg.drop_path_rate,
            grad_checkpointing=cfg.grad_checkpointing,
        )
        if cfg.pretrained:
            report = load_pretrained(self.body, cfg.pretrained)
            log.info("backbone %s from %s: %s", cfg.name, cfg.pretrained, report.summary())
            self.load_report = report
        if cfg.freeze:
            self.body.requires_grad_(False)
        self.num_channels: list[int] = list(self.body.pyramid_channels)
        self.strides: list[int] = list(self.body.pyramid_strides)

    def forward(self, images: Tensor, mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        """images: [B, 3, H, W]; mask: bool [B, H, W] (True = padding).

        Returns one (feature [B, C_i, H/s_i, W/s_i], mask bool [B, H/s_i, W/s_i]) per selected stage.
        """
        out = []
        for feat in self.body.forward_pyramid(images):
            m = F.interpolate(mask[None].float(), size=feat.shape[-2:]).to(torch.bool)[0]
            out.append((feat, m))
        return out


def build_backbone(cfg: BackboneConfig) -> Backbone:
    return Backbone(cfg)
