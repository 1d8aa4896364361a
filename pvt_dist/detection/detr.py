"""DETR on a PVT backbone: projection, sine positions, transformer, class and box heads."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import DEFORMABLE_STAGES, DETR_STAGES, Backbone, BackboneConfig
from .deformable_transformer import DeformableTransformerConfig
from .position_encoding import PositionEmbeddingSine
from .transformer import Transformer, TransformerConfig


@dataclass
class DETRConfig:
    """The detector: backbone, transformer and prediction heads."""

    head: str = "detr"
    """``detr``: DETR's single-scale transformer and softmax heads (the PVT paper's setup); ``deformable``:
    Deformable-DETR's multi-scale deformable transformer and sigmoid focal-loss heads on several stages."""
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """PVT variant, stages and initial weights."""
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    """Encoder/decoder shape of the ``detr`` head."""
    deformable: DeformableTransformerConfig = field(default_factory=DeformableTransformerConfig)
    """Transformer shape, feature levels and variants (box refinement, two-stage) of the ``deformable``
    head."""
    num_classes: int | None = None
    """Object classes K (contiguous labels 0..K-1); the head has K+1 outputs, the last is no-object.
    Null: the number of categories in the training annotation file."""
    num_queries: int | None = None
    """Object queries = maximum detections per image. Null: 100 for ``detr``, 300 for ``deformable``."""
    aux_loss: bool = True
    """Return the predictions of the earlier decoder layers as ``aux_outputs`` (auxiliary losses)."""

    def validate(self) -> None:
        """Check every field; the head-dependent nulls (stages, num_queries) are filled in here."""
        if self.head not in ("detr", "deformable"):
            raise ValueError(f"model.head: must be 'detr' or 'deformable', got {self.head!r}")
        deformable = self.head == "deformable"
        if self.backbone.stages is None:
            self.backbone.stages = list(DEFORMABLE_STAGES if deformable else DETR_STAGES)
        if self.num_queries is None:
            self.num_queries = 300 if deformable else 100
        if self.num_classes is None or self.num_classes < 1:
            raise ValueError(f"model.num_classes: must be >= 1, got {self.num_classes}")
        if self.num_queries < 1:
            raise ValueError(f"model.num_queries: must be >= 1, got {self.num_queries}")
        self.backbone.validate()
        if deformable:
            self.deformable.validate()
            stages = sorted(self.backbone.stages)
            if stages != list(range(stages[0], stages[-1] + 1)):
                raise ValueError(
                    f"model.backbone.stages: the deformable head needs consecutive stages (each level half "
                    f"the previous one's resolution), got {self.backbone.stages}"
                )
            levels = self.deformable.num_feature_levels
            if levels < len(stages):
                raise ValueError(
                    f"model.deformable.num_feature_levels: {levels} levels cannot hold the {len(stages)} "
                    f"backbone stages {stages}; use >= {len(stages)} (extra levels are stride-2 convs)"
                )


class MLP(nn.Module):
    """Linear layers with ReLU in between (DETR's box head: 256-256-4)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class DETR(nn.Module):
    """Set-prediction detector. ``forward(images, mask)`` returns DETR's output dict:

    ``pred_logits`` [B, Q, K+1], ``pred_boxes`` [B, Q, 4] (normalized cx, cy, w, h relative to each image's
    un-padded size), ``aux_outputs`` (a list of L-1 such dicts, earliest decoder layer first).
    """

    score_activation = "softmax"

    def __init__(
        self,
        backbone: Backbone,
        transformer: Transformer,
        num_classes: int,
        num_queries: int,
        aux_loss: bool = True,
    ):
        super().__init__()
        d = transformer.d_model
        self.backbone = backbone
        self.transformer = transformer
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.input_proj = nn.ModuleList(nn.Conv2d(c, d, kernel_size=1) for c in backbone.num_channels)
        # With several stages the encoder sees all their tokens; a learned per-stage embedding marks them.
        self.level_embed = (
            nn.Parameter(torch.zeros(len(backbone.num_channels), d))
            if len(backbone.num_channels) > 1
            else None
        )
        self.position = PositionEmbeddingSine(d // 2, normalize=True)
        self.query_embed = nn.Embedding(num_queries, d)
        self.class_embed = nn.Linear(d, num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed, std=0.02)

    def forward(self, images: Tensor, mask: Tensor) -> dict:
        """images: [B, 3, H, W]; mask: bool [B, H, W] (True = padding)."""
        srcs, masks, poss = [], [], []
        for lvl, (feat, m) in enumerate(self.backbone(images, mask)):
            src = self.input_proj[lvl](feat)  # [B, d, h, w]
            pos = self.position(m).to(src.dtype)
            if self.level_embed is not None:
                pos = pos + self.level_embed[lvl].view(1, -1, 1, 1).to(src.dtype)
            srcs.append(src.flatten(2).permute(2, 0, 1))  # [hw, B, d]
            poss.append(pos.flatten(2).permute(2, 0, 1))
            masks.append(m.flatten(1))  # [B, hw]
        hs, _ = self.transformer(
            torch.cat(srcs), torch.cat(masks, 1), self.query_embed.weight, torch.cat(poss)
        )
        logits = self.class_embed(hs)  # [L, B, Q, K+1]
        boxes = self.bbox_embed(hs).sigmoid()  # [L, B, Q, 4]
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])
            ]
        return out

    def param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Trainable parameters split into ``backbone`` and ``rest`` (they get different learning rates)."""
        groups: dict[str, list] = {"backbone": [], "rest": []}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups["backbone" if name.startswith("backbone.") else "rest"].append((name, p))
        return groups


def build_detr(cfg: DETRConfig) -> DETR:
    from .backbone import build_backbone
    from .transformer import build_transformer

    cfg.validate()
    return DETR(
        build_backbone(cfg.backbone),
        build_transformer(cfg.transformer),
        cfg.num_classes,
        cfg.num_queries,
        cfg.aux_loss,
    )
