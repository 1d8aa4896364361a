"""Box format conversions and (generalized) IoU.

Boxes are float tensors [..., 4]; ``cxcywh`` is (center x, center y, width, height) and ``xyxy`` is
(left, top, right, bottom). Both may be absolute pixels or normalized to [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """COCO [..., 4] (x, y, w, h) -> [..., 4] (x0, y0, x1, y1)."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def box_xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """[..., 4] (x0, y0, x1, y1) -> COCO [..., 4] (x, y, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """[N, 4] xyxy -> [N]."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def check_boxes_xyxy(boxes: Tensor, name: str) -> None:
    """Raise ValueError naming ``name`` and the first offending row when x1 < x0 or y1 < y0 or non-finite.

    A predicted box can only become degenerate through NaN/inf (sigmoid keeps w, h >= 0), so this points
    at diverged training or corrupt targets rather than failing in an assert deep inside the loss.
    """
    if boxes.numel() == 0:
        return
    bad = ~torch.isfinite(boxes).all(dim=-1) | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name}: degenerate box at row {idx}: {boxes[idx].tolist()} (need finite x1 >= x0 and y1 >= y0; "
            f"{int(bad.sum())} of {boxes.shape[0]} boxes are bad)"
        )


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of [N, 4] and [M, 4] xyxy boxes -> (iou [N, M], union [N, M])."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of [N, 4] and [M, 4] xyxy boxes -> [N, M].

    Raises ValueError (not an assert) on degenerate boxes, which would otherwise yield NaN or wrong values.
    """
    check_boxes_xyxy(boxes1, "generalized_box_iou boxes1")
    check_boxes_xyxy(boxes2, "generalized_box_iou boxes2")
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull


def match_detections(boxes: Tensor, scores: Tensor, gt_boxes: Tensor, iou_threshold: float = 0.5) -> dict:
    """Greedy COCO-style matching of detections [D, 4] to ground truth [G, 4] (xyxy, one class).

    In descending score order each detection takes the unmatched ground-truth box it overlaps most with
    IoU >= ``iou_threshold``. A detection whose only such boxes are already taken is a ``duplicate`` (a
    second box on one object, what DETR's set loss should prevent); one overlapping none is a
    ``false_positive``. Returns {"ground_truth", "found", "duplicates", "false_positives"}.
    """
    g = gt_boxes.shape[0]
    out = {"ground_truth": g, "found": 0, "duplicates": 0, "false_positives": 0}
    if boxes.shape[0] == 0:
        return out
    if g == 0:
        out["false_positives"] = boxes.shape[0]
        return out
    iou = box_iou(boxes.float(), gt_boxes.float())[0]  # [D, G]
    taken = torch.zeros(g, dtype=torch.bool)
    for d in scores.argsort(descending=True).tolist():
        hits = iou[d] >= iou_threshold
        free = hits & ~taken
        if free.any():
            taken[torch.where(free, iou[d], -1.0).argmax()] = True
            out["found"] += 1
        elif hits.any():
            out["duplicates"] += 1
        else:
            out["false_positives"] += 1
    return out
