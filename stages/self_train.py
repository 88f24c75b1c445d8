"""Stage self_train: the transductive (+ST) model, from the inductive checkpoint, trained on
ground truth for seen pixels and pseudo-labels for the others, over all classes."""

from __future__ import annotations

from pipeline.config import Params, TrainConfig
from pipeline.data.dataset import SegmentationDataset
from pipeline.data.prepared import ClassInfo
from pipeline.data.transforms import label_lut
from pipeline.engine.pseudo import online_label_fn, self_training_lut
from pipeline.engine.setup import load_text_embeddings, model_card, normalizer, train_transform
from pipeline.engine.stage_training import TrainingOutputs, run_training
from pipeline.model import load
from pipeline.weights import read_backbone_meta
from stages.common import TRAINED_MODELS, StageContext, run_stage

NAME = "self_train"
SECTIONS = ("seed", "loss", "train", "pseudo", "self_train")
PREPARED = "data/prepared"
BACKBONE = "artifacts/backbone"
TEXT = "artifacts/text/embeddings.npy"
PSEUDO = "artifacts/pseudo"
OUT = "artifacts/self_train"
CHECKPOINTS = "artifacts/checkpoints/self_train"
METRICS = "artifacts/self_train_metrics.json"
CURVE = "artifacts/self_train_curve.csv"  # DVC plot


def training_config(p: Params) -> TrainConfig:
    """The train settings self-training runs with: train's, with self_train.batch_size when set."""
    if p.self_train.batch_size is None:
        return p.train
    return p.train.model_copy(update={"batch_size": p.self_train.batch_size})


def main(ctx: StageContext) -> None:
    p = ctx.params
    classes = ClassInfo.read(ctx.path(PREPARED) / "classes.json")
    embeddings = load_text_embeddings(ctx.path(TEXT), classes)  # all classes: transductive
    model = load(ctx.path(TRAINED_MODELS[p.self_train.init]), backbone=ctx.path(BACKBONE))
    normalize = normalizer(p.train.normalization, read_backbone_meta(ctx.path(BACKBONE)))
    transform = train_transform(p.train, normalize)
    if p.self_train.mode == "offline":
        dataset = SegmentationDataset(ctx.path(PREPARED), "train", transform=transform, seed=p.seed,
                                      lut=label_lut(list(range(classes.num_classes)), classes.num_classes),
                                      label_root=ctx.path(PSEUDO))
        label_fn = None
    else:
        dataset = SegmentationDataset(ctx.path(PREPARED), "train", transform=transform, seed=p.seed,
                                      lut=self_training_lut(classes.seen_ids, classes.num_classes))
        label_fn = online_label_fn(classes.seen_ids, classes.unseen_ids, p.pseudo.threshold)
    outputs = TrainingOutputs(model_dir=ctx.path(OUT), checkpoints=ctx.path(CHECKPOINTS), curve=ctx.path(CURVE),
                              metrics=ctx.path(METRICS))
    run_training(model, embeddings, dataset, cfg=training_config(p), loss_cfg=p.loss, seed=p.seed,
                 iterations=p.self_train.iterations, warmup=p.self_train.warmup_iters, outputs=outputs,
                 card=model_card(classes, normalize, f"self_train_{p.self_train.mode}"), resume_key=ctx.resume_key(),
                 log_metrics=ctx.log_metrics, write_config=ctx.write_config, label_fn=label_fn)
    ctx.log_artifact(outputs.curve)


if __name__ == "__main__":
    raise SystemExit(run_stage(NAME, main, SECTIONS))
