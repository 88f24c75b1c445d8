"""Stage self_train: the transductive (+ST) model, from the inductive checkpoint, trained on
ground truth for seen pixels and pseudo-labels for the others, over all classes."""

from __future__ import annotations

import shutil

from pipeline.config import params_hash
from pipeline.data.dataset import SegmentationDataset
from pipeline.data.prepared import ClassInfo
from pipeline.data.transforms import label_lut
from pipeline.engine.pseudo import online_label_fn, self_training_lut
from pipeline.engine.setup import load_text_embeddings, model_card, normalizer, train_transform
from pipeline.engine.train import Schedule, distributed, train
from pipeline.io import atomic_dir, write_json
from pipeline.model import load, save
from pipeline.weights import read_backbone_meta
from stages.common import StageContext, run_stage
from stages.train import train_metrics, write_curve

NAME = "self_train"
SECTIONS = ("seed", "loss", "train", "pseudo", "self_train")
PREPARED = "data/prepared"
BACKBONE = "artifacts/backbone"
TEXT = "artifacts/text/embeddings.npy"
PSEUDO = "artifacts/pseudo"
INIT = {"half": "artifacts/train/model_half.safetensors", "final": "artifacts/train/model.safetensors"}
OUT = "artifacts/self_train"
CHECKPOINTS = "artifacts/checkpoints/self_train"
METRICS = "artifacts/self_train_metrics.json"
CURVE = "artifacts/self_train_curve.csv"  # DVC plot


def main(ctx: StageContext) -> None:
    p = ctx.params
    classes = ClassInfo.read(ctx.path(PREPARED) / "classes.json")
    embeddings = load_text_embeddings(ctx.path(TEXT), classes)  # all classes: transductive
    model = load(ctx.path(INIT[p.self_train.init]))
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
    checkpoints = ctx.path(CHECKPOINTS)
    checkpoints.mkdir(parents=True, exist_ok=True)
    result = train(
        model, embeddings, dataset, cfg=p.train, loss_cfg=p.loss,
        schedule=Schedule(p.self_train.iterations, p.self_train.warmup_iters), seed=p.seed,
        checkpoint=checkpoints / "last.pt", params_hash=params_hash(ctx.stage_params), label_fn=label_fn,
        on_log=lambda row: ctx.log_metrics({k: row[k] for k in ("loss", "focal", "dice", "lr")}, step=row["step"]),
    )
    if distributed()[0] != 0:
        return
    with atomic_dir(ctx.path(OUT)) as tmp:
        save(model, tmp / "model.safetensors", extra=model_card(classes, normalize, f"self_train_{p.self_train.mode}"))
        ctx.write_config(tmp)
    write_curve(ctx.path(CURVE), result.curve)
    metrics = train_metrics(result)
    write_json(ctx.path(METRICS), metrics)
    ctx.log_metrics(metrics)
    ctx.log_artifact(ctx.path(CURVE))
    shutil.rmtree(checkpoints, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(run_stage(NAME, main, SECTIONS))
