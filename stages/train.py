"""Stage train: the inductive model, trained on the seen classes only (unseen pixels ignored)."""

from __future__ import annotations

import torch

from pipeline.data.dataset import SegmentationDataset
from pipeline.data.prepared import ClassInfo
from pipeline.data.transforms import label_lut
from pipeline.engine.setup import load_text_embeddings, model_card, normalizer, train_transform
from pipeline.engine.stage_training import TrainingOutputs, run_training
from pipeline.model import build_model
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
    outputs = TrainingOutputs(model_dir=ctx.path(OUT), checkpoints=ctx.path(CHECKPOINTS), curve=ctx.path(CURVE),
                              metrics=ctx.path(METRICS))
    run_training(model, embeddings, dataset, cfg=p.train, loss_cfg=p.loss, seed=p.seed, iterations=p.train.iterations,
                 warmup=p.train.warmup_iters, outputs=outputs, card=model_card(classes, normalize, "inductive"),
                 resume_key=ctx.resume_key(), log_metrics=ctx.log_metrics, write_config=ctx.write_config, keep_half=True)
    ctx.log_artifact(outputs.curve)


if __name__ == "__main__":
    raise SystemExit(run_stage(NAME, main, SECTIONS))
