"""Stage prepare_data: the configured dataset in the prepared layout (pipeline.data.prepared)."""

from __future__ import annotations

from pipeline.data.prepared import prepare_dataset
from pipeline.io import atomic_dir, write_json
from stages.common import StageContext, run_stage

NAME = "prepare_data"
SECTIONS = ("seed", "dataset")
OUT = "data/prepared"
METRICS = "data/prepare_metrics.json"


def main(ctx: StageContext) -> None:
    with atomic_dir(ctx.path(OUT)) as tmp:
        summary = prepare_dataset(ctx.params.dataset, ctx.params.seed, tmp)
        ctx.write_config(tmp)
    write_json(ctx.path(METRICS), summary["counts"])
    ctx.log_metrics(summary["counts"])
    ctx.log_dict(summary, "summary.json")
    ctx.log_artifact(ctx.path(OUT) / "classes.json")


if __name__ == "__main__":
    raise SystemExit(run_stage(NAME, main, SECTIONS))
