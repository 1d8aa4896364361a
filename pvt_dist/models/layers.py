"""Building blocks shared by PVT v1 and PVTv2.

Attribute names follow the authors' released code (``q``, ``kv``, ``proj``, ``sr``, ``norm``,
``fc1``, ``dwconv.dwconv``, ``fc2``), so ``state_dict()`` keys match their checkpoints exactly.
Tokens are ``[B, N, C]`` with ``N = H * W`` in row-major order of the ``H x W`` grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

# The authors build blocks and final norms with eps=1e-6, but keep PyTorch's default (1e-5) in the
# patch-embedding norms and the norm after the spatial-reduction conv. Matching both matters for
# reproducing their outputs from their weights.
BLOCK_LN_EPS = 1e-6
DEFAULT_LN_EPS = 1e-5


def tokens_to_map(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[B, H*W, C] -> [B, C, H, W]."""
    b, _, c = x.shape
    return x.transpose(1, 2).reshape(b, c, hw[0], hw[1])


class DWConv(nn.Module):
    """3x3 depthwise conv over the token grid (PVTv2's MLP); the inner name gives ``dwconv.dwconv``."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return self.dwconv(tokens_to_map(x, hw)).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """fc1 -> [ReLU if linear] -> [3x3 depthwise conv if dwconv] -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, dwconv: bool = False, linear: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden) if dwconv else None
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)
        self.relu = nn.ReLU(inplace=True) if linear else None

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = self.fc1(x)
        if self.relu is not None:
            x = self.relu(x)
        if self.dwconv is not None:
            x = self.dwconv(x, hw)
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys/values come from a spatially reduced token grid.

    ``sr_ratio > 1``: K/V tokens from a ``Conv2d(k=s=sr_ratio)`` over the grid, then LayerNorm.
    ``linear=True`` (PVTv2-li): K/V tokens from a 7x7 adaptive average pool, 1x1 conv, LayerNorm, GELU,
    at every stage. The attention itself runs in ``F.scaled_dot_product_attention`` so GPUs pick the
    flash / memory-efficient kernels.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        linear: bool = False,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        self.linear = linear
        if linear:
            self.pool = nn.AdaptiveAvgPool2d(7)
            self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1)
            self.norm = nn.LayerNorm(dim, eps=DEFAULT_LN_EPS)
            self.act = nn.GELU()
        elif sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=DEFAULT_LN_EPS)

    def reduced_tokens(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """[B, N, C] -> [B, M, C], the tokens that keys and values are computed from."""
        if self.linear:
            x_ = self.sr(self.pool(tokens_to_map(x, hw))).flatten(2).transpose(1, 2)
            return self.act(self.norm(x_))
        if self.sr_ratio > 1:
            x_ = self.sr(tokens_to_map(x, hw)).flatten(2).transpose(1, 2)
            return self.norm(x_)
        return x

    def qkv(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q [B, h, N, d], k and v [B, h, M, d]."""
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(self.reduced_tokens(x, hw))
        # First C outputs of kv are K, last C are V (the authors' layout).
        kv = kv.reshape(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, kv[0], kv[1]

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x, hw)
        drop = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(SRA(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        dwconv: bool = False,
        linear: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_LN_EPS)
        self.attn = SpatialReductionAttention(
            dim, num_heads, sr_ratio, qkv_bias, attn_drop=attn_drop, proj_drop=drop, linear=linear
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop, dwconv=dwconv, linear=linear)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x), hw))


class PatchEmbed(nn.Module):
    """Conv patch embedding, then flatten and LayerNorm.

    v1: non-overlapping (kernel = stride = patch), so sizes not divisible by the stride are floored.
    v2: overlapping (kernel 7/3, padding kernel//2), which gives ceil(size / stride).
    """

    def __init__(self, in_chans: int, embed_dim: int, kernel: int, stride: int, padding: int = 0):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim, eps=DEFAULT_LN_EPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, C_in, H, W] -> tokens [B, h*w, C] and the grid (h, w)."""
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


def init_weights(module: nn.Module) -> None:
    """The authors' init: trunc-normal(0.02) linears with zero bias, unit LayerNorms, He-style convs."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def drop_path_schedule(rate: float, depths: list[int]) -> list[list[float]]:
    """Stochastic depth rising linearly from 0 to ``rate`` over all blocks, split per stage."""
    # On the CPU explicitly: models are also built under a meta-device context (pvt_dist.cluster.plan counts
    # parameters that way), where a default-device tensor would have no values to read.
    rates = torch.linspace(0, rate, sum(depths), device="cpu").tolist()
    out, start = [], 0
    for d in depths:
        out.append(rates[start : start + d])
        start += d
    return out
