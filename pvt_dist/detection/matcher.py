"""Hungarian matching between predicted and ground-truth boxes (one-to-one, minimum total cost)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """Cost = cost_class * class cost + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU(xyxy)).

    DETR (softmax heads): the class cost is -p[target class], linear (not log-prob) so it is on the same
    scale as the box costs. Deformable-DETR (``focal_alpha`` set, sigmoid heads without a no-object slot):
    the focal-loss difference alpha*(1-p)^gamma*(-log p) - (1-alpha)*p^gamma*(-log(1-p)) at the target class.
    Every image's matching is independent; costs for the whole batch are computed in one matrix and split
    per image before scipy's ``linear_sum_assignment``.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float | None = None,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("matcher: all costs are 0 (cost_class, cost_bbox, cost_giou)")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def class_cost(self, logits: Tensor, tgt_ids: Tensor) -> Tensor:
        """logits: [B*Q, K(+1)]; tgt_ids: [N] -> cost [B*Q, N] (lower = better match)."""
        if self.focal_alpha is None:
            return -logits.softmax(-1)[:, tgt_ids]
        a, g = self.focal_alpha, self.focal_gamma
        p = logits.sigmoid()[:, tgt_ids]
        pos = a * (1 - p) ** g * -(p + 1e-8).log()
        neg = (1 - a) * p**g * -(1 - p + 1e-8).log()
        return pos - neg

    @torch.no_grad()
    def cost_matrices(self, outputs: dict, targets: list[dict]) -> list[Tensor]:
        """Per image b: cost [Q, N_b] (float32, CPU) between its Q predictions and N_b targets."""
        logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
        bs, nq = logits.shape[:2]
        out_boxes = pred_boxes.flatten(0, 1).float()  # [B*Q, 4]
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            return [torch.zeros(nq, 0) for _ in range(bs)]
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()
        cost_class = self.class_cost(logits.flatten(0, 1).float(), tgt_ids)
        cost_bbox = torch.cdist(out_boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        c = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        c = c.view(bs, nq, -1).cpu()
        return [c[b][:, part] for b, part in enumerate(_column_slices(sizes))]

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """outputs: ``pred_logits`` [B, Q, K+1] (softmax) or [B, Q, K] (focal), ``pred_boxes`` [B, Q, 4];
        targets: B dicts with ``labels`` [N_b] and ``boxes`` [N_b, 4] (normalized cxcywh).

        Returns B pairs (index_pred [min(Q, N_b)], index_target [min(Q, N_b)]) of int64 tensors.
        """
        out = []
        for c in self.cost_matrices(outputs, targets):
            i, j = linear_sum_assignment(c.numpy())
            out.append((torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)))
        return out


def _column_slices(sizes: list[int]) -> list[slice]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


def build_matcher(
    cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0, focal_alpha: float | None = None
) -> HungarianMatcher:
    return HungarianMatcher(cost_class, cost_bbox, cost_giou, focal_alpha)
