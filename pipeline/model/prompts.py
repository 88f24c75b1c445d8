"""Deep visual prompts (VPT-deep) for a frozen ViT."""

from __future__ import annotations

import math

import torch
from open_clip.transformer import LayerNorm
from torch import nn


class DeepVisualPrompts(nn.Module):
    """One set of learnable prompt tokens per encoder block, a shared projection and a norm.

    Set 0 is inserted after ln_pre (before block 1); before each later block the previous
    block's prompt tokens are replaced by that block's set. Every set passes the shared
    Linear(width, width) and dropout before insertion. `norm` (LayerNorm, eps 1e-6) is the
    "prompt norm" the encoder applies to tapped and final hidden states.
    """

    def __init__(self, *, depth: int, num_tokens: int, width: int, patch_size: int, dropout: float = 0.1) -> None:
        """
        Args:
            depth: encoder blocks, one prompt set each.
            num_tokens: P, prompt tokens per set.
            width: token width of the encoder.
            patch_size: ViT patch side; sets the uniform init bound sqrt(6 / (3 * patch^2 + width)).
            dropout: dropout on the projected prompts.
        """
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}; build the encoder without prompts instead")
        self.num_tokens = num_tokens
        bound = math.sqrt(6.0 / (3 * patch_size * patch_size + width))
        self.embeddings = nn.Parameter(torch.empty(depth, num_tokens, width).uniform_(-bound, bound))
        self.proj = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.proj.weight, a=0, mode="fan_out")
        self.dropout = nn.Dropout(dropout)
        self.norm = LayerNorm(width, eps=1e-6)

    def forward(self, block: int, batch_size: int) -> torch.Tensor:
        """Projected prompt tokens [batch_size, P, width] inserted before `block` (0-based)."""
        return self.dropout(self.proj(self.embeddings[block]).expand(batch_size, -1, -1))

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The raw prompt embeddings (no weight decay)."""
        return [self.embeddings]
