import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.data.transforms import Normalize
from pipeline.errors import CascadeError
from pipeline.model import model_extra, save
from pipeline.predict import Segmenter, parse_classes, plan_outputs
from tests.tiny import tiny_model

CARD = {"templates": ["a photo of a {}."], "mean": [120.0, 110.0, 100.0], "std": [60.0, 60.0, 60.0]}


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save(tiny_model(prompt_dropout=0.0, decoder_dropout=0.0), path, extra=CARD)
    return path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 56), (64, 64)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_model_card_travels_with_the_file(model_file):
    assert model_extra(model_file) == CARD
    segmenter = Segmenter.from_file(model_file)
    assert segmenter.normalize == Normalize((120.0, 110.0, 100.0), (60.0, 60.0, 60.0))
    assert segmenter.templates == ["a photo of a {}."]


def test_cli_writes_label_maps_and_overlays_with_the_given_classes(model_file, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(images), "--classes", "red circle, blue star,green square", "--model", str(model_file),
                 "--out", str(out), "--scores", "--mode", "slide", "--crop", "32", "--stride", "24", "--short-side", "32"]) == 0
    for stem, size in (("im0", (40, 56)), ("im1", (64, 64))):
        label = np.array(Image.open(out / f"{stem}_label.png"))
        assert label.shape == size and label.max() < 3
        assert (out / f"{stem}_overlay.png").stat().st_size > 0
        assert np.load(out / f"{stem}_scores.npy").shape == (3, *size)
    assert "wrote 2 label maps" in capsys.readouterr().out


def test_python_api_gives_the_same_result_as_the_cli(model_file, images, tmp_path):
    from pipeline.config import EvaluateConfig

    out = tmp_path / "out"
    main(["predict", str(images / "im0.png"), "--classes", "a,b", "--model", str(model_file), "--out", str(out),
          "--mode", "whole", "--short-side", "32"])
    inference = EvaluateConfig(mode="whole", short_side=32)
    result = Segmenter.from_file(model_file, inference=inference)(images / "im0.png", ["a", "b"])
    assert np.array_equal(result.label.astype(np.uint8), np.array(Image.open(out / "im0_label.png")))
    array = np.array(Image.open(images / "im0.png"))
    assert np.array_equal(Segmenter.from_file(model_file, inference=inference)(array, "a,b").label, result.label)


def test_threshold_leaves_low_scores_unlabelled(model_file, images):
    segmenter = Segmenter.from_file(model_file)
    result = segmenter(images / "im0.png", ["a", "b"], threshold=1.0)
    assert np.all(result.label == 255)


def test_clear_errors(model_file, tmp_path):
    with pytest.raises(CascadeError, match="class list is empty"):
        parse_classes(" , ")
    with pytest.raises(CascadeError, match="given twice"):
        parse_classes("cat,cat")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(CascadeError, match="bad.png: unreadable"):
        Segmenter.from_file(model_file)(bad, ["cat"])
    with pytest.raises(CascadeError, match="no such file"):
        plan_outputs([tmp_path / "missing.png"], tmp_path / "out", scores=False, overwrite=False)
    with pytest.raises(CascadeError, match="model file not found"):
        Segmenter.from_file(tmp_path / "none.safetensors")


def test_model_file_that_does_not_match_its_config_is_rejected(tmp_path):
    from safetensors.torch import load_file, save_file

    from pipeline.model.checkpoint import read_metadata

    path = tmp_path / "m.safetensors"
    save(tiny_model(), path)
    state = load_file(str(path))
    state.pop(next(iter(state)))
    save_file(state, str(tmp_path / "broken.safetensors"), metadata=read_metadata(path))
    with pytest.raises(Exception, match=r"(?s)broken.safetensors: state dict does not match.*missing \(1\)"):
        Segmenter.from_file(tmp_path / "broken.safetensors")


def _image(path, size=(32, 40), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _predict(model_file, out, *inputs, extra=()):
    return main(["predict", *map(str, inputs), "--classes", "a,b", "--model", str(model_file), "--out", str(out),
                 "--mode", "whole", "--short-side", "32", *extra])


def test_cli_keeps_the_input_folders_structure_under_out(model_file, tmp_path):
    _image(tmp_path / "shots" / "day" / "img.png", seed=1)
    _image(tmp_path / "shots" / "night" / "img.png", seed=2)
    _image(tmp_path / "shots" / "top.jpg", seed=3)
    out = tmp_path / "out"
    assert _predict(model_file, out, tmp_path / "shots") == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == ["day/img_label.png", "day/img_overlay.png", "night/img_label.png", "night/img_overlay.png",
                       "top_label.png", "top_overlay.png"]


def test_cli_refuses_inputs_that_would_write_the_same_outputs(model_file, tmp_path, capsys):
    a, b = _image(tmp_path / "a" / "img.png"), _image(tmp_path / "b" / "img.png")
    out = tmp_path / "out"
    assert _predict(model_file, out, a, b) == 2
    err = capsys.readouterr().err
    assert str(a) in err and str(b) in err and str(out / "img_label.png") in err
    _image(tmp_path / "a" / "img.jpg")  # same stem in one folder
    assert _predict(model_file, out, tmp_path / "a") == 2
    assert "img.jpg" in capsys.readouterr().err
    assert not out.exists()


def test_cli_refuses_to_overwrite_outputs_without_overwrite(model_file, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert _predict(model_file, out, images) == 0
    (out / "im1_overlay.png").write_bytes(b"mine")  # a file a user edited since
    before = {p: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert _predict(model_file, out, images) == 2
    err = capsys.readouterr().err
    assert str(out / "im0_label.png") in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in out.iterdir()} == before  # nothing was written
    assert _predict(model_file, out, images, extra=["--overwrite"]) == 0
    assert (out / "im1_overlay.png").read_bytes() != b"mine"
