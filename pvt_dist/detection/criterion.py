"""DETR's set criterion: Hungarian matching, then classification, L1 and GIoU losses per decoder layer.

The classification term is DETR's softmax cross-entropy with a down-weighted no-object class, or, for the
Deformable-DETR head (``focal_alpha`` set), a sigmoid focal loss over the K classes normalized by num_boxes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .matcher import HungarianMatcher


@dataclass
class LossConfig:
    """Matching costs, loss weights and the no-object weight."""

    cost_class: float | None = None
    """Matcher weight of the class cost. Null: the head's, 1 for DETR (-p) and 2 for Deformable-DETR
    (focal)."""
    cost_bbox: float = 5.0
    """Matcher weight of the L1 distance between normalized cxcywh boxes."""
    cost_giou: float = 2.0
    """Matcher weight of -GIoU."""
    ce_weight: float | None = None
    """Loss weight of ``loss_ce``. Null: the head's, 1 for DETR (cross-entropy) and 2 for Deformable-DETR
    (focal loss)."""
    bbox_weight: float = 5.0
    """Loss weight of ``loss_bbox`` (L1)."""
    giou_weight: float = 2.0
    """Loss weight of ``loss_giou`` (1 - GIoU)."""
    eos_coef: float = 0.1
    """Relative weight of the no-object class in the cross-entropy (DETR head; most queries are no-object)."""
    focal_alpha: float = 0.25
    """Focal loss alpha (Deformable-DETR head): weight of the positive term."""
    focal_gamma: float = 2.0
    """Focal loss gamma (Deformable-DETR head): down-weighting of easy examples."""

    def resolve(self, head: str) -> None:
        """Fill the head-dependent nulls (DETR's softmax weights or Deformable-DETR's focal ones)."""
        default = 2.0 if head == "deformable" else 1.0
        if self.cost_class is None:
            self.cost_class = default
        if self.ce_weight is None:
            self.ce_weight = default


def build_weight_dict(
    cfg: LossConfig, num_decoder_layers: int, aux_loss: bool, two_stage: bool = False, head: str = "detr"
) -> dict[str, float]:
    """``{'loss_ce': 1, 'loss_bbox': 5, 'loss_giou': 2, 'loss_ce_0': 1, ...}`` (``_i``: aux layer i,
    ``_enc``: the two-stage encoder proposals)."""
    cfg = copy.deepcopy(cfg)
    cfg.resolve(head)
    base = {"loss_ce": cfg.ce_weight, "loss_bbox": cfg.bbox_weight, "loss_giou": cfg.giou_weight}
    weights = dict(base)
    if aux_loss:
        for i in range(num_decoder_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in base.items()})
    if two_stage:
        weights.update({f"{k}_enc": v for k, v in base.items()})
    return weights


def _global_num_boxes(targets: list[dict], device: torch.device) -> Tensor:
    """Average target count per rank, so each rank's box losses are normalized identically."""
    n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return n.clamp(min=1.0)


class SetCriterion(nn.Module):
    """Computes named loss terms; the total is ``sum(weight_dict[k] * losses[k])``."""

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        eos_coef: float = 0.1,
        focal_alpha: float | None = None,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def check_targets(self, targets: list[dict]) -> None:
        for b, t in enumerate(targets):
            labels = t["labels"]
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"targets[{b}]['labels']: values must be in 0..{self.num_classes - 1}, got "
                    f"{sorted(set(labels.tolist()))}"
                )
            if t["boxes"].shape != (labels.numel(), 4):
                raise ValueError(
                    f"targets[{b}]['boxes']: shape {tuple(t['boxes'].shape)} != ({labels.numel()}, 4)"
                )

    def layer_losses(self, outputs: dict, targets: list[dict], num_boxes: Tensor) -> dict[str, Tensor]:
        """Losses of one decoder layer's predictions (matched independently)."""
        indices = self.matcher(outputs, targets)
        logits = outputs["pred_logits"].float()  # [B, Q, K+1] (softmax) or [B, Q, K] (focal)
        device = logits.device
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(device)
        src_idx = torch.cat([src for src, _ in indices]).to(device)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=device)
        target_classes[batch_idx, src_idx] = torch.cat(
            [t["labels"][j] for t, (_, j) in zip(targets, indices)]
        ).to(device)
        if self.focal_alpha is None:
            loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(device))
        else:
            # One-hot over K+1, the no-object column dropped: unmatched queries are all-negative.
            onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].to(logits.dtype)
            loss_ce = (
                sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, reduction="sum")
                / num_boxes
            )

        src_boxes = outputs["pred_boxes"][batch_idx, src_idx].float()  # [M, 4]
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(device).float()
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes)))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """outputs: DETR's dict; targets: per image ``labels`` int64 [N] in 0..K-1 and ``boxes`` [N, 4]
        normalized cxcywh. Returns the final layer's terms plus ``<term>_<i>`` for aux layer i."""
        self.check_targets(targets)
        num_boxes = _global_num_boxes(targets, outputs["pred_logits"].device)
        losses = self.layer_losses(outputs, targets, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self.layer_losses(aux, targets, num_boxes).items()})
        if "enc_outputs" in outputs:  # two-stage proposals are scored class-agnostically (all labels 0)
            binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc = self.layer_losses(outputs["enc_outputs"], binary, num_boxes)
            losses.update({f"{k}_enc": v for k, v in enc.items()})
        return losses

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        """Weighted sum of the terms that have a weight."""
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)


def build_criterion(
    cfg: LossConfig,
    num_classes: int,
    num_decoder_layers: int,
    aux_loss: bool,
    head: str = "detr",
    two_stage: bool = False,
) -> SetCriterion:
    """DETR's criterion (``head='detr'``) or Deformable-DETR's focal one (``head='deformable'``)."""
    cfg = copy.deepcopy(cfg)
    cfg.resolve(head)
    alpha = cfg.focal_alpha if head == "deformable" else None
    matcher = HungarianMatcher(cfg.cost_class, cfg.cost_bbox, cfg.cost_giou, alpha, cfg.focal_gamma)
    weights = build_weight_dict(cfg, num_decoder_layers, aux_loss, two_stage, head)
    return SetCriterion(num_classes, matcher, weights, cfg.eos_coef, alpha, cfg.focal_gamma)
