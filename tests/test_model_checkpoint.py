import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.model import StateDictError, load, load_trainable, save, save_trainable
from tests.tiny import class_embeddings, images, tiny_model


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = tiny_model(seed=5, aggregator="concat", release_double_cls=True, image_size=40).eval()
    with torch.no_grad():
        model.encoder.prompts.embeddings.normal_()  # not the init values
    path = save(model, tmp_path / "model.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["model_config"])["aggregator"] == "concat"
    assert json.loads(meta["arch"]) == model.arch
    restored = load(path).eval()
    assert restored.model_cfg == model.model_cfg
    x, t = images(2, 40), class_embeddings(4)
    with torch.no_grad():
        assert torch.equal(model(x, t).logits, restored(x, t).logits)


def test_load_rejects_wrong_keys_and_shapes_naming_the_file(tmp_path):
    path = save(tiny_model(), tmp_path / "model.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    state["head.text_projs.0.weight"] = torch.zeros(2, 2)
    state["head.bogus"] = torch.zeros(1)
    del state["encoder.prompts.norm.bias"]
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata=meta)
    with pytest.raises(StateDictError) as info:
        load(bad)
    message = str(info.value)
    assert str(bad) in message
    assert "head.text_projs.0.weight: checkpoint [2, 2] vs model [32, 64]" in message
    assert "head.bogus" in message and "encoder.prompts.norm.bias" in message


def test_load_rejects_files_of_another_format(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a Cascade-CLIP model file"):
        load(tmp_path / "other.safetensors")


def test_trainable_round_trip_holds_only_trainable_tensors(tmp_path):
    model = tiny_model(seed=1)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(1.0)
    path = save_trainable(model, tmp_path / "trainable.safetensors")
    keys = set(load_file(str(path)))
    assert keys == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(k.startswith("text_encoder.") or k.startswith("encoder.transformer.") for k in keys)
    other = tiny_model(seed=2)
    load_trainable(other, path)
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), name


def test_load_trainable_rejects_a_different_model(tmp_path):
    path = save_trainable(tiny_model(prompt_tokens=3), tmp_path / "t.safetensors")
    with pytest.raises(StateDictError, match="encoder.prompts.embeddings"):
        load_trainable(tiny_model(prompt_tokens=4), path)


def _with_arch(tmp_path, edit) -> "Path":
    """A copy of a saved tiny model file whose metadata arch was changed by `edit` (tensors unchanged)."""
    from pipeline.model.checkpoint import read_metadata

    path = save(tiny_model(), tmp_path / "model.safetensors")
    meta = read_metadata(path)
    arch = json.loads(meta["arch"])
    edit(arch)
    meta["arch"] = json.dumps(arch)
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(path)), str(bad), metadata=meta)
    return bad


@pytest.mark.parametrize("edit, key", [
    (lambda a: a["text_cfg"].update(hf_model_name="bert-base-uncased"), "arch.text_cfg.hf_model_name"),
    (lambda a: a["vision_cfg"].update(timm_model_name="vit_tiny_patch16_224", timm_model_pretrained=True),
     "arch.vision_cfg.timm_model_"),
    (lambda a: a.update(cast_dtype="float16"), "arch.cast_dtype"),
    (lambda a: a["text_cfg"].update(vocab_size=10**13), "arch.text_cfg.vocab_size"),
    (lambda a: a["vision_cfg"].update(patch_size=-8), "arch.vision_cfg.patch_size"),
    (lambda a: a.pop("vision_cfg"), "arch.vision_cfg"),
])
def test_load_validates_the_files_arch_before_building_anything(tmp_path, monkeypatch, edit, key):
    from pipeline.errors import CascadeError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # if anything did try to download, it fails at once
    bad = _with_arch(tmp_path, edit)
    with pytest.raises(CascadeError) as info:
        load(bad)
    assert str(bad) in str(info.value) and key in str(info.value)
