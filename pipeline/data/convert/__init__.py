"""Converters from each real dataset's official files to the prepared layout (pipeline.data.prepared).

`converter(name)(entry, cfg, roots, root, splits, progress=...)` reads the source folders that
pipeline.data.download.locate_sources found (`roots`, keyed by the catalog's source names), writes
images/, labels/, manifest.parquet and classes.json into `root`, and returns the summary counts.
Modules are imported on demand, so conversion worker processes load only what they use.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

CONVERTERS = {  # dataset name -> module with a `convert` function
    "voc12": "pipeline.data.convert.voc",
    "coco_stuff164k": "pipeline.data.convert.coco_stuff",
    "context59": "pipeline.data.convert.context",
}


def converter(name: str) -> Callable[..., dict]:
    return import_module(CONVERTERS[name]).convert
