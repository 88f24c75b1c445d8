"""Stage prepare_data: the configured dataset in the prepared layout (pipeline.data.prepared).

Real datasets first have their source files found or downloaded (pipeline.data.download) in a
Prefect task: the downloader retries transient network errors itself, and the task retries the
whole fetch a few more times, later, when the network stayed down (a resumed download loses no
bytes). Conversion then writes into a temporary folder that replaces data/prepared on success.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.config import DatasetConfig
from pipeline.data.catalog import get_dataset
from pipeline.data.download import locate_sources
from pipeline.data.prepared import prepare_dataset
from pipeline.io import atomic_dir, write_json
from stages.common import StageContext, retry_if_transient, run_stage

NAME = "prepare_data"
SECTIONS = ("seed", "dataset")
OUT = "data/prepared"
METRICS = "data/prepare_metrics.json"
FETCH_RETRIES = 2  # Prefect retries of the whole fetch after the downloader's own retries gave up
FETCH_RETRY_DELAY_S = 120


@task(name="fetch dataset sources", retries=FETCH_RETRIES, retry_delay_seconds=FETCH_RETRY_DELAY_S,
      retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def fetch_sources(cfg: DatasetConfig) -> dict[str, Path]:
    return locate_sources(get_dataset(cfg.name), cfg, ("train", "val"))


def main(ctx: StageContext) -> None:
    cfg = ctx.params.dataset
    cfg = cfg.model_copy(update={"cache_dir": ctx.path(cfg.cache_dir),
                                 "source_dir": ctx.path(cfg.source_dir) if cfg.source_dir else None})
    sources = fetch_sources(cfg) if cfg.name != "demo" else None
    with atomic_dir(ctx.path(OUT)) as tmp:
        summary = prepare_dataset(cfg, ctx.params.seed, tmp, sources=sources)
        ctx.write_config(tmp)
    write_json(ctx.path(METRICS), summary["counts"])
    ctx.log_metrics(summary["counts"])
    ctx.log_dict(summary, "summary.json")
    ctx.log_artifact(ctx.path(OUT) / "classes.json")


if __name__ == "__main__":
    raise SystemExit(run_stage(NAME, main, SECTIONS))
