"""PASCAL Context 59: fake VOC2010 tar + trainval_merged.json -> the prepared layout."""

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DatasetConfig
from pipeline.data.catalog import get_dataset
from pipeline.data.convert.common import BadFilesError
from pipeline.data.convert.context import decode_segmentation, label_map, rle_counts
from pipeline.data.prepared import ClassInfo, prepare_dataset, read_manifest
from tests.fake_datasets import CONTEXT_CATEGORIES, make_context, rle_encode

# Masks and their compressed RLE as written by the COCO API (pycocotools.mask.encode)
SMALL = np.array([[0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=bool)
SMALL_COUNTS = "2112002O0O"
LARGE_COUNTS = ("o2d0:000000000000AH88HH88HH88HH88HH88HH88HH88HH88HH88HH88HH88HH88HH88HH88HH88HH88HH88HH88HH88HH"
                "887000000000000g1]OlN")


def large_mask() -> np.ndarray:
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:25, 3:37] = True
    mask[10:12, 10:30] = False
    mask[0, 39] = True
    return mask


def test_rle_decoding_matches_the_coco_api():
    assert np.array_equal(decode_segmentation({"size": [4, 5], "counts": SMALL_COUNTS}, 4, 5), SMALL)
    assert np.array_equal(decode_segmentation({"size": [30, 40], "counts": LARGE_COUNTS}, 30, 40), large_mask())
    assert rle_encode(SMALL)["counts"] == SMALL_COUNTS and rle_encode(large_mask())["counts"] == LARGE_COUNTS
    assert sum(rle_counts(LARGE_COUNTS)) == 1200
    uncompressed = {"size": [4, 5], "counts": rle_counts(SMALL_COUNTS)}
    assert np.array_equal(decode_segmentation(uncompressed, 4, 5), SMALL)


def test_polygons_are_filled_at_pixel_centres():
    mask = decode_segmentation([[2, 1, 6, 1, 6, 4, 2, 4]], 6, 8)
    expected = np.zeros((6, 8), dtype=bool)
    expected[1:4, 2:6] = True
    assert np.array_equal(mask, expected)


def test_malformed_masks_are_errors():
    with pytest.raises(ValueError, match="RLE size"):
        decode_segmentation({"size": [5, 5], "counts": SMALL_COUNTS}, 4, 5)
    with pytest.raises(ValueError, match="cover 20 pixels, expected 24"):
        decode_segmentation({"size": [4, 6], "counts": SMALL_COUNTS}, 4, 6)


def test_label_map_puts_the_59_classes_in_catalog_order():
    entry = get_dataset("context59")
    categories = dict(CONTEXT_CATEGORIES)
    labels = label_map(entry, categories)
    mapped, bad = labels.apply(np.array([0, 2, 9, 458, 284, 1, 300]))
    assert mapped.tolist() == [255, 0, 1, 58, entry.classes.index("person"), 255, 255] and bad == []
    _, bad = labels.apply(np.array([457, 10_000]))
    assert bad == [457, 10_000]  # ids the file does not define


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_context(tmp_path_factory.mktemp("context_sources"))


def full_to_59(full: np.ndarray) -> np.ndarray:
    ids = get_dataset("context59").extra["full_label_ids"]
    out = np.full(full.shape, 255, dtype=np.uint8)
    for index, cid in enumerate(ids):
        out[full == cid] = index
    return out


def config(tmp_path, source_dir) -> DatasetConfig:
    return DatasetConfig(name="context59", source_dir=source_dir, cache_dir=tmp_path / "cache",
                         verify_checksums=False, download=False, workers=1)


def prepare(tmp_path, source_dir, splits=("train", "val")):
    root = tmp_path / "prepared"
    root.mkdir()
    return root, prepare_dataset(config(tmp_path, source_dir), 0, root, splits=splits, progress=False)


def test_context_sources_become_the_prepared_layout(tmp_path, fake):
    root, summary = prepare(tmp_path, fake.folder)
    rows = read_manifest(root)
    assert [r["id"] for r in rows if r["split"] == "train"] == ["2008_000002", "2008_000007"]
    assert [r["id"] for r in rows if r["split"] == "val"] == ["2008_000003", "2010_000001"]  # test phase left out
    assert summary["counts"]["classes"] == 59
    for row in rows:
        label = np.asarray(Image.open(root / row["label"]))
        expected = full_to_59(fake.expected_full[row["id"]])
        assert np.array_equal(label, expected), row["id"]
        assert (label == 255).any()  # unlabeled background and the non-59 categories are ignored
    classes = ClassInfo.read(root / "classes.json")
    assert classes.unseen_split == "paper" and len(classes.unseen_ids) == 10


def test_polygon_annotations_are_accepted(tmp_path):
    fake = make_context(tmp_path / "poly", polygon=True)
    root, _ = prepare(tmp_path, fake.folder, splits=("train",))
    for row in read_manifest(root):
        label = np.asarray(Image.open(root / row["label"]))
        assert np.array_equal(label, full_to_59(fake.expected_full[row["id"]])), row["id"]


def test_undefined_categories_and_bad_masks_are_reported(tmp_path):
    fake = make_context(tmp_path / "bad", undefined_category=True)
    data = json.loads((fake.folder / "trainval_merged.json").read_text())
    first_val = next(a for a in data["annos_segmentation"] if a["image_id"] == 2008000003)
    first_val["segmentation"]["size"] = [1, 1]
    (fake.folder / "trainval_merged.json").write_text(json.dumps(data))
    root = tmp_path / "prepared"
    root.mkdir()
    with pytest.raises(BadFilesError) as info:
        prepare_dataset(config(tmp_path, fake.folder), 0, root, progress=False)
    message = str(info.value)
    assert "2 bad source file(s)" in message
    assert "trainval_merged.json (image 2008_000007): label values outside the dataset's range: 457" in message
    assert "trainval_merged.json (image 2008_000003): malformed mask" in message and "RLE size [1, 1]" in message
    assert list(root.iterdir()) == []
