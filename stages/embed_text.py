"""Stage embed_text: class text embeddings of the prepared dataset's classes (artifacts/text).

Reads data/prepared/classes.json and the backbone's text tower; writes the embeddings
(pipeline.text's format), the templates used and the class-similarity heatmap.
"""

from __future__ import annotations

from pipeline.data.prepared import ClassInfo
from pipeline.io import atomic_dir, write_json
from pipeline.text import (
    backbone_tokenizer,
    class_embeddings,
    embedding_summary,
    resolve_templates,
    similarity,
    similarity_figure,
    write_text_embeddings,
)
from pipeline.weights import build_clip, load_backbone
from stages.common import StageContext, run_stage

NAME = "embed_text"
SECTIONS = ("text",)
CLASSES = "data/prepared/classes.json"
BACKBONE = "artifacts/backbone"
OUT = "artifacts/text"
METRICS = "artifacts/text_metrics.json"
FIGURE = "similarity.png"


def main(ctx: StageContext) -> None:
    import mlflow

    cfg = ctx.params.text
    classes = ClassInfo.read(ctx.path(CLASSES))
    backbone = load_backbone(ctx.path(BACKBONE))
    templates = resolve_templates(cfg, classes)
    result = class_embeddings(build_clip(backbone), backbone_tokenizer(backbone.arch, backbone.meta), classes.names,
                              templates.templates, cfg.batch_size)
    figure = similarity_figure(similarity(result.embeddings), classes.names, classes.unseen_ids)
    with atomic_dir(ctx.path(OUT)) as tmp:
        write_text_embeddings(tmp, classes, result, templates, per_template=cfg.per_template)
        figure.savefig(tmp / FIGURE, dpi=120)
        ctx.write_config(tmp)
    summary = embedding_summary(result, classes.seen_ids, classes.unseen_ids)
    write_json(ctx.path(METRICS), summary)
    ctx.log_metrics(summary)
    ctx.log_dict({"name": templates.name, "templates": list(templates.templates)}, "templates.json")
    ctx.log_figure(figure, FIGURE)
    mlflow.set_tags({"text.template_set": templates.name, "backbone.sha256": backbone.meta["sha256"],
                     "backbone.source": backbone.meta["source"]})


if __name__ == "__main__":
    raise SystemExit(run_stage(NAME, main, SECTIONS))
