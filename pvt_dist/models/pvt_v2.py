"""PVTv2 (Wang et al., arXiv 2106.13797): b0..b5 and b2_li.

Overlapping patch embeddings, no position embeddings (the 3x3 depthwise conv in every MLP carries
position), a LayerNorm ``norm{i}`` closing each stage and mean-pooled stage-4 tokens for classification.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import NUM_STAGES, PyramidModel
from .layers import BLOCK_LN_EPS, PatchEmbed, init_weights, tokens_to_map
from .registry import register_model


class PyramidVisionTransformerV2(PyramidModel):
    """PVTv2. ``linear=True`` gives the "-li" variant (pooled linear spatial-reduction attention).

    ``features_only`` drops the classification head; ``img_size`` is accepted for a uniform
    constructor but unused, since nothing in PVTv2 depends on the input size.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: list[int] = (64, 128, 320, 512),
        num_heads: list[int] = (1, 2, 5, 8),
        mlp_ratios: list[float] = (8, 8, 4, 4),
        depths: list[int] = (3, 4, 6, 3),
        sr_ratios: list[int] = (8, 4, 2, 1),
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        linear: bool = False,
        features_only: bool = False,
        out_indices: tuple[int, ...] = (0, 1, 2, 3),
        grad_checkpointing: bool = False,
    ):
        super().__init__(
            list(embed_dims), list(num_heads), list(mlp_ratios), list(depths), list(sr_ratios),
            num_classes, drop_rate, attn_drop_rate, drop_path_rate, out_indices, grad_checkpointing,
            dwconv=True, linear=linear,
        )  # fmt: skip
        self.features_only = features_only
        chans = [in_chans, *embed_dims]
        for i in range(NUM_STAGES):
            kernel, stride = (7, 4) if i == 0 else (3, 2)
            embed = PatchEmbed(chans[i], chans[i + 1], kernel, stride, padding=kernel // 2)
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"norm{i + 1}", nn.LayerNorm(embed_dims[i], eps=BLOCK_LN_EPS))
        if not features_only:
            self.head = nn.Linear(embed_dims[3], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)

    def no_weight_decay(self) -> set[str]:
        return set()

    def _stage(self, i: int, x: torch.Tensor, classify: bool) -> tuple[torch.Tensor, tuple[int, int]]:
        x, hw = getattr(self, f"patch_embed{i}")(x)
        x = self._run_blocks(i, x, hw)
        return getattr(self, f"norm{i}")(x), hw

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> normalized stage-4 tokens [B, h*w, C]."""
        for i in range(1, NUM_STAGES + 1):
            tokens, hw = self._stage(i, x, classify=True)
            x = tokens if i == NUM_STAGES else tokens_to_map(tokens, hw)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens [B, N, C] -> logits [B, num_classes] from their mean."""
        if self.features_only:
            raise RuntimeError("a features_only PVTv2 has no head: use forward_pyramid")
        x = x.mean(dim=1)
        return x if pre_logits else self.head(x)


def _pvt_v2(dims, stage_depths, mlp, drop_path, /, **kwargs) -> PyramidVisionTransformerV2:
    """The variant's architecture and stochastic depth; any of them can be overridden."""
    cfg = dict(embed_dims=dims, depths=stage_depths, mlp_ratios=mlp, drop_path_rate=drop_path)
    return PyramidVisionTransformerV2(**{**cfg, **kwargs})


_WIDE = [64, 128, 320, 512]


@register_model
def pvt_v2_b0(**kwargs) -> PyramidVisionTransformerV2:
    return _pvt_v2([32, 64, 160, 256], [2, 2, 2, 2], [8, 8, 4, 4], 0.1, **kwargs)


@register_model
def pvt_v2_b1(**kwargs) -> PyramidVisionTransformerV2:
    return _pvt_v2(_WIDE, [2, 2, 2, 2], [8, 8, 4, 4], 0.1, **kwargs)


@register_model
def pvt_v2_b2(**kwargs) -> PyramidVisionTransformerV2:
    return _pvt_v2(_WIDE, [3, 4, 6, 3], [8, 8, 4, 4], 0.1, **kwargs)


@register_model
def pvt_v2_b2_li(**kwargs) -> PyramidVisionTransformerV2:
    kwargs.setdefault("linear", True)
    return _pvt_v2(_WIDE, [3, 4, 6, 3], [8, 8, 4, 4], 0.1, **kwargs)


@register_model
def pvt_v2_b3(**kwargs) -> PyramidVisionTransformerV2:
    return _pvt_v2(_WIDE, [3, 4, 18, 3], [8, 8, 4, 4], 0.3, **kwargs)


@register_model
def pvt_v2_b4(**kwargs) -> PyramidVisionTransformerV2:
    return _pvt_v2(_WIDE, [3, 8, 27, 3], [8, 8, 4, 4], 0.3, **kwargs)


@register_model
def pvt_v2_b5(**kwargs) -> PyramidVisionTransformerV2:
    return _pvt_v2(_WIDE, [3, 6, 40, 3], [4, 4, 4, 4], 0.3, **kwargs)
