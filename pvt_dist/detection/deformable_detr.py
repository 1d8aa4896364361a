"""Deformable-DETR on a PVT pyramid: stages 2-4 (strides 8/16/32) plus a stride-64 level, 300 queries.

Keys and shapes of the transformer, heads and query embeddings are Deformable-DETR's, so its released
checkpoints load with ``load_deformable_detr_weights`` (everything but the backbone and the input
projections, whose channels differ: ResNet's 512/1024/2048 against PVT's 128/320/512).
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pvt_dist.models.pretrained import load_state_dict_file

from .backbone import Backbone
from .deformable_transformer import DeformableTransformer, inverse_sigmoid
from .detr import MLP
from .position_encoding import PositionEmbeddingSine

log = logging.getLogger(__name__)

# Parameters whose learning rate is scaled by optim.linear_proj_lr_mult (Deformable-DETR: x0.1): the
# projections that move the sampling points.
LINEAR_PROJ_NAMES = ("reference_points", "sampling_offsets")


class DeformableDETR(nn.Module):
    """``forward(images, mask)`` -> ``pred_logits`` [B, Q, K] (sigmoid scores, no no-object slot),
    ``pred_boxes`` [B, Q, 4] (normalized cxcywh), ``aux_outputs`` (earlier decoder layers) and, two-stage,
    ``enc_outputs`` (the encoder's class-agnostic proposals)."""

    score_activation = "sigmoid"

    def __init__(
        self,
        backbone: Backbone,
        transformer: DeformableTransformer,
        num_classes: int,
        num_queries: int,
        num_feature_levels: int,
        aux_loss: bool = True,
        with_box_refine: bool = False,
        two_stage: bool = False,
    ):
        super().__init__()
        d = transformer.d_model
        self.backbone = backbone
        self.transformer = transformer
        self.num_classes, self.num_queries = num_classes, num_queries
        self.num_feature_levels = num_feature_levels
        self.aux_loss, self.with_box_refine, self.two_stage = aux_loss, with_box_refine, two_stage
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, 2 * d)  # query position and target, concatenated
        channels = list(backbone.num_channels)
        if num_feature_levels < len(channels):
            raise ValueError(
                f"model.deformable.num_feature_levels: {num_feature_levels} < the {len(channels)} backbone "
                f"stages {backbone.stages}"
            )
        proj = [nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(32, d)) for c in channels]
        in_ch = channels[-1]
        for _ in range(num_feature_levels - len(channels)):  # extra levels: 3x3 stride-2 convs
            proj.append(nn.Sequential(nn.Conv2d(in_ch, d, 3, stride=2, padding=1), nn.GroupNorm(32, d)))
            in_ch = d
        self.input_proj = nn.ModuleList(proj)
        self.position = PositionEmbeddingSine(d // 2, normalize=True, offset=0.5)

        class_embed = nn.Linear(d, num_classes)
        bbox_embed = MLP(d, d, 4, 3)
        prior_prob = 0.01  # every query starts as "background" with p = 0.01 (focal-loss init)
        nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        for p in self.input_proj:
            nn.init.xavier_uniform_(p[0].weight, gain=1)
            nn.init.zeros_(p[0].bias)
        # Two-stage adds one more (class, box) head pair, for the encoder proposals.
        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            # One head shared by every layer (the same module repeated, as the reference's state_dict has it).
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([class_embed] * num_pred)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed
            for head in self.bbox_embed:
                nn.init.zeros_(head.layers[-1].bias[2:])

    def levels(self, images: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Projected maps [B, d, H_l, W_l], their padding masks and sine positions, finest level first."""
        feats = self.backbone(images, mask)
        srcs, masks = [], []
        for lvl, (feat, m) in enumerate(feats):
            srcs.append(self.input_proj[lvl](feat))
            masks.append(m)
        for lvl in range(len(feats), self.num_feature_levels):
            src = self.input_proj[lvl](feats[-1][0] if lvl == len(feats) else srcs[-1])
            masks.append(F.interpolate(mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0])
            srcs.append(src)
        pos = [self.position(m).to(s.dtype) for s, m in zip(srcs, masks)]
        return srcs, masks, pos

    def forward(self, images: Tensor, mask: Tensor) -> dict:
        """images: [B, 3, H, W]; mask: bool [B, H, W] (True = padding)."""
        srcs, masks, pos = self.levels(images, mask)
        query = None if self.two_stage else self.query_embed.weight
        hs, init_ref, inter_refs, enc_class, enc_coord = self.transformer(srcs, masks, pos, query)
        logits, boxes = [], []
        for lvl in range(hs.shape[0]):
            reference = inverse_sigmoid(init_ref if lvl == 0 else inter_refs[lvl - 1])
            delta = self.bbox_embed[lvl](hs[lvl]).float()
            if reference.shape[-1] == 4:
                coord = delta + reference
            else:
                coord = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            logits.append(self.class_embed[lvl](hs[lvl]))
            boxes.append(coord.sigmoid())
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])
            ]
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_class, "pred_boxes": enc_coord.sigmoid()}
        return out

    def param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Trainable parameters as ``backbone``, ``linear_proj`` (sampling offsets and reference points,
        lr x0.1 in the recipe) and ``rest``."""
        groups: dict[str, list] = {"backbone": [], "linear_proj": [], "rest": []}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("backbone."):
                groups["backbone"].append((name, p))
            elif any(k in name for k in LINEAR_PROJ_NAMES):
                groups["linear_proj"].append((name, p))
            else:
                groups["rest"].append((name, p))
        return groups


@dataclass
class DetectorLoadReport:
    """What ``load_deformable_detr_weights`` did, key by key."""

    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    """Checkpoint key -> why it was not loaded (backbone, input projection channels, class count)."""
    missing: list[str] = field(default_factory=list)
    """Model keys the checkpoint has no value for (backbone and input projections keep their init)."""

    def summary(self) -> str:
        n_loaded, n_skipped, n_missing = len(self.loaded), len(self.skipped), len(self.missing)
        return f"loaded {n_loaded} tensors, skipped {n_skipped}, kept init for {n_missing}"


def load_deformable_detr_weights(
    model: DeformableDETR, source: str | os.PathLike | dict
) -> DetectorLoadReport:
    """Load a Deformable-DETR checkpoint (file or state dict) into ``model``.

    Skipped: ``backbone.*`` (a ResNet, not a PVT), ``input_proj.*`` whose shapes differ (the backbone's
    channels) and class heads whose class count differs (fine-tuning on other categories). Every other key
    must exist in the model with the same shape, and every transformer / head / query key of the model must
    be in the checkpoint; anything else is an error naming the keys.
    """
    name = "state dict" if isinstance(source, dict) else os.fspath(source)
    sd = dict(source) if isinstance(source, dict) else load_state_dict_file(source)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    own = model.state_dict()
    # A projection whose conv does not fit (other backbone channels) is skipped whole, its GroupNorm too.
    misfit_proj = {
        key.split(".")[1]
        for key, value in sd.items()
        if key.startswith("input_proj.")
        and key.endswith(".0.weight")
        and key in own
        and own[key].shape != value.shape
    }
    report, to_load, errors = DetectorLoadReport(), {}, []
    for key, value in sd.items():
        if key.startswith("backbone."):
            report.skipped[key] = "backbone (the detector's backbone is a PVT)"
        elif key.startswith("input_proj.") and key.split(".")[1] in misfit_proj:
            report.skipped[key] = "input projection of other backbone channels"
        elif key not in own:
            errors.append(f"unexpected {key}")
        elif own[key].shape != value.shape:
            if "class_embed." in key:
                report.skipped[key] = f"class count {tuple(value.shape)} vs {tuple(own[key].shape)}"
            else:
                errors.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        else:
            to_load[key] = value
    for key in own:
        if key not in to_load and key not in report.skipped:
            if key.startswith(("backbone.", "input_proj.")):
                report.missing.append(key)
            else:
                errors.append(f"missing {key}")
    if errors:
        raise ValueError(f"{name}: not a matching Deformable-DETR checkpoint: " + "; ".join(errors[:20]))
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    log.info("Deformable-DETR weights from %s: %s", name, report.summary())
    return report
