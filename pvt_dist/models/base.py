"""What PVT v1 and PVTv2 share: the stage loop, activation checkpointing and the timm-style API."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import Block, drop_path_schedule, tokens_to_map

NUM_STAGES = 4


def to_2tuple(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    if len(size) != 2:
        raise ValueError(f"img_size must be an int or (height, width), got {size!r}")
    return (int(size[0]), int(size[1]))


class PyramidModel(nn.Module):
    """Four stages of ``patch_embed{i}`` + ``block{i}`` (i = 1..4), as the authors name them.

    Subclasses implement ``_stage(i, x, classify)`` -> (tokens [B, N, C], grid (h, w)),
    ``forward_features`` and ``forward_head``.
    """

    def __init__(
        self,
        embed_dims: list[int],
        num_heads: list[int],
        mlp_ratios: list[float],
        depths: list[int],
        sr_ratios: list[int],
        num_classes: int,
        drop_rate: float,
        attn_drop_rate: float,
        drop_path_rate: float,
        out_indices: tuple[int, ...],
        grad_checkpointing: bool,
        dwconv: bool,
        linear: bool,
    ):
        super().__init__()
        for name, value in dict(
            embed_dims=embed_dims,
            num_heads=num_heads,
            mlp_ratios=mlp_ratios,
            depths=depths,
            sr_ratios=sr_ratios,
        ).items():
            if len(value) != NUM_STAGES:
                raise ValueError(f"{name} must have {NUM_STAGES} entries, got {value!r}")
        if any(i not in range(NUM_STAGES) for i in out_indices):
            raise ValueError(f"out_indices must be within 0..{NUM_STAGES - 1}, got {out_indices!r}")
        self.embed_dims = list(embed_dims)
        self.depths = list(depths)
        self.num_classes = num_classes
        self.out_indices = tuple(out_indices)
        self.grad_checkpointing = grad_checkpointing
        dpr = drop_path_schedule(drop_path_rate, depths)
        for i in range(NUM_STAGES):
            blocks = [
                Block(
                    embed_dims[i],
                    num_heads[i],
                    mlp_ratios[i],
                    sr_ratios[i],
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i][j],
                    dwconv=dwconv,
                    linear=linear,
                )
                for j in range(depths[i])
            ]
            setattr(self, f"block{i + 1}", nn.ModuleList(blocks))

    @property
    def pyramid_channels(self) -> list[int]:
        """Channels of the maps returned by ``forward_pyramid``."""
        return [self.embed_dims[i] for i in self.out_indices]

    @property
    def pyramid_strides(self) -> list[int]:
        return [(4, 8, 16, 32)[i] for i in self.out_indices]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def _run_blocks(self, i: int, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        for blk in getattr(self, f"block{i}"):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, hw, use_reentrant=False)
            else:
                x = blk(x, hw)
        return x

    def _stage(self, i: int, x: torch.Tensor, classify: bool) -> tuple[torch.Tensor, tuple[int, int]]:
        raise NotImplementedError

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] -> the maps of ``out_indices``: [B, C_i, H/s_i, W/s_i] for strides 4/8/16/32."""
        outs = []
        last = max(self.out_indices)
        for i in range(1, last + 2):
            tokens, hw = self._stage(i, x, classify=False)
            x = tokens_to_map(tokens, hw)
            if i - 1 in self.out_indices:
                outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> logits [B, num_classes]."""
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        dim = self.embed_dims[-1]
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
