"""Stage train: the inductive model, trained on the seen classes only (unseen pixels ignored)."""

from __future__ import annotations

import csv
import shutil
from functools import partial
from pathlib import Path

import torch

from pipeline.config import TrainConfig
from pipeline.data.dataset import SegmentationDataset
from pipeline.data.prepared import ClassInfo
from pipeline.data.transforms import label_lut
from pipeline.engine.setup import load_text_embeddings, model_card, normalizer, train_transform
from pipeline.engine.train import CURVE_KEYS, Schedule, TrainResult, distributed, train
from pipeline.io import atomic_dir, atomic_file, write_json
from pipeline.model import build_model, save
from pipeline.weights import backbone_reference, load_backbone
from stages.common import StageContext, run_stage

NAME = "train"
SECTIONS = ("seed", "model", "loss", "train")
PREPARED = "data/prepared"
BACKBONE = "artifacts/backbone"
TEXT = "artifacts/text/embeddings.npy"
OUT = "artifacts/train"
CHECKPOINTS = "artifacts/checkpoints/train"  # resumable state; survives a crash, removed on success
METRICS = "artifacts/train_metrics.json"
CURVE = "artifacts/train_curve.csv"  # DVC plot


def write_curve(path: Path, curve: list[dict]) -> None:
    with atomic_file(path, "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=CURVE_KEYS)
        writer.writeheader()
        writer.writerows(curve)


def train_metrics(result: TrainResult) -> dict[str, float]:
    return {"final_loss": result.final_loss, "iterations_per_second": result.steps_per_second,
            "train_seconds": result.seconds, "resumed_from": result.resumed_from}


def main(ctx: StageContext) -> None:
    p = ctx.params
    classes = ClassInfo.read(ctx.path(PREPARED) / "classes.json")
    backbone = load_backbone(ctx.path(BACKBONE))
    torch.manual_seed(p.seed)  # the random frozen taps are not in trainable checkpoints: same seed, same taps
    model = build_model(p.model, backbone.arch, backbone.state)
    model.backbone_ref = backbone_reference(ctx.path(BACKBONE), recorded_as=BACKBONE)  # model files refer to it
    embeddings = load_text_embeddings(ctx.path(TEXT), classes)[classes.seen_ids]
    normalize = normalizer(p.train.normalization, backbone.meta)
    dataset = SegmentationDataset(
        ctx.path(PREPARED), "train", transform=train_transform(p.train, normalize),
        lut=label_lut(classes.seen_ids, classes.num_classes), seed=p.seed,
    )
    run_training(ctx, model, embeddings, dataset, iterations=p.train.iterations, warmup=p.train.warmup_iters,
                 checkpoints=ctx.path(CHECKPOINTS), out=ctx.path(OUT), curve=ctx.path(CURVE), metrics=ctx.path(METRICS),
                 card=model_card(classes, normalize, "inductive"), keep_half=True)


def run_training(
    ctx: StageContext,
    model,
    embeddings: torch.Tensor,
    dataset: SegmentationDataset,
    *,
    iterations: int,
    warmup: int,
    checkpoints: Path,
    out: Path,
    curve: Path,
    metrics: Path,
    card: dict,
    label_fn=None,
    keep_half: bool = False,
    cfg: TrainConfig | None = None,
) -> None:
    """Train (resuming from `checkpoints` when nothing it depends on changed, see `ctx.resume_key`), then write the model (and
    the half-schedule model) atomically to `out`, the curve, the metrics, and log them (rank 0). `cfg`: the train
    settings (default the params' train section)."""
    p = ctx.params
    checkpoints.mkdir(parents=True, exist_ok=True)
    half = checkpoints / "model_half.safetensors" if keep_half else None
    result = train(
        model, embeddings, dataset, cfg=cfg or p.train, loss_cfg=p.loss, schedule=Schedule(iterations, warmup, half_checkpoint=half),
        seed=p.seed, checkpoint=checkpoints / "last.pt", resume_key=ctx.resume_key(), label_fn=label_fn,
        on_log=lambda row: ctx.log_metrics({k: row[k] for k in ("loss", "focal", "dice", "lr")}, step=row["step"]),
        save_model=partial(save, extra=card),
    )
    if distributed()[0] != 0:
        return
    with atomic_dir(out) as tmp:
        save(model, tmp / "model.safetensors", extra=card)
        if half is not None:
            shutil.copy2(half, tmp / "model_half.safetensors")
        ctx.write_config(tmp)
    write_curve(curve, result.curve)
    values = train_metrics(result)
    write_json(metrics, values)
    ctx.log_metrics(values)
    ctx.log_artifact(curve)
    shutil.rmtree(checkpoints, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(run_stage(NAME, main, SECTIONS))
