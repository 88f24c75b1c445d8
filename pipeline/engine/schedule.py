"""Learning-rate schedule of the release: linear warm-up, then poly decay to a floor.

One group's lr: the training loop calls it once per parameter group with that group's own base
(lr x lr_mult) and the same absolute floor, as mmcv's PolyLrUpdater does.
"""

from __future__ import annotations


def poly_lr(
    step: int,
    *,
    base_lr: float,
    max_steps: int,
    power: float = 0.9,
    min_lr: float = 1e-6,
    warmup_steps: int = 0,
    warmup_ratio: float = 1e-6,
) -> float:
    """Learning rate at optimiser step `step` (0-based), mmcv's PolyLrUpdater with linear warm-up.

    poly:    (base - min) * (1 - step / max_steps) ** power + min
    warm-up: for step < warmup_steps the poly value is scaled by
             1 - (1 - step / warmup_steps) * (1 - warmup_ratio)   (warmup_ratio at step 0)
    """
    if max_steps <= 0:
        raise ValueError("max_steps must be positive")
    progress = min(step, max_steps) / max_steps
    lr = (base_lr - min_lr) * (1.0 - progress) ** power + min_lr
    if step < warmup_steps:
        lr *= 1.0 - (1.0 - step / warmup_steps) * (1.0 - warmup_ratio)
    return lr
