"""Evaluation over a prepared split: test-time resize, whole/slide logits, calibrated arg-max,
confusion matrix over all classes, seen/unseen/hIoU."""

from __future__ import annotations

from collections.abc import Sequence
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
def predict_image(
    model: CascadeCLIP,
    image: np.ndarray,
    class_embeddings: torch.Tensor,
    *,
    cfg: EvaluateConfig,
    normalize: Normalize,
) -> tuple[np.ndarray, torch.Tensor]:
    """(label map [H, W] int64 at the image's size, sigmoid scores [C, H, W]) for one RGB uint8 image."""
    device = next(model.parameters()).device
    height, width = image.shape[:2]
    resized, _ = resize_pair(image, None, eval_size(height, width, cfg.short_side, cfg.max_long_side))
    tensor = torch.from_numpy(normalize(resized))[None].to(device)
    logits = segment_logits(
        model_logits_fn(model, class_embeddings.to(device)), tensor, num_classes=class_embeddings.shape[0],
        mode=cfg.mode, crop=cfg.crop_size, stride=cfg.stride, out_size=(height, width),
    )
    scores = scores_from_logits(logits)[0]
    return scores.argmax(0).cpu().numpy(), scores.cpu()


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
    for row in tqdm(rows, desc=f"evaluating {split}", unit="img", disable=not progress):
        image, label = read_image(root / row["image"]), read_label(root / row["label"])
        _, scores = predict_image(model, image, class_embeddings, cfg=cfg, normalize=normalize)
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
