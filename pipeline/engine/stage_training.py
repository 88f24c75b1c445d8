"""What the train and self_train stages share: train (resuming from a checkpoint when nothing it
depends on changed), then write the model folder, the loss curve and the metrics.

No Prefect, MLflow or DVC here: the stage hands in what it depends on (`resume_key`), how to log
metrics and how to save its configuration beside the model.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from pipeline.config import LossConfig, TrainConfig
from pipeline.data.dataset import SegmentationDataset
from pipeline.engine.train import CURVE_KEYS, LabelFn, ResumeKey, Schedule, TrainResult, distributed, train
from pipeline.io import atomic_dir, atomic_file, write_json
from pipeline.model import CascadeCLIP, save

LogMetrics = Callable[..., None]  # log_metrics(metrics: dict[str, float], step: int | None = None)
HALF_MODEL = "model_half.safetensors"  # the model at half the schedule (self-training may start from it)


@dataclass(frozen=True)
class TrainingOutputs:
    """Where a training stage writes."""

    model_dir: Path  # written atomically: model.safetensors, model_half.safetensors (keep_half), the config
    checkpoints: Path  # resumable state while training; removed once everything else is written
    curve: Path  # CSV of CURVE_KEYS, one row per logged step (a DVC plot)
    metrics: Path  # JSON: final_loss, iterations_per_second, train_seconds, resumed_from


def write_curve(path: Path, curve: list[dict]) -> None:
    with atomic_file(path, "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=CURVE_KEYS)
        writer.writeheader()
        writer.writerows(curve)


def train_metrics(result: TrainResult) -> dict[str, float]:
    return {"final_loss": result.final_loss, "iterations_per_second": result.steps_per_second,
            "train_seconds": result.seconds, "resumed_from": result.resumed_from}


def run_training(
    model: CascadeCLIP,
    embeddings: torch.Tensor,
    dataset: SegmentationDataset,
    *,
    cfg: TrainConfig,
    loss_cfg: LossConfig,
    seed: int,
    iterations: int,
    warmup: int,
    outputs: TrainingOutputs,
    card: dict,
    resume_key: ResumeKey,
    log_metrics: LogMetrics,
    write_config: Callable[[Path], None],
    label_fn: LabelFn | None = None,
    keep_half: bool = False,
) -> dict[str, float] | None:
    """Train `model` for `iterations` steps (see `pipeline.engine.train.train`), then, on rank 0, write
    the model (and with `keep_half` the half-schedule model) with `card` as its metadata and
    `write_config`'s files into `outputs.model_dir` atomically, then the curve and the metrics, and
    remove the checkpoints. Logs each curve row and the final metrics with `log_metrics`.

    Returns the final metrics on rank 0, None on the other DDP ranks (which write nothing).
    """
    outputs.checkpoints.mkdir(parents=True, exist_ok=True)
    half = outputs.checkpoints / HALF_MODEL if keep_half else None
    result = train(
        model, embeddings, dataset, cfg=cfg, loss_cfg=loss_cfg, schedule=Schedule(iterations, warmup, half_checkpoint=half),
        seed=seed, checkpoint=outputs.checkpoints / "last.pt", resume_key=resume_key, label_fn=label_fn,
        on_log=lambda row: log_metrics({k: row[k] for k in ("loss", "focal", "dice", "lr")}, step=row["step"]),
        save_model=partial(save, extra=card),
    )
    if distributed()[0] != 0:
        return None
    with atomic_dir(outputs.model_dir) as tmp:
        save(model, tmp / "model.safetensors", extra=card)
        if half is not None:
            shutil.copy2(half, tmp / HALF_MODEL)
        write_config(tmp)
    write_curve(outputs.curve, result.curve)
    values = train_metrics(result)
    write_json(outputs.metrics, values)
    log_metrics(values)
    shutil.rmtree(outputs.checkpoints, ignore_errors=True)
    return values
