"""Bad inputs a user can hand the pipeline (issue 9): each one stops with a single error whose message
names the offending file or key and says the fix, and nothing already written is lost or
half-overwritten. Real files in tmp_path, real code paths; the full disk is a patched writer in a
subprocess."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.config import DatasetConfig, DemoConfig, ParamsError, TrainConfig, load_params
from pipeline.data import catalog
from pipeline.data.catalog import CatalogError, get_dataset
from pipeline.data.dataset import DataFileError, SegmentationDataset
from pipeline.data.prepared import ClassInfo, prepare_dataset, read_manifest
from pipeline.data.transforms import label_lut
from pipeline.engine.setup import EmbeddingMismatch, load_text_embeddings, normalizer, train_transform
from pipeline.errors import CascadeError
from pipeline.io import TMP_MARK, atomic_dir, write_json
from pipeline.model import StateDictError, load, load_trainable, save, save_trainable
from pipeline.predict import parse_classes
from stages.common import run_stage
from tests.project import REPO
from tests.tiny import tiny_model

DEMO = DemoConfig(n_train=4, n_val=1, image_size=32, workers=1)
PREPARE_FIX = "dvc repro prepare_data"
DEV_FULL = Path("/dev/full")  # every write to it fails with ENOSPC


def write_params(folder, data: dict):
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def prepared(tmp_path):
    """A complete prepared demo dataset at tmp_path/data/prepared, written as the prepare_data stage does."""
    root = tmp_path / "data" / "prepared"
    with atomic_dir(root) as tmp:
        prepare_dataset(DatasetConfig(demo=DEMO), 0, tmp, progress=False)
    return root


def dataset(root) -> SegmentationDataset:
    classes = ClassInfo.read(root / "classes.json")
    transform = train_transform(TrainConfig(crop_size=32, scale=(64, 32)), normalizer("backbone"))
    return SegmentationDataset(root, "train", transform=transform, lut=label_lut(classes.seen_ids, classes.num_classes))


def load_error(root, index: int = 0) -> str:
    with pytest.raises(DataFileError) as info:
        dataset(root).load(index, np.random.default_rng(0))
    return str(info.value)


# --------------------------------------------------------------------------------------------
# params
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"train": {"iteratons": 5}}, ["train.iteratons: unknown key", "valid keys here: iterations, batch_size"]),
        ({"train": {"batch_size": "eight"}}, ["train.batch_size", "valid integer", "'eight'"]),
    ],
    ids=["mistyped-key", "wrong-type"],
)
def test_bad_params_key_or_type_names_file_key_and_valid_choice(tmp_path, section, expected):
    path = write_params(tmp_path, section)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert f"{path} is invalid (1 problem)" in message
    for part in expected:
        assert part in message


def test_stage_split_past_the_encoder_depth_names_key_and_valid_range(tmp_path):
    path = write_params(tmp_path, {"model": {"stages": [[6, 8], [9, 13]]}})
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert "  - model.stages: stage [9, 13] goes past the encoder depth (12 blocks); valid blocks are 1..12" in str(info.value)


# --------------------------------------------------------------------------------------------
# classes and splits
# --------------------------------------------------------------------------------------------
def test_unknown_unseen_split_names_key_split_and_valid_splits(tmp_path):
    root = tmp_path / "prepared"
    root.mkdir()
    with pytest.raises(CatalogError) as info:
        prepare_dataset(DatasetConfig(unseen_split="latn", demo=DEMO), 0, root, progress=False)
    message = str(info.value)
    assert "dataset.unseen_split: dataset 'demo' has no unseen split 'latn'; valid splits: latin" in message
    assert "set it to one of them in params.yaml" in message
    assert list(root.iterdir()) == []


@pytest.fixture
def edited_catalog(tmp_path, monkeypatch):
    """The catalog with one unseen split naming a class the demo does not have."""
    raw = yaml.safe_load(catalog.CATALOG_PATH.read_text())
    raw["datasets"]["demo"]["unseen_splits"]["latin"].append("purple circle")
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(catalog, "CATALOG_PATH", path)
    catalog._raw.cache_clear()
    yield path
    catalog._raw.cache_clear()


def test_unseen_split_naming_an_unknown_class_names_the_class_and_the_class_list(edited_catalog):
    with pytest.raises(CatalogError) as info:
        get_dataset("demo")
    message = str(info.value)
    assert message.startswith(f"{edited_catalog}: demo.unseen_splits.latin names classes not in demo.classes: ['purple circle']")
    assert "use names from demo.classes: red circle, red square" in message


# --------------------------------------------------------------------------------------------
# prepared dataset files
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["PNG", "JPEG"])
def test_truncated_image_names_the_file_and_the_fix(prepared, kind):
    path = prepared / read_manifest(prepared, "train")[0]["image"]
    Image.open(path).convert("RGB").save(path, format=kind)  # same name, the content decides the format
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = load_error(prepared)
    assert f"{path}: unreadable or truncated image" in message
    assert PREPARE_FIX in message and "replace the file" in message


def edit_label(path, edit) -> None:
    label = np.array(Image.open(path))
    Image.fromarray(edit(label)).save(path)


def with_value(value: int):
    def edit(label):
        label[0, 0] = value
        return label

    return edit


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (with_value(42), "label values [42] are not class ids of this dataset (0..15, 255 = ignore)"),
        (with_value(16), "label values [16] are not class ids of this dataset (0..15, 255 = ignore)"),
        (lambda label: label[1:], "label size (31, 32) differs from the size (32, 32) of its image"),
        (lambda label: np.stack([label] * 3, axis=-1), "label must be a single-channel uint8 PNG, got shape (32, 32, 3)"),
    ],
    ids=["value-42", "value-num-classes", "one-row-short", "rgb"],
)
def test_bad_label_names_the_file_the_problem_and_the_fix(prepared, edit, expected):
    rows = read_manifest(prepared, "train")
    path = prepared / rows[0]["label"]
    edit_label(path, edit)
    message = load_error(prepared)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert PREPARE_FIX in message
    dataset(prepared).load(1, np.random.default_rng(0))  # the untouched files still load (255 = ignore is fine)


@pytest.mark.parametrize("column", ["image", "label"])
def test_file_missing_from_the_manifest_is_called_missing(prepared, column):
    path = prepared / read_manifest(prepared, "train")[0][column]
    path.unlink()
    message = load_error(prepared)
    assert f"{path}: {column} file is missing" in message
    assert "unreadable" not in message
    assert PREPARE_FIX in message


@pytest.mark.parametrize("stage", ["evaluate", "pseudo_label"])
def test_label_value_out_of_range_at_evaluation_or_pseudo_labelling_names_the_file_value_and_fix(tmp_path, stage):
    from pipeline.config import EvaluateConfig
    from pipeline.engine.evaluate import evaluate
    from pipeline.engine.pseudo import generate
    from tests.tiny import class_embeddings
    from tests.train_fixtures import make_data

    root = tmp_path / "data"
    classes = make_data(root, n_train=2)
    path = root / read_manifest(root, "val" if stage == "evaluate" else "train")[0]["label"]
    edit_label(path, with_value(42))
    model, embeddings = tiny_model(), class_embeddings(num_classes=classes.num_classes)
    run = dict(cfg=EvaluateConfig(short_side=32, max_long_side=64, crop_size=32, stride=24, batch_size=2),
               normalize=normalizer("backbone"), progress=False)
    with pytest.raises(DataFileError) as info:
        if stage == "evaluate":
            evaluate(model, embeddings, root, classes, **run)
        else:
            generate(model, embeddings, root, classes, tmp_path / "pseudo", threshold=0.0, **run)
    message = str(info.value)
    assert message.startswith(f"{path}: label values [42] are not class ids of this dataset (0..15, 255 = ignore)")
    assert PREPARE_FIX in message


# --------------------------------------------------------------------------------------------
# image ids from list files
# --------------------------------------------------------------------------------------------
BAD_IDS = [("..", "is '..'"), ("JPEGImages/2007_000032", "contains a path separator"),
           ("sub\\x", "contains a path separator"), ("a\0b", "contains a NUL character"),
           ("/etc/passwd", "is an absolute path")]


@pytest.mark.parametrize(("bad", "reason"), BAD_IDS, ids=["dotdot", "slash", "backslash", "nul", "absolute"])
def test_split_list_id_that_is_not_a_file_name_names_the_list_the_line_and_the_fix(tmp_path, bad, reason):
    from pipeline.data.convert.voc import plan

    voc = tmp_path / "VOC2012"
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text(f"2007_000032\n\n{bad}\n")
    (lists / "val.txt").write_text("2007_000033\n")
    with pytest.raises(CascadeError) as info:
        plan({"voc2012": voc}, ("val",))
    message = str(info.value)
    assert message.startswith(f"{lists / 'train.txt'}: 1 image id(s) that cannot be file names")
    assert f"  - line 3: {bad!r} {reason}" in message
    assert "correct or delete these lines" in message


def test_annotation_file_name_that_leaves_the_image_folder_is_refused(tmp_path):
    from pipeline.data.convert.context import plan

    voc = tmp_path / "VOC2010"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "secret.jpg").write_bytes(b"not an image of the dataset")
    data = {"images": [{"image_id": 1, "file_name": "../secret.jpg", "height": 2, "width": 2, "phase": "train"}],
            "annos_segmentation": []}
    with pytest.raises(CascadeError) as info:
        plan(data, voc, ("train",), "/src/trainval_merged.json")
    message = str(info.value)
    assert message.startswith("/src/trainval_merged.json: 1 image id(s) that cannot be file names")
    assert "  - images[0].file_name: '../secret.jpg' contains a path separator" in message
    assert "download it again" in message


@pytest.mark.parametrize(("column", "value"), [("id", "../x"), ("label", "labels/train/../../../escape.png"),
                                               ("image", "/etc/passwd")])
def test_manifest_row_with_a_path_leaving_the_dataset_names_the_row_and_the_fix(prepared, column, value):
    from pipeline.data.prepared import write_manifest

    rows = read_manifest(prepared)
    rows[1][column] = value
    write_manifest(rows, prepared / "manifest.parquet")
    with pytest.raises(CascadeError) as info:
        read_manifest(prepared, "train")
    message = str(info.value)
    assert message.startswith(f"{prepared / 'manifest.parquet'}: 1 image id(s) that cannot be file names")
    assert f"  - row 1 {column}: {value!r}" in message
    assert PREPARE_FIX in message


# --------------------------------------------------------------------------------------------
# checkpoints and text embeddings
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("saved", "expected"),
    [
        ({"prompt_tokens": 4}, ["encoder.prompts.embeddings: checkpoint [12, 4, 32] vs model [12, 3, 32]",
                                "model.prompt_tokens: file 4 vs model 3"]),
        ({"variant": "zegclip", "stages": [(12, 12)]}, ["missing (", "head.text_projs.1.weight",
                                                        "model.variant: file 'zegclip' vs model 'cascade'"]),
    ],
    ids=["shape", "keys"],
)
def test_checkpoint_of_another_config_lists_mismatches_and_the_fix(tmp_path, saved, expected):
    path = save_trainable(tiny_model(**saved), tmp_path / "trainable.safetensors")
    with pytest.raises(StateDictError) as info:
        load_trainable(tiny_model(), path)
    message = str(info.value)
    assert message.startswith(f"{path}: state dict does not match the model")
    for part in expected:
        assert part in message
    assert "load it into a model built like the one that saved it, or train again with the current params" in message


def test_model_file_whose_tensors_do_not_fit_its_config_says_to_write_it_again(tmp_path):
    from safetensors.torch import load_file, save_file

    from pipeline.model.checkpoint import read_metadata

    path = save(tiny_model(), tmp_path / "model.safetensors")
    state = load_file(str(path))
    state["head.text_projs.0.weight"] = torch.zeros(2, 2)
    save_file(state, str(path), metadata=read_metadata(path))
    with pytest.raises(StateDictError) as info:
        load(path)
    message = str(info.value)
    assert f"{path}: state dict does not match the model" in message
    assert "head.text_projs.0.weight: checkpoint [2, 2] vs model [32, 64]" in message
    assert "write the file again with this version" in message


@pytest.mark.parametrize(("shape", "expected"), [((20, 8), "holds 20 class embeddings but dataset 'demo' has 16 classes"),
                                                  ((8,), "expected a [classes, dim] matrix, got shape (8,)")])
def test_text_embeddings_of_another_class_list_name_file_counts_and_fix(tmp_path, shape, expected):
    path = tmp_path / "embeddings.npy"
    np.save(path, np.zeros(shape, np.float32))
    with pytest.raises(EmbeddingMismatch) as info:
        load_text_embeddings(path, ClassInfo.from_catalog(get_dataset("demo"), None))
    message = str(info.value)
    assert message.startswith(f"{path}: {expected}")
    assert "re-run `dvc repro embed_text`" in message


# --------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("classes", ["", " , ", []])
def test_empty_class_list_says_to_pass_class_names(classes):
    with pytest.raises(CascadeError, match="the class list is empty; pass class names"):
        parse_classes(classes)


def test_cli_predict_with_no_classes_says_to_pass_class_names(tmp_path, capsys):
    from pipeline.cli import main

    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    assert main(["predict", str(image), "--classes", " , "]) == 2
    assert 'the class list is empty; pass class names, such as --classes "cat,dog,grass"' in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# disk full
# --------------------------------------------------------------------------------------------
FULL_DISK = '''
import builtins, errno, io, os, sys
from pathlib import Path

from pipeline.config import DatasetConfig, DemoConfig
from pipeline.data.prepared import prepare_dataset
from pipeline.io import atomic_dir, write_json

budget, kind, target = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
real_open = io.open


class FullDisk:
    """A file opened for writing on a disk with `budget` bytes left: the write crossing it is cut short and fails."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        global budget
        if len(data) > budget:
            self.handle.write(data[:budget])
            budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        budget -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def full_open(file, mode="r", *args, **kwargs):
    handle = real_open(file, mode, *args, **kwargs)
    return FullDisk(handle) if set(mode) & set("wax+") else handle


io.open = builtins.open = full_open  # os.fdopen, pathlib and PIL all open files through these
try:
    if kind == "file":
        write_json(target, {"images_train": 99, "images_val": 99, "note": "x" * 500})
    else:
        with atomic_dir(target) as tmp:
            prepare_dataset(DatasetConfig(demo=DemoConfig(n_train=4, n_val=1, image_size=32, workers=1)), 1, tmp, progress=False)
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}")
    sys.exit(1)
'''


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


@pytest.mark.parametrize(("kind", "budget"), [("file", 40), ("dir", 3_000)])
def test_disk_full_keeps_the_previous_output_and_says_to_free_space(tmp_path, prepared, kind, budget):
    target = prepared if kind == "dir" else tmp_path / "data" / "prepare_metrics.json"
    write_json(tmp_path / "data" / "prepare_metrics.json", {"images_train": 4, "images_val": 1})
    before = snapshot(tmp_path)
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(budget), kind, str(target)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1, done.stderr[-3000:]
    message = done.stdout.strip()
    assert message.startswith(f"DiskFullError: {target}: disk full (no space left on device)"), message
    assert "its previous version, if any, is unchanged" in message
    assert f"Free space on the disk holding {target.parent} and re-run." in message
    assert snapshot(tmp_path) == before  # byte-identical, nothing added
    assert not [p for p in tmp_path.rglob("*") if TMP_MARK in p.name]


@pytest.mark.skipif(not DEV_FULL.exists(), reason="no /dev/full on this system")
def test_stage_running_out_of_disk_space_prints_one_clear_error(tmp_path, monkeypatch, capsys):
    """An out-of-space error outside the atomic writers (a real one: /dev/full is always full)."""

    def main(ctx):
        with open(DEV_FULL, "wb", buffering=0) as handle:
            handle.write(b"x")

    monkeypatch.setenv("RANK", "1")  # a non-zero rank runs main() without Prefect and MLflow
    assert run_stage("demo", main, (), ["--params", str(write_params(tmp_path, {}))]) == 1
    err = capsys.readouterr().err
    assert "error [demo]: disk full (no space left on device) while writing an output; free space and re-run the stage" in err


def test_stage_run_by_a_python_without_the_project_packages_says_how_to_fix_it():
    # what `dvc repro` does when the shell's python is not .venv's: name the problem and the fix
    code = "import sys; sys.modules['open_clip'] = None; import stages"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "has no open_clip: this Python is not the project's environment" in result.stderr
    assert "source .venv/bin/activate" in result.stderr
