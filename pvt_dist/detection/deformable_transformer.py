"""Deformable-DETR's encoder-decoder: multi-scale deformable attention over all pyramid levels.

Batch-first layouts throughout: the flattened levels are [B, S, d] (S = sum of H_l*W_l), queries [B, Q, d].
Module and parameter names are Deformable-DETR's (``transformer.encoder.layers.0.self_attn.value_proj`` ...),
so its checkpoints load into this module key for key.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ms_deform_attn import MSDeformAttn


@dataclass
class DeformableTransformerConfig:
    """Shape of the deformable transformer and the Deformable-DETR variants."""

    d_model: int = 256
    """Width of every token; the channel count every pyramid level is projected to."""
    nhead: int = 8
    """Attention heads (deformable and decoder self-attention)."""
    num_encoder_layers: int = 6
    """Encoder depth."""
    num_decoder_layers: int = 6
    """Decoder depth; every layer's output is supervised (the first five as aux losses)."""
    dim_feedforward: int = 1024
    """Hidden width of the ReLU feed-forward blocks (Deformable-DETR: 1024)."""
    dropout: float = 0.1
    """Dropout after attention and in the feed-forward blocks."""
    num_feature_levels: int = 4
    """Levels attended to: the backbone stages, then extra stride-2 levels made by 3x3 convs."""
    enc_n_points: int = 4
    """Sampling points per head and level in the encoder."""
    dec_n_points: int = 4
    """Sampling points per head and level in the decoder's cross-attention."""
    with_box_refine: bool = False
    """Iterative box refinement: each decoder layer refines the previous layer's boxes (own heads)."""
    two_stage: bool = False
    """Queries are the top-scoring encoder proposals instead of learned embeddings (needs box refine to
    match the paper's 46.9 AP, as the reference's configs do)."""

    def validate(self) -> None:
        for key in ("d_model", "nhead", "num_encoder_layers", "num_decoder_layers", "dim_feedforward"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.deformable.{key}: must be >= 1, got {getattr(self, key)}")
        if self.d_model % self.nhead:
            raise ValueError(f"model.deformable.nhead: {self.nhead} does not divide d_model {self.d_model}")
        if self.d_model % 32:
            raise ValueError(
                f"model.deformable.d_model: GroupNorm(32) needs a multiple of 32, got {self.d_model}"
            )
        for key in ("num_feature_levels", "enc_n_points", "dec_n_points"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.deformable.{key}: must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.deformable.dropout: must be in [0, 1), got {self.dropout}")


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class DeformableEncoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        """src, pos: [B, S, d]; reference_points: [B, S, L, 2]; padding_mask: bool [B, S]."""
        src2 = self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class DeformableDecoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, src, spatial_shapes, level_start_index, padding_mask):
        """tgt, query_pos: [B, Q, d]; reference_points: [B, Q, L, 2|4]; src: [B, S, d] (encoder memory)."""
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.cross_attn(
            tgt + query_pos, reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))


class DeformableEncoder(nn.Module):
    def __init__(self, layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    @staticmethod
    def reference_points(spatial_shapes: Tensor, valid_ratios: Tensor) -> Tensor:
        """Every token's pixel centre, normalized by its image's valid extent and then re-expressed in each
        level's padded map: [B, S, L, 2] as (x, y)."""
        refs = []
        for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
            ys, xs = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=valid_ratios.device),
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=valid_ratios.device),
                indexing="ij",
            )
            ref_y = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src, spatial_shapes, level_start_index, valid_ratios, pos, padding_mask):
        ref = self.reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, ref, spatial_shapes, level_start_index, padding_mask)
        return src


class DeformableDecoder(nn.Module):
    """Returns every layer's output and reference boxes. With box refinement the model sets ``bbox_embed``
    (one head per layer) and each layer's boxes become the next layer's (detached) references."""

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(self, tgt, reference_points, src, spatial_shapes, level_start_index, valid_ratios, query_pos,
                padding_mask):  # fmt: skip
        """Returns (hs [num_layers, B, Q, d], references [num_layers, B, Q, 2|4])."""
        hs, refs = [], []
        for lid, layer in enumerate(self.layers):
            ratios = valid_ratios if reference_points.shape[-1] == 2 else torch.cat([valid_ratios] * 2, -1)
            ref_input = reference_points[:, :, None] * ratios[:, None]
            tgt = layer(tgt, query_pos, ref_input, src, spatial_shapes, level_start_index, padding_mask)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[lid](tgt).float()
                if reference_points.shape[-1] == 4:
                    new_ref = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    new_ref = torch.cat(
                        [
                            (delta[..., :2] + inverse_sigmoid(reference_points)).sigmoid(),
                            delta[..., 2:].sigmoid(),
                        ],
                        -1,
                    )
                reference_points = new_ref.detach()
            hs.append(tgt)
            refs.append(reference_points)
        return torch.stack(hs), torch.stack(refs)


class DeformableTransformer(nn.Module):
    """forward(srcs, masks, pos_embeds, query_embed) -> (hs, init_reference, inter_references,
    enc_outputs_class, enc_outputs_coord_unact); the last two are None unless two_stage."""

    def __init__(self, cfg: DeformableTransformerConfig, num_queries: int):
        super().__init__()
        d = cfg.d_model
        self.d_model, self.nhead, self.two_stage = d, cfg.nhead, cfg.two_stage
        self.two_stage_num_proposals = num_queries
        enc = DeformableEncoderLayer(
            d, cfg.dim_feedforward, cfg.dropout, cfg.num_feature_levels, cfg.nhead, cfg.enc_n_points
        )
        self.encoder = DeformableEncoder(enc, cfg.num_encoder_layers)
        dec = DeformableDecoderLayer(
            d, cfg.dim_feedforward, cfg.dropout, cfg.num_feature_levels, cfg.nhead, cfg.dec_n_points
        )
        self.decoder = DeformableDecoder(dec, cfg.num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(cfg.num_feature_levels, d))
        if cfg.two_stage:
            self.enc_output = nn.Linear(d, d)
            self.enc_output_norm = nn.LayerNorm(d)
            self.pos_trans = nn.Linear(d * 2, d * 2)
            self.pos_trans_norm = nn.LayerNorm(d * 2)
        else:
            self.reference_points = nn.Linear(d, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()  # the xavier pass above must not overwrite the offset pattern
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def valid_ratio(mask: Tensor) -> Tensor:
        """mask: bool [B, H, W] -> [B, 2] (valid width / W, valid height / H)."""
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).float() / h
        valid_w = (~mask[:, 0, :]).sum(1).float() / w
        return torch.stack([valid_w, valid_h], -1)

    def proposal_pos_embed(self, proposals: Tensor) -> Tensor:
        """Sine embedding of unactivated boxes [B, K, 4] -> [B, K, 4*128] (two-stage query positions)."""
        num_feats, temperature = self.d_model // 2, 10000
        dim_t = torch.arange(num_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
        pos = proposals.sigmoid()[..., None] * (2 * math.pi) / dim_t  # [B, K, 4, F]
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)

    def encoder_proposals(self, memory: Tensor, padding_mask: Tensor, spatial_shapes: Tensor):
        """One box per encoder token (its pixel, side 0.05 * 2^level), in inverse-sigmoid space; padding and
        border tokens get +inf so they are never selected. Returns (projected memory, proposals [B, S, 4])."""
        n = memory.shape[0]
        proposals, start = [], 0
        for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
            m = padding_mask[:, start : start + h * w].view(n, h, w)
            valid_h, valid_w = (~m[:, :, 0]).sum(1), (~m[:, 0, :]).sum(1)
            ys, xs = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=memory.device),
                torch.arange(w, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = torch.stack([xs, ys], -1)
            scale = torch.stack([valid_w, valid_h], -1).view(n, 1, 1, 2).float()
            grid = (grid[None] + 0.5) / scale
            wh = torch.full_like(grid, 0.05 * 2.0**lvl)
            proposals.append(torch.cat([grid, wh], -1).view(n, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        invalid = padding_mask[..., None] | ~valid
        proposals = proposals.masked_fill(invalid, float("inf"))
        out = memory.masked_fill(invalid, 0.0)
        return self.enc_output_norm(self.enc_output(out)), proposals

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor], query_embed=None):
        """srcs, pos_embeds: per level [B, d, H_l, W_l]; masks: bool [B, H_l, W_l]; query_embed: [Q, 2d]
        (query position and target) unless two_stage."""
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # [B, S, d]
        mask = torch.cat([m.flatten(1) for m in masks], 1)  # [B, S]
        pos = torch.cat(
            [
                p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                for lvl, p in enumerate(pos_embeds)
            ],
            1,
        ).to(src.dtype)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src.device)
        level_start = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
        valid_ratios = torch.stack([self.valid_ratio(m) for m in masks], 1)  # [B, L, 2]

        memory = self.encoder(src, spatial_shapes, level_start, valid_ratios, pos, mask)

        bs, _, c = memory.shape
        enc_class = enc_coord = None
        if self.two_stage:
            out_memory, proposals = self.encoder_proposals(memory, mask, spatial_shapes)
            last = self.decoder.num_layers  # the extra heads after the decoder's own score proposals
            enc_class = self.decoder.class_embed[last](out_memory)
            enc_coord = self.decoder.bbox_embed[last](out_memory).float() + proposals
            topk = torch.topk(enc_class[..., 0].float(), self.two_stage_num_proposals, dim=1)[1]
            coords = torch.gather(enc_coord, 1, topk[..., None].repeat(1, 1, 4)).detach()
            reference_points = coords.sigmoid()
            pos_trans = self.pos_trans_norm(self.pos_trans(self.proposal_pos_embed(coords).to(memory.dtype)))
            query_pos, tgt = torch.split(pos_trans, c, dim=2)
        else:
            query_pos, tgt = torch.split(query_embed, c, dim=1)
            query_pos = query_pos[None].expand(bs, -1, -1)
            tgt = tgt[None].expand(bs, -1, -1)
            reference_points = self.reference_points(query_pos).float().sigmoid()
        init_reference = reference_points
        hs, inter_references = self.decoder(
            tgt, reference_points, memory, spatial_shapes, level_start, valid_ratios, query_pos, mask
        )
        return hs, init_reference, inter_references, enc_class, enc_coord


def build_deformable_transformer(cfg: DeformableTransformerConfig, num_queries: int) -> DeformableTransformer:
    cfg.validate()
    return DeformableTransformer(cfg, num_queries)
