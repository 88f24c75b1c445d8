"""PASCAL Context 59 (VOC2010 images + the PASCAL in Detail annotations) into the prepared layout.

trainval_merged.json (the "detail" release) is one JSON object with, among others:
  images:             [{image_id: 2008000002, file_name: "2008_000002.jpg", height, width,
                        phase: "train" | "val" | ...}, ...]
  annos_segmentation: [{id, image_id, category_id, segmentation, area, bbox, iscrowd, parts}, ...]
  categories:         [{category_id, name, supercategory, ...}, ...]   (full Context label ids)
`segmentation` is a COCO-style RLE, {"size": [height, width], "counts": "<compressed string>"}
(uncompressed integer counts and polygon lists are also accepted; polygons are filled at pixel
centres, within about 1% of the COCO API's pixels on the boundary). The semantic label of an image
is its annotations painted in file order, later ones on top, 0 where none covers a pixel (what the
detail API's getMask returns). The catalog's `full_label_ids` map the 59 classes; 0 and every
other category become 255 (ignored); a category id the file does not define is out of range.
Splits come from each image's `phase` (4,996 train / 5,104 val in the standard release).

The RLE decoder is written here; it follows the compressed format of the COCO API: counts of
alternating 0/1 runs over the column-major mask, each count written as 5-bit groups in characters
from '0', with counts after the second stored as differences. The detail API is not on PyPI, and
pycocotools' `mask.decode` (which is) checks nothing: a string cut short decodes without an error,
and counts that cover fewer pixels than the mask leave the rest as it was in memory (2.0.11). A
corrupt mask must be a named error, and checking the counts takes parsing them, which is all the
decoding there is; tests/test_rle_matches_pycocotools.py holds this decoder to pycocotools' results.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline.config import DatasetConfig
from pipeline.data.catalog import DatasetEntry
from pipeline.data.convert.common import (
    Item,
    LabelMap,
    Problem,
    SourceLayoutError,
    Unreadable,
    convert_items,
    finish,
)
from pipeline.data.ids import id_problem, unsafe_ids_error

log = logging.getLogger("cascade_clip.data")

ANNOTATION_FILE = "trainval_merged.json"
REQUIRED_KEYS = ("images", "annos_segmentation", "categories")


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------
def rle_counts(text: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string."""
    counts: list[int] = []
    position, end = 0, len(text)
    while position < end:
        value, shift, more = 0, 0, True
        while more:
            if position >= end:
                raise ValueError("RLE string ends inside a count")
            chunk = ord(text[position]) - 48
            value |= (chunk & 0x1F) << shift
            more = bool(chunk & 0x20)
            position += 1
            shift += 5
            if not more and chunk & 0x10:
                value |= -1 << shift  # sign-extend
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """Binary mask [height, width] of an RLE (compressed or not) or a polygon list; ValueError if malformed."""
    if isinstance(segmentation, dict):
        size = segmentation.get("size")
        if size is not None and list(size) != [height, width]:
            raise ValueError(f"RLE size {list(size)} differs from the image's [{height}, {width}]")
        counts = segmentation.get("counts")
        counts = rle_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
        if any(c < 0 for c in counts) or sum(counts) != height * width:
            raise ValueError(f"RLE counts cover {sum(counts)} pixels, expected {height * width}")
        flat = np.repeat(np.arange(len(counts), dtype=np.uint8) % 2, counts)
        return flat.reshape(width, height).T.astype(bool)
    if isinstance(segmentation, list):  # polygons [[x1, y1, x2, y2, ...], ...], united
        from skimage.draw import polygon as draw_polygon

        mask = np.zeros((height, width), dtype=bool)
        for polygon in segmentation:
            points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2) - 0.5  # pixel centres, as the COCO API
            if len(points) >= 3:
                rows, cols = draw_polygon(points[:, 1], points[:, 0], (height, width))
                mask[rows, cols] = True
        return mask
    raise ValueError(f"unknown segmentation format {type(segmentation).__name__}")


def read_label(item: Item) -> np.ndarray:
    """The full-label-id map of one image (0 where no annotation covers a pixel)."""
    height, width, annotations = item.annotation
    label = np.zeros((height, width), dtype=np.int32)
    for category, segmentation in annotations:
        try:
            mask = decode_segmentation(segmentation, height, width)
        except (ValueError, TypeError, KeyError) as exc:
            raise Unreadable(f"malformed mask of category {category}: {exc}") from None
        label[mask] = category
    return label


# --------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------
def _normal(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def load_annotations(path: Path) -> dict:
    if not path.is_file():
        raise SourceLayoutError(f"{path}: not found; put {ANNOTATION_FILE} in dataset.source_dir or let prepare_data "
                                "download it")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourceLayoutError(f"{path}: not valid JSON ({exc}); the file is truncated or corrupt: delete it and "
                                "download it again") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise SourceLayoutError(f"{path}: missing the keys {missing}; this is not the PASCAL in Detail "
                                f"{ANNOTATION_FILE}")
    return data


def label_map(entry: DatasetEntry, categories: dict[int, str]) -> LabelMap:
    """59 full ids -> 0..58; 0 and the file's other categories -> ignore; undefined ids -> out of range."""
    full_ids = entry.extra["full_label_ids"]
    mismatched = [f"{cid}: {categories.get(cid)!r} vs {name!r}" for cid, name in zip(full_ids, entry.classes)
                  if _normal(categories.get(cid, "")) != _normal(name)]
    if mismatched:
        log.warning("context59: category names in %s differ from the catalog's for ids %s", ANNOTATION_FILE,
                    "; ".join(mismatched))
    size = max([*categories, *full_ids, 0]) + 1
    ignore = [0, *(cid for cid in categories if cid not in full_ids)]
    return LabelMap.build(size, {cid: i for i, cid in enumerate(full_ids)}, ignore=ignore)


def plan(data: dict, voc: Path, splits: tuple[str, ...], source: str = ANNOTATION_FILE) -> tuple[list[Item], list[Problem]]:
    by_image: dict[int, list] = defaultdict(list)
    for annotation in data["annos_segmentation"]:
        by_image[annotation["image_id"]].append((int(annotation["category_id"]), annotation["segmentation"]))
    names = [(n, str(image.get("file_name", ""))) for n, image in enumerate(data["images"])]
    bad = [f"images[{n}].file_name: {name!r} {problem}" for n, name in names if (problem := id_problem(name))]
    if bad:
        raise unsafe_ids_error(source, bad, "Each file_name must be a plain file name such as 2008_000002.jpg; "
                                            f"this is not the official {ANNOTATION_FILE}: download it again.")
    items, problems = [], []
    for image in data["images"]:
        split = image.get("phase")
        if split not in splits:
            continue
        path = voc / "JPEGImages" / image["file_name"]
        if not path.is_file():
            problems.append(Problem(str(path), f"missing (annotated in {ANNOTATION_FILE}, {split} split)"))
            continue
        annotation = (int(image["height"]), int(image["width"]), by_image.get(image["image_id"], []))
        image_id = Path(image["file_name"]).stem
        items.append(Item(split=split, id=image_id, image=path, label=None, annotation=annotation,
                          label_name=f"{source} (image {image_id})"))
    return items, problems


def convert(entry: DatasetEntry, cfg: DatasetConfig, roots: dict[str, Path], root: Path,
            splits: tuple[str, ...], *, progress: bool = True) -> dict:
    data = load_annotations(roots["context"] / ANNOTATION_FILE)
    categories = {int(c["category_id"]): c.get("name", "") for c in data["categories"]}
    labels = label_map(entry, categories)
    items, problems = plan(data, roots["voc2010"], splits, str(roots["context"] / ANNOTATION_FILE))
    del data
    rows, pixels = convert_items(entry.name, items, read_label, labels, root, problems=problems,
                                 workers=cfg.workers, progress=progress)
    return finish(entry, cfg.unseen_split, rows, pixels, root)
