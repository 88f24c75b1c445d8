"""CLIP's text tower (frozen) and the class-embedding recipe of METHOD.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool
from torch import nn


def average_class_embeddings(embeddings: torch.Tensor) -> torch.Tensor:
    """Class embeddings from per-template embeddings: L2-normalise, average templates, L2-normalise.

    Args:
        embeddings: [C, T, D] text embeddings of every (class, template).
    Returns:
        [C, D] unit-norm class embeddings.
    """
    return F.normalize(F.normalize(embeddings, dim=-1).mean(dim=1), dim=-1)


class TextEncoder(nn.Module):
    """CLIP's text transformer, taken over from an open_clip CLIP (modules shared, not copied)."""

    def __init__(self, *, clip: CLIP) -> None:
        """
        Args:
            clip: open_clip CLIP whose token_embedding [vocab, width], positional_embedding
                [context, width], transformer, ln_final and text_projection [width, embed_dim]
                are taken over.
        """
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.pool_type = clip.text_pool_type
        self.eos_id = getattr(clip, "text_eos_id", None)
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """
        Args:
            tokens: token ids [N, context_length].
        Returns:
            text embeddings [N, embed_dim] (not normalised).
        """
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        x = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection
