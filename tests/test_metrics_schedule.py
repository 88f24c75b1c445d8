import math

import numpy as np
import pytest

from pipeline.engine.metrics import confusion_matrix, harmonic_mean, iou_per_class, summarize
from pipeline.engine.schedule import poly_lr


def test_confusion_matrix_against_hand_count():
    target = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])
    cm = confusion_matrix(pred, target, 3)
    expected = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    assert np.array_equal(cm, expected)


def test_iou_and_means_with_an_absent_class():
    # class 0: tp 1, fn 1, fp 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 0 -> 0; class 3 absent
    cm = np.array([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    iou = iou_per_class(cm)
    assert iou[:3] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert math.isnan(iou[3])
    m = summarize(cm, seen_ids=[0, 1], unseen_ids=[2, 3])
    assert m["mIoU_seen"] == pytest.approx(50.0)
    assert m["mIoU_unseen"] == pytest.approx(0.0)  # the absent class 3 is excluded, not counted as 0 or 1
    assert m["hIoU"] == 0.0
    assert m["mIoU"] == pytest.approx(100 / 3)
    assert m["pixel_accuracy"] == pytest.approx(60.0)


def test_harmonic_mean_matches_the_paper():
    assert harmonic_mean(92.7, 83.1) == pytest.approx(87.64, abs=0.01)
    assert harmonic_mean(93.3, 93.4) == pytest.approx(93.35, abs=0.01)
    assert math.isnan(harmonic_mean(float("nan"), 3.0))


def test_out_of_range_labels_are_rejected():
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix(np.array([0]), np.array([7]), 3)


def test_poly_lr_at_key_iterations():
    kw = dict(base_lr=2e-5, max_steps=20000, power=0.9, min_lr=1e-6, warmup_steps=1500, warmup_ratio=1e-6)
    assert poly_lr(0, **kw) == pytest.approx(2e-5 * 1e-6, rel=1e-3)  # warm-up starts at ratio x poly(0)
    poly_750 = (2e-5 - 1e-6) * (1 - 750 / 20000) ** 0.9 + 1e-6
    assert poly_lr(750, **kw) == pytest.approx(poly_750 * (1 - 0.5 * (1 - 1e-6)))
    poly_1500 = (2e-5 - 1e-6) * (1 - 1500 / 20000) ** 0.9 + 1e-6
    assert poly_lr(1500, **kw) == pytest.approx(poly_1500)  # warm-up over
    assert poly_lr(10000, **kw) == pytest.approx((2e-5 - 1e-6) * 0.5**0.9 + 1e-6)
    assert poly_lr(20000, **kw) == pytest.approx(1e-6)
    assert poly_lr(25000, **kw) == pytest.approx(1e-6)
    lrs = [poly_lr(s, **kw) for s in range(1500, 20000, 500)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
