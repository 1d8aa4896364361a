"""DETR encoder-decoder transformer (post-norm, positions added to queries and keys only).

Sequences are sequence-first, as ``nn.MultiheadAttention`` defaults: [S, B, d] for the flattened feature map
and [Q, B, d] for the object queries.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class TransformerConfig:
    """Shape of the DETR transformer."""

    d_model: int = 256
    """Width of every token (also the channel count the backbone map is projected to)."""
    nhead: int = 8
    """Attention heads per layer."""
    num_encoder_layers: int = 6
    """Encoder depth."""
    num_decoder_layers: int = 6
    """Decoder depth; each layer's output feeds a (shared) prediction head, the last five as aux losses."""
    dim_feedforward: int = 2048
    """Hidden width of the ReLU feed-forward block."""
    dropout: float = 0.1
    """Dropout in attention, after attention and in the feed-forward block."""


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, key_padding_mask: Tensor | None, pos: Tensor | None) -> Tensor:
        """src, pos: [S, B, d]; key_padding_mask: bool [B, S] (True = padding)."""
        q = k = _with_pos(src, pos)
        src2 = self.self_attn(q, k, value=src, key_padding_mask=key_padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout(torch.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor | None,
        pos: Tensor | None,
        query_pos: Tensor | None,
    ) -> Tensor:
        """tgt, query_pos: [Q, B, d]; memory, pos: [S, B, d]; memory_key_padding_mask: [B, S]."""
        q = k = _with_pos(tgt, query_pos)
        tgt2 = self.self_attn(q, k, value=tgt, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.cross_attn(
            query=_with_pos(tgt, query_pos),
            key=_with_pos(memory, pos),
            value=memory,
            key_padding_mask=memory_key_padding_mask,
            need_weights=False,
        )[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout(torch.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(tgt2))


class Transformer(nn.Module):
    """6 encoder + 6 decoder post-norm layers; returns every decoder layer's (normed) output."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        enc = EncoderLayer(cfg.d_model, cfg.nhead, cfg.dim_feedforward, cfg.dropout)
        dec = DecoderLayer(cfg.d_model, cfg.nhead, cfg.dim_feedforward, cfg.dropout)
        self.encoder_layers = nn.ModuleList(copy.deepcopy(enc) for _ in range(cfg.num_encoder_layers))
        self.decoder_layers = nn.ModuleList(copy.deepcopy(dec) for _ in range(cfg.num_decoder_layers))
        # Post-norm encoder layers already end in a LayerNorm, so only the decoder has a final norm; it is
        # applied to every intermediate output because each one feeds the prediction heads.
        self.decoder_norm = nn.LayerNorm(cfg.d_model)
        self.d_model = cfg.d_model
        self.nhead = cfg.nhead
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor
    ) -> tuple[Tensor, Tensor]:
        """src, pos_embed: [S, B, d] flattened feature tokens; mask: bool [B, S] (True = padding);
        query_embed: [Q, d].

        Returns (hs [L, B, Q, d] decoder outputs of all L layers, memory [S, B, d]).
        """
        bs = src.shape[1]
        pos_embed = pos_embed.to(src.dtype)
        query_pos = query_embed.unsqueeze(1).repeat(1, bs, 1)  # [Q, B, d]
        memory = src
        for layer in self.encoder_layers:
            memory = layer(memory, key_padding_mask=mask, pos=pos_embed)
        # The decoder content starts at zero: the queries only carry information through query_pos at first.
        tgt = torch.zeros_like(query_pos)
        intermediate = []
        for layer in self.decoder_layers:
            tgt = layer(tgt, memory, memory_key_padding_mask=mask, pos=pos_embed, query_pos=query_pos)
            intermediate.append(self.decoder_norm(tgt))
        hs = torch.stack(intermediate).transpose(1, 2)  # [L, B, Q, d]
        return hs, memory


def build_transformer(cfg: TransformerConfig) -> Transformer:
    return Transformer(cfg)
