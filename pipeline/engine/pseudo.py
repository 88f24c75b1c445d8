"""Pseudo-labels for self-training (the transductive setting, +ST).

As in the authors' release (ZegCLIP's transductive protocol), a training pixel whose ground truth
is a class outside the seen set gets the arg-max over the unseen classes of sigmoid(M); pixels of
seen classes keep their ground truth; ignored pixels (background, padding) stay ignored, and so
does a pixel whose best unseen score is below the confidence threshold. Unseen ground truth is
used only to know *where* non-seen objects are, never *which* class they are.

One rule, two drivers: offline (a pipeline stage stores label maps and confidences) and online
(recomputed from the model inside every training step, as the release does).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.config import IGNORE_INDEX

TO_PSEUDO = 254  # label value marking "pixel of a non-seen class: take the pseudo-label" (online mode)


def pseudo_labels(
    scores: torch.Tensor,
    labels: torch.Tensor,
    *,
    seen_ids: Sequence[int],
    unseen_ids: Sequence[int],
    threshold: float = 0.0,
    fill_value: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels [B, H, W] and confidence [B, H, W] from sigmoid scores [B, C, H, W] over all classes.

    labels hold dataset class ids with IGNORE_INDEX; the pixels to pseudo-label are those whose
    label is `fill_value` when given (online: the loader marks them TO_PSEUDO), else every pixel
    labelled with a class outside `seen_ids` (offline: full ground truth).
    """
    unseen = torch.as_tensor(list(unseen_ids), device=scores.device, dtype=torch.long)
    best, which = scores.index_select(1, unseen).max(dim=1)
    candidate = unseen[which]
    if fill_value is not None:
        to_fill = labels == fill_value
    else:
        seen = torch.zeros(256, dtype=torch.bool, device=labels.device)
        seen[list(seen_ids)] = True
        to_fill = (labels != IGNORE_INDEX) & ~seen[labels.long().clamp(0, 255)]
    confident = best >= threshold
    out = torch.where(to_fill, torch.where(confident, candidate, IGNORE_INDEX), labels.long())
    confidence = torch.where(to_fill, best, torch.zeros_like(best))
    return out, confidence


def self_training_lut(seen_ids: Sequence[int], num_classes: int) -> np.ndarray:
    """Loader mapping for online self-training: seen ids kept, other classes -> TO_PSEUDO, ignore kept."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[:num_classes] = TO_PSEUDO
    lut[list(seen_ids)] = list(seen_ids)
    return lut


def online_label_fn(seen_ids: Sequence[int], unseen_ids: Sequence[int], threshold: float = 0.0):
    """A train() label_fn, as the release: pseudo-labels from the logits of the same training
    forward pass (detached), for the pixels the loader marked TO_PSEUDO."""

    def label(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out, _ = pseudo_labels(logits.detach().float().sigmoid(), labels, seen_ids=seen_ids, unseen_ids=unseen_ids,
                               threshold=threshold, fill_value=TO_PSEUDO)
        return out

    return label


def coverage(labels: np.ndarray, confidence: np.ndarray, truth: np.ndarray, unseen_ids: Sequence[int], num_classes: int) -> dict:
    """Per unseen class: pseudo-labelled pixels, their mean confidence, and (diagnostic only)
    how many of them the ground truth agrees with. Accumulate over images with `merge`."""
    stats = {}
    for class_id in unseen_ids:
        assigned = labels == class_id
        stats[class_id] = {
            "pixels": int(assigned.sum()),
            "confidence_sum": float(confidence[assigned].sum()),
            "correct": int((assigned & (truth == class_id)).sum()),
            "truth_pixels": int((truth == class_id).sum()),
        }
    return stats


def merge(total: dict, part: dict) -> dict:
    for class_id, values in part.items():
        slot = total.setdefault(class_id, {k: 0 for k in values})
        for key, value in values.items():
            slot[key] += value
    return total


def generate(
    model,
    class_embeddings: torch.Tensor,
    root,
    classes,
    out,
    *,
    cfg,
    normalize,
    threshold: float,
    keep_samples: int = 0,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Offline pseudo-labels for every training image of the prepared dataset at `root`.

    Writes <out>/<label path of the manifest> (dataset class ids, 255 ignore), so a
    SegmentationDataset with label_root=<out> reads them, and <out>/confidence/<same path>
    (best unseen score x 255, 0 where not pseudo-labelled).
    Returns per-unseen-class statistics (see `coverage`) and a few samples for pictures.
    """
    from pathlib import Path

    from PIL import Image

    from pipeline.data.prepared import read_manifest
    from pipeline.engine.evaluate import predict_split

    model.eval()
    out = Path(out)
    stats: dict = {}
    samples = []
    rows = read_manifest(root, "train")
    for row, image, truth, scores in predict_split(model, class_embeddings, Path(root), rows, cfg=cfg, normalize=normalize,
                                                   desc="pseudo-labelling", progress=progress):
        labels, confidence = pseudo_labels(scores[None], torch.from_numpy(truth.astype(np.int64))[None],
                                           seen_ids=classes.seen_ids, unseen_ids=classes.unseen_ids, threshold=threshold)
        labels = labels[0].numpy().astype(np.uint8)
        confidence = confidence[0].numpy()
        for path, picture in ((out / row["label"], labels), (out / "confidence" / row["label"], np.round(confidence * 255).astype(np.uint8))):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture).save(path)
        merge(stats, coverage(labels, confidence, truth, classes.unseen_ids, classes.num_classes))
        if len(samples) < keep_samples and set(np.unique(truth).tolist()) & set(classes.unseen_ids):
            samples.append({"id": row["id"], "image": image, "label": truth, "prediction": labels, "title": "pseudo-labels"})
    return stats, samples
