import numpy as np
import pytest

from pipeline.config import IGNORE_INDEX, DatasetConfig, DemoConfig
from pipeline.data.catalog import get_dataset, template_set, dataset_names, CatalogError
from pipeline.data.prepared import MANIFEST_SCHEMA, ClassInfo, prepare_demo, read_manifest
from pipeline.data.shapes import ShapesWorld, scene_rng

DEMO = get_dataset("demo")


def draw(seed=0, index=0, **kw):
    world = ShapesWorld(DEMO)
    args = dict(size=96, n_objects=3, min_size=0.22, max_size=0.42) | kw
    return world.draw(scene_rng(seed, "train", index), **args)


def test_same_seed_same_scene_and_different_index_differs():
    a, b, c = draw(), draw(), draw(index=1)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert not np.array_equal(a.image, c.image)


def test_object_pixels_carry_their_class_and_colour():
    world = ShapesWorld(DEMO)
    for class_id in range(len(DEMO.classes)):
        scene = world.draw(scene_rng(1, "val", class_id), size=96, n_objects=1, min_size=0.3, max_size=0.4, class_ids=[class_id])
        assert scene.present == [class_id]
        colour = DEMO.classes[class_id].split()[0]
        mean = scene.image[scene.label == class_id].astype(float).mean(0)
        assert np.abs(mean - np.array(DEMO.extra["colours"][colour])).max() < 25


def test_background_is_ignore_and_only_class_ids_appear():
    scene = draw(n_objects=4)
    values = set(np.unique(scene.label).tolist())
    assert IGNORE_INDEX in values
    assert values - {IGNORE_INDEX} <= set(range(len(DEMO.classes)))
    assert scene.label.dtype == np.uint8


def test_shapes_differ_in_area_as_expected():
    world = ShapesWorld(DEMO)
    areas = {}
    for shape in DEMO.extra["shapes"]:
        class_id = DEMO.classes.index(f"red {shape}")
        scene = world.draw(scene_rng(0, "train", 0), size=128, n_objects=1, min_size=0.4, max_size=0.4, class_ids=[class_id])
        areas[shape] = int((scene.label == class_id).sum())
    # same bounding radius r: circle (radius 0.85 r, 2.27 r^2) > square (2 r^2) > triangle (1.3 r^2) > star
    assert areas["circle"] > areas["square"] > areas["triangle"] > areas["star"] > 0


def square_fill(scene, class_id):
    """Share of the object's bounding box its pixels cover: 1 for an axis-aligned square, 0.5 at 45 degrees."""
    rows, cols = np.nonzero(scene.label == class_id)
    return rows.size / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1))


def test_rotation_zero_draws_upright_objects_and_360_any_orientation():
    red_square, red_triangle = DEMO.classes.index("red square"), DEMO.classes.index("red triangle")
    kw = dict(size=96, n_objects=1, min_size=0.4, max_size=0.4)
    upright, turned = ShapesWorld(DEMO, rotation=0), ShapesWorld(DEMO, rotation=360)
    fills = {name: [square_fill(world.draw(scene_rng(0, "train", i), class_ids=[red_square], **kw), red_square)
                    for i in range(20)] for name, world in (("upright", upright), ("turned", turned))}
    assert min(fills["upright"]) > 0.95  # every square axis-aligned
    assert np.mean(fills["turned"]) < 0.8 and min(fills["turned"]) < 0.6  # some near 45 degrees
    # an upright triangle points up: its top half holds fewer pixels than its bottom half
    for i in range(10):
        mask = upright.draw(scene_rng(1, "train", i), class_ids=[red_triangle], **kw).label == red_triangle
        rows = np.nonzero(mask)[0]
        middle = (rows.min() + rows.max()) / 2
        assert (rows < middle).sum() < (rows > middle).sum() / 2


def test_rotation_outside_0_to_360_is_refused():
    with pytest.raises(ValueError, match="between 0 and 360"):
        ShapesWorld(DEMO, rotation=400)
    with pytest.raises(ValueError, match="rotation"):
        DemoConfig(rotation=-5)


def test_unseen_split_is_a_latin_square_keeping_every_colour_and_shape_seen():
    unseen = DEMO.unseen()
    assert len(unseen) == 4
    colours = [u.split()[0] for u in unseen]
    shapes = [u.split()[1] for u in unseen]
    assert sorted(colours) == sorted(DEMO.extra["colours"]) and sorted(shapes) == sorted(DEMO.extra["shapes"])
    seen = [DEMO.classes[i] for i in DEMO.seen_ids()]
    for colour in DEMO.extra["colours"]:
        assert sum(s.startswith(colour + " ") for s in seen) == 3
    for shape in DEMO.extra["shapes"]:
        assert sum(s.endswith(" " + shape) for s in seen) == 3


def test_caption_names_the_objects():
    world = ShapesWorld(DEMO)
    assert world.caption([0]) == "a photo of a red circle"
    assert world.caption([0, 11, 0]) == "a photo of a red circle and a blue star"


def test_catalog_has_real_datasets_with_paper_splits():
    assert {"demo", "voc12", "coco_stuff164k", "context59"} <= set(dataset_names())
    coco = get_dataset("coco_stuff164k")
    assert len(coco.classes) == 171
    assert coco.unseen_ids() == [19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160]
    context = get_dataset("context59")
    assert len(context.classes) == 59
    assert context.unseen_ids("release") == [0, 2, 3, 7, 9, 13, 17, 19, 31, 37]
    assert len(context.unseen("paper")) == 10
    voc = get_dataset("voc12")
    assert voc.unseen_ids() == [15, 16, 17, 18, 19]
    assert len(template_set("paper15")) == 15 and all(t.count("{}") == 1 for t in template_set("paper15"))
    with pytest.raises(CatalogError, match="valid splits: paper, release"):
        context.unseen("nope")


def small_cfg(workers=1, **demo):
    return DatasetConfig(demo=DemoConfig(n_train=24, n_val=8, image_size=48, workers=workers, **demo))


def test_prepare_demo_writes_layout_manifest_and_classes(tmp_path):
    summary = prepare_demo(small_cfg(), seed=3, root=tmp_path, progress=False)
    rows = read_manifest(tmp_path)
    assert len(rows) == 32 and summary["counts"]["images_train"] == 24
    assert {r["split"] for r in rows} == {"train", "val"}
    import pyarrow.parquet as pq

    assert pq.read_schema(tmp_path / "manifest.parquet").equals(MANIFEST_SCHEMA)
    from PIL import Image

    for row in rows[:5]:
        label = np.array(Image.open(tmp_path / row["label"]))
        image = np.array(Image.open(tmp_path / row["image"]))
        assert label.shape == (row["height"], row["width"]) == image.shape[:2]
        assert sorted(set(np.unique(label).tolist()) - {255}) == row["classes"]
    classes = ClassInfo.read(tmp_path / "classes.json")
    assert classes.names == list(DEMO.classes)
    assert sorted(classes.seen_ids + classes.unseen_ids) == list(range(16))
    assert classes.templates == ["a photo of a {}."]
    assert len(classes.palette) == 16


def test_every_class_occurs_in_a_default_sized_split(tmp_path):
    cfg = DatasetConfig(demo=DemoConfig(n_train=200, n_val=1, image_size=48, workers=1))
    prepare_demo(cfg, seed=0, root=tmp_path, progress=False)
    present = set()
    for row in read_manifest(tmp_path, "train"):
        present.update(row["classes"])
    assert present == set(range(16))


def test_worker_count_does_not_change_the_data(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    prepare_demo(small_cfg(workers=1), seed=5, root=one, progress=False)
    prepare_demo(small_cfg(workers=2), seed=5, root=two, progress=False)
    for row in read_manifest(one):
        assert (one / row["image"]).read_bytes() == (two / row["image"]).read_bytes()
        assert (one / row["label"]).read_bytes() == (two / row["label"]).read_bytes()
    assert read_manifest(one) == read_manifest(two)


def test_manifest_with_wrong_schema_is_rejected(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"split": ["train"]}), tmp_path / "manifest.parquet")
    with pytest.raises(ValueError, match="schema differs"):
        read_manifest(tmp_path)
