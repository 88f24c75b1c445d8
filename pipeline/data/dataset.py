"""Torch datasets over the prepared layout (manifest.parquet + PNGs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import IGNORE_INDEX
from pipeline.data.prepared import ClassInfo, read_manifest
from pipeline.data.transforms import TrainTransform
from pipeline.errors import CascadeError

REWRITE = "re-run the stage that wrote it (`dvc repro prepare_data`; `dvc repro pseudo_label` for pseudo-labels)"


class DataFileError(CascadeError, ValueError):
    """An image or label file that is missing or unusable; the message names the file and the fix."""


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 [H, W, 3]; a clear error naming the file when it is missing or cannot be decoded."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise DataFileError(f"{path}: image file is missing; re-run `dvc repro prepare_data` to write it again") from None
    except (OSError, ValueError) as exc:
        raise DataFileError(
            f"{path}: unreadable or truncated image ({exc}); re-run `dvc repro prepare_data` or replace the file"
        ) from None


def read_label(path: Path, num_classes: int | None = None) -> np.ndarray:
    """uint8 [H, W] class ids, IGNORE_INDEX = no class; with `num_classes`, any other value is an error."""
    try:
        with Image.open(path) as img:
            label = np.asarray(img)
    except FileNotFoundError:
        raise DataFileError(f"{path}: label file is missing; {REWRITE}") from None
    except (OSError, ValueError) as exc:
        raise DataFileError(f"{path}: unreadable or truncated label PNG ({exc}); {REWRITE}") from None
    if label.ndim != 2 or label.dtype != np.uint8:
        raise DataFileError(f"{path}: label must be a single-channel uint8 PNG, got shape {label.shape} {label.dtype}; {REWRITE}")
    if num_classes is not None:
        bad = np.unique(label[(label >= num_classes) & (label != IGNORE_INDEX)])
        if bad.size:
            raise DataFileError(
                f"{path}: label values {bad.tolist()} are not class ids of this dataset (0..{num_classes - 1}, "
                f"{IGNORE_INDEX} = ignore); {REWRITE}"
            )
    return label


class SegmentationDataset(torch.utils.data.Dataset):
    """Items of one split: the image (normalised float [3, H, W]) and its label ([H, W] int64).

    `lut` maps dataset class ids to the ids the model is trained on (see transforms.label_lut),
    applied once the training crop is chosen (the crop rule counts unseen classes, as the release);
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
        self.num_classes = ClassInfo.read(self.root / "classes.json").num_classes
        self.transform, self.lut, self.seed = transform, lut, seed
        self.label_root = Path(label_root) if label_root else self.root

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.load(index, np.random.default_rng([self.seed, index]))

    def load(self, index: int, rng: np.random.Generator) -> dict:
        row = self.rows[index]
        image_path, label_path = self.root / row["image"], self.label_root / row["label"]
        image = read_image(image_path)
        label = read_label(label_path, self.num_classes)  # dataset ids: `lut` is applied after the crop is chosen
        if label.shape != image.shape[:2]:
            raise DataFileError(
                f"{label_path}: label size {label.shape} differs from the size {image.shape[:2]} of its image "
                f"{image_path}; {REWRITE}"
            )
        image, label = self.transform(rng, image, label, self.lut)
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(label.astype(np.int64)), "index": index}
