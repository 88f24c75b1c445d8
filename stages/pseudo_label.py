"""Stage pseudo_label: offline pseudo-labels of the training split from the inductive model."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.data.prepared import ClassInfo
from pipeline.engine.pseudo import generate
from pipeline.engine.setup import load_text_embeddings, normalizer
from pipeline.io import atomic_dir, write_json
from pipeline.model import load
from pipeline.viz import close, overlay_grid
from pipeline.weights import read_backbone_meta
from stages.common import TRAINED_MODELS, StageContext, run_stage

NAME = "pseudo_label"
SECTIONS = ("pseudo", "train", "evaluate")  # train: normalisation; evaluate: inference settings
PREPARED = "data/prepared"
BACKBONE = "artifacts/backbone"
TEXT = "artifacts/text/embeddings.npy"
OUT = "artifacts/pseudo"
METRICS = "artifacts/pseudo_metrics.json"


def summary_table(classes: ClassInfo, stats: dict) -> pa.Table:
    rows = []
    for class_id in classes.unseen_ids:
        s = stats.get(class_id, {"pixels": 0, "confidence_sum": 0.0, "correct": 0, "truth_pixels": 0})
        rows.append({
            "class_id": class_id, "class": classes.names[class_id], "pixels": s["pixels"],
            "mean_confidence": s["confidence_sum"] / s["pixels"] if s["pixels"] else None,
            # diagnostics against the withheld ground truth, never used for training
            "precision": s["correct"] / s["pixels"] if s["pixels"] else None,
            "recall": s["correct"] / s["truth_pixels"] if s["truth_pixels"] else None,
        })
    return pa.Table.from_pylist(rows)


def main(ctx: StageContext) -> None:
    ctx.pin_threads()
    p = ctx.params
    root = ctx.path(PREPARED)
    classes = ClassInfo.read(root / "classes.json")
    embeddings = load_text_embeddings(ctx.path(TEXT), classes)
    normalize = normalizer(p.train.normalization, read_backbone_meta(ctx.path(BACKBONE)))
    model = load(ctx.path(TRAINED_MODELS[p.pseudo.checkpoint]), map_location="cuda" if torch.cuda.is_available() else "cpu",
                 backbone=ctx.path(BACKBONE))
    with atomic_dir(ctx.path(OUT)) as tmp:
        stats, samples = generate(model, embeddings, root, classes, tmp, cfg=p.evaluate, normalize=normalize,
                                  threshold=p.pseudo.threshold, keep_samples=p.pseudo.n_overlays)
        table = summary_table(classes, stats)
        pq.write_table(table, tmp / "summary.parquet")
        if samples:
            figure = overlay_grid(samples, classes.names, classes.palette, set(classes.unseen_ids))
            figure.savefig(tmp / "overlays.png", dpi=110)
            ctx.log_figure(figure, "pseudo_overlays.png")
            close(figure)
        ctx.write_config(tmp)
    rows = table.to_pylist()
    labelled = sum(r["pixels"] for r in rows)
    correct = sum(stats.get(r["class_id"], {}).get("correct", 0) for r in rows)
    truth = sum(stats.get(r["class_id"], {}).get("truth_pixels", 0) for r in rows)
    metrics = {"pseudo_pixels": labelled, "pseudo_accuracy": correct / labelled if labelled else 0.0,
               "unseen_coverage": labelled / truth if truth else 0.0,
               **{f"accuracy/{r['class']}": r["precision"] or 0.0 for r in rows}}
    write_json(ctx.path(METRICS), metrics)
    ctx.log_metrics({k.replace("/", ".").replace(" ", "_"): v for k, v in metrics.items()})
    ctx.log_artifact(ctx.path(OUT) / "summary.parquet")


if __name__ == "__main__":
    raise SystemExit(run_stage(NAME, main, SECTIONS))
