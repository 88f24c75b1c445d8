"""The cascade head: per stage an aggregator, class-query projection and an independent decoder."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.model.frozen_linear import linear

from pipeline.model.image_encoder import VisualFeatures


def relationship_descriptor(class_embeddings: torch.Tensor, global_embedding: torch.Tensor) -> torch.Tensor:
    """concat(T * g, T): [B, C, 2D] from class embeddings T [C, D] and image embeddings g [B, D]."""
    text = class_embeddings.unsqueeze(0).expand(global_embedding.shape[0], -1, -1)
    return torch.cat([text * global_embedding.unsqueeze(1), text], dim=-1)


class CascadeHead(nn.Module):
    """Stages decode independently; each returns every decoder layer's masks at feature resolution."""

    def __init__(
        self,
        *,
        stages: Sequence[tuple[int, int]],
        aggregators: Sequence[nn.Module],
        text_projs: Sequence[nn.Linear],
        decoders: Sequence[nn.Module],
    ) -> None:
        """
        Args:
            stages: inclusive 1-based block ranges, one per stage.
            aggregators: per stage, list of d features [B, N, D] -> [B, N, D].
            text_projs: per stage Linear(2D -> D) giving class queries, or one shared by all stages.
            decoders: per stage, (queries [B, C, D], features [B, N, D]) -> list of masks [B, C, N].
        """
        super().__init__()
        if not (len(aggregators) == len(decoders) == len(stages)) or len(text_projs) not in (1, len(stages)):
            raise ValueError("need one aggregator and decoder per stage and one text projection per stage (or one shared)")
        self.stages = [tuple(s) for s in stages]
        self.aggregators = nn.ModuleList(aggregators)
        self.text_projs = nn.ModuleList(text_projs)
        self.decoders = nn.ModuleList(decoders)

    def forward(self, features: VisualFeatures, class_embeddings: torch.Tensor) -> list[list[torch.Tensor]]:
        """
        Args:
            features: encoder output (blocks covering every stage, global embedding, grid).
            class_embeddings: T [C, D].
        Returns:
            per stage, per decoder layer, mask logits [B, C, h, w].
        """
        descriptor = relationship_descriptor(class_embeddings.to(features.global_embedding.dtype), features.global_embedding)
        h, w = features.grid
        out = []
        for index, (start, end) in enumerate(self.stages):
            stage_features = self.aggregators[index]([features.blocks[b] for b in range(start, end + 1)])
            queries = linear(self.text_projs[index if len(self.text_projs) > 1 else 0], descriptor)
            masks = self.decoders[index](queries, stage_features)
            out.append([m.unflatten(-1, (h, w)) for m in masks])
        return out
