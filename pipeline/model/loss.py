"""Training loss: sigmoid focal over all classes + dice over the classes present (as the release).

Targets come from label maps [B, H, W] with values in 0..C-1 (indices into the current class
set) or the ignore value. As in the release, an ignored pixel is a negative for every class in
the focal term and counts in the dice denominators through its predicted probability. Masks
are compared at label resolution (predictions are bilinearly resized to it). Both terms are
summed over masks and divided by `num_masks`, the number of (image, class) pairs present.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.config import IGNORE_INDEX, LossConfig
from pipeline.model.cascade import SegOutput


@dataclass
class LossOutput:
    """The weighted loss and its parts (all scalars)."""

    total: torch.Tensor
    """focal_weight * focal + dice_weight * dice (+ aux_weight * auxiliary)"""
    focal: torch.Tensor
    """unweighted focal term of the final logits"""
    dice: torch.Tensor
    """unweighted dice term of the final logits"""
    aux: torch.Tensor
    """aux_weight * weighted focal + dice summed over every decoder layer's masks (0 when off)"""
    num_masks: float
    """the normaliser used"""


def class_targets(labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """One-hot float targets [B, C, H, W] from labels [B, H, W]; ignored pixels are all zeros."""
    valid = labels != ignore_index
    bad = labels[valid & ((labels < 0) | (labels >= num_classes))]
    if bad.numel():
        raise ValueError(f"labels {sorted(bad.unique().tolist())} are outside 0..{num_classes - 1} and not {ignore_index}")
    onehot = F.one_hot(torch.where(valid, labels, 0).long(), num_classes).permute(0, 3, 1, 2)
    return (onehot * valid.unsqueeze(1)).float()


def present_classes(targets: torch.Tensor) -> torch.Tensor:
    """[B, C] bool: which classes occur in each image's targets [B, C, H, W]."""
    return targets.flatten(2).amax(dim=2) > 0


def count_masks(labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> int:
    """Number of (image, class) pairs present in labels [B, H, W] (all-reduce this across workers)."""
    return int(present_classes(class_targets(labels, num_classes, ignore_index)).sum())


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_masks: float, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss of logits vs targets [B, C, H, W]: mean over pixels, summed over masks, / num_masks."""
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    prob = logits.sigmoid()
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(2).mean(dim=2).sum() / num_masks


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, present: torch.Tensor, num_masks: float, smooth: float = 1.0) -> torch.Tensor:
    """Dice loss 1 - (2 sum(p t) + s) / (sum p + sum t + s) over the (image, class) pairs in present [B, C]."""
    prob = logits.sigmoid().flatten(2)
    targets = targets.flatten(2)
    loss = 1 - (2 * (prob * targets).sum(-1) + smooth) / (prob.sum(-1) + targets.sum(-1) + smooth)
    return (loss * present).sum() / num_masks


def _resize(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def segmentation_loss(
    output: SegOutput,
    labels: torch.Tensor,
    cfg: LossConfig,
    num_masks: float | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> LossOutput:
    """The training loss of a model output against label maps [B, H, W].

    Args:
        output: model output; logits [B, C, H', W'] and per-layer masks.
        labels: class indices into the output's class set, or `ignore_index`.
        cfg: weights and focal parameters.
        num_masks: normaliser (all-reduced mean over workers); None counts this batch's pairs.
            Clamped to at least 1.
        ignore_index: label value of ignored pixels.
    """
    num_classes = output.logits.shape[1]
    targets = class_targets(labels, num_classes, ignore_index)
    present = present_classes(targets)
    norm = max(float(present.sum()) if num_masks is None else float(num_masks), 1.0)
    size = tuple(labels.shape[-2:])

    def terms(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = _resize(logits.float(), size)
        focal = sigmoid_focal_loss(logits, targets, norm, cfg.focal_alpha, cfg.focal_gamma)
        return focal, dice_loss(logits, targets, present, norm)

    focal, dice = terms(output.logits)
    total = cfg.focal_weight * focal + cfg.dice_weight * dice
    aux = total.new_zeros(())
    if cfg.aux_weight > 0:
        for layers in output.layer_logits:
            for layer_logits in layers:
                aux_focal, aux_dice = terms(layer_logits)
                aux = aux + cfg.focal_weight * aux_focal + cfg.dice_weight * aux_dice
        total = total + cfg.aux_weight * aux
    return LossOutput(total=total, focal=focal, dice=dice, aux=cfg.aux_weight * aux, num_masks=norm)
