"""Inference: whole-image and sliding-window logits, test-time resizing, scoring.

`logits_fn(images [B, 3, h, w]) -> [B, C, h, w]` is any segmenter returning logits at its input
resolution (a Cascade-CLIP model with its class embeddings bound, for example).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """mmseg's slide grid along one axis: windows of `crop` every `stride`, the last flush with the end."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride, length - crop), 0) for i in range(count)})


def slide_logits(logits_fn: LogitsFn, images: torch.Tensor, *, num_classes: int, crop: int, stride: int) -> torch.Tensor:
    """Logits averaged over overlapping `crop` windows; windows past a small image are zero-padded."""
    if stride > crop:
        raise ValueError(f"stride ({stride}) larger than the crop ({crop}) would skip pixels")
    batch, _, height, width = images.shape
    total = images.new_zeros(batch, num_classes, height, width)
    count = images.new_zeros(1, 1, height, width)
    for top in window_starts(height, crop, stride):
        for left in window_starts(width, crop, stride):
            window = images[:, :, top : top + crop, left : left + crop]
            h, w = window.shape[-2:]
            if h < crop or w < crop:
                window = F.pad(window, (0, crop - w, 0, crop - h))
            logits = logits_fn(window)[:, :, :h, :w]
            total[:, :, top : top + h, left : left + w] += logits
            count[:, :, top : top + h, left : left + w] += 1
    return total / count


def segment_logits(
    logits_fn: LogitsFn,
    images: torch.Tensor,
    *,
    num_classes: int,
    mode: str = "slide",
    crop: int = 512,
    stride: int = 426,
    out_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Logits for already resized, normalised images; bilinearly resized to `out_size` if given."""
    if mode == "whole":
        logits = logits_fn(images)
    elif mode == "slide":
        logits = slide_logits(logits_fn, images, num_classes=num_classes, crop=crop, stride=stride)
    else:
        raise ValueError(f"unknown inference mode {mode!r}; valid modes: whole, slide")
    if out_size is not None and tuple(logits.shape[-2:]) != tuple(out_size):
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
    return logits


def scores_from_logits(logits: torch.Tensor, *, seen_mask: torch.Tensor | None = None, calibration: float = 0.0) -> torch.Tensor:
    """sigmoid(logits), minus `calibration` on the seen classes (the inductive model's bias fix)."""
    scores = logits.sigmoid()
    if seen_mask is not None and calibration:
        scores = scores - calibration * seen_mask.to(scores.dtype).view(1, -1, 1, 1)
    return scores
