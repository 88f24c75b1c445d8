import fractions
import logging
from pathlib import Path

import pytest
import torch

from pipeline.model import StateDictError, load
from pipeline.model.release import convert_release_state, import_release_checkpoint, release_model_config
from tests.tiny import tiny_arch, tiny_cfg

KEYS_FILE = Path(__file__).parent / "data" / "release_checkpoint_keys.txt"  # written from a release checkpoint (see its header)


def release_shapes(*, width, embed, prompts, depth=12, taps=6, grid, patch, text_width, text_layers, context,
                   vocab=49408, seen=156, stages=3, layers=3) -> dict[str, list[int]]:
    """Key -> shape of a release (mmseg EncoderDecoder) state dict, at any size."""
    w, e, tw = width, embed, text_width

    def block(prefix, d):
        return {
            f"{prefix}.attn.in_proj_weight": [3 * d, d], f"{prefix}.attn.in_proj_bias": [3 * d],
            f"{prefix}.attn.out_proj.weight": [d, d], f"{prefix}.attn.out_proj.bias": [d],
            f"{prefix}.ln_1.weight": [d], f"{prefix}.ln_1.bias": [d],
            f"{prefix}.mlp.c_fc.weight": [4 * d, d], f"{prefix}.mlp.c_fc.bias": [4 * d],
            f"{prefix}.mlp.c_proj.weight": [d, 4 * d], f"{prefix}.mlp.c_proj.bias": [d],
            f"{prefix}.ln_2.weight": [d], f"{prefix}.ln_2.bias": [d],
        }

    def norm(prefix, d):
        return {f"{prefix}.weight": [d], f"{prefix}.bias": [d]}

    def linear(prefix, out, inp):
        return {f"{prefix}.weight": [out, inp], f"{prefix}.bias": [out]}

    s = {
        "backbone.class_embedding": [w], "backbone.positional_embedding": [1 + grid * grid, w],
        "backbone.proj": [w, e], "backbone.proj_layers": [taps, w, e],
        "backbone.prompt_embeddings": [1, prompts, w], "backbone.deep_prompt_embeddings": [depth - 1, prompts, w],
        "backbone.conv1.weight": [w, 3, patch, patch],
    }
    s |= norm("backbone.ln_pre", w)
    for i in range(depth):
        s |= block(f"backbone.transformer.resblocks.{i}", w)
    s |= norm("backbone.ln_post", w)
    for i in range(taps):
        s |= norm(f"backbone.ln_layers.{i}", w)
    s |= linear("backbone.prompt_proj", w, w) | norm("backbone.prompt_norm", w)
    s |= {"decode_head.weights_s1": [3], "decode_head.weights_s2": [3], "decode_head.loss_decode.criterion.empty_weight": [seen + 1]}
    for st in range(stages):
        for la in range(layers):
            p = f"decode_head.cascade_decoders.{st}.layers.{la}"
            s |= {f"{p}.self_attn.in_proj_weight": [3 * e, e], f"{p}.self_attn.in_proj_bias": [3 * e]}
            s |= linear(f"{p}.self_attn.out_proj", e, e) | linear(f"{p}.linear1", 4 * e, e) | linear(f"{p}.linear2", e, 4 * e)
            s |= norm(f"{p}.norm1", e) | norm(f"{p}.norm2", e) | norm(f"{p}.norm3", e)
            for name in ("q", "k", "v", "proj"):
                s |= linear(f"{p}.multihead_attn.{name}", e, e)
    for st in range(stages):
        s |= linear(f"decode_head.q_projs.{st}", e, 2 * e)
    s |= {"text_encoder.positional_embedding": [context, tw], "text_encoder.text_projection": [tw, e]}
    for i in range(text_layers):
        s |= block(f"text_encoder.transformer.resblocks.{i}", tw)
    s |= {"text_encoder.token_embedding.weight": [vocab, tw]} | norm("text_encoder.ln_final", tw)
    return s


def tiny_release_state(seed=0, **sizes):
    gen = torch.Generator().manual_seed(seed)
    shapes = release_shapes(**{"width": 32, "embed": 32, "prompts": 3, "grid": 4, "patch": 8, "text_width": 32,
                               "text_layers": 1, "context": 8, "seen": 4, **sizes})
    return {k: torch.randn(*shape, generator=gen) for k, shape in shapes.items()}


def test_release_layout_generator_matches_the_release_key_list():
    listed = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            listed[key] = [int(x) for x in shape.strip("[]").split(",")]
    full = release_shapes(width=768, embed=512, prompts=50, grid=32, patch=16, text_width=512, text_layers=12, context=77)
    assert full == listed


def test_convert_release_state_maps_everything_and_drops_dead_weights():
    state = tiny_release_state()
    cfg = tiny_cfg()
    ours, dropped = convert_release_state(state, cfg, tiny_arch())
    assert dropped == {
        "decoder self_attn (never called)": 36,
        "decoder norm1 (never called)": 18,
        "last-layer v/proj/FFN/norms (no effect on the output)": 36,
        "loss buffer empty_weight": 1,
    }
    assert torch.equal(ours["encoder.prompts.embeddings"][0], state["backbone.prompt_embeddings"][0])
    assert torch.equal(ours["encoder.prompts.embeddings"][1:], state["backbone.deep_prompt_embeddings"])
    assert torch.equal(ours["head.aggregators.1.weights"], state["decode_head.weights_s2"])
    assert torch.equal(ours["head.decoders.2.layers.1.attn_norm.weight"], state["decode_head.cascade_decoders.2.layers.1.norm2.weight"])
    assert torch.equal(ours["head.decoders.0.layers.0.ffn_norm.bias"], state["decode_head.cascade_decoders.0.layers.0.norm3.bias"])
    assert torch.equal(ours["head.decoders.1.layers.0.ffn_in.weight"], state["decode_head.cascade_decoders.1.layers.0.linear1.weight"])
    assert torch.equal(ours["head.decoders.0.layers.2.k.bias"], state["decode_head.cascade_decoders.0.layers.2.multihead_attn.k.bias"])
    assert torch.equal(ours["encoder.tap_proj"], state["backbone.proj_layers"])
    assert torch.equal(ours["encoder.tap_norms.5.weight"], state["backbone.ln_layers.5.weight"])
    assert torch.equal(ours["text_encoder.token_embedding.weight"], state["text_encoder.token_embedding.weight"])


def test_convert_release_state_fails_on_unknown_and_missing_keys():
    state = tiny_release_state()
    state["decode_head.mystery.weight"] = torch.zeros(2)
    with pytest.raises(StateDictError, match="decode_head.mystery.weight"):
        convert_release_state(state, tiny_cfg(), tiny_arch())
    state = tiny_release_state()
    del state["backbone.ln_post.weight"]
    state["backbone.ln_pre.bias"] = torch.zeros(7)
    with pytest.raises(StateDictError) as info:
        convert_release_state(state, tiny_cfg(), tiny_arch())
    assert "encoder.ln_post.weight" in str(info.value) and "encoder.ln_pre.bias: checkpoint [7]" in str(info.value)


def _demo_release_file(path, meta=None):
    # the demo preset: toy CLIP (width 64, 12 blocks, patch 8, image 96 -> grid 12), P = 10
    state = tiny_release_state(width=64, embed=64, prompts=10, grid=12, patch=8, text_width=64, text_layers=4, context=24)
    torch.save({"meta": meta or {"mmseg_version": "0.20.2", "iter": 80000}, "state_dict": state, "optimizer": {}}, path)
    return state


def test_import_release_checkpoint_writes_a_loadable_release_compatible_model(tmp_path, caplog):
    state = _demo_release_file(tmp_path / "iter_80000.pth")
    with caplog.at_level(logging.INFO, logger="pipeline.model.release"):
        summary = import_release_checkpoint(tmp_path / "iter_80000.pth", tmp_path / "imported.safetensors", "demo")
    assert "dropped 91 unused release tensors" in caplog.text
    assert sum(summary["dropped"].values()) == 91
    model = load(summary["out"])
    assert model.model_cfg.release_double_cls and model.model_cfg.tap_init == "random" and not model.model_cfg.tap_trainable
    assert not model.encoder.tap_proj.requires_grad
    assert torch.equal(model.head.aggregators[0].weights.detach(), state["decode_head.weights_s1"])


def test_import_refuses_pickled_objects_unless_allowed(tmp_path):
    _demo_release_file(tmp_path / "ckpt.pth", meta={"ratio": fractions.Fraction(1, 3)})
    with pytest.raises(ValueError, match="allow_pickle=True"):
        import_release_checkpoint(tmp_path / "ckpt.pth", tmp_path / "out.safetensors", "demo")
    with pytest.warns(UserWarning, match="full unpickling"):
        import_release_checkpoint(tmp_path / "ckpt.pth", tmp_path / "out.safetensors", "demo", allow_pickle=True)
    assert (tmp_path / "out.safetensors").exists()


def test_release_model_config_switches_on_release_behaviour():
    cfg = release_model_config(tiny_cfg(tap_init="clip", tap_trainable=True))
    assert cfg.release_double_cls and cfg.tap_init == "random" and not cfg.tap_trainable
