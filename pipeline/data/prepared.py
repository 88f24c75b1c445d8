"""The prepared dataset layout every later stage reads (DESIGN.md, stage prepare_data).

    <root>/images/<split>/<id>.png     RGB images
    <root>/labels/<split>/<id>.png     uint8 class ids, 255 = ignore
    <root>/manifest.parquet            one row per image (MANIFEST_SCHEMA)
    <root>/classes.json                names, seen/unseen ids, palette, templates
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from pipeline.config import IGNORE_INDEX, DatasetConfig
from pipeline.data.catalog import CatalogError, DatasetEntry, get_dataset, palette, template_set
from pipeline.data.ids import id_problem, path_problem, unsafe_ids_error
from pipeline.data.shapes import ShapesWorld, scene_rng
from pipeline.errors import CascadeError

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("split", pa.string(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.string(), nullable=False),  # path relative to the prepared root
        pa.field("label", pa.string(), nullable=False),  # path relative to the prepared root
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("classes", pa.list_(pa.int16()), nullable=False),  # class ids present, ascending
    ]
)


class DatasetNotAvailable(CascadeError):
    """A catalog dataset whose preparation is not part of this build (or whose files are missing)."""


@dataclass(frozen=True)
class ClassInfo:
    dataset: str
    names: list[str]
    seen_ids: list[int]
    unseen_ids: list[int]
    unseen_split: str
    palette: list[list[int]]
    template_set: str
    templates: list[str]
    ignore_index: int = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def read(cls, path: str | Path) -> ClassInfo:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: classes.json not found; run `dvc repro prepare_data` first")
        return cls(**json.loads(path.read_text()))

    @classmethod
    def from_catalog(cls, entry: DatasetEntry, split: str | None) -> ClassInfo:
        split = split or entry.default_split
        return cls(
            dataset=entry.name,
            names=list(entry.classes),
            seen_ids=entry.seen_ids(split),
            unseen_ids=entry.unseen_ids(split),
            unseen_split=split,
            palette=palette(len(entry.classes)),
            template_set=entry.templates,
            templates=list(template_set(entry.templates)),
        )


def read_manifest(root: str | Path, split: str | None = None) -> list[dict]:
    """Manifest rows as dicts (optionally one split), checked against MANIFEST_SCHEMA."""
    path = Path(root) / "manifest.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: manifest not found; run `dvc repro prepare_data` first")
    table = pq.read_table(path)
    if not table.schema.equals(MANIFEST_SCHEMA):
        raise ValueError(f"{path}: manifest schema differs from the expected one:\n{table.schema}\nexpected:\n{MANIFEST_SCHEMA}")
    rows = table.to_pylist()
    checks = {"id": id_problem, "image": path_problem, "label": path_problem}  # ids and paths become file paths
    bad = [f"row {n} {column}: {row[column]!r} {problem}" for n, row in enumerate(rows)
           for column, check in checks.items() if (problem := check(row[column]))]
    if bad:
        raise unsafe_ids_error(path, bad, "The manifest is damaged or was not written by prepare_data: re-run "
                                          "`dvc repro prepare_data`.")
    return [r for r in rows if split is None or r["split"] == split]


def write_manifest(rows: list[dict], path: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    pq.write_table(table, path)


# --------------------------------------------------------------------------------------------
# the demo world
# --------------------------------------------------------------------------------------------
def _draw_and_write(task: tuple) -> dict:
    world, seed, split, index, demo, root = task
    rng = scene_rng(seed, split, index)
    n_objects = int(rng.integers(demo["min_objects"], demo["max_objects"] + 1))
    scene = world.draw(
        rng, size=demo["image_size"], n_objects=n_objects,
        min_size=demo["min_object_size"], max_size=demo["max_object_size"],
    )
    item = f"{split}_{index:06d}"
    image_rel, label_rel = f"images/{split}/{item}.png", f"labels/{split}/{item}.png"
    Image.fromarray(scene.image).save(root / image_rel, compress_level=1)
    Image.fromarray(scene.label).save(root / label_rel, compress_level=1)
    height, width = scene.label.shape
    row = {"split": split, "id": item, "image": image_rel, "label": label_rel,
           "height": height, "width": width, "classes": scene.present}
    return row, np.bincount(scene.label.ravel(), minlength=256)


def _tasks(world, seed, demo, root) -> Iterator[tuple]:
    for split, count in (("train", demo["n_train"]), ("val", demo["n_val"])):
        for index in range(count):
            yield (world, seed, split, index, demo, root)


def prepare_demo(cfg: DatasetConfig, seed: int, root: Path, *, progress: bool = True) -> dict:
    """Draw the demo world into `root` (which must exist and be empty). Returns summary counts."""
    entry = get_dataset("demo")
    classes = ClassInfo.from_catalog(entry, cfg.unseen_split)
    world = ShapesWorld(entry, rotation=cfg.demo.rotation)
    demo = cfg.demo.model_dump()
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    total = demo["n_train"] + demo["n_val"]
    tasks = _tasks(world, seed, demo, root)
    bar = tqdm(total=total, desc="drawing demo world", unit="img", disable=not progress)
    rows, pixels = [], np.zeros(256, dtype=np.int64)
    with worker_pool(cfg.demo.workers) as pool:
        for row, counts in pool.imap(_draw_and_write, tasks, chunksize=32):
            rows.append(row)
            pixels += counts
            bar.update()
    bar.close()
    write_manifest(rows, root / "manifest.parquet")
    (root / "classes.json").write_text(classes.to_json())
    return summarise(rows, pixels, classes)


class _SerialPool:
    """The slice of multiprocessing.Pool used here, in-process (workers == 1)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, items, chunksize=1):
        return map(fn, items)

    imap_unordered = imap


def worker_pool(workers: int):
    """`workers` spawned processes (a multiprocessing.Pool), or this process alone when `workers` <= 1."""
    return get_context("spawn").Pool(workers) if workers > 1 else _SerialPool()


def summarise(rows: list[dict], pixels: np.ndarray, classes: ClassInfo) -> dict:
    """Image counts per split, and pixels and images per class (for logging)."""
    counts = {f"images_{split}": sum(r["split"] == split for r in rows) for split in ("train", "val")}
    images = np.zeros(classes.num_classes, dtype=np.int64)
    for r in rows:
        images[r["classes"]] += 1
    counts["classes"] = classes.num_classes
    counts["unseen_classes"] = len(classes.unseen_ids)
    counts["images_per_class_min"] = int(images.min())
    counts["ignored_pixel_fraction"] = float(pixels[classes.ignore_index] / max(pixels.sum(), 1))
    return {
        "counts": counts,
        "pixels_per_class": {name: int(pixels[i]) for i, name in enumerate(classes.names)},
        "images_per_class": {name: int(images[i]) for i, name in enumerate(classes.names)},
    }


SPLITS = ("train", "val")


def prepare_dataset(
    cfg: DatasetConfig,
    seed: int,
    root: Path,
    *,
    splits: tuple[str, ...] = SPLITS,
    sources: dict[str, Path] | None = None,
    progress: bool = True,
) -> dict:
    """Prepare the catalog dataset `cfg.name` into `root` (an existing, empty folder); return summary counts.

    Real datasets: the source files of `splits` are found in `cfg.source_dir` or the cache, or
    downloaded (pipeline.data.download), unless `sources` (source name -> content folder, from
    locate_sources) is given; then they are converted (pipeline.data.convert). E.g. the evaluate
    stage prepares another dataset's val split with `splits=("val",)`. The demo world always draws
    both splits. On an error, what this call wrote into `root` is removed.
    """
    entry = get_dataset(cfg.name)
    try:
        entry.unseen(cfg.unseen_split)  # fail early on an unknown split name
    except CatalogError as exc:
        raise CatalogError(
            f"dataset.unseen_split: {exc}; set it to one of them in params.yaml (null = {entry.default_split})"
        ) from None
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {splits}")
    if cfg.name == "demo":
        return prepare_demo(cfg, seed, root, progress=progress)
    from pipeline.data.convert import CONVERTERS, converter
    from pipeline.data.download import locate_sources

    if not entry.available or cfg.name not in CONVERTERS:
        raise DatasetNotAvailable(
            f"dataset {cfg.name!r} ({entry.description}) cannot be prepared: it has no converter in this build. "
            "Use a dataset marked available in pipeline/data/catalog.yaml."
        )
    roots = sources if sources is not None else locate_sources(entry, cfg, splits, progress=progress)
    try:
        return converter(cfg.name)(entry, cfg, roots, Path(root), tuple(splits), progress=progress)
    except BaseException:
        _remove_outputs(Path(root))
        raise


def _remove_outputs(root: Path) -> None:
    """Delete the prepared-layout entries a failed conversion may have left in `root`."""
    for name in ("images", "labels"):
        shutil.rmtree(root / name, ignore_errors=True)
    for name in ("manifest.parquet", "classes.json"):
        (root / name).unlink(missing_ok=True)
