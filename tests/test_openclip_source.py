"""clip.source open_clip: tiny open_clip ViTs of several depths and patch sizes, saved to local files
and loaded through open_clip's own API (`pretrained=<file>`), the depth rule for stage splits, the
12-block case against today's `clip.source: file` path, and clear errors. Nothing is downloaded:
open_clip's downloaders are replaced by functions that fail the test (or serve local files)."""

import json
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from safetensors.torch import save_file

from pipeline.config import ClipConfig, ModelConfig, ParamsError, depth_stages, load_params, preset_params, validate_params
from pipeline.engine.setup import normalizer
from pipeline.model import build_model
from pipeline.model.clip import ArchError, create_clip, make_tokenizer, openclip_arch
from pipeline.model.tools import model_info
from pipeline.text import backbone_tokenizer
from pipeline.weights import WeightsError, WeightsUnavailable, build_clip, load_backbone, load_pretrained, save_backbone
import pipeline.openclip_weights as ocw
from tests.project import REPO
from tests.test_backbone import project, run_backbone, the_run, tiny_params  # noqa: F401 (project: a fixture)

EMBED = 16


def tiny_config(layers: int, patch: int, image_size: int = 32) -> dict:
    """A tiny plain ViT CLIP in open_clip's model-config format (GELU, as LAION's models)."""
    return {
        "embed_dim": EMBED,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": 32, "patch_size": patch, "head_width": 16},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }


def write_tiny(folder: Path, name: str, layers: int, patch: int, seed: int = 0) -> tuple[Path, Path]:
    """(model-config .json, safetensors state dict) of a random tiny CLIP, the config registered with
    open_clip under `name` (open_clip.add_model_config: the file's stem), as open_clip's own configs."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{name}.json"
    config.write_text(json.dumps(tiny_config(layers, patch)))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    weights = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in create_clip(tiny_config(layers, patch)).state_dict().items()}, str(weights))
    return config, weights


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any download attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args} {kwargs}")

    monkeypatch.setattr(ocw, "download_pretrained_from_hf", refuse)
    monkeypatch.setattr(open_clip, "download_pretrained", refuse)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", refuse)
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", refuse)


def open_clip_source(tmp_path: Path, model: str, pretrained: str, **kwargs) -> ClipConfig:
    return ClipConfig(source="open_clip", model=model, pretrained=pretrained, cache_dir=tmp_path / "cache", **kwargs)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------------------------
# loading through open_clip
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers,patch", [(6, 8), (12, 16), (4, 4)])
def test_tiny_vits_load_through_open_clip_from_local_files(tmp_path, layers, patch):
    config, weights = write_tiny(tmp_path, f"tiny-d{layers}-p{patch}", layers, patch)
    loaded = load_pretrained(open_clip_source(tmp_path, config.stem, str(weights)))
    assert loaded.arch == tiny_config(layers, patch)
    assert len(loaded.model.visual.transformer.resblocks) == layers and loaded.model.visual.patch_size == (patch, patch)
    torch.manual_seed(0)
    assert_same_state(loaded.model.state_dict(), create_clip(tiny_config(layers, patch)).state_dict())
    assert loaded.details["source_sha256"] == ocw.sha256_file(weights)
    assert loaded.details["open_clip_model"] == config.stem and loaded.details["open_clip_pretrained"] == str(weights)


def test_params_with_a_registered_config_validate_and_load(tmp_path):
    _, weights = write_tiny(tmp_path / "configs", "tiny-registered-d6", 6, 8)
    clip = validate_params({"clip": {"source": "open_clip", "model": "tiny-registered-d6", "pretrained": str(weights)}}).clip
    loaded = load_pretrained(clip)
    assert loaded.arch == tiny_config(6, 8)
    assert loaded.details["mean"] == list(open_clip.constants.OPENAI_DATASET_MEAN)  # a bare file: open_clip's default


def test_the_backbone_records_weights_sha256_and_statistics_and_rebuilds(tmp_path):
    config, weights = write_tiny(tmp_path, "tiny-saved-d6", 6, 8)
    loaded = load_pretrained(open_clip_source(tmp_path, config.stem, str(weights)))
    folder = tmp_path / "backbone"
    folder.mkdir()
    meta = save_backbone(folder, loaded.arch, loaded.model, source="open_clip", details=loaded.details)
    assert meta["source"] == "open_clip" and meta["vision_layers"] == 6 and meta["patch_size"] == 8
    assert meta["source_sha256"] == ocw.sha256_file(weights)
    backbone = load_backbone(folder)  # sha256 of clip.safetensors verified, every key and shape checked
    assert_same_state(build_clip(backbone).state_dict(), loaded.model.state_dict())
    tokens = backbone_tokenizer(backbone.arch, backbone.meta)(["a photo of a cat."])
    assert tokens.shape == (1, 12) and torch.equal(tokens, make_tokenizer(backbone.arch)(["a photo of a cat."]))


def test_a_wrong_sha256_is_refused_naming_both_hashes(tmp_path):
    config, weights = write_tiny(tmp_path, "tiny-sha-d6", 6, 8)
    with pytest.raises(WeightsError, match=r"sha256 mismatch: expected 0{64}, found [0-9a-f]{64}. Check clip.pretrained and clip.sha256"):
        load_pretrained(open_clip_source(tmp_path, config.stem, str(weights), sha256="0" * 64))


def test_weights_of_another_architecture_are_refused(tmp_path):
    config, _ = write_tiny(tmp_path / "a", "tiny-fit-d6", 6, 8)
    _, other = write_tiny(tmp_path / "b", "tiny-fit-d4", 4, 8)
    with pytest.raises(WeightsError, match="does not fit open_clip model"):
        load_pretrained(open_clip_source(tmp_path, config.stem, str(other)))


def test_neither_tag_nor_hub_nor_file_lists_the_models_tags(tmp_path):
    with pytest.raises(WeightsError, match=r"neither an open_clip pretrained tag of ViT-B-16 \(its tags: openai, laion400m"):
        load_pretrained(open_clip_source(tmp_path, "ViT-B-16", "no_such_tag"))


def test_a_tag_is_fetched_by_open_clip_into_the_cache_dir(tmp_path, monkeypatch):
    config, weights = write_tiny(tmp_path, "tiny-tagged-d6", 6, 8)
    seen = {}

    def fake_download(cfg, cache_dir=None, **kwargs):
        seen.update(cfg=cfg, cache_dir=cache_dir)
        return str(weights)

    monkeypatch.setattr(open_clip, "download_pretrained", fake_download)
    tag = {"url": "https://example.org/tiny.bin", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda model, name: tag if name == "tinytag" else {})
    loaded = load_pretrained(open_clip_source(tmp_path, "tiny-tagged-d6", "tinytag"))
    assert seen == {"cfg": tag, "cache_dir": str(tmp_path / "cache")}
    assert loaded.details["source_tag"] == "tinytag" and loaded.details["source_url"] == tag["url"]
    assert loaded.details["mean"] == [0.5] * 3 and loaded.details["std"] == [0.25] * 3
    assert normalizer("backbone", loaded.details).mean == (127.5, 127.5, 127.5)  # the weights' statistics


def test_a_failed_fetch_says_how_to_place_the_weights(tmp_path, monkeypatch):
    def offline(cfg, cache_dir=None, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    with pytest.raises(WeightsUnavailable, match="copy the cache folder here, or set clip.pretrained") as info:
        load_pretrained(open_clip_source(tmp_path, "ViT-B-16", "laion2b_s34b_b88k"))
    assert info.value.transient  # a dropped connection: the stage's task retries


def test_an_hf_hub_name_must_describe_clip_models_architecture(tmp_path, monkeypatch):
    config, weights = write_tiny(tmp_path, "tiny-hub-d6", 6, 8)
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / ocw.HUB_CONFIG_FILE).write_text(json.dumps({"model_cfg": tiny_config(6, 8),
                                                       "preprocess_cfg": {"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]}}))

    def fake_hf(repo, filename=None, cache_dir=None, **kwargs):
        assert repo == "org/tiny" and cache_dir == str(tmp_path / "cache")
        return str(hub / filename) if filename else str(weights)

    monkeypatch.setattr(ocw, "download_pretrained_from_hf", fake_hf)
    loaded = load_pretrained(open_clip_source(tmp_path, "tiny-hub-d6", "hf-hub:org/tiny"))
    assert loaded.details["source_hub"] == "hf-hub:org/tiny" and loaded.details["mean"] == [0.4] * 3
    with pytest.raises(WeightsError, match="is not clip.model ViT-B-16's"):
        load_pretrained(open_clip_source(tmp_path, "ViT-B-16", "hf-hub:org/tiny"))


def test_the_backbone_stage_records_an_open_clip_model_with_a_project_relative_file(project, mlflow_uri):
    _, weights = write_tiny(project / "weights", "tiny-stage-d6", 6, 8)
    params = tiny_params(source="open_clip", model="tiny-stage-d6", pretrained="weights/tiny-stage-d6.safetensors")
    (project / "open_clip.yaml").write_text(yaml.safe_dump(params))
    assert run_backbone("--params", "open_clip.yaml") == 0
    arch, _, meta = load_backbone(project / "artifacts/backbone")
    assert arch == tiny_config(6, 8) and meta["source"] == "open_clip"
    assert meta["source_sha256"] == ocw.sha256_file(weights) and meta["open_clip_model"] == "tiny-stage-d6"
    _, run = the_run(mlflow_uri)
    assert run.data.tags["clip.source"] == "open_clip" and run.data.params["clip.model"] == "tiny-stage-d6"


# --------------------------------------------------------------------------------------------
# the 12-block case is today's model, numbers included
# --------------------------------------------------------------------------------------------
def test_twelve_blocks_give_the_same_taps_and_numbers_as_source_file(tmp_path):
    config, weights = write_tiny(tmp_path, "tiny-same-d12", 12, 8)
    via_file = load_pretrained(ClipConfig(source="file", arch=str(config), file=weights))
    via_open_clip = load_pretrained(open_clip_source(tmp_path, config.stem, str(weights)))
    assert via_open_clip.arch == via_file.arch
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    classes = torch.nn.functional.normalize(torch.randn(5, EMBED, generator=torch.Generator().manual_seed(2)), dim=-1)
    outputs = []
    for loaded, cfg in [(via_file, ModelConfig(stages=[(6, 8), (9, 11), (12, 12)], prompt_tokens=3, decoder_heads=4)),
                        (via_open_clip, ModelConfig(prompt_tokens=3, decoder_heads=4))]:  # stages from the depth
        torch.manual_seed(0)
        model = build_model(cfg, loaded.arch, loaded.model.state_dict()).eval()
        assert model.stages == [(6, 8), (9, 11), (12, 12)] and model.encoder.tap_blocks == (6, 7, 8, 9, 10, 11)
        with torch.no_grad():
            outputs.append((model.encoder(images), model(images, classes)))
    (feats_a, out_a), (feats_b, out_b) = outputs
    assert feats_a.blocks.keys() == feats_b.blocks.keys() == set(range(6, 13))
    for block in feats_a.blocks:
        assert torch.equal(feats_a.blocks[block], feats_b.blocks[block]), block
    assert torch.equal(out_a.logits, out_b.logits)
    for a, b in zip(out_a.stage_logits, out_b.stage_logits):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# stages from the depth, any patch size and grid
# --------------------------------------------------------------------------------------------
def test_the_depth_rule_keeps_the_papers_split_and_scales_it():
    assert depth_stages(12) == [(6, 8), (9, 11), (12, 12)]
    assert depth_stages(24) == [(12, 17), (18, 23), (24, 24)]
    assert depth_stages(32) == [(16, 23), (24, 31), (32, 32)]
    assert depth_stages(6) == [(3, 3), (4, 5), (6, 6)]
    assert depth_stages(2) == [(1, 1), (2, 2)] and depth_stages(1) == [(1, 1)]
    for depth in range(1, 65):
        stages = depth_stages(depth)
        assert stages[-1] == (depth, depth)
        assert all(s <= e for s, e in stages) and all(a[1] + 1 == b[0] for a, b in zip(stages, stages[1:]))


@pytest.mark.parametrize("layers,patch,image_size,grid", [(6, 8, 40, 5), (12, 16, 48, 3), (6, 4, 30, 7)])
def test_other_depths_and_patches_build_with_derived_stages_and_resized_positions(tmp_path, layers, patch, image_size, grid):
    config, weights = write_tiny(tmp_path, f"tiny-grid-d{layers}-p{patch}", layers, patch)
    loaded = load_pretrained(open_clip_source(tmp_path, config.stem, str(weights)))
    torch.manual_seed(0)
    model = build_model(ModelConfig(prompt_tokens=2, decoder_heads=4, image_size=image_size), loaded.arch,
                        loaded.model.state_dict()).eval()
    assert model.stages == depth_stages(layers)
    assert model.encoder.grid == (grid, grid) and model.encoder.positional_embedding.shape[0] == 1 + grid * grid
    classes = torch.nn.functional.normalize(torch.randn(3, EMBED), dim=-1)
    with torch.no_grad():
        out = model(torch.randn(1, 3, image_size, image_size), classes)
        odd = model.encoder(torch.randn(1, 3, image_size + patch, image_size))  # a grid resized at run time
    assert out.logits.shape[-3:] == (3, image_size, image_size) and odd.grid == (grid + 1, grid)


def test_an_explicit_model_stages_overrides_the_depth_rule(tmp_path):
    config, weights = write_tiny(tmp_path, "tiny-override-d6", 6, 8)
    loaded = load_pretrained(open_clip_source(tmp_path, config.stem, str(weights)))
    model = build_model(ModelConfig(stages=[(2, 4), (5, 6)], prompt_tokens=2, decoder_heads=4), loaded.arch)
    assert model.stages == [(2, 4), (5, 6)] and model.encoder.tap_blocks == (2, 3, 4, 5)
    with pytest.raises(ValueError, match="goes past the encoder depth"):
        build_model(ModelConfig(stages=[(6, 8), (9, 11), (12, 12)]), loaded.arch)


def test_stages_past_a_named_models_depth_fail_at_validation():
    with pytest.raises(ParamsError, match=r"model.stages: stage \[13, 13\] goes past the encoder depth \(12 blocks\)"):
        validate_params({"clip": {"source": "open_clip", "model": "ViT-B-16", "pretrained": "laion2b_s34b_b88k"},
                         "model": {"stages": [[6, 8], [9, 12], [13, 13]]}})
    params = validate_params({"clip": {"source": "open_clip", "model": "ViT-L-14", "pretrained": "openai"},
                              "model": {"stages": [[12, 17], [18, 23], [24, 24]]}})
    assert params.model.stages_for(24) == depth_stages(24)


# --------------------------------------------------------------------------------------------
# architectures that are not plain ViTs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,why", [("RN50", "a ResNet"), ("convnext_base", "timm's convnext_base"),
                                      ("ViT-B-16-SigLIP", "timm's"), ("coca_ViT-B-32", "CoCa")])
def test_a_model_that_is_not_a_plain_vit_is_refused_clearly(name, why):
    with pytest.raises(ParamsError) as info:
        validate_params({"clip": {"source": "open_clip", "model": name, "pretrained": "openai"}})
    assert f"clip.model: {name!r} is not a plain ViT CLIP" in str(info.value) and why in str(info.value)


def test_an_unknown_model_lists_the_plain_vit_configs():
    with pytest.raises(ArchError, match=r"unknown open_clip model 'ViT-Nope'; plain ViT configs: .*ViT-L-14"):
        openclip_arch("ViT-Nope")


def test_a_registered_config_with_a_timm_tower_is_refused_before_building(tmp_path):
    path = tmp_path / "tiny-timm-tower.json"
    config = tiny_config(6, 8)
    config["vision_cfg"] = {"timm_model_name": "vit_base_patch16_224", "image_size": 32}
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    with pytest.raises(ArchError, match="timm's vit_base_patch16_224"):
        load_pretrained(open_clip_source(tmp_path, path.stem, str(path)))


def test_quick_gelu_follows_the_tag_the_weights_were_trained_with():
    assert openclip_arch("ViT-L-14", "openai")["quick_gelu"] is True  # OpenAI's weights: QuickGELU
    assert "quick_gelu" not in openclip_arch("ViT-L-14", "laion2b_s32b_b82k")
    assert openclip_arch("ViT-B-16-quickgelu", "metaclip_400m")["quick_gelu"] is True


def test_the_tokenizer_of_a_named_model_is_open_clips():
    arch = openclip_arch("ViT-B-16", "laion2b_s34b_b88k")
    tokenizer = backbone_tokenizer(arch, {"source": "open_clip", "open_clip_model": "ViT-B-16"})
    expected = open_clip.get_tokenizer("ViT-B-16")(["a photo of a dog."])
    assert torch.equal(tokenizer(["a photo of a dog."]), expected) and expected.shape == (1, 77)


# --------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------
NEW_PRESETS = {"voc12_vitl14": ("voc12", "ViT-L-14", "openai"), "coco_vitl14": ("coco", "ViT-L-14", "openai"),
               "voc12_vitb16_laion": ("voc12", "ViT-B-16", "laion2b_s34b_b88k"),
               "coco_vitb16_laion": ("coco", "ViT-B-16", "laion2b_s34b_b88k")}


@pytest.mark.parametrize("name", sorted(NEW_PRESETS))
def test_backbone_presets_are_the_papers_recipe_with_another_clip(name):
    base, model, tag = NEW_PRESETS[name]
    data = yaml.safe_load((REPO / "presets" / f"{name}.yaml").read_text())
    base_data = yaml.safe_load((REPO / "presets" / f"{base}.yaml").read_text())
    assert data.pop("clip") == {"source": "open_clip", "model": model, "pretrained": tag}
    base_data.pop("clip")
    assert data == base_data
    assert load_params(REPO / "params.yaml", preset=name).clip.model == model
    assert preset_params(name).model.stages is None  # from the depth


def test_model_info_of_a_vitl14_preset_builds_without_downloading():
    info = model_info("voc12_vitl14", "cascade", image_size=512)
    assert info["stages"] == [[12, 17], [18, 23], [24, 24]]
    assert info["params_total"] == 489_052_684 and info["params_trainable"] == 50_909_452
    assert info["gmacs"] == pytest.approx(505.5, rel=0.01)
