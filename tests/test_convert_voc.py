"""PASCAL VOC 2012 + SBD: fake official archives -> the prepared layout, through prepare_dataset and the stage."""

import json
import tarfile

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.config import DatasetConfig, render_params_yaml
from pipeline.data.convert.common import BadFilesError
from pipeline.data.convert.voc import label_map, split_ids
from pipeline.data.download import MissingSourceError
from pipeline.data.prepared import ClassInfo, prepare_dataset, read_manifest
from stages import prepare_data
from stages.common import run_stage
from tests.fake_datasets import make_voc


def voc_lut(raw: np.ndarray) -> np.ndarray:
    """The mapping written out by hand: 0 -> 255, 1..20 -> 0..19, 255 -> 255."""
    out = np.full(raw.shape, 255, dtype=np.uint8)
    inside = (raw >= 1) & (raw <= 20)
    out[inside] = raw[inside] - 1
    return out


def config(tmp_path, source_dir, **extra) -> DatasetConfig:
    return DatasetConfig(name="voc12", source_dir=source_dir, cache_dir=tmp_path / "cache",
                         verify_checksums=False, download=False, workers=1, **extra)


def prepare(tmp_path, cfg, splits=("train", "val"), name="prepared"):
    root = tmp_path / name
    root.mkdir()
    summary = prepare_dataset(cfg, 0, root, splits=splits, progress=False)
    return root, summary


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc_sources"))


def test_label_map_matches_the_standard_voc_mapping():
    raw = np.arange(256)
    mapped, bad = label_map().apply(np.array([0, 1, 20, 255, 15]))
    assert mapped.tolist() == [255, 0, 19, 255, 14] and bad == []
    _, bad = label_map().apply(np.array([0, 21, 42, 254]))
    assert bad == [21, 42, 254]
    assert np.array_equal(label_map().table[[0, 255]], [255, 255])
    assert np.array_equal(label_map().table[1:21], np.arange(20))
    assert (label_map().table[21:255] == -1).all() and raw.size == 256


def test_split_lists_are_the_standard_union_minus_val():
    ids = split_ids(["a", "b"], ["c"], ["b", "c", "d", "e"])
    assert ids == {"train": ["a", "b", "d", "e"], "val": ["c"]}


def test_voc_archives_become_the_prepared_layout(tmp_path, fake):
    root, summary = prepare(tmp_path, config(tmp_path, fake.folder))
    rows = read_manifest(root)
    train = [r["id"] for r in rows if r["split"] == "train"]
    val = [r["id"] for r in rows if r["split"] == "val"]
    assert train == fake.train_ids == ["2007_000032", "2007_000039", "2008_000002", "2008_000003", "2008_000008",
                                       "2009_000001"]
    assert val == sorted(fake.voc_val)
    assert summary["counts"]["images_train"] == 6 and summary["counts"]["images_val"] == 2
    for row in rows:
        label = np.asarray(Image.open(root / row["label"]))
        assert label.dtype == np.uint8 and label.shape == fake.sizes[row["id"]]
        # VOC's own label wherever VOC has one (2007_000039 is in VOC train and in SBD), SBD's otherwise
        raw = fake.voc_labels.get(row["id"], fake.sbd_labels.get(row["id"]))
        assert np.array_equal(label, voc_lut(raw)), row["id"]
        assert row["classes"] == sorted(set(np.unique(label).tolist()) - {255})
        assert (row["height"], row["width"]) == fake.sizes[row["id"]]
        assert row["image"] == f"images/{row['split']}/{row['id']}.jpg"
    with tarfile.open(fake.voc_tar) as tar:  # images are the original JPEG bytes
        original = tar.extractfile("VOCdevkit/VOC2012/JPEGImages/2007_000032.jpg").read()
    assert (root / "images/train/2007_000032.jpg").read_bytes() == original
    # known pixels: background -> ignore, 1 -> 0, 20 -> 19, boundary 255 -> ignore; SBD 16 -> 15
    voc_label = np.asarray(Image.open(root / "labels/val/2007_000033.png"))
    assert voc_label[0, :4].tolist() == [255, 0, 19, 255]
    sbd_label = np.asarray(Image.open(root / "labels/train/2008_000003.png"))
    assert sbd_label[0, :3].tolist() == [255, 0, 15]
    classes = ClassInfo.read(root / "classes.json")
    assert classes.dataset == "voc12" and classes.num_classes == 20 and classes.unseen_ids == [15, 16, 17, 18, 19]


def test_extracted_archive_is_cached_between_runs(tmp_path, fake):
    cfg = config(tmp_path, fake.folder)
    prepare(tmp_path, cfg, name="first")
    stamp = tmp_path / "cache/voc12/extracted/VOCtrainval_11-May-2012/.source.json"
    marker = tmp_path / "cache/voc12/extracted/VOCtrainval_11-May-2012/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
    before = (stamp.stat().st_mtime_ns, marker.stat().st_mtime_ns)
    assert json.loads(stamp.read_text())["file"] == "VOCtrainval_11-May-2012.tar"
    prepare(tmp_path, cfg, name="second")
    assert (stamp.stat().st_mtime_ns, marker.stat().st_mtime_ns) == before


def test_already_extracted_folders_are_used_in_place(tmp_path, fake):
    user = tmp_path / "my_data"
    for archive in (fake.voc_tar, fake.sbd_tgz):
        with tarfile.open(archive) as tar:
            tar.extractall(user, filter="data")
    root, summary = prepare(tmp_path, config(tmp_path, user))
    assert summary["counts"]["images_train"] == 6
    assert not (tmp_path / "cache").exists()  # nothing extracted or downloaded


def test_val_only_preparation_needs_no_sbd(tmp_path, fake):
    only_voc = tmp_path / "only_voc"
    only_voc.mkdir()
    (only_voc / fake.voc_tar.name).symlink_to(fake.voc_tar)
    root, summary = prepare(tmp_path, config(tmp_path, only_voc), splits=("val",))
    assert {r["split"] for r in read_manifest(root)} == {"val"}
    assert summary["counts"]["images_val"] == 2 and not (root / "images/train").exists()
    with pytest.raises(MissingSourceError, match=r"benchmark\.tgz"):
        prepare(tmp_path, config(tmp_path, only_voc), name="with_train")


def test_parallel_conversion_writes_the_same_files(tmp_path, fake):
    serial, _ = prepare(tmp_path, config(tmp_path, fake.folder), name="serial")
    parallel, _ = prepare(tmp_path, config(tmp_path, fake.folder).model_copy(update={"workers": 2}), name="parallel")
    assert read_manifest(serial) == read_manifest(parallel)
    for row in read_manifest(serial):
        assert (serial / row["label"]).read_bytes() == (parallel / row["label"]).read_bytes()


def test_every_bad_file_is_listed_in_one_error_and_nothing_is_written(tmp_path):
    fake = make_voc(tmp_path / "bad_sources", corrupt={
        "2007_000032": "image",  # truncated JPEG
        "2007_000042": "label_value",  # VOC label with value 42
        "2008_000008": "label_value",  # SBD label with value 21
        "2008_000002": "size",  # label 2 rows shorter than the image
        "2007_000033": "no_image",  # listed in val, JPEG missing
    })
    root = tmp_path / "prepared"
    root.mkdir()
    with pytest.raises(BadFilesError) as info:
        prepare_dataset(config(tmp_path, fake.folder), 0, root, progress=False)
    message = str(info.value)
    assert "5 bad source file(s)" in message
    assert "JPEGImages/2007_000032.jpg: unreadable or truncated image" in message
    assert "SegmentationClass/2007_000042.png: label values outside the dataset's range: 42" in message
    assert "cls/2008_000008.mat: label values outside the dataset's range: 21" in message
    assert "SegmentationClass/2008_000002.png: label size" in message and "differs from the image's" in message
    assert "JPEGImages/2007_000033.jpg: missing" in message
    assert list(root.iterdir()) == []


def test_unreadable_sbd_mat_is_reported_by_name(tmp_path, fake):
    user = tmp_path / "user"
    for archive in (fake.voc_tar, fake.sbd_tgz):
        with tarfile.open(archive) as tar:
            tar.extractall(user, filter="data")
    (user / "benchmark_RELEASE/dataset/cls/2009_000001.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    root = tmp_path / "prepared"
    root.mkdir()
    with pytest.raises(BadFilesError, match=r"cls/2009_000001\.mat: unreadable SBD label"):
        prepare_dataset(config(tmp_path, user), 0, root, progress=False)


@pytest.fixture
def project(tmp_path, monkeypatch, mlflow_uri, prefect_harness):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_prepare_data_stage_prepares_voc_from_the_archives(project, mlflow_uri, tmp_path_factory):
    fake = make_voc(tmp_path_factory.mktemp("stage_sources"))
    params = yaml.safe_load(render_params_yaml())
    params["dataset"].update({"name": "voc12", "source_dir": str(fake.folder), "verify_checksums": False,
                              "download": False, "workers": 1})
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage(prepare_data.NAME, prepare_data.main, prepare_data.SECTIONS, []) == 0
    out = project / "data/prepared"
    rows = read_manifest(out)
    assert sorted({r["split"] for r in rows}) == ["train", "val"] and len(rows) == 8
    assert all((out / r["image"]).is_file() and (out / r["label"]).is_file() for r in rows)
    assert ClassInfo.read(out / "classes.json").dataset == "voc12"
    metrics = json.loads((project / "data/prepare_metrics.json").read_text())
    assert metrics["images_train"] == 6 and metrics["images_val"] == 2 and metrics["classes"] == 20
    assert (project / "data/cache/voc12/extracted/benchmark/.source.json").exists()  # relative cache_dir: under the project


def test_prepare_data_stage_without_sources_or_downloads_says_what_is_missing(project, mlflow_uri, capsys):
    params = yaml.safe_load(render_params_yaml())
    params["dataset"].update({"name": "voc12", "download": False})
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage(prepare_data.NAME, prepare_data.main, prepare_data.SECTIONS, []) == 1
    err = capsys.readouterr().err
    assert "VOCtrainval_11-May-2012.tar" in err and "benchmark.tgz" in err and "dataset.source_dir" in err
    assert "Traceback" not in err and not (project / "data/prepared").exists()
