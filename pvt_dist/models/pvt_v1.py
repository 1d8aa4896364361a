"""PVT v1 (Wang et al., arXiv 2102.12122): Tiny, Small, Medium, Large.

Non-overlapping patch embeddings (4, 2, 2, 2), one learned position embedding per stage, a cls token
in stage 4 only. Parameter names equal the authors' release, so their ``.pth`` loads with strict=True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import NUM_STAGES, PyramidModel, to_2tuple
from .layers import BLOCK_LN_EPS, PatchEmbed, init_weights, tokens_to_map
from .registry import register_model

PATCH_STRIDES = (4, 2, 2, 2)


def resize_grid_pos_embed(pos: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """[1, src_h*src_w, C] -> [1, dst_h*dst_w, C], bilinear (align_corners=False) as the authors resize."""
    if tuple(src) == tuple(dst):
        return pos
    pos = pos.reshape(1, src[0], src[1], -1).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=tuple(dst), mode="bilinear", align_corners=False)
    return pos.flatten(2).transpose(1, 2)


class PyramidVisionTransformer(PyramidModel):
    """PVT v1.

    Args:
        img_size: input size the position embeddings are stored for; other sizes resize them.
        features_only: backbone for dense prediction: no cls token, final norm or head, and
            ``pos_embed4`` without the cls slot (what the authors' detection code uses).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: list[int] = (64, 128, 320, 512),
        num_heads: list[int] = (1, 2, 5, 8),
        mlp_ratios: list[float] = (8, 8, 4, 4),
        depths: list[int] = (2, 2, 2, 2),
        sr_ratios: list[int] = (8, 4, 2, 1),
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        features_only: bool = False,
        out_indices: tuple[int, ...] = (0, 1, 2, 3),
        grad_checkpointing: bool = False,
    ):
        super().__init__(
            list(embed_dims), list(num_heads), list(mlp_ratios), list(depths), list(sr_ratios),
            num_classes, drop_rate, attn_drop_rate, drop_path_rate, out_indices, grad_checkpointing,
            dwconv=False, linear=False,
        )  # fmt: skip
        self.features_only = features_only
        h, w = to_2tuple(img_size)
        self.pos_grids: list[tuple[int, int]] = []
        chans = [in_chans, *embed_dims]
        for i, stride in enumerate(PATCH_STRIDES):
            setattr(self, f"patch_embed{i + 1}", PatchEmbed(chans[i], chans[i + 1], stride, stride))
            h, w = h // stride, w // stride
            if h < 1 or w < 1:
                raise ValueError(f"img_size {img_size!r} is too small for PVT's total stride of 32")
            self.pos_grids.append((h, w))
            has_cls = i == NUM_STAGES - 1 and not features_only
            pos = nn.Parameter(torch.zeros(1, h * w + int(has_cls), embed_dims[i]))
            setattr(self, f"pos_embed{i + 1}", pos)
        self.pos_drop = nn.Dropout(drop_rate)
        if not features_only:
            self.norm = nn.LayerNorm(embed_dims[3], eps=BLOCK_LN_EPS)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[3]))
            self.head = nn.Linear(embed_dims[3], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)
        for name, p in self.named_parameters():
            if name.startswith("pos_embed") or name == "cls_token":
                nn.init.trunc_normal_(p, std=0.02)

    def no_weight_decay(self) -> set[str]:
        # The authors exclude only the cls token (biases and norms are handled by the optimizer's 1-D rule).
        return set() if self.features_only else {"cls_token"}

    def _grid_pos_embed(self, i: int, hw: tuple[int, int]) -> torch.Tensor:
        """Stage ``i``'s grid position embedding [1, h*w, C], bilinearly resized when ``hw`` differs."""
        pos = getattr(self, f"pos_embed{i}")
        grid = self.pos_grids[i - 1]
        pos = pos[:, pos.shape[1] - grid[0] * grid[1] :]  # drops the cls slot of stage 4
        return resize_grid_pos_embed(pos, grid, hw)

    def _stage(self, i: int, x: torch.Tensor, classify: bool) -> tuple[torch.Tensor, tuple[int, int]]:
        """Stage ``i`` (1..4): [B, C, H, W] or the previous map -> tokens, grid."""
        x, hw = getattr(self, f"patch_embed{i}")(x)
        x = x + self._grid_pos_embed(i, hw)
        if classify and i == NUM_STAGES:
            cls = self.cls_token + self.pos_embed4[:, :1]
            x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x)
        return self._run_blocks(i, x, hw), hw

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> normalized stage-4 tokens [B, 1 + h*w, 512] (cls token first)."""
        if self.features_only:
            raise RuntimeError("a features_only PVT has no cls token or head: use forward_pyramid")
        for i in range(1, NUM_STAGES + 1):
            tokens, hw = self._stage(i, x, classify=True)
            x = tokens if i == NUM_STAGES else tokens_to_map(tokens, hw)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens [B, N, C] -> logits [B, num_classes] from the cls token."""
        x = x[:, 0]
        return x if pre_logits else self.head(x)


def _pvt(depths: list[int], default_drop_path: float, /, **kwargs) -> PyramidVisionTransformer:
    """The variant's depths and stochastic depth; either can be overridden."""
    return PyramidVisionTransformer(**{"depths": depths, "drop_path_rate": default_drop_path, **kwargs})


@register_model
def pvt_tiny(**kwargs) -> PyramidVisionTransformer:
    return _pvt([2, 2, 2, 2], 0.1, **kwargs)


@register_model
def pvt_small(**kwargs) -> PyramidVisionTransformer:
    return _pvt([3, 4, 6, 3], 0.1, **kwargs)


@register_model
def pvt_medium(**kwargs) -> PyramidVisionTransformer:
    return _pvt([3, 4, 18, 3], 0.3, **kwargs)


@register_model
def pvt_large(**kwargs) -> PyramidVisionTransformer:
    return _pvt([3, 8, 27, 3], 0.3, **kwargs)
