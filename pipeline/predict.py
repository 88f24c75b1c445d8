"""Open-vocabulary segmentation of any image with any class names (`cascade-clip predict`).

    seg = Segmenter.from_file("artifacts/self_train/model.safetensors")
    result = seg("photo.png", ["cat", "dog", "grass"])   # or an RGB uint8 array
    result.label        # [H, W] index into the class list
    result.scores       # [C, H, W] sigmoid scores

Class embeddings are computed on the fly with the model's own (frozen) text tower and a template
set, then cached per class list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import IGNORE_INDEX, EvaluateConfig
from pipeline.data.catalog import template_set
from pipeline.data.dataset import read_image
from pipeline.engine.evaluate import predict_image
from pipeline.engine.setup import card_normalizer
from pipeline.errors import CascadeError
from pipeline.model import CascadeCLIP, load, make_tokenizer, model_extra

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
OUTPUT_SUFFIXES = ("_label.png", "_overlay.png")  # written for every image, appended to its output stem
SCORES_SUFFIX = "_scores.npy"  # written too with --scores


@dataclass
class Prediction:
    classes: list[str]
    label: np.ndarray  # [H, W] int64, index into classes; 255 where no score reached the threshold
    scores: np.ndarray  # [C, H, W] float32 sigmoid scores


def parse_classes(text: str | Sequence[str]) -> list[str]:
    names = [c.strip() for c in (text.split(",") if isinstance(text, str) else text)]
    names = [c for c in names if c]
    if not names:
        raise CascadeError('the class list is empty; pass class names, such as --classes "cat,dog,grass" or ["cat", "dog"]')
    duplicates = sorted({c for c in names if names.count(c) > 1})
    if duplicates:
        raise CascadeError(f"class names given twice: {duplicates}; each class once, please")
    return names


def _images_with_stems(inputs: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """(image, output stem relative to the output folder) for every image of `inputs`, in order."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            images = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            found.extend((p, p.relative_to(item).with_suffix("")) for p in images)
        elif item.is_file():
            found.append((item, Path(item.stem)))
        else:
            raise CascadeError(f"{item}: no such file or folder")
    if not found:
        raise CascadeError(f"no images found in {', '.join(map(str, inputs))} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return list(dict.fromkeys(found))  # an image given twice the same way is segmented once


def output_files(stem: Path, *, scores: bool) -> list[Path]:
    """The files `cascade-clip predict` writes for one image: label map, overlay, and scores if asked."""
    return [stem.with_name(stem.name + suffix) for suffix in OUTPUT_SUFFIXES + ((SCORES_SUFFIX,) if scores else ())]


def plan_outputs(inputs: Sequence[str | Path], out: Path, *, scores: bool, overwrite: bool) -> list[tuple[Path, Path]]:
    """(image, output stem under `out`) for every image of `inputs`, checked before anything is written.

    An image inside a given folder keeps its path relative to that folder (day/img.png -> out/day/img),
    so same-named images in different subfolders do not collide; an image given directly keeps only its
    name. Two images that would still write the same files (a/img.png and b/img.png given directly, or
    img.png beside img.jpg) are an error naming both, as are outputs that exist already, unless
    `overwrite`: nothing is written over silently.
    """
    plan, owner = [], {}
    for image, stem in _images_with_stems(inputs):
        target = out / stem
        other = owner.setdefault(target, image)
        if other != image:
            raise CascadeError(f"{other} and {image} would both be written as {target}_label.png; give their common "
                               "folder instead (its subfolders are kept under --out), or segment them in separate runs "
                               "with different --out")
        plan.append((image, target))
    if not overwrite:
        existing = [f for _, target in plan for f in output_files(target, scores=scores) if f.exists()]
        if existing:
            more = f" (and {len(existing) - 1} more outputs)" if len(existing) > 1 else ""
            raise CascadeError(f"{existing[0]} exists{more}; pass --overwrite to replace earlier predictions, or "
                               "choose another --out")
    return plan


class Segmenter:
    """A loaded model ready to segment arrays or paths with any class names."""

    def __init__(self, model: CascadeCLIP, *, card: dict, templates: Sequence[str], inference: EvaluateConfig):
        self.model = model.eval()
        self.card = card
        self.normalize = card_normalizer(card)
        self.templates = list(templates)
        self.inference = inference
        self.tokenizer = make_tokenizer(model.arch)
        self._cache: dict[tuple[str, ...], torch.Tensor] = {}

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        device: str = "auto",
        templates: str | Sequence[str] | None = None,
        inference: EvaluateConfig | None = None,
        backbone: str | Path | None = None,
    ) -> Segmenter:
        """Load a model file (written by training or import-checkpoint). `templates`: a catalog set
        name, a list of templates with '{}', or None for the ones the model was trained with.
        `backbone`: the frozen CLIP file (or folder) of a model file that refers to one, when it is not
        where the file says (see `pipeline.model.load`)."""
        path = Path(path)
        if not path.is_file():
            raise CascadeError(f"{path}: model file not found; train one with `dvc repro` or pass --model")
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        model = load(path, map_location=device, backbone=backbone)
        card = model_extra(path)
        if templates is None:
            chosen = card.get("templates") or list(template_set("single"))
        elif isinstance(templates, str):
            chosen = list(template_set(templates))
        else:
            chosen = list(templates)
        bad = [t for t in chosen if t.count("{}") != 1]
        if bad:
            raise CascadeError(f"templates need exactly one '{{}}' for the class name: {bad}")
        return cls(model, card=card, templates=chosen, inference=inference or EvaluateConfig())

    def class_embeddings(self, classes: Sequence[str]) -> torch.Tensor:
        key = tuple(classes)
        if key not in self._cache:
            with torch.no_grad():
                self._cache[key] = self.model.encode_text(list(classes), self.templates, self.tokenizer).float()
        return self._cache[key]

    def __call__(self, image: np.ndarray | str | Path, classes: str | Sequence[str], threshold: float = 0.0) -> Prediction:
        """Segment one image; pixels whose best sigmoid score is below `threshold` get 255 (no class)."""
        names = parse_classes(classes)
        if not isinstance(image, np.ndarray):
            if not Path(image).is_file():
                raise CascadeError(f"{image}: no such image file")
            image = read_image(Path(image))
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise CascadeError(f"expected an RGB uint8 image [H, W, 3], got {image.shape} {image.dtype}")
        label, scores = predict_image(self.model, image, self.class_embeddings(names), cfg=self.inference, normalize=self.normalize)
        if threshold > 0:
            label = np.where(scores.amax(0).numpy() < threshold, IGNORE_INDEX, label)
        return Prediction(classes=names, label=label, scores=scores.numpy().astype(np.float32))
