"""PASCAL VOC 2012 + SBD ("aug") into the prepared layout.

Labels: VOC's SegmentationClass palette PNGs hold class indices (0 background, 1..20 the classes,
255 the object boundaries); SBD's cls/<id>.mat hold a MATLAB struct GTcls whose field Segmentation
has the same 0..20 indices. Both map to background 0 -> 255 (ignored), 1..20 -> 0..19, 255 -> 255.

Splits (the standard ones): val = VOC val (1,449 images); train = VOC train + SBD train + SBD val,
minus VOC val (10,582). An image in VOC train keeps VOC's own label; the others take SBD's.
Images always come from VOC's JPEGImages (SBD's images are the same VOC photographs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import IGNORE_INDEX, DatasetConfig
from pipeline.data.catalog import DatasetEntry
from pipeline.data.convert.common import (
    Item,
    LabelMap,
    Problem,
    Unreadable,
    convert_items,
    finish,
    read_id_list,
    read_index_png,
)

NUM_CLASSES = 20


def label_map() -> LabelMap:
    """0 (background) -> ignore, 1..20 -> 0..19, 255 (boundary) -> ignore."""
    return LabelMap.build(256, {raw: raw - 1 for raw in range(1, NUM_CLASSES + 1)}, ignore=(0, IGNORE_INDEX))


def read_sbd_mat(path: Path) -> np.ndarray:
    """GTcls.Segmentation of an SBD cls/<id>.mat file."""
    from scipy.io import loadmat

    try:
        gt = loadmat(path)["GTcls"]
        segmentation = np.asarray(gt["Segmentation"][0, 0])
    except (OSError, ValueError, TypeError, KeyError, IndexError, NotImplementedError) as exc:
        raise Unreadable(f"unreadable SBD label ({type(exc).__name__}: {exc}); expected a MATLAB file with a "
                         "struct GTcls holding the field Segmentation") from None
    if segmentation.ndim != 2:
        raise Unreadable(f"GTcls.Segmentation has shape {segmentation.shape}, expected a 2-D label map")
    return segmentation


def read_label(item: Item) -> np.ndarray:
    if item.label.suffix.lower() == ".mat":
        return read_sbd_mat(item.label)
    return read_index_png(item)


def split_ids(voc_train: list[str], voc_val: list[str], sbd: list[str]) -> dict[str, list[str]]:
    """The standard lists: train = (VOC train | SBD train | SBD val) - VOC val, val = VOC val."""
    val = set(voc_val)
    train = sorted((set(voc_train) | set(sbd)) - val)
    return {"train": train, "val": sorted(val)}


def plan(roots: dict[str, Path], splits: tuple[str, ...]) -> tuple[list[Item], list[Problem]]:
    voc = roots["voc2012"]
    lists = voc / "ImageSets" / "Segmentation"
    voc_train, voc_val = read_id_list(lists / "train.txt"), read_id_list(lists / "val.txt")
    sbd_ids: list[str] = []
    if "train" in splits:
        sbd = roots["sbd"]
        sbd_ids = read_id_list(sbd / "train.txt") + read_id_list(sbd / "val.txt")
    ids = split_ids(voc_train, voc_val, sbd_ids)
    own = set(voc_train) | set(voc_val)
    items, problems = [], []
    for split in splits:
        for image_id in ids[split]:
            image = voc / "JPEGImages" / f"{image_id}.jpg"
            if image_id in own:
                label = voc / "SegmentationClass" / f"{image_id}.png"
            else:
                label = roots["sbd"] / "cls" / f"{image_id}.mat"
            missing = [p for p in (image, label) if not p.is_file()]
            if missing:
                other = label if image in missing else image
                for path in missing:
                    problems.append(Problem(str(path), f"missing (its pair {other.name} is listed in the {split} split)"))
                continue
            items.append(Item(split=split, id=image_id, image=image, label=label))
    return items, problems


def convert(entry: DatasetEntry, cfg: DatasetConfig, roots: dict[str, Path], root: Path,
            splits: tuple[str, ...], *, progress: bool = True) -> dict:
    items, problems = plan(roots, splits)
    rows, pixels = convert_items(entry.name, items, read_label, label_map(), root, problems=problems,
                                 workers=cfg.workers, progress=progress)
    return finish(entry, cfg.unseen_split, rows, pixels, root)
