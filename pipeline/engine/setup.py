"""Glue shared by the train, pseudo_label, self_train and evaluate stages: model from the
backbone, text embeddings checked against the dataset, normalisation and transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.data.prepared import ClassInfo
from pipeline.data.transforms import IMAGENET, OPENAI_CLIP, Normalize, TrainTransform
from pipeline.errors import CascadeError


class EmbeddingMismatch(CascadeError):
    """Text embeddings that do not belong to the prepared dataset."""


def normalizer(kind: str, backbone_meta: dict | None = None) -> Normalize:
    """'imagenet' (the release) or 'backbone' (the statistics the CLIP was trained with)."""
    if kind == "imagenet":
        return IMAGENET
    meta = backbone_meta or {}
    mean, std = meta.get("mean"), meta.get("std")
    if mean is None or std is None:
        return OPENAI_CLIP
    scale = 255.0 if max(mean) <= 1.0 else 1.0  # stored on the 0..1 scale by open_clip convention
    return Normalize(tuple(m * scale for m in mean), tuple(s * scale for s in std))


def train_transform(cfg: TrainConfig, normalize: Normalize) -> TrainTransform:
    return TrainTransform(
        crop_size=cfg.crop_size, scale=cfg.scale, ratio_range=cfg.ratio_range, cat_max_ratio=cfg.cat_max_ratio,
        flip_prob=cfg.flip_prob, photometric=cfg.photometric, normalize=normalize,
    )


def load_text_embeddings(path: Path, classes: ClassInfo) -> torch.Tensor:
    """[C, D] float32 class embeddings, checked to match the dataset's class count."""
    if not path.exists():
        raise EmbeddingMismatch(f"{path}: text embeddings not found; run `dvc repro embed_text` first")
    embeddings = np.load(path)
    if embeddings.ndim != 2:
        raise EmbeddingMismatch(
            f"{path}: expected a [classes, dim] matrix, got shape {embeddings.shape}; re-run `dvc repro embed_text`"
        )
    if embeddings.shape[0] != classes.num_classes:
        raise EmbeddingMismatch(
            f"{path}: holds {embeddings.shape[0]} class embeddings but dataset {classes.dataset!r} has "
            f"{classes.num_classes} classes; re-run `dvc repro embed_text` after prepare_data"
        )
    return torch.from_numpy(embeddings.astype(np.float32))


def seen_mask(classes: ClassInfo) -> torch.Tensor:
    mask = torch.zeros(classes.num_classes, dtype=torch.bool)
    mask[classes.seen_ids] = True
    return mask


def model_card(classes: ClassInfo, normalize: Normalize, setting: str) -> dict:
    """What a model file should carry for its users (saved as its `extra` metadata)."""
    return {
        "setting": setting,
        "dataset": classes.dataset,
        "classes": classes.names,
        "seen_ids": classes.seen_ids,
        "unseen_ids": classes.unseen_ids,
        "templates": classes.templates,
        "mean": list(normalize.mean),
        "std": list(normalize.std),
    }


def card_normalizer(card: dict) -> Normalize:
    """The pixel normalisation recorded in a model card (OpenAI CLIP's when absent)."""
    if "mean" in card and "std" in card:
        return Normalize(tuple(card["mean"]), tuple(card["std"]))
    return OPENAI_CLIP
