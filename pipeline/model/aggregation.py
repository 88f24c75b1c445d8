"""How one cascade stage merges the features of its blocks (Table 8).

Every aggregator maps a list of d block features [B, N, D] (shallow to deep) to one [B, N, D].
A stage of one block uses `SingleBlock`, which has no parameters.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

AggregatorKind = Literal["nga", "nga_fixed", "sum", "trainable_sum", "concat", "attention"]


def nga_initial_weights(num_blocks: int, sigma: float) -> torch.Tensor:
    """Neighborhood Gaussian weights w_l = exp(-0.5 (d - l)^2 / sigma^2), l = 1..d (last block 1)."""
    distance = torch.arange(num_blocks - 1, -1, -1, dtype=torch.float32)
    return torch.exp(-0.5 * (distance / sigma) ** 2)


class SingleBlock(nn.Module):
    """A one-block stage: its feature as is."""

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return features[0]

    def no_decay_parameters(self) -> list[nn.Parameter]:
        return []


class WeightedSum(nn.Module):
    """sum_l w_l H_l: NGA (Gaussian init) or trainable sum (ones); fixed weights are a buffer."""

    def __init__(self, *, initial_weights: torch.Tensor, trainable: bool = True) -> None:
        """
        Args:
            initial_weights: [d] starting weight of each block, shallow to deep.
            trainable: learn the weights (the paper's NGA-dagger) or keep them fixed (Table 8's NGA).
        """
        super().__init__()
        if trainable:
            self.weights = nn.Parameter(initial_weights.clone().float())
        else:
            self.register_buffer("weights", initial_weights.clone().float())

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return sum(w * f for w, f in zip(self.weights, features))

    def no_decay_parameters(self) -> list[nn.Parameter]:
        return [self.weights] if isinstance(self.weights, nn.Parameter) else []


class PlainSum(nn.Module):
    """sum_l H_l, no parameters."""

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return sum(features)

    def no_decay_parameters(self) -> list[nn.Parameter]:
        return []


class ConcatLinear(nn.Module):
    """Concatenate the blocks' channels, then Linear(d*D -> D)."""

    def __init__(self, *, num_blocks: int, dim: int) -> None:
        """
        Args:
            num_blocks: d, blocks in the stage.
            dim: D, feature width.
        """
        super().__init__()
        self.proj = nn.Linear(num_blocks * dim, dim)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.proj(torch.cat(features, dim=-1))

    def no_decay_parameters(self) -> list[nn.Parameter]:
        return []


class BlockSelfAttention(nn.Module):
    """Self-attention across the d block features of each token, residual, then mean over blocks."""

    def __init__(self, *, dim: int, heads: int) -> None:
        """
        Args:
            dim: D, feature width.
            heads: attention heads (D must be divisible by it).
        """
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(features, dim=2)  # [B, N, d, D]
        batch, tokens, blocks, dim = x.shape
        x = x.reshape(batch * tokens, blocks, dim)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x.mean(dim=1).reshape(batch, tokens, dim)

    def no_decay_parameters(self) -> list[nn.Parameter]:
        return []


def build_aggregator(kind: AggregatorKind, *, num_blocks: int, dim: int, sigma: float = 1.0, heads: int = 8) -> nn.Module:
    """The aggregator of one stage of `num_blocks` blocks."""
    if num_blocks == 1:
        return SingleBlock()
    if kind in ("nga", "nga_fixed"):
        return WeightedSum(initial_weights=nga_initial_weights(num_blocks, sigma), trainable=kind == "nga")
    if kind == "sum":
        return PlainSum()
    if kind == "trainable_sum":
        return WeightedSum(initial_weights=torch.ones(num_blocks))
    if kind == "concat":
        return ConcatLinear(num_blocks=num_blocks, dim=dim)
    if kind == "attention":
        return BlockSelfAttention(dim=dim, heads=math.gcd(heads, dim))
    raise ValueError(f"unknown aggregator {kind!r}; valid: nga, nga_fixed, sum, trainable_sum, concat, attention")
