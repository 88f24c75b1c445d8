"""Segmentation metrics: confusion matrix, IoU per class, mIoU over seen / unseen, hIoU."""

from __future__ import annotations

import numpy as np

from pipeline.config import IGNORE_INDEX


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """[C, C] int64 counts, rows = ground truth, columns = prediction; ignored pixels skipped."""
    pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"prediction has {pred.size} pixels, ground truth {target.size}")
    keep = target != ignore_index
    pred, target = pred[keep].astype(np.int64), target[keep].astype(np.int64)
    if target.size and (target.max() >= num_classes or target.min() < 0):
        raise ValueError(f"ground truth holds class {int(target.max())} outside 0..{num_classes - 1}")
    if pred.size and (pred.max() >= num_classes or pred.min() < 0):
        raise ValueError(f"prediction holds class {int(pred.max())} outside 0..{num_classes - 1}")
    return np.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU of each class; NaN for a class absent from both prediction and ground truth."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def harmonic_mean(seen: float, unseen: float) -> float:
    """hIoU = 2 S U / (S + U) (the paper's tables; its Eq. 5 has a typo)."""
    if np.isnan(seen) or np.isnan(unseen):
        return float("nan")
    return 0.0 if seen + unseen == 0 else 2.0 * seen * unseen / (seen + unseen)


def summarize(cm: np.ndarray, seen_ids: list[int], unseen_ids: list[int]) -> dict[str, float]:
    """mIoU over all, seen and unseen classes and their harmonic mean, in percent; pixel accuracy."""
    iou = iou_per_class(cm)
    with np.errstate(invalid="ignore"):
        pick = lambda ids: float(np.nanmean(iou[ids]) * 100) if len(ids) and not np.all(np.isnan(iou[ids])) else float("nan")  # noqa: E731
        seen, unseen = pick(list(seen_ids)), pick(list(unseen_ids))
        total = cm.sum()
        return {
            "mIoU": pick(list(range(len(iou)))),
            "mIoU_seen": seen,
            "mIoU_unseen": unseen,
            "hIoU": harmonic_mean(seen, unseen),
            "pixel_accuracy": float(np.trace(cm) / total * 100) if total else float("nan"),
        }
