"""Evaluation over a prepared split: test-time resize, whole/slide logits, calibrated arg-max,
confusion matrix over all classes, seen/unseen/hIoU."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.config import EvaluateConfig
from pipeline.data.dataset import read_image, read_label
from pipeline.data.prepared import ClassInfo, read_manifest
from pipeline.data.transforms import Normalize, eval_size, resize_pair
from pipeline.engine.inference import scores_from_logits, segment_logits
from pipeline.engine.metrics import confusion_matrix, iou_per_class, summarize
from pipeline.model import CascadeCLIP


@dataclass
class EvalResult:
    metrics: dict[str, float]  # mIoU, mIoU_seen, mIoU_unseen, hIoU, pixel_accuracy (percent)
    confusion: np.ndarray  # [C, C], rows truth
    iou: np.ndarray  # [C] in 0..1, NaN where the class is absent
    samples: list[dict]  # a few (id, image, label, prediction) for pictures


def model_logits_fn(model: CascadeCLIP, class_embeddings: torch.Tensor):
    return lambda images: model(images, class_embeddings).logits


@torch.no_grad()
def predict_batch(
    model: CascadeCLIP,
    images: Sequence[np.ndarray],
    class_embeddings: torch.Tensor,
    *,
    cfg: EvaluateConfig,
    normalize: Normalize,
) -> list[torch.Tensor]:
    """Sigmoid scores [C, H, W] at each RGB uint8 image's own size, in input order.

    Images whose test-time size is the same run as one batch (one forward per sliding window for
    all of them); images of other sizes in their own batches.
    """
    device = next(model.parameters()).device
    embeddings = class_embeddings.to(device)
    groups: dict[tuple[int, int], list[int]] = {}
    resized = []
    for index, image in enumerate(images):
        picture, _ = resize_pair(image, None, eval_size(*image.shape[:2], cfg.short_side, cfg.max_long_side))
        resized.append(picture)
        groups.setdefault(picture.shape[:2], []).append(index)
    out: list[torch.Tensor | None] = [None] * len(images)
    for members in groups.values():
        batch = torch.from_numpy(np.stack([normalize(resized[i]) for i in members])).to(device)
        logits = segment_logits(model_logits_fn(model, embeddings), batch, num_classes=embeddings.shape[0],
                                mode=cfg.mode, crop=cfg.crop_size, stride=cfg.stride)
        for row, index in enumerate(members):
            size = images[index].shape[:2]
            single = logits[row : row + 1]
            if tuple(single.shape[-2:]) != tuple(size):
                single = F.interpolate(single, size=size, mode="bilinear", align_corners=False)
            out[index] = scores_from_logits(single)[0].cpu()
    return out


def predict_image(
    model: CascadeCLIP,
    image: np.ndarray,
    class_embeddings: torch.Tensor,
    *,
    cfg: EvaluateConfig,
    normalize: Normalize,
) -> tuple[np.ndarray, torch.Tensor]:
    """(label map [H, W] int64 at the image's size, sigmoid scores [C, H, W]) for one RGB uint8 image."""
    [scores] = predict_batch(model, [image], class_embeddings, cfg=cfg, normalize=normalize)
    return scores.argmax(0).numpy(), scores


def predict_split(
    model: CascadeCLIP,
    class_embeddings: torch.Tensor,
    root: Path,
    rows: Sequence[dict],
    *,
    cfg: EvaluateConfig,
    normalize: Normalize,
    desc: str,
    progress: bool = True,
) -> Iterator[tuple[dict, np.ndarray, np.ndarray, torch.Tensor]]:
    """(manifest row, image, label, scores [C, H, W]) for every row, predicted `cfg.batch_size` images at a time.

    A label value that is neither a class id (below C, the number of class embeddings) nor the
    ignore value stops with a DataFileError naming the file and the values (read_label)."""
    num_classes = class_embeddings.shape[0]
    with tqdm(total=len(rows), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(rows), cfg.batch_size):
            chunk = rows[start : start + cfg.batch_size]
            images = [read_image(root / row["image"]) for row in chunk]
            labels = [read_label(root / row["label"], num_classes) for row in chunk]
            scores = predict_batch(model, images, class_embeddings, cfg=cfg, normalize=normalize)
            yield from zip(chunk, images, labels, scores)
            bar.update(len(chunk))


@torch.no_grad()
def evaluate(
    model: CascadeCLIP,
    class_embeddings: torch.Tensor,
    root: Path,
    classes: ClassInfo,
    *,
    cfg: EvaluateConfig,
    normalize: Normalize,
    calibrations: Sequence[float] = (0.0,),
    split: str = "val",
    keep_samples: int = 0,
    progress: bool = True,
) -> list[EvalResult]:
    """Evaluate on every image of `split`: one result per calibration (subtracted from seen-class
    scores), all from one inference pass."""
    model.eval()
    seen = torch.zeros(classes.num_classes, dtype=torch.bool)
    seen[classes.seen_ids] = True
    shift = seen.float()[:, None, None]
    cms = [np.zeros((classes.num_classes, classes.num_classes), dtype=np.int64) for _ in calibrations]
    samples: list[list[dict]] = [[] for _ in calibrations]
    rows = read_manifest(root, split)
    for row, image, label, scores in predict_split(model, class_embeddings, root, rows, cfg=cfg, normalize=normalize,
                                                   desc=f"evaluating {split}", progress=progress):
        for cm, kept, calibration in zip(cms, samples, calibrations):
            pred = (scores - calibration * shift).argmax(0).numpy()
            cm += confusion_matrix(pred, label, classes.num_classes)
            if len(kept) < keep_samples:
                kept.append({"id": row["id"], "image": image, "label": label, "prediction": pred.astype(np.uint8)})
    return [EvalResult(metrics=summarize(cm, classes.seen_ids, classes.unseen_ids), confusion=cm, iou=iou_per_class(cm), samples=kept)
            for cm, kept in zip(cms, samples)]


def random_unit_embeddings(like: torch.Tensor, rows: list[int], seed: int) -> torch.Tensor:
    """A copy of `like` [C, D] whose `rows` are random unit vectors: the no-transfer control."""
    generator = torch.Generator().manual_seed(seed)
    out = like.clone()
    noise = torch.randn(len(rows), like.shape[1], generator=generator)
    out[rows] = F.normalize(noise, dim=-1).to(like.dtype)
    return out
