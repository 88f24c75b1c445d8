"""Torch datasets over the prepared layout (manifest.parquet + PNGs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.prepared import read_manifest
from pipeline.data.transforms import TrainTransform


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 [H, W, 3]; a clear error naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable or truncated image ({exc}); re-run prepare_data or replace the file") from None


def read_label(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            label = np.asarray(img)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable label PNG ({exc}); re-run prepare_data") from None
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"{path}: label must be a single-channel uint8 PNG, got shape {label.shape} {label.dtype}")
    return label


class SegmentationDataset(torch.utils.data.Dataset):
    """Items of one split: the image (normalised float [3, H, W]) and its label ([H, W] int64).

    `lut` maps dataset class ids to the ids the model is trained on (see transforms.label_lut);
    `label_root` replaces the prepared root for labels (pseudo-labels with the same relative
    paths). `load(index, rng)` augments with the given generator, so a training stream can make
    augmentation a function of the sample's position (reproducible whatever the worker layout).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        transform: TrainTransform,
        lut: np.ndarray,
        seed: int = 0,
        label_root: Path | None = None,
    ):
        self.root = Path(root)
        self.rows = read_manifest(self.root, split)
        if not self.rows:
            raise ValueError(f"{self.root}: split {split!r} has no images")
        self.transform, self.lut, self.seed = transform, lut, seed
        self.label_root = Path(label_root) if label_root else self.root

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.load(index, np.random.default_rng([self.seed, index]))

    def load(self, index: int, rng: np.random.Generator) -> dict:
        row = self.rows[index]
        image = read_image(self.root / row["image"])
        label = self.lut[read_label(self.label_root / row["label"])]
        if label.shape != image.shape[:2]:
            raise ValueError(f"{self.label_root / row['label']}: label size {label.shape} differs from image size {image.shape[:2]}")
        image, label = self.transform(rng, image, label)
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(label.astype(np.int64)), "index": index}
