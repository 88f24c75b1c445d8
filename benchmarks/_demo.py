"""What the diagnostics of a trained demo model read: the pipeline's outputs (paths as in dvc.yaml,
relative to the repository root) and everything needed to score the val split with them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import Params, load_params
from pipeline.data.prepared import ClassInfo
from pipeline.data.transforms import Normalize
from pipeline.engine.setup import load_text_embeddings, normalizer
from pipeline.model import CascadeCLIP, load
from pipeline.weights import read_backbone_meta

PREPARED = Path("data/prepared")  # prepare_data's output
BACKBONE = Path("artifacts/backbone")  # backbone's output (the toy CLIP)
TEXT = Path("artifacts/text/embeddings.npy")  # embed_text's class embeddings
INDUCTIVE = Path("artifacts/train/model.safetensors")  # train's final model


@dataclass
class Scoring:
    """A trained model and what the evaluate stage hands it for the prepared dataset."""

    params: Params
    classes: ClassInfo
    embeddings: torch.Tensor  # class embeddings [C, D]
    normalize: Normalize  # the image normalisation the model was trained with
    model: CascadeCLIP  # in eval mode


def load_scoring(model_file: str | Path) -> Scoring:
    """Read params.yaml, the prepared classes, the text embeddings and `model_file` (run after `dvc repro evaluate`)."""
    params = load_params("params.yaml")
    classes = ClassInfo.read(PREPARED / "classes.json")
    return Scoring(
        params=params,
        classes=classes,
        embeddings=load_text_embeddings(TEXT, classes),
        normalize=normalizer(params.train.normalization, read_backbone_meta(BACKBONE)),
        model=load(Path(model_file), backbone=BACKBONE).eval(),
    )
