"""What every converter shares: the work items, label look-up tables, the checked per-file
conversion run in parallel, and the one error that lists every bad file.

A converter plans `Item`s (one image and its label source each) and a `LabelMap`; `convert_items`
then reads, checks and writes every item in worker processes and returns the manifest rows and
the pixel histogram. Nothing bad is skipped silently: unreadable or truncated images, labels with
values outside the dataset's range, image/label size mismatches and missing pairs are all
collected and raised together as one `BadFilesError` after the whole pass.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.config import IGNORE_INDEX
from pipeline.data.catalog import DatasetEntry
from pipeline.data.ids import id_problem, unsafe_ids_error
from pipeline.errors import CascadeError

log = logging.getLogger("cascade_clip.data")

INVALID = -1  # LabelMap entry of a raw value the dataset never uses
MAX_LISTED = 200  # bad files shown in full in one error message


class BadFilesError(CascadeError):
    """Source files that cannot be converted; the message lists every one of them."""


class SourceLayoutError(CascadeError):
    """A source folder without a file every converter run needs (a split list, the annotation file)."""


@dataclass(frozen=True)
class Problem:
    path: str  # the offending source file
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def bad_files_error(dataset: str, problems: list[Problem]) -> BadFilesError:
    problems = sorted(set(problems), key=lambda p: (p.path, p.reason))
    shown = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return BadFilesError(
        f"dataset {dataset!r}: {len(problems)} bad source file(s); nothing was written:\n{shown}{more}\n"
        "Fix: the files are damaged or incomplete; delete the extracted copy (or the archive) and let "
        "prepare_data fetch it again, or replace these files in dataset.source_dir."
    )


@dataclass(frozen=True)
class LabelMap:
    """Raw label value -> class id (0..C-1), IGNORE_INDEX, or INVALID (never used by the dataset)."""

    table: np.ndarray  # int16 [R]; raw values >= R are invalid

    @classmethod
    def build(cls, size: int, classes: dict[int, int], ignore: Iterable[int] = (IGNORE_INDEX,)) -> LabelMap:
        table = np.full(size, INVALID, dtype=np.int16)
        for raw in ignore:
            table[raw] = IGNORE_INDEX
        for raw, class_id in classes.items():
            table[raw] = class_id
        return cls(table)

    def apply(self, raw: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """The uint8 label map, and the sorted raw values outside the dataset's range (if any)."""
        raw = np.asarray(raw)
        if raw.size and (raw.min() < 0 or raw.max() >= len(self.table)):
            values = np.unique(raw)
            return np.zeros(raw.shape, np.uint8), [int(v) for v in values if v < 0 or v >= len(self.table)
                                                   or self.table[v] == INVALID]
        mapped = self.table[raw]
        if (mapped == INVALID).any():
            return np.zeros(raw.shape, np.uint8), [int(v) for v in np.unique(raw[mapped == INVALID])]
        return mapped.astype(np.uint8), []


@dataclass(frozen=True)
class Item:
    """One image of the prepared dataset and where its label comes from."""

    split: str
    id: str
    image: Path  # source image file
    label: Path | None  # source label file (None when the label is in `annotation`)
    annotation: Any = None  # converter-specific label data (Context: the image's RLE masks)
    label_name: str | None = None  # how messages name the label when it is not a file of its own

    @property
    def label_source(self) -> str:
        return self.label_name or str(self.label)


LabelReader = Callable[[Item], np.ndarray]  # raw label values [H, W]; raises Unreadable


class Unreadable(Exception):
    """A source file that cannot be read (the message is the reason, without the path)."""


def read_index_png(item: Item) -> np.ndarray:
    """A PNG of class indices: palette ('P') or grayscale ('L'), never colour-converted."""
    try:
        with Image.open(item.label) as img:
            img.load()
            if img.mode not in ("P", "L"):
                raise Unreadable(f"label PNG has mode {img.mode}, expected a palette (P) or grayscale (L) "
                                     "image of class indices")
            return np.asarray(img)
    except (OSError, ValueError, SyntaxError) as exc:
        raise Unreadable(f"unreadable or truncated label ({exc})") from None


def check_image(path: Path) -> tuple[int, int]:
    """(height, width) of a fully decodable image; raises Unreadable otherwise."""
    try:
        with Image.open(path) as img:
            img.load()  # decodes every pixel: truncated files fail here, not later in training
            if img.mode not in ("RGB", "L", "P", "RGBA", "CMYK"):
                raise Unreadable(f"image mode {img.mode} cannot be converted to RGB")
            return img.height, img.width
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise Unreadable(f"unreadable or truncated image ({exc})") from None


def _convert_one(task: tuple) -> tuple[dict | None, np.ndarray | None, list[Problem]]:
    item, reader, labels, root = task
    problems = []
    try:
        height, width = check_image(item.image)
    except Unreadable as exc:
        problems.append(Problem(str(item.image), str(exc)))
        height = width = None
    label_source = item.label_source
    try:
        raw = reader(item)
    except Unreadable as exc:
        return None, None, problems + [Problem(label_source, str(exc))]
    label, bad = labels.apply(raw)
    if bad:
        shown = ", ".join(str(v) for v in bad[:20]) + (" ..." if len(bad) > 20 else "")
        problems.append(Problem(label_source, f"label values outside the dataset's range: {shown}"))
    if height is not None and raw.shape != (height, width):
        problems.append(Problem(label_source, f"label size {raw.shape[1]}x{raw.shape[0]} differs from the image's "
                                              f"{width}x{height} ({item.image.name})"))
    if problems:
        return None, None, problems
    suffix = item.image.suffix.lower()
    image_rel = f"images/{item.split}/{item.id}{suffix}"
    label_rel = f"labels/{item.split}/{item.id}.png"
    shutil.copyfile(item.image, root / image_rel)  # the original bytes: no re-encoding loss
    Image.fromarray(label).save(root / label_rel, compress_level=1)
    present = np.unique(label)
    row = {"split": item.split, "id": item.id, "image": image_rel, "label": label_rel,
           "height": height, "width": width, "classes": [int(c) for c in present if c != IGNORE_INDEX]}
    return row, np.bincount(label.ravel(), minlength=256), []


def convert_items(
    dataset: str,
    items: list[Item],
    reader: LabelReader,
    labels: LabelMap,
    root: Path,
    *,
    problems: list[Problem] | None = None,
    workers: int = 1,
    progress: bool = True,
) -> tuple[list[dict], np.ndarray]:
    """Check and write every item into `root`; rows sorted by (split, id) and the pixel histogram.

    `problems` found while planning (missing pairs) are reported together with the ones found
    here; any problem raises BadFilesError after the whole pass (the caller discards `root`).
    """
    from pipeline.data.prepared import worker_pool  # not needed in the workers

    problems = list(problems or [])
    for split in sorted({item.split for item in items}):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    rows, pixels = [], np.zeros(256, dtype=np.int64)
    tasks: Iterator[tuple] = ((item, reader, labels, root) for item in items)
    with worker_pool(workers) as pool, tqdm(total=len(items), desc=f"converting {dataset}", unit="img",
                                      disable=not progress) as bar:
        for row, counts, found in pool.imap_unordered(_convert_one, tasks, chunksize=16):
            if found:
                problems.extend(found)
            else:
                rows.append(row)
                pixels += counts
            bar.update()
    if problems:
        raise bad_files_error(dataset, problems)
    rows.sort(key=lambda r: (r["split"], r["id"]))
    return rows, pixels


def finish(entry: DatasetEntry, unseen_split: str | None, rows: list[dict], pixels: np.ndarray, root: Path) -> dict:
    """Write manifest.parquet and classes.json; log counts that differ from the standard ones."""
    from pipeline.data.prepared import ClassInfo, summarise, write_manifest  # not needed in the workers

    classes = ClassInfo.from_catalog(entry, unseen_split)
    write_manifest(rows, root / "manifest.parquet")
    (root / "classes.json").write_text(classes.to_json())
    expected = entry.extra.get("expected_images", {})
    for split in sorted({r["split"] for r in rows}):
        count = sum(r["split"] == split for r in rows)
        if split in expected and count != expected[split]:
            log.warning("%s %s: %d images; the standard split has %d", entry.name, split, count, expected[split])
    return summarise(rows, pixels, classes)


def read_id_list(path: Path) -> list[str]:
    """Image ids of a split list (one per line), in file order without duplicates; an id that is not
    a plain file name (`..`, a path separator, a NUL, absolute) is refused with its line number."""
    if not path.is_file():
        raise SourceLayoutError(f"{path}: split list not found; the source folder is incomplete: extract the "
                                "official archive again (or let prepare_data download it)")
    numbered = [(n, line.split()[0]) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    bad = [f"line {n}: {image_id!r} {problem}" for n, image_id in numbered if (problem := id_problem(image_id))]
    if bad:
        raise unsafe_ids_error(path, bad, "A split list holds one image name per line, without folders (such as "
                                          "2007_000032): correct or delete these lines, or extract the official "
                                          "archive again (or let prepare_data download it).")
    return list(dict.fromkeys(image_id for _, image_id in numbered))


def files_by_stem(folder: Path, suffix: str) -> dict[str, Path]:
    """{stem: path} of the files with `suffix` (case-insensitive) directly in `folder`."""
    if not folder.is_dir():
        return {}
    suffix = suffix.lower()
    found = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.lower().endswith(suffix) and entry.is_file():
                found[entry.name[: -len(suffix)]] = folder / entry.name
    return found
