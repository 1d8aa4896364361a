"""Turn detector outputs into per-image detections in original-image pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """DETR (``score_activation='softmax'``): best non-background class per query, Q detections.
    Deformable-DETR (``'sigmoid'``): sigmoid scores of every (query, class) pair, the ``top_k`` best of the
    Q*K pairs kept (a query may appear with several classes). Boxes are scaled to the original image size."""

    def __init__(self, score_activation: str = "softmax", top_k: int = 100):
        super().__init__()
        if score_activation not in ("softmax", "sigmoid"):
            raise ValueError(
                f"postprocess: score_activation must be softmax or sigmoid, got {score_activation!r}"
            )
        self.score_activation, self.top_k = score_activation, top_k

    @classmethod
    def for_model(cls, model: nn.Module) -> PostProcess:
        """The post-processing a detector's heads were trained for (also through a DeepSpeed engine)."""
        return cls(getattr(getattr(model, "module", model), "score_activation", "softmax"))

    @torch.no_grad()
    def forward(self, outputs: dict, orig_sizes: Tensor) -> list[dict[str, Tensor]]:
        """outputs: ``pred_logits`` [B, Q, K+1] (softmax) or [B, Q, K] (sigmoid), ``pred_boxes`` [B, Q, 4];
        orig_sizes: [B, 2] (height, width).

        Returns B dicts: ``scores`` [D], ``labels`` [D] (contiguous 0..K-1), ``boxes`` [D, 4] absolute xyxy,
        D = Q (softmax) or min(top_k, Q*K) (sigmoid).
        """
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        if len(logits) != len(orig_sizes):
            raise ValueError(f"postprocess: {len(logits)} predictions but {len(orig_sizes)} image sizes")
        h, w = orig_sizes.to(boxes.device).float().unbind(1)
        scale = torch.stack([w, h, w, h], dim=1)[:, None, :]  # [B, 1, 4]
        xyxy = box_cxcywh_to_xyxy(boxes) * scale
        if self.score_activation == "softmax":
            scores, labels = F.softmax(logits, -1)[..., :-1].max(-1)
        else:
            num_classes = logits.shape[-1]
            k = min(self.top_k, logits.shape[1] * num_classes)
            scores, index = logits.sigmoid().flatten(1).topk(k, dim=1)  # over all Q*K pairs
            labels = index % num_classes
            xyxy = torch.gather(xyxy, 1, (index // num_classes)[..., None].expand(-1, -1, 4))
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, xyxy)]
