"""COCO-Stuff 164k into the prepared layout.

Images: train2017/*.jpg and val2017/*.jpg (COCO 2017). Labels: stuffthingmaps_trainval2017's
train2017/*.png and val2017/*.png, grayscale PNGs of 0-based COCO-Stuff ids 0..181 with 255 for
unlabeled pixels. Of the 182 ids, the catalog's `unused_label_values` (11 COCO thing ids that were
never annotated) are absent; the other 171, in increasing order, become the compact ids 0..170 of
the catalog's class list. 255 stays ignore; any other value is reported as out of range.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DatasetConfig
from pipeline.data.catalog import DatasetEntry
from pipeline.data.convert.common import (
    Item,
    LabelMap,
    Problem,
    SourceLayoutError,
    convert_items,
    files_by_stem,
    finish,
    read_index_png,
)


def raw_to_compact(entry: DatasetEntry) -> dict[int, int]:
    """{raw stuffthingmaps value: compact class id} from the catalog's data."""
    unused = set(entry.extra["unused_label_values"])
    used = [raw for raw in range(entry.extra["raw_label_count"]) if raw not in unused]
    if len(used) != len(entry.classes):
        raise ValueError(f"catalog: {entry.name} has {len(used)} used raw ids but {len(entry.classes)} classes")
    return {raw: index for index, raw in enumerate(used)}


def label_map(entry: DatasetEntry) -> LabelMap:
    return LabelMap.build(256, raw_to_compact(entry))


def plan(roots: dict[str, Path], splits: tuple[str, ...]) -> tuple[list[Item], list[Problem]]:
    items, problems = [], []
    for split in splits:
        image_dir = roots[f"{split}2017"] / f"{split}2017"
        label_dir = roots["stuffthingmaps"] / f"{split}2017"
        images, labels = files_by_stem(image_dir, ".jpg"), files_by_stem(label_dir, ".png")
        if not labels:
            raise SourceLayoutError(f"{label_dir}: no label PNGs; extract stuffthingmaps_trainval2017.zip again "
                                    "(or let prepare_data download it)")
        for stem in sorted(images.keys() - labels.keys()):
            problems.append(Problem(str(images[stem]), f"no label {stem}.png in {label_dir}"))
        for stem in sorted(labels.keys() - images.keys()):
            problems.append(Problem(str(labels[stem]), f"no image {stem}.jpg in {image_dir}"))
        for stem in sorted(images.keys() & labels.keys()):
            items.append(Item(split=split, id=stem, image=images[stem], label=labels[stem]))
    return items, problems


def convert(entry: DatasetEntry, cfg: DatasetConfig, roots: dict[str, Path], root: Path,
            splits: tuple[str, ...], *, progress: bool = True) -> dict:
    items, problems = plan(roots, splits)
    rows, pixels = convert_items(entry.name, items, read_index_png, label_map(entry), root, problems=problems,
                                 workers=cfg.workers, progress=progress)
    return finish(entry, cfg.unseen_split, rows, pixels, root)
