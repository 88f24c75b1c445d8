import pytest
import torch
from safetensors.torch import save_file

from pipeline.config import ClipConfig
from pipeline.model import StateDictError, arch_config, build_model, create_clip, load_clip_state, read_clip_checkpoint
from tests.tiny import tiny_arch, tiny_cfg


def _reference_clip(seed=3):
    torch.manual_seed(seed)
    return create_clip(tiny_arch()).eval()


def _same_weights(model, state):
    own = model.state_dict()
    return all(torch.equal(own[k], v.to(own[k].dtype)) for k, v in state.items())


def test_toy_arch_config_from_toy_clip_config():
    arch = arch_config(ClipConfig())
    assert arch["vision_cfg"] == {"image_size": 64, "layers": 12, "width": 64, "patch_size": 8, "head_width": 32,
                                  "pool_type": "tok"}
    assert arch["text_cfg"] == {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 4}
    assert arch["quick_gelu"] is True and arch["embed_dim"] == 64


def test_named_arch_config_is_open_clips_bundled_json():
    arch = arch_config(ClipConfig(source="openai"))
    assert arch["embed_dim"] == 512 and arch["quick_gelu"] is True
    assert arch["vision_cfg"]["patch_size"] == 16 and arch["vision_cfg"]["width"] == 768
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        arch_config(ClipConfig(source="openai", arch="ViT-Nope"))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_read_openai_jit_archive(tmp_path):
    clip = _reference_clip()
    traced = torch.jit.trace(clip, (torch.randn(1, 3, 32, 32), torch.randint(0, 100, (1, 8))), check_trace=False)
    traced.save(str(tmp_path / "ViT-tiny.pt"))
    with pytest.raises(ValueError, match="TorchScript"):
        read_clip_checkpoint(tmp_path / "ViT-tiny.pt")  # it can run code: read only when allowed
    with pytest.warns(UserWarning, match="allow_pickle"):
        state = read_clip_checkpoint(tmp_path / "ViT-tiny.pt", allow_pickle=True)
    fresh = create_clip(tiny_arch())
    load_clip_state(fresh, state)
    assert _same_weights(fresh, clip.state_dict())


def test_read_open_clip_state_dicts_wrapped_prefixed_and_safetensors(tmp_path):
    clip = _reference_clip()
    state = clip.state_dict()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    torch.save({**state, "input_resolution": torch.tensor(32)}, tmp_path / "plain.bin")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    for name in ("wrapped.pt", "plain.bin", "w.safetensors"):
        loaded = read_clip_checkpoint(tmp_path / name)
        assert set(loaded) == set(state), name
        fresh = create_clip(tiny_arch())
        load_clip_state(fresh, loaded)
        assert _same_weights(fresh, state), name


def test_strict_clip_loading_lists_every_wrong_key_and_shape():
    state = dict(_reference_clip().state_dict())
    state["visual.proj"] = torch.zeros(3, 3)
    state["visual.extra_thing"] = torch.zeros(1)
    del state["ln_final.bias"]
    with pytest.raises(StateDictError) as info:
        load_clip_state(create_clip(tiny_arch()), state)
    message = str(info.value)
    assert "visual.proj: checkpoint [3, 3] vs model [32, 32]" in message
    assert "visual.extra_thing" in message and "unexpected (1)" in message
    assert "ln_final.bias" in message and "missing (1)" in message


def test_allow_missing_is_explicit():
    state = dict(_reference_clip().state_dict())
    del state["logit_scale"]
    with pytest.raises(StateDictError, match=r"missing \(1\):\s+logit_scale"):
        load_clip_state(create_clip(tiny_arch()), state)  # a key the file lacks is an error...
    fresh = create_clip(tiny_arch())
    own_scale = fresh.logit_scale.detach().clone()
    load_clip_state(fresh, state, allow_missing=["logit_scale"])  # ...unless named: the rest loads, it stays
    assert _same_weights(fresh, state) and torch.equal(fresh.logit_scale.detach(), own_scale)


def test_build_model_with_clip_weights_uses_them():
    clip = _reference_clip()
    model = build_model(tiny_cfg(), tiny_arch(), clip_state=clip.state_dict())
    assert torch.equal(model.encoder.transformer.resblocks[3].mlp.c_fc.weight, clip.visual.transformer.resblocks[3].mlp.c_fc.weight)
    assert torch.equal(model.text_encoder.token_embedding.weight, clip.token_embedding.weight)
    assert torch.equal(model.encoder.proj, clip.visual.proj)
    tokens = torch.randint(0, 49407, (2, 8))
    with torch.no_grad():
        assert torch.allclose(model.text_encoder(tokens), clip.encode_text(tokens), atol=1e-6)


def test_declared_torch_floor_is_the_first_with_a_safe_weights_only_load():
    """torch.load(weights_only=True) can be bypassed before torch 2.6 (CVE-2025-32434); users install from pyproject."""
    import tomllib

    from packaging.requirements import Requirement

    from tests.project import REPO

    requirements = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    [torch_req] = [Requirement(r) for r in requirements if Requirement(r).name == "torch"]
    assert not torch_req.specifier.contains("2.5.1") and torch_req.specifier.contains("2.6.0")
