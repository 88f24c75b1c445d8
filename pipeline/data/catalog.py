"""The dataset catalog (catalog.yaml beside this file): class names, unseen splits, templates."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

from pipeline.errors import CascadeError

CATALOG_PATH = Path(__file__).with_name("catalog.yaml")


class CatalogError(CascadeError, ValueError):
    """A dataset, split or template set that the catalog does not have."""


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    description: str
    available: bool  # False: its downloader/converter is not part of this build yet
    classes: tuple[str, ...]
    unseen_splits: dict[str, tuple[str, ...]]
    default_split: str
    templates: str  # name of a template set
    extra: dict = field(default_factory=dict)  # dataset-specific data (the demo's colours and shapes)

    def unseen(self, split: str | None = None) -> tuple[str, ...]:
        split = split or self.default_split
        if split not in self.unseen_splits:
            valid = ", ".join(self.unseen_splits)
            raise CatalogError(f"dataset {self.name!r} has no unseen split {split!r}; valid splits: {valid}")
        return self.unseen_splits[split]

    def unseen_ids(self, split: str | None = None) -> list[int]:
        return sorted(self.classes.index(name) for name in self.unseen(split))

    def seen_ids(self, split: str | None = None) -> list[int]:
        unseen = set(self.unseen_ids(split))
        return [i for i in range(len(self.classes)) if i not in unseen]


@cache
def _raw() -> dict:
    return yaml.safe_load(CATALOG_PATH.read_text())


def dataset_names(*, real: bool = False) -> list[str]:
    """The catalog's datasets, in catalog order; real=True: only those built from official source
    files (not the drawn demo world)."""
    return [name for name, entry in _raw()["datasets"].items() if not real or entry.get("sources")]


def get_dataset(name: str) -> DatasetEntry:
    datasets = _raw()["datasets"]
    if name not in datasets:
        raise CatalogError(f"unknown dataset {name!r}; valid datasets: {', '.join(datasets)}")
    entry = dict(datasets[name])
    classes = tuple(entry.pop("classes"))
    splits = {k: tuple(v) for k, v in entry.pop("unseen_splits").items()}
    for split, names in splits.items():
        missing = [n for n in names if n not in classes]
        if missing:
            raise CatalogError(
                f"{CATALOG_PATH}: {name}.unseen_splits.{split} names classes not in {name}.classes: {missing}; "
                f"use names from {name}.classes: {', '.join(classes)}"
            )
    return DatasetEntry(
        name=name,
        description=entry.pop("description"),
        available=entry.pop("available"),
        classes=classes,
        unseen_splits=splits,
        default_split=entry.pop("default_split"),
        templates=entry.pop("templates"),
        extra=entry,
    )


def template_set(name: str) -> tuple[str, ...]:
    sets = _raw()["template_sets"]
    if name not in sets:
        raise CatalogError(f"unknown template set {name!r}; valid sets: {', '.join(sets)}")
    return tuple(sets[name])


def palette(n: int) -> list[list[int]]:
    """A fixed, well-spread colour per class id (golden-ratio hues), for label pictures."""
    import colorsys

    colours = []
    for i in range(n):
        hue = (i * 0.618033988749895) % 1.0
        lightness = 0.45 + 0.15 * ((i // 7) % 2)
        r, g, b = colorsys.hls_to_rgb(hue, lightness, 0.75)
        colours.append([round(r * 255), round(g * 255), round(b * 255)])
    return colours
