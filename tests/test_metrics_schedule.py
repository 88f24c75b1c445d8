import math

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.engine.metrics import confusion_matrix, harmonic_mean, iou_per_class, summarize
from pipeline.engine.schedule import poly_lr
from pipeline.engine.train import Schedule, set_lr
from tests.tiny import tiny_model


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


def mmcv_poly_with_linear_warmup(step, *, initial_lr, max_iters, power, min_lr, warmup_iters, warmup_ratio):
    """mmcv's PolyLrUpdaterHook with warmup='linear', written out as mmcv writes it (by iteration)."""
    regular_lr = (initial_lr - min_lr) * (1 - step / max_iters) ** power + min_lr
    if step >= warmup_iters:
        return regular_lr
    k = (1 - step / warmup_iters) * (1 - warmup_ratio)
    return regular_lr * (1 - k)


def test_every_param_group_follows_mmcv_poly_from_its_own_initial_lr_over_a_whole_schedule():
    """VOC numbers (METHOD.md "Optimisation"): base 2e-5, x10 groups, absolute floor 1e-6, 1500
    warm-up steps of ratio 1e-6. The real model's groups (all x10) plus one x1 group."""
    cfg = TrainConfig(lr=2e-5, lr_mult=10.0, weight_decay=0.01, min_lr=1e-6, poly_power=0.9, warmup_ratio=1e-6)
    schedule = Schedule(iterations=20000, warmup_iters=1500)
    groups = tiny_model().param_groups(cfg.lr, cfg.weight_decay, cfg.lr_mult)
    groups.append({"name": "x1", "params": [torch.nn.Parameter(torch.zeros(1))], "lr": cfg.lr, "lr_mult": 1.0})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    initial = [g["lr"] for g in optimizer.param_groups]
    assert initial[:-1] == [2e-4] * (len(initial) - 1) and initial[-1] == 2e-5
    for step in range(schedule.iterations):
        set_lr(optimizer, step, cfg, schedule)
        for group, lr0 in zip(optimizer.param_groups, initial):
            expected = mmcv_poly_with_linear_warmup(step, initial_lr=lr0, max_iters=20000, power=0.9, min_lr=1e-6,
                                                    warmup_iters=1500, warmup_ratio=1e-6)
            assert group["lr"] == pytest.approx(expected, rel=1e-9), (group["name"], step)
    # the x10 groups end at the absolute floor 1e-6, not at 10 x 1e-6
    last = (2e-4 - 1e-6) * (1 / 20000) ** 0.9 + 1e-6
    assert [g["lr"] for g in optimizer.param_groups][:-1] == pytest.approx([last] * (len(initial) - 1))
    assert last < 1.03e-6
