"""Sine position encoding computed from the padding mask (DETR's ``PositionEmbeddingSine``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine encoding of the *un-padded* pixel coordinates.

    Coordinates are the cumulative sum of the valid-pixel mask, so padding added to batch images of different
    sizes does not shift the encoding of the real pixels. With ``normalize`` they are scaled to
    [0, ``scale``] by the extent of each image's valid region. ``offset`` is subtracted before normalizing:
    DETR uses 0 (coordinates 1..H), Deformable-DETR 0.5 (pixel centres); weights trained with one expect it.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale=None,
        offset: float = 0.0,
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset

    def forward(self, mask: Tensor) -> Tensor:
        """mask: bool [B, H, W], True on padding -> pos: float [B, 2*num_pos_feats, H, W]."""
        not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed - self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t  # [B, H, W, F]
        pos_y = y_embed[:, :, :, None] / dim_t
        # Interleave sin on even and cos on odd feature indices.
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def build_position_encoding(hidden_dim: int) -> PositionEmbeddingSine:
    return PositionEmbeddingSine(hidden_dim // 2, normalize=True)
