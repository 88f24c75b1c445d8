"""Model files that refer to their frozen CLIP backbone file instead of copying it: the same model
back, a fraction of the bytes, and a clear error (or the DVC cache) when the backbone is elsewhere."""

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline.config import ModelConfig
from pipeline.model import build_model, load, save
from pipeline.model.backbone_ref import BackboneNotFound
from pipeline.model.checkpoint import FORMAT, REF_FORMAT, read_metadata
from pipeline.model.clip import create_clip
from pipeline.weights import backbone_reference, load_backbone, save_backbone

ARCH = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 12, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
BACKBONE = "artifacts/backbone"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder (dvc.yaml) with a backbone folder written by `save_backbone`, as the stage does."""
    torch.manual_seed(0)
    folder = tmp_path / BACKBONE
    folder.mkdir(parents=True)
    save_backbone(folder, ARCH, create_clip(ARCH), source="file")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def trained_model(project: Path):
    """A model built on the project's backbone the way stage train builds it, its trainable tensors moved."""
    backbone = load_backbone(project / BACKBONE)
    torch.manual_seed(1)
    model = build_model(ModelConfig(prompt_tokens=3, decoder_heads=4), backbone.arch, backbone.state)
    model.backbone_ref = backbone_reference(project / BACKBONE, recorded_as=BACKBONE)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    return model


def outputs(model) -> torch.Tensor:
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    embeddings = torch.nn.functional.normalize(torch.randn(4, 32, generator=torch.Generator().manual_seed(3)), dim=-1)
    with torch.no_grad():
        return model.eval()(images, embeddings).logits


def test_a_model_file_keeps_the_reference_not_the_clip_tensors_and_loads_the_same_model(project):
    model = trained_model(project)
    path = save(model, project / "artifacts/train/model.safetensors")
    meta = read_metadata(path)
    assert meta["format"] == REF_FORMAT
    with safe_open(str(path), framework="pt") as f:
        stored = set(f.keys())
    assert stored.isdisjoint(k for k in model.clip_keys if "transformer.resblocks.0.attn.in_proj_weight" in k)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= stored  # prompts, head, decoders: always in the file
    full = save_full_copy(model, project / "full.safetensors")
    assert path.stat().st_size < 0.6 * full.stat().st_size

    loaded = load(path)
    assert loaded.backbone_ref == model.backbone_ref
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(outputs(loaded), outputs(model))
    # saved again, a loaded model writes the same file
    again = save(loaded, project / "again.safetensors")
    assert again.read_bytes() == path.read_bytes()


def save_full_copy(model, path: Path) -> Path:
    ref, model.backbone_ref = model.backbone_ref, None
    try:
        out = save(model, path)
    finally:
        model.backbone_ref = ref
    assert read_metadata(out)["format"] == FORMAT
    return out


def test_a_missing_backbone_is_named_with_the_places_looked_at_and_how_to_get_it(project):
    path = save(trained_model(project), project / "model.safetensors")
    shutil.rmtree(project / BACKBONE)
    with pytest.raises(BackboneNotFound) as err:
        load(path)
    message = str(err.value)
    assert f"{BACKBONE}/clip.safetensors" in message and "(missing)" in message
    assert "dvc pull artifacts/backbone" in message and "dvc repro backbone" in message and "--backbone" in message


def test_another_backbone_at_the_recorded_path_is_refused_not_used(project):
    path = save(trained_model(project), project / "model.safetensors")
    torch.manual_seed(5)  # another CLIP of the same architecture: same keys and shapes, other numbers
    save_backbone(project / BACKBONE, ARCH, create_clip(ARCH), source="file")
    with pytest.raises(BackboneNotFound, match="its sha256 differs"):
        load(path)


def test_the_backbone_is_found_in_the_dvc_cache_or_where_the_user_says(project, tmp_path_factory):
    model = trained_model(project)
    path = save(model, project / "model.safetensors")
    weights = project / BACKBONE / "clip.safetensors"
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "clip.safetensors"
    shutil.copy2(weights, elsewhere)
    md5 = hashlib.md5(weights.read_bytes()).hexdigest()
    cached = project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
    cached.parent.mkdir(parents=True)
    shutil.move(weights, cached)  # checked out nowhere, cached by DVC: `dvc exp run --queue` leaves it so

    assert torch.equal(outputs(load(path)), outputs(model))
    assert torch.equal(outputs(load(path, backbone=project)), outputs(model))  # a project folder: its cache
    cached.unlink()
    assert torch.equal(outputs(load(path, backbone=elsewhere)), outputs(model))
    assert torch.equal(outputs(load(path, backbone=elsewhere.parent)), outputs(model))  # a backbone folder works too
    with pytest.raises(BackboneNotFound, match="missing"):
        load(path)


def test_predict_takes_the_backbone_from_the_command_line(project, tmp_path_factory, capsys):
    from PIL import Image

    from pipeline.cli import main

    path = save(trained_model(project), project / "model.safetensors")
    moved = tmp_path_factory.mktemp("moved")
    shutil.move(project / BACKBONE, moved / "backbone")
    image = project / "photo.png"
    Image.new("RGB", (40, 32), (120, 30, 200)).save(image)
    args = [str(image), "--classes", "cat,dog", "--model", str(path), "--out", str(project / "pred"), "--device", "cpu"]
    assert main(["predict", *args]) != 0
    assert "needs its frozen CLIP backbone" in capsys.readouterr().err
    assert main(["predict", *args, "--backbone", str(moved / "backbone")]) == 0
    assert sorted(p.name for p in (project / "pred").iterdir()) == ["photo_label.png", "photo_overlay.png"]
