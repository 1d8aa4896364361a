"""Drawing detections (and ground truth) on images with PIL."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

_COLORS = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
]


def draw_detections(
    image: Image.Image,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor | None,
    class_names: list[str],
    gt_boxes: torch.Tensor | None = None,
) -> Image.Image:
    """Boxes [N, 4] absolute xyxy; ``"name score"`` above each box; ground truth (if given) in white."""
    image = image.convert("RGB").copy()
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    if gt_boxes is not None:
        for b in gt_boxes.tolist():
            draw.rectangle(b, outline=(255, 255, 255), width=1)
    for i, (b, lab) in enumerate(zip(boxes.tolist(), labels.tolist())):
        color = _COLORS[lab % len(_COLORS)]
        draw.rectangle(b, outline=color, width=2)
        text = class_names[lab] if lab < len(class_names) else str(lab)
        if scores is not None:
            text += f" {float(scores[i]):.2f}"
        x0, y0 = b[0], max(0.0, b[1] - 11)
        tw = draw.textlength(text, font=font)
        draw.rectangle([x0, y0, x0 + tw + 2, y0 + 11], fill=color)
        draw.text((x0 + 1, y0), text, fill=(255, 255, 255), font=font)
    return image


def denormalize(image: torch.Tensor, mean, std) -> Image.Image:
    """[3, H, W] normalized tensor -> PIL image (for TensorBoard pictures of a val batch)."""
    x = image.float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return Image.fromarray((x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
