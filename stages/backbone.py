"""Stage backbone: the CLIP weights in the local format of pipeline.weights (artifacts/backbone).

source toy pretrains the toy CLIP on the demo world and reports whether it learned (zero-shot
accuracy on held-out images, compositional text embeddings); openai and file load a checkpoint,
open_clip any open_clip ViT (clip.model) with clip.pretrained's weights (pipeline.openclip_weights).
"""

from __future__ import annotations

import csv
import time

from pipeline.config import ClipConfig
from pipeline.engine.pretrain import CURVE_FIELDS, pretrain_toy_clip
from pipeline.io import atomic_dir, atomic_file, write_json
from pipeline.openclip_weights import rooted_paths
from pipeline.weights import load_pretrained, save_backbone
from stages.common import StageContext, retry_if_transient, run_stage

NAME = "backbone"
SECTIONS = ("seed", "clip", "dataset.demo.rotation")  # the demo world the toy CLIP pretrains on
OUT = "artifacts/backbone"
METRICS = "artifacts/backbone_metrics.json"
CURVE = "artifacts/backbone_pretrain_curve.csv"
RETRY_DELAYS_S = [10, 60]


def main(ctx: StageContext) -> None:
    import mlflow

    clip = rooted(ctx.params.clip, ctx)
    with atomic_dir(ctx.path(OUT)) as tmp:
        if clip.source == "toy":
            rotation = ctx.params.dataset.demo.rotation  # the demo world the toy CLIP learns (logged: in SECTIONS)
            toy = pretrain_toy_clip(clip.toy, ctx.params.seed, rotation=rotation)
            meta = save_backbone(tmp, toy.arch, toy.model, source="toy", details={"pretraining": toy.summary})
            curve, checks = toy.result.curve, toy.metrics
        else:
            loaded = fetch_and_load(clip)
            meta = save_backbone(tmp, loaded.arch, loaded.model, source=clip.source, details=loaded.details)
            curve, checks = [], {}
        ctx.write_config(tmp)
    metrics = {"parameters": meta["parameters"], "size_mb": meta["size_bytes"] / 2**20, **checks}
    write_json(ctx.path(METRICS), metrics)
    write_curve(ctx, curve)
    log_curve(ctx, curve)
    ctx.log_metrics(metrics)
    ctx.log_dict(meta, "clip.json")
    mlflow.set_tags({"clip.source": clip.source, "clip.sha256": meta["sha256"]})


def rooted(clip: ClipConfig, ctx: StageContext) -> ClipConfig:
    """clip with its paths resolved against the project root (the stage may run from anywhere)."""
    update = {"cache_dir": ctx.path(clip.cache_dir)}
    if clip.file is not None:
        update["file"] = ctx.path(clip.file)
    if clip.arch.endswith(".json"):
        update["arch"] = str(ctx.path(clip.arch))
    if clip.source == "open_clip":
        update |= rooted_paths(clip, ctx.path)
    return clip.model_copy(update=update)


def fetch_and_load(clip: ClipConfig):
    """load_pretrained as a Prefect task: a download that fails for a passing reason is retried."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    load = task(load_pretrained, name="load CLIP weights", retries=len(RETRY_DELAYS_S),
                retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
    return load(clip)


def write_curve(ctx: StageContext, curve: list[dict]) -> None:
    """The pretraining curve as a DVC plot (header only for sources that are not pretrained)."""
    with atomic_file(ctx.path(CURVE), "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=CURVE_FIELDS)
        writer.writeheader()
        writer.writerows(curve)


def log_curve(ctx: StageContext, curve: list[dict]) -> None:
    """Every step of the pretraining curve as MLflow metric points (one batched call)."""
    if not curve:
        return
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    points = [Metric(f"pretrain_{key}", float(row[key]), now, int(row["step"]))
              for row in curve for key in CURVE_FIELDS if key != "step"]
    client = MlflowClient()
    for i in range(0, len(points), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(ctx.run.info.run_id, metrics=points[i : i + 1000])


if __name__ == "__main__":
    raise SystemExit(run_stage(NAME, main, SECTIONS))
