"""Multi-scale deformable attention (Deformable-DETR, arXiv 2010.04159), pure PyTorch.

Each query attends to ``n_points`` sampled locations per head and per feature level around its reference
point, instead of to every token. Parameter names, shapes and initialisation follow Deformable-DETR's
``MSDeformAttn``, so its checkpoints load as they are. The sampling core is ``F.grid_sample`` (bilinear, zero
padding, ``align_corners=False``), so it runs on any device and dtype; a fused kernel can replace
``ms_deform_attn_core`` later without changing the module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def ms_deform_attn_core(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Weighted sum of bilinearly sampled values.

    value: [N, S, M, D] (S = sum of H_l*W_l, M heads of D channels); spatial_shapes: int64 [L, 2] (H_l, W_l);
    sampling_locations: [N, Q, M, L, P, 2] as (x, y) in [0, 1] of each level's map (outside samples zeros);
    attention_weights: [N, Q, M, L, P]. Returns [N, Q, M*D] in value's dtype.

    Sampling runs in fp32 whatever the storage dtype: locations in bf16 would be off by up to ~0.2 pixel on a
    100-pixel map, and the gather is memory-bound, so fp32 costs little.
    """
    n, _, m, d = value.shape
    _, q, _, n_levels, n_points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_levels = value.float().split(sizes, dim=1)
    grids = 2 * sampling_locations.float() - 1  # grid_sample's [-1, 1] convention
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        v = value_levels[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, int(h), int(w))
        # [N, Q, M, P, 2] -> [N*M, Q, P, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [N*M, D, Q, L*P] weighted by [N*M, 1, Q, L*P], summed over the L*P samples.
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.float().transpose(1, 2).reshape(n * m, 1, q, n_levels * n_points)
    out = (stacked * weights).sum(-1).view(n, m * d, q)
    return out.transpose(1, 2).contiguous().to(value.dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with Deformable-DETR's parameters.

    ``sampling_offsets`` Linear(d, M*L*P*2), ``attention_weights`` Linear(d, M*L*P) (softmax over the L*P
    samples of each head), ``value_proj`` and ``output_proj`` Linear(d, d).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"MSDeformAttn: d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Offsets start as a fixed pattern: head h looks along direction 2*pi*h/M (scaled so the larger
        # coordinate is 1), point i at distance i+1 pixels; the query-dependent part (weight) starts at 0.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Tensor,
        input_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """query: [N, Q, C]; reference_points: [N, Q, L, 2] (x, y) or [N, Q, L, 4] (cx, cy, w, h), in [0, 1]
        of each level's padded map; input_flatten: [N, S, C] (levels concatenated, row-major);
        input_spatial_shapes: int64 [L, 2] (H_l, W_l); input_level_start_index: [L]; input_padding_mask:
        bool [N, S] (True = padding, its values are zeroed). Returns [N, Q, C]."""
        n, q, _ = query.shape
        _, s, _ = input_flatten.shape
        if int((input_spatial_shapes[:, 0] * input_spatial_shapes[:, 1]).sum()) != s:
            raise ValueError(
                f"MSDeformAttn: input_spatial_shapes {input_spatial_shapes.tolist()} cover "
                f"{int(input_spatial_shapes.prod(1).sum())} tokens, input_flatten has {s}"
            )
        m, lv, p = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(n, q, m, lv, p, 2).float()
        weights = self.attention_weights(query).view(n, q, m, lv * p).float().softmax(-1)
        weights = weights.view(n, q, m, lv, p)
        ref = reference_points.float()[:, :, None, :, None, :]  # [N, Q, 1, L, 1, 2|4]
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalize by (W_l, H_l).
            normalizer = input_spatial_shapes.flip(-1).to(offsets)  # [L, 2] as (W, H)
            locations = ref + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            # Offsets are fractions of the reference box: P points span half its size each way.
            locations = ref[..., :2] + offsets / p * ref[..., 2:] * 0.5
        else:
            raise ValueError(
                f"MSDeformAttn: reference_points last dim must be 2 or 4, got {reference_points.shape[-1]}"
            )
        out = ms_deform_attn_core(value, input_spatial_shapes, locations, weights)
        return self.output_proj(out.to(query.dtype))
