"""Stage evaluate: mIoU^S / mIoU^U / hIoU of the trained model(s) on the val split, pictures, and
the no-transfer control (unseen text embeddings replaced by random unit vectors)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.compare import TAG_MODEL_FILE
from pipeline.data.prepared import ClassInfo, prepare_dataset
from pipeline.engine.evaluate import EvalResult, evaluate, random_unit_embeddings
from pipeline.engine.setup import load_text_embeddings, normalizer
from pipeline.io import atomic_dir, write_json
from pipeline.model import load, make_tokenizer, model_extra
from pipeline.viz import close, iou_bars, matrix_heatmap, overlay_grid
from pipeline.weights import read_backbone_meta
from stages.common import StageContext, run_stage

NAME = "evaluate"
SECTIONS = ("seed", "dataset", "train", "evaluate")  # dataset: cross-dataset preparation; train: normalisation
PREPARED = "data/prepared"
BACKBONE = "artifacts/backbone"
TEXT = "artifacts/text/embeddings.npy"
INDUCTIVE = "artifacts/train/model.safetensors"
SELF_TRAINED = "artifacts/self_train/model.safetensors"
CROSS = "data/cross"  # other datasets' val splits for cross-dataset evaluation
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


def cross_dataset(ctx: StageContext, name: str) -> tuple[Path, ClassInfo]:
    """The val split of another catalog dataset, prepared once into data/cross/<name>; every one
    of its classes counts as unseen (the model never trained on its labels)."""
    root = ctx.path(CROSS) / name
    if not (root / "classes.json").exists():
        cfg = ctx.params.dataset.model_copy(update={"name": name, "unseen_split": None})
        with atomic_dir(root) as tmp:
            prepare_dataset(cfg, ctx.params.seed, tmp, splits=("val",))
    classes = ClassInfo.read(root / "classes.json")
    every = list(range(classes.num_classes))
    return root, replace(classes, seen_ids=[], unseen_ids=every)


def cross_embeddings(model, classes: ClassInfo) -> torch.Tensor:
    """The target dataset's class embeddings from the model's own text tower and its templates."""
    with torch.no_grad():
        return model.encode_text(classes.names, classes.templates, make_tokenizer(model.arch)).float().cpu()


def protocol(ctx: StageContext) -> dict[str, str]:
    """How the scored models were made, recorded with their scores (strings: metrics.json's
    "protocol" entry and MLflow tags, never MLflow metrics): the self-training protocol from the
    self-trained model's card, and the training dataset with its unseen split."""
    training = ClassInfo.read(ctx.path(PREPARED) / "classes.json")
    setting = model_extra(ctx.path(SELF_TRAINED)).get("setting", "")
    return {"self_train_mode": setting.removeprefix("self_train_") or "unknown", "dataset": training.dataset,
            "unseen_split": training.unseen_split}


def main(ctx: StageContext) -> None:
    ctx.pin_threads()
    p = ctx.params
    if p.evaluate.cross_dataset is not None:
        root, classes = cross_dataset(ctx, p.evaluate.cross_dataset)
        embeddings = None  # computed per model below
    else:
        root = ctx.path(PREPARED)
        classes = ClassInfo.read(root / "classes.json")
        embeddings = load_text_embeddings(ctx.path(TEXT), classes)
    normalize = normalizer(p.train.normalization, read_backbone_meta(ctx.path(BACKBONE)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, EvalResult] = {}
    for name, model_file, calibrated in SETTINGS:
        model = load(ctx.path(model_file), map_location=device, backbone=ctx.path(BACKBONE))
        class_embeddings = embeddings if embeddings is not None else cross_embeddings(model, classes)
        calibration = p.evaluate.calibration if calibrated and classes.seen_ids else 0.0
        # a calibrated model is also scored without calibration (same pass): what the calibration moves
        scored = evaluate(model, class_embeddings, root, classes, cfg=p.evaluate, normalize=normalize,
                          calibrations=(calibration, 0.0) if calibration else (calibration,),
                          keep_samples=p.evaluate.n_overlays)
        results[name] = scored[0]
        if len(scored) > 1:
            results[f"{name}_uncalibrated"] = replace(scored[1], samples=[])
        if name == "inductive":
            control = random_unit_embeddings(class_embeddings, classes.unseen_ids, seed=p.seed)
            [results["control_no_transfer"]] = evaluate(model, control, root, classes, cfg=p.evaluate, normalize=normalize,
                                                        calibrations=(calibration,), progress=False)
    metrics = {name: {k: (None if np.isnan(v) else v) for k, v in result.metrics.items()} for name, result in results.items()}
    with atomic_dir(ctx.path(OUT)) as tmp:
        pq.write_table(iou_table(classes, results), tmp / "per_class_iou.parquet")
        for name, result in results.items():
            np.save(tmp / f"{name}_confusion.npy", result.confusion)
            if result.samples:
                write_pictures(ctx, tmp, classes, name, result)
        ctx.write_config(tmp)
    record = protocol(ctx)
    write_json(ctx.path(METRICS), {**metrics, "protocol": record})  # DVC shows string metrics, diffs only numbers
    final_name = "self_train" if "self_train" in metrics else "inductive"
    final = metrics[final_name]  # the pipeline's final model, logged unprefixed
    final_file = ctx.path(dict((n, f) for n, f, _ in SETTINGS)[final_name])
    ctx.set_tags({TAG_MODEL_FILE: str(final_file.resolve()), "cascade.final_setting": final_name,
                  "cascade.self_train_mode": record["self_train_mode"], "cascade.unseen_split": record["unseen_split"]})
    ctx.tag_scored_model(final_file)  # the logged model (runs:/ URI, sha256) that `compare --register` registers
    for name, values in {**metrics, "": final}.items():
        ctx.log_metrics({f"{name}.{k}" if name else k: v for k, v in values.items() if v is not None})
    ctx.log_pipeline_metrics({k: v for k, v in final.items() if v is not None})  # onto the pipeline's parent run
    ctx.log_artifact(ctx.path(OUT) / "per_class_iou.parquet")


if __name__ == "__main__":
    raise SystemExit(run_stage(NAME, main, SECTIONS, log_all_params=True))
