"""Stage evaluate: mIoU^S / mIoU^U / hIoU of the trained model(s) on the val split, pictures, and
the no-transfer control (unseen text embeddings replaced by random unit vectors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.compare import TAG_MODEL_FILE
from pipeline.data.prepared import ClassInfo
from pipeline.engine.evaluate import EvalResult, evaluate, random_unit_embeddings
from pipeline.engine.setup import load_text_embeddings, normalizer
from pipeline.errors import CascadeError
from pipeline.io import atomic_dir, write_json
from pipeline.model import load
from pipeline.viz import close, iou_bars, matrix_heatmap, overlay_grid
from pipeline.weights import read_backbone_meta
from stages.common import StageContext, run_stage

NAME = "evaluate"
SECTIONS = ("seed", "train", "evaluate")  # train: its normalisation setting
PREPARED = "data/prepared"
BACKBONE = "artifacts/backbone"
TEXT = "artifacts/text/embeddings.npy"
INDUCTIVE = "artifacts/train/model.safetensors"
SELF_TRAINED = "artifacts/self_train/model.safetensors"
OUT = "artifacts/eval"
METRICS = "artifacts/metrics.json"


# (name, model file, calibrated): seen-class calibration is for the inductive model only
SETTINGS = (("inductive", INDUCTIVE, True), ("self_train", SELF_TRAINED, False))


def iou_table(classes: ClassInfo, results: dict[str, EvalResult]) -> pa.Table:
    unseen = set(classes.unseen_ids)
    columns = {"class_id": list(range(classes.num_classes)), "class": classes.names,
               "seen": [i not in unseen for i in range(classes.num_classes)]}
    for name, result in results.items():
        columns[f"iou_{name}"] = [None if np.isnan(v) else float(v) for v in result.iou]
    return pa.table(columns)


def write_pictures(ctx: StageContext, folder: Path, classes: ClassInfo, name: str, result: EvalResult) -> None:
    unseen = set(classes.unseen_ids)
    pictures = {
        f"{name}_iou_per_class.png": iou_bars(classes.names, result.iou, unseen, f"{name}: IoU per class (hIoU {result.metrics['hIoU']:.1f})"),
        f"{name}_confusion.png": matrix_heatmap(result.confusion, classes.names, f"{name}: confusion (rows: truth, row-normalised)", normalise_rows=True, vmin=0, vmax=1),
        f"{name}_overlays.png": overlay_grid(result.samples, classes.names, classes.palette, unseen),
    }
    for file_name, figure in pictures.items():
        figure.savefig(folder / file_name, dpi=110)
        ctx.log_figure(figure, file_name)
        close(figure)


def main(ctx: StageContext) -> None:
    p = ctx.params
    if p.evaluate.cross_dataset is not None:
        raise CascadeError(
            f"evaluate.cross_dataset={p.evaluate.cross_dataset!r} needs that dataset prepared, and real datasets "
            "cannot be prepared in this build yet; set evaluate.cross_dataset: null"
        )
    root = ctx.path(PREPARED)
    classes = ClassInfo.read(root / "classes.json")
    embeddings = load_text_embeddings(ctx.path(TEXT), classes)
    normalize = normalizer(p.train.normalization, read_backbone_meta(ctx.path(BACKBONE)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, EvalResult] = {}
    for name, model_file, calibrated in SETTINGS:
        model = load(ctx.path(model_file), map_location=device)
        calibration = p.evaluate.calibration if calibrated else 0.0
        results[name] = evaluate(model, embeddings, root, classes, cfg=p.evaluate, normalize=normalize,
                                 calibration=calibration, keep_samples=p.evaluate.n_overlays)
        if name == "inductive":
            control = random_unit_embeddings(embeddings, classes.unseen_ids, seed=p.seed)
            results["control_no_transfer"] = evaluate(model, control, root, classes, cfg=p.evaluate, normalize=normalize,
                                                      calibration=calibration, progress=False)
    metrics = {name: result.metrics for name, result in results.items()}
    with atomic_dir(ctx.path(OUT)) as tmp:
        pq.write_table(iou_table(classes, results), tmp / "per_class_iou.parquet")
        for name, result in results.items():
            np.save(tmp / f"{name}_confusion.npy", result.confusion)
            if result.samples:
                write_pictures(ctx, tmp, classes, name, result)
        ctx.write_config(tmp)
    write_json(ctx.path(METRICS), metrics)
    final_name = "self_train" if "self_train" in metrics else "inductive"
    final = metrics[final_name]  # the pipeline's final model, logged unprefixed
    ctx.set_tags({TAG_MODEL_FILE: str(ctx.path(dict((n, f) for n, f, _ in SETTINGS)[final_name]).resolve()),
                  "cascade.final_setting": final_name})
    for name, values in {**metrics, "": final}.items():
        ctx.log_metrics({f"{name}.{k}" if name else k: v for k, v in values.items() if not np.isnan(v)})
    ctx.log_artifact(ctx.path(OUT) / "per_class_iou.parquet")


if __name__ == "__main__":
    raise SystemExit(run_stage(NAME, main, SECTIONS, log_all_params=True))
