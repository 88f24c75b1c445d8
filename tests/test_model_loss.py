import math

import pytest
import torch

from pipeline.config import LossConfig
from pipeline.model import SegOutput, count_masks, segmentation_loss
from pipeline.model.loss import class_targets, dice_loss, sigmoid_focal_loss

LN2 = math.log(2)


def _focal_scalar(logit: float, target: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    ce = -math.log(p) if target else -math.log(1 - p)
    p_t = p if target else 1 - p
    a = alpha if target else 1 - alpha
    return a * (1 - p_t) ** gamma * ce


def _out(logits):
    return SegOutput(logits=logits, layer_logits=[])


def test_focal_and_dice_hand_computed_with_an_ignored_pixel():
    # one image, two classes, two pixels: class 0 at pixel 0, pixel 1 ignored
    logits = torch.zeros(1, 2, 1, 2)
    labels = torch.tensor([[[0, 255]]])
    loss = segmentation_loss(_out(logits), labels, LossConfig())
    pos, neg = 0.25 * 0.25 * LN2, 0.75 * 0.25 * LN2  # p = 0.5 everywhere
    # ignored pixel is a negative for every class; class 1 is absent but still in the focal term
    expected_focal = (pos + neg) / 2 + (neg + neg) / 2
    assert loss.num_masks == 1
    assert loss.focal.item() == pytest.approx(expected_focal, rel=1e-6)
    # dice over class 0 only: p = (0.5, 0.5), t = (1, 0): 1 - (2*0.5 + 1) / (1 + 1 + 1)
    assert loss.dice.item() == pytest.approx(1 / 3, rel=1e-6)
    assert loss.total.item() == pytest.approx(100 * expected_focal + 1 / 3, rel=1e-6)


def test_focal_and_dice_hand_computed_two_images():
    logits = torch.tensor([[[[2.0, -1.0]], [[0.5, 3.0]]], [[[-2.0, 1.0]], [[0.0, 0.0]]]])  # [2, 2, 1, 2]
    labels = torch.tensor([[[0, 1]], [[1, 1]]])
    targets = [[[1, 0], [0, 1]], [[0, 0], [1, 1]]]
    focal = sum(
        sum(_focal_scalar(logits[b, c, 0, i].item(), targets[b][c][i]) for i in range(2)) / 2
        for b in range(2) for c in range(2)
    )
    present = [(0, 0), (0, 1), (1, 1)]
    dice = 0.0
    for b, c in present:
        p = [1 / (1 + math.exp(-logits[b, c, 0, i].item())) for i in range(2)]
        t = targets[b][c]
        dice += 1 - (2 * sum(pi * ti for pi, ti in zip(p, t)) + 1) / (sum(p) + sum(t) + 1)
    loss = segmentation_loss(_out(logits), labels, LossConfig())
    assert loss.num_masks == 3
    assert loss.focal.item() == pytest.approx(focal / 3, rel=1e-5)
    assert loss.dice.item() == pytest.approx(dice / 3, rel=1e-5)


def test_num_masks_argument_overrides_the_local_count():
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    local = segmentation_loss(_out(logits), labels, LossConfig())
    reduced = segmentation_loss(_out(logits), labels, LossConfig(), num_masks=2 * local.num_masks)
    assert reduced.total.item() == pytest.approx(local.total.item() / 2, rel=1e-6)
    assert count_masks(labels, 3) == local.num_masks


def test_image_without_labels_adds_no_dice_and_no_masks():
    labels = torch.full((2, 2, 2), 255)
    labels[0, 0, 0] = 1
    assert count_masks(labels, 3) == 1
    loss = segmentation_loss(_out(torch.zeros(2, 3, 2, 2)), labels, LossConfig())
    assert loss.num_masks == 1
    assert loss.dice.item() == pytest.approx(1 - (2 * 0.5 + 1) / (4 * 0.5 + 1 + 1), rel=1e-6)


def test_predictions_are_resized_to_label_resolution():
    logits = torch.randn(1, 2, 4, 4)
    labels = torch.randint(0, 2, (1, 8, 8))
    loss = segmentation_loss(_out(logits), labels, LossConfig())
    up = torch.nn.functional.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    targets = class_targets(labels, 2)
    n = loss.num_masks
    assert loss.focal.item() == pytest.approx(sigmoid_focal_loss(up, targets, n).item(), rel=1e-6)
    present = targets.flatten(2).amax(2) > 0
    assert loss.dice.item() == pytest.approx(dice_loss(up, targets, present, n).item(), rel=1e-6)


def test_auxiliary_losses_add_every_layer_when_enabled():
    logits = torch.zeros(1, 2, 2, 2)
    layers = [[torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)]]
    labels = torch.tensor([[[0, 1], [1, 1]]])
    out = SegOutput(logits=logits, layer_logits=layers)
    off = segmentation_loss(out, labels, LossConfig())
    on = segmentation_loss(out, labels, LossConfig(aux_weight=0.5))
    assert off.aux.item() == 0
    # each layer's mask, upsampled, equals the final logits here: aux = 0.5 * 2 * main
    assert on.total.item() == pytest.approx(off.total.item() * 2, rel=1e-6)


def test_labels_outside_the_class_set_are_rejected():
    with pytest.raises(ValueError, match="outside 0..1"):
        segmentation_loss(_out(torch.zeros(1, 2, 1, 2)), torch.tensor([[[0, 5]]]), LossConfig())
