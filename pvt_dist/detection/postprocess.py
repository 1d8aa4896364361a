"""Turn DETR outputs into per-image detections in original-image pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Softmax, best non-background class per query, boxes scaled to the original image size."""

    @torch.no_grad()
    def forward(self, outputs: dict, orig_sizes: Tensor) -> list[dict[str, Tensor]]:
        """outputs: ``pred_logits`` [B, Q, K+1], ``pred_boxes`` [B, Q, 4]; orig_sizes: [B, 2] (height, width).

        Returns B dicts: ``scores`` [Q], ``labels`` [Q] (contiguous 0..K-1), ``boxes`` [Q, 4] absolute xyxy.
        """
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        if len(logits) != len(orig_sizes):
            raise ValueError(f"postprocess: {len(logits)} predictions but {len(orig_sizes)} image sizes")
        prob = F.softmax(logits, -1)
        scores, labels = prob[..., :-1].max(-1)
        h, w = orig_sizes.to(boxes.device).float().unbind(1)
        scale = torch.stack([w, h, w, h], dim=1)[:, None, :]  # [B, 1, 4]
        xyxy = box_cxcywh_to_xyxy(boxes) * scale
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, xyxy)]
