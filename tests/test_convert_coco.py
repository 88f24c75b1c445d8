"""COCO-Stuff 164k: fake official zips -> the prepared layout, with the 182 -> 171 id compaction."""

import zipfile

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DatasetConfig
from pipeline.data.catalog import get_dataset
from pipeline.data.convert.coco_stuff import label_map, raw_to_compact
from pipeline.data.convert.common import BadFilesError
from pipeline.data.prepared import ClassInfo, prepare_dataset, read_manifest
from tests.fake_datasets import make_coco

UNUSED = [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]

# The 182 names of COCO-Stuff's labels.txt (0-based stuffthingmaps values), unused thing ids included
COCO_STUFF_182 = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant street_sign stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe hat backpack umbrella shoe "
    "eye_glasses handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
    "surfboard tennis_racket bottle plate wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli "
    "carrot hot_dog pizza donut cake chair couch potted_plant bed mirror dining_table window desk toilet door tv "
    "laptop mouse remote keyboard cell_phone microwave oven toaster sink refrigerator blender book clock vase "
    "scissors teddy_bear hair_drier toothbrush hair_brush banner blanket branch bridge building-other bush cabinet "
    "cage cardboard carpet ceiling-other ceiling-tile cloth clothes clouds counter cupboard curtain desk-stuff dirt "
    "door-stuff fence floor-marble floor-other floor-stone floor-tile floor-wood flower fog food-other fruit "
    "furniture-other grass gravel ground-other hill house leaves light mat metal mirror-stuff moss mountain mud "
    "napkin net paper pavement pillow plant-other plastic platform playingfield railing railroad river road rock "
    "roof rug salad sand sea shelf sky-other skyscraper snow solid-other stairs stone straw structural-other table "
    "tent textile-other towel tree vegetable wall-brick wall-concrete wall-other wall-panel wall-stone wall-tile "
    "wall-wood water-other waterdrops window-blind window-other wood"
).split()


def config(tmp_path, source_dir) -> DatasetConfig:
    return DatasetConfig(name="coco_stuff164k", source_dir=source_dir, cache_dir=tmp_path / "cache",
                         verify_checksums=False, download=False, workers=1)


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("coco_sources"))


def test_the_unused_ids_are_the_11_never_annotated_thing_ids():
    assert len(COCO_STUFF_182) == 182
    assert [COCO_STUFF_182[i] for i in UNUSED] == ["street_sign", "hat", "shoe", "eye_glasses", "plate", "mirror",
                                                   "window", "desk", "door", "blender", "hair_brush"]
    entry = get_dataset("coco_stuff164k")
    assert entry.extra["unused_label_values"] == UNUSED
    kept = [name.replace("_", " ") for i, name in enumerate(COCO_STUFF_182) if i not in UNUSED]
    assert kept == list(entry.classes)  # the catalog's 171-name order is the raw order minus the gaps


def test_raw_ids_compact_to_171_around_the_gaps():
    compact = raw_to_compact(get_dataset("coco_stuff164k"))
    assert len(compact) == 171 and sorted(compact.values()) == list(range(171))
    assert compact[0] == 0 and compact[10] == 10 and compact[12] == 11  # 11 (street sign) is a gap
    assert compact[24] == 23 and compact[26] == 24  # 25 (hat) is a gap
    assert compact[91] == 80 and compact[181] == 170  # stuff starts at banner
    mapped, bad = label_map(get_dataset("coco_stuff164k")).apply(np.array([0, 12, 91, 181, 255]))
    assert mapped.tolist() == [0, 11, 80, 170, 255] and bad == []
    _, bad = label_map(get_dataset("coco_stuff164k")).apply(np.array([11, 90, 182, 254, 3]))
    assert bad == [11, 90, 182, 254]


def test_coco_zips_become_the_prepared_layout(tmp_path, fake):
    root = tmp_path / "prepared"
    root.mkdir()
    summary = prepare_dataset(config(tmp_path, fake.folder), 0, root, progress=False)
    rows = read_manifest(root)
    assert [r["id"] for r in rows if r["split"] == "train"] == fake.ids["train"]
    assert [r["id"] for r in rows if r["split"] == "val"] == fake.ids["val"]
    assert summary["counts"]["images_train"] == 3 and summary["counts"]["classes"] == 171
    compact = raw_to_compact(get_dataset("coco_stuff164k"))
    lut = np.full(256, 255, dtype=np.uint8)
    for raw, index in compact.items():
        lut[raw] = index
    for row in rows:
        label = np.asarray(Image.open(root / row["label"]))
        assert np.array_equal(label, lut[fake.labels[row["id"]]]), row["id"]
        assert label[0, :6].tolist() == [0, 10, 11, 80, 170, 255]  # known pixels across the gaps
        assert row["image"] == f"images/{row['split']}/{row['id']}.jpg"
    with zipfile.ZipFile(fake.folder / "val2017.zip") as images:
        assert (root / "images/val/000000000139.jpg").read_bytes() == images.read("val2017/000000000139.jpg")
    assert ClassInfo.read(root / "classes.json").num_classes == 171


def test_mmseg_style_extracted_folders_are_found(tmp_path, fake):
    user = tmp_path / "coco_stuff164k"
    for name, sub in (("train2017.zip", "images"), ("val2017.zip", "images"),
                      ("stuffthingmaps_trainval2017.zip", "annotations")):
        with zipfile.ZipFile(fake.folder / name) as archive:
            archive.extractall(user / sub)
    root = tmp_path / "prepared"
    root.mkdir()
    summary = prepare_dataset(config(tmp_path, user), 0, root, splits=("val",), progress=False)
    assert summary["counts"]["images_val"] == 2 and not (tmp_path / "cache").exists()


def test_unused_ids_and_unpaired_files_are_all_reported(tmp_path):
    fake = make_coco(tmp_path / "bad", bad_values={"000000000009": 11, "000000000285": 200},
                     unpaired_label="000000000077")
    root = tmp_path / "prepared"
    root.mkdir()
    with pytest.raises(BadFilesError) as info:
        prepare_dataset(config(tmp_path, fake.folder), 0, root, progress=False)
    message = str(info.value)
    assert "3 bad source file(s)" in message
    assert "train2017/000000000009.png: label values outside the dataset's range: 11" in message
    assert "val2017/000000000285.png: label values outside the dataset's range: 200" in message
    assert "train2017/000000000077.png: no image 000000000077.jpg" in message
    assert list(root.iterdir()) == []
