"""Text-image decoder of one cascade stage: cross-attention layers whose attention logits are masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.frozen_linear import linear


class CrossAttentionLayer(nn.Module):
    """Class queries attend to the stage features; the pre-softmax logits are the layer's mask.

    cross-attention (q/k/v Linear with bias, output Linear, attention dropout) -> residual +
    LayerNorm -> FFN D-rD-D (ReLU, dropout) -> residual + LayerNorm. No self-attention.
    """

    def __init__(self, *, dim: int, heads: int, ffn_ratio: int = 4, dropout: float = 0.1) -> None:
        """
        Args:
            dim: D, width of queries and features.
            heads: attention heads (D divisible by it).
            ffn_ratio: FFN hidden width as a multiple of D.
            dropout: attention, FFN and residual dropout.
        """
        super().__init__()
        if dim % heads:
            raise ValueError(f"decoder width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = nn.Dropout(dropout)
        self.attn_norm = nn.LayerNorm(dim)
        self.ffn_in = nn.Linear(dim, dim * ffn_ratio)
        self.ffn_out = nn.Linear(dim * ffn_ratio, dim)
        self.dropout = nn.Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(dim)

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            queries: class queries [B, C, D].
            features: stage features [B, N, D].
        Returns:
            updated queries [B, C, D] and the mask logits [B, C, N] (head-averaged q.k / sqrt(d_head)).
        """
        # attention logits per head
        q, k, v = (self._heads(linear(layer, t)) for layer, t in ((self.q, queries), (self.k, features), (self.v, features)))
        logits = (q @ k.transpose(-2, -1)) * self.scale  # [B, heads, C, N]
        # attention output, residual, FFN
        out = self.attn_dropout(logits.softmax(dim=-1)) @ v
        out = linear(self.proj, out.transpose(1, 2).flatten(2))
        x = self.attn_norm(queries + self.dropout(out))
        x = self.ffn_norm(x + self.dropout(linear(self.ffn_out, self.dropout(F.relu(linear(self.ffn_in, x))))))
        return x, logits.mean(dim=1)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class LogitsLayer(nn.Module):
    """A decoder's last layer: only q and k, since only its attention logits are used."""

    def __init__(self, *, dim: int, heads: int) -> None:
        """
        Args:
            dim: D, width of queries and features.
            heads: attention heads the logits are averaged over (sets the scale).
        """
        super().__init__()
        if dim % heads:
            raise ValueError(f"decoder width {dim} is not divisible by {heads} heads")
        # mean over heads of q_h.k_h / sqrt(d_head) == q.k / (heads * sqrt(d_head))
        self.scale = (dim // heads) ** -0.5 / heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> tuple[None, torch.Tensor]:
        """Mask logits [B, C, N] for queries [B, C, D] and features [B, N, D]."""
        return None, (linear(self.q, queries) @ linear(self.k, features).transpose(-2, -1)) * self.scale


class StageDecoder(nn.Module):
    """`num_layers` layers: (num_layers - 1) cross-attention layers, then a logits-only layer."""

    def __init__(self, *, dim: int, heads: int, num_layers: int, ffn_ratio: int = 4, dropout: float = 0.1) -> None:
        """
        Args:
            dim: D, width of queries and features.
            heads: attention heads per layer.
            num_layers: layers, >= 1; the last one only computes logits.
            ffn_ratio: FFN hidden width as a multiple of D.
            dropout: attention, FFN and residual dropout.
        """
        super().__init__()
        self.layers = nn.ModuleList(
            [CrossAttentionLayer(dim=dim, heads=heads, ffn_ratio=ffn_ratio, dropout=dropout) for _ in range(num_layers - 1)]
            + [LogitsLayer(dim=dim, heads=heads)]
        )

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's mask logits [B, C, N] for queries [B, C, D] and features [B, N, D]."""
        masks = []
        for layer in self.layers:
            queries, mask = layer(queries, features)
            masks.append(mask)
        return masks
