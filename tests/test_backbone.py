"""CLIP weights: sources openai / file / toy, the local format, strict loading, the backbone stage."""

import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from pipeline.config import ClipConfig, ToyClipConfig, render_params_yaml
from pipeline.errors import CascadeError
from pipeline.model.clip import create_clip, toy_arch
from pipeline.weights import (
    META_FILE,
    WEIGHTS_FILE,
    WeightsError,
    WeightsUnavailable,
    build_clip,
    fetch_openai_weights,
    load_backbone,
    load_pretrained,
    openai_download,
    save_backbone,
)
from pipeline.tracking import TAG_STAGE
from stages import backbone as backbone_stage
from stages.common import run_stage
from tests.http_server import FileServer

TINY = dict(embed_dim=16, image_size=32, patch_size=8, width=32, layers=2, head_width=16,
            text_width=32, text_layers=1, text_heads=2, context_length=16)
OPENAI_SHA = "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"  # in OpenAI's ViT-B/16 URL


def tiny_arch() -> dict:
    return toy_arch(ToyClipConfig(**TINY))


def tiny_clip(seed: int = 0):
    torch.manual_seed(seed)
    return create_clip(tiny_arch()).eval()


def write_arch(folder: Path) -> Path:
    path = folder / "tiny-clip.json"
    path.write_text(json.dumps(tiny_arch()))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_openai_archive(path: Path) -> None:
    """An OpenAI-style TorchScript archive: tiny_clip() scripted in fp16, with the int entries OpenAI adds."""
    model = tiny_clip().half()
    for name, value in (("input_resolution", 32), ("context_length", 16), ("vocab_size", 49408)):
        if hasattr(model, name):
            delattr(model, name)  # open_clip keeps these as plain ints; OpenAI's archive as tensors
        model.register_buffer(name, torch.tensor(value))
    torch.jit.script(model).save(str(path))


def assert_same_weights(state: dict, model, atol=0.0) -> None:
    reference = model.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert state[key].dtype == torch.float32 or not value.is_floating_point(), key
        assert torch.allclose(state[key], value.float(), atol=atol), key


# --------------------------------------------------------------------------------------------
# source file, both formats, and the local format round trip
# --------------------------------------------------------------------------------------------
def test_file_source_round_trip_open_clip_state_dict(tmp_path):
    model = tiny_clip()
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ckpt.pt")
    clip = ClipConfig(source="file", file=tmp_path / "ckpt.pt", arch=str(write_arch(tmp_path)))
    loaded = load_pretrained(clip, progress=False)
    out = tmp_path / "backbone"
    out.mkdir()
    meta = save_backbone(out, loaded.arch, loaded.model, source="file", details=loaded.details)

    arch, state, meta_read = load_backbone(out)
    assert arch == tiny_arch() and meta_read == meta
    assert_same_weights(state, model)
    assert meta["sha256"] == sha256(out / WEIGHTS_FILE)
    assert meta["source_sha256"] == sha256(tmp_path / "ckpt.pt")
    assert meta["parameters"] == sum(p.numel() for p in model.parameters())
    assert meta["image_size"] == 32 and meta["context_length"] == 16 and len(meta["mean"]) == 3
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 400, (2, 16))
    rebuilt = build_clip(load_backbone(out))
    assert torch.allclose(rebuilt.encode_image(images), model.encode_image(images), atol=1e-6)
    assert torch.allclose(rebuilt.encode_text(tokens), model.encode_text(tokens), atol=1e-6)


def test_file_source_reads_an_openai_jit_archive_in_fp16_when_allowed(tmp_path):
    write_openai_archive(tmp_path / "ViT-tiny.pt")
    clip = ClipConfig(source="file", file=tmp_path / "ViT-tiny.pt", arch=str(write_arch(tmp_path)),
                      sha256=sha256(tmp_path / "ViT-tiny.pt"), allow_pickle=True)
    loaded = load_pretrained(clip, progress=False)
    state = loaded.model.state_dict()
    assert all(v.dtype == torch.float32 for v in state.values())
    assert_same_weights(state, tiny_clip().half(), atol=0)  # fp16 values, now stored as fp32


class Opaque:
    """An object only full unpickling can rebuild (it stands for any code a pickle may run)."""


def test_file_source_refuses_torchscript_and_pickles_without_allow_pickle(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("torch.jit.load was called on an untrusted file")

    write_openai_archive(tmp_path / "ViT-tiny.pt")
    torch.save({"state_dict": tiny_clip().state_dict(), "args": Opaque()}, tmp_path / "pickled.pt")
    arch = str(write_arch(tmp_path))
    with monkeypatch.context() as patched:
        patched.setattr(torch.jit, "load", never)
        with pytest.raises(WeightsError) as info:
            load_pretrained(ClipConfig(source="file", file=tmp_path / "ViT-tiny.pt", arch=arch), progress=False)
    message = str(info.value)
    assert str(tmp_path / "ViT-tiny.pt") in message and "TorchScript" in message
    assert "clip.allow_pickle: true" in message and "safetensors" in message
    with pytest.raises(WeightsError) as info:
        load_pretrained(ClipConfig(source="file", file=tmp_path / "pickled.pt", arch=arch), progress=False)
    message = str(info.value)
    assert str(tmp_path / "pickled.pt") in message and "clip.allow_pickle: true" in message
    with pytest.warns(UserWarning, match="allow_pickle"):
        loaded = load_pretrained(ClipConfig(source="file", file=tmp_path / "pickled.pt", arch=arch, allow_pickle=True),
                                 progress=False)
    assert_same_weights(loaded.model.state_dict(), tiny_clip())


def test_file_source_with_wrong_sha256_names_both_hashes(tmp_path):
    torch.save(tiny_clip().state_dict(), tmp_path / "ckpt.pt")
    clip = ClipConfig(source="file", file=tmp_path / "ckpt.pt", arch=str(write_arch(tmp_path)), sha256="ab" * 32)
    with pytest.raises(WeightsError) as info:
        load_pretrained(clip, progress=False)
    assert "ab" * 32 in str(info.value) and sha256(tmp_path / "ckpt.pt") in str(info.value)


def test_checkpoint_with_a_wrong_shape_is_rejected_naming_the_key(tmp_path):
    state = tiny_clip().state_dict()
    state["visual.proj"] = torch.zeros(32, 8)  # model: [32, 16]
    del state["ln_final.bias"]
    torch.save(state, tmp_path / "bad.pt")
    clip = ClipConfig(source="file", file=tmp_path / "bad.pt", arch=str(write_arch(tmp_path)))
    with pytest.raises(WeightsError) as info:
        load_pretrained(clip, progress=False)
    message = str(info.value)
    assert "visual.proj: checkpoint [32, 8] vs model [32, 16]" in message
    assert "missing (1)" in message and "ln_final.bias" in message


def test_missing_file_and_unknown_arch_fail_clearly(tmp_path):
    with pytest.raises(WeightsError, match="clip.file: .*nope.pt not found"):
        load_pretrained(ClipConfig(source="file", file=tmp_path / "nope.pt", arch=str(write_arch(tmp_path))))
    with pytest.raises(WeightsError, match="unknown open_clip architecture 'ViT-Q-99'"):
        load_pretrained(ClipConfig(source="file", file=tmp_path / "nope.pt", arch="ViT-Q-99"))


def test_load_backbone_rejects_modified_weights(tmp_path):
    out = tmp_path / "backbone"
    out.mkdir()
    save_backbone(out, tiny_arch(), tiny_clip(), source="toy")
    state = load_file(str(out / WEIGHTS_FILE))
    state["logit_scale"] = state["logit_scale"] + 1
    from safetensors.torch import save_file

    save_file(state, str(out / WEIGHTS_FILE))
    with pytest.raises(WeightsError, match="changed or damaged"):
        load_backbone(out)


@pytest.mark.parametrize("section, key, value", [
    ("text_cfg", "hf_model_name", "bert-base-uncased"),  # open_clip would fetch it from the Hugging Face hub
    ("vision_cfg", "timm_model_pretrained", True),  # timm would download ImageNet weights
    ("vision_cfg", "layers", 0),
    ("text_cfg", "vocab_size", 10**13),
])
def test_load_backbone_validates_the_arch_in_clip_json_before_building(tmp_path, monkeypatch, section, key, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # if anything did try to download, it fails at once
    out = tmp_path / "backbone"
    out.mkdir()
    meta = save_backbone(out, tiny_arch(), tiny_clip(), source="toy")
    meta["arch"][section][key] = value
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CascadeError) as info:
        load_backbone(out)
    assert str(out / META_FILE) in str(info.value) and f"arch.{section}.{key}" in str(info.value)


def test_arch_json_file_is_validated_naming_the_file_and_key(tmp_path):
    arch = tiny_arch()
    arch["vision_cfg"]["timm_model_name"] = "vit_base_patch16_224"
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    torch.save(tiny_clip().state_dict(), tmp_path / "ckpt.pt")
    clip = ClipConfig(source="file", file=tmp_path / "ckpt.pt", arch=str(tmp_path / "arch.json"))
    with pytest.raises(CascadeError) as info:
        load_pretrained(clip, progress=False)
    assert str(tmp_path / "arch.json") in str(info.value) and "vision_cfg.timm_model_name" in str(info.value)


@pytest.mark.parametrize("name", ["ViT-B-16-quickgelu", "ViT-L-14", "ViT-L-14-336", "ViT-H-14"])
def test_arch_validation_admits_the_large_openai_and_laion_vits(name):
    from pipeline.model.clip import check_arch, named_arch

    assert check_arch(named_arch(name), source=name) == named_arch(name)


def test_load_backbone_checks_keys_and_shapes_against_its_arch(tmp_path):
    out = tmp_path / "backbone"
    out.mkdir()
    meta = save_backbone(out, tiny_arch(), tiny_clip(), source="toy")
    meta["arch"]["embed_dim"] = 24  # weights no longer fit the recorded architecture
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_backbone(out)


# --------------------------------------------------------------------------------------------
# source openai, offline: files placed where the code looks, downloads from a local HTTP server
# --------------------------------------------------------------------------------------------
def test_openai_source_is_looked_up_in_the_cache_under_openais_file_name(tmp_path):
    spec = openai_download(ClipConfig(source="openai", cache_dir=tmp_path))
    assert spec.path == tmp_path / "ViT-B-16.pt"
    assert spec.sha256 == OPENAI_SHA
    assert spec.url.startswith("https://openaipublic.azureedge.net/clip/models/")


def test_openai_source_without_the_file_says_where_to_place_it(tmp_path):
    clip = ClipConfig(source="openai", cache_dir=tmp_path / "cache", download=False)
    with pytest.raises(WeightsUnavailable) as info:
        fetch_openai_weights(clip, progress=False)
    message = str(info.value)
    assert str((tmp_path / "cache" / "ViT-B-16.pt").resolve()) in message
    assert "openaipublic.azureedge.net" in message and OPENAI_SHA in message and "curl" in message
    assert not info.value.transient


def test_openai_source_uses_a_file_placed_in_the_cache(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    write_openai_archive(cache / "ViT-B-16.pt")
    clip = ClipConfig(source="openai", cache_dir=cache, download=False, sha256=sha256(cache / "ViT-B-16.pt"),
                      allow_pickle=True)  # a TorchScript archive that is not OpenAI's own (other sha256)
    assert fetch_openai_weights(clip, progress=False) == cache / "ViT-B-16.pt"
    # the tiny file is not ViT-B/16: strict loading names what does not fit
    with pytest.raises(WeightsError, match=r"does not fit architecture ViT-B-16-quickgelu[\s\S]*shape mismatch"):
        load_pretrained(clip, progress=False)


def test_openais_own_torchscript_file_is_read_without_allow_pickle(tmp_path, monkeypatch, recwarn):
    cache = tmp_path / "cache"
    cache.mkdir()
    write_openai_archive(cache / "ViT-B-16.pt")
    digest = sha256(cache / "ViT-B-16.pt")
    clip = ClipConfig(source="openai", arch=str(write_arch(tmp_path)), cache_dir=cache, download=False,
                      url="https://example.org/ViT-B-16.pt", sha256=digest)
    with pytest.raises(WeightsError, match="clip.allow_pickle: true"):
        load_pretrained(clip, progress=False)
    monkeypatch.setattr("pipeline.weights.openai_sha256", lambda arch: digest)  # as if OpenAI published this file
    loaded = load_pretrained(clip, progress=False)
    assert_same_weights(loaded.model.state_dict(), tiny_clip().half())
    assert not [w for w in recwarn if "allow_pickle" in str(w.message)]


def test_openai_source_rejects_a_cached_file_with_the_wrong_checksum(tmp_path):
    (tmp_path / "ViT-B-16.pt").write_bytes(b"not the OpenAI checkpoint")
    with pytest.raises(WeightsError) as info:
        fetch_openai_weights(ClipConfig(source="openai", cache_dir=tmp_path, download=False), progress=False)
    assert OPENAI_SHA in str(info.value) and "delete it" in str(info.value)


def test_openai_source_downloads_over_http_and_loads_strictly(tmp_path):
    write_openai_archive(tmp_path / "ViT-B-16.pt")
    payload = (tmp_path / "ViT-B-16.pt").read_bytes()
    with FileServer(payload) as server:
        clip = ClipConfig(source="openai", arch=str(write_arch(tmp_path)), cache_dir=tmp_path / "cache",
                          url=server.url("ViT-B-16.pt"), sha256=sha256(tmp_path / "ViT-B-16.pt"), allow_pickle=True)
        loaded = load_pretrained(clip, progress=False)
    cached = tmp_path / "cache" / "ViT-B-16.pt"
    assert cached.read_bytes() == payload
    assert loaded.details["source_url"] == clip.url
    assert_same_weights(loaded.model.state_dict(), tiny_clip().half())
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["ViT-B-16.pt"]


def test_interrupted_weights_download_resumes_from_its_part_file(tmp_path):
    payload = bytes(range(256)) * 1200
    with FileServer(payload, plan=["cut:100000"]) as server:
        clip = ClipConfig(source="openai", cache_dir=tmp_path / "cache", url=server.url("w.pt"),
                          sha256=hashlib.sha256(payload).hexdigest())
        with pytest.raises(WeightsUnavailable) as info:
            fetch_openai_weights(clip, progress=False)
        assert info.value.transient
        part = tmp_path / "cache" / "w.pt.part"
        assert [p.name for p in (tmp_path / "cache").iterdir()] == ["w.pt.part"]  # nothing else is left behind
        assert part.read_bytes() == payload[:100_000]
        assert fetch_openai_weights(clip, progress=False) == tmp_path / "cache" / "w.pt"
    assert [r["range"] for r in server.requests] == [None, "bytes=100000-"]
    assert (tmp_path / "cache" / "w.pt").read_bytes() == payload
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["w.pt"]


def test_download_with_the_wrong_checksum_keeps_nothing(tmp_path):
    with FileServer(b"weights") as server:
        clip = ClipConfig(source="openai", cache_dir=tmp_path / "cache", url=server.url("w.pt"), sha256="00" * 32)
        with pytest.raises(WeightsError, match="downloaded file does not match") as info:
            fetch_openai_weights(clip, progress=False)
    assert "0" * 64 in str(info.value) and hashlib.sha256(b"weights").hexdigest() in str(info.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_unreachable_url_is_a_clear_error(tmp_path):
    with FileServer(b"weights", plan=["404"]) as server:
        clip = ClipConfig(source="openai", cache_dir=tmp_path / "cache", url=server.url("w.pt"))
        with pytest.raises(WeightsUnavailable, match="download failed") as info:
            fetch_openai_weights(clip, progress=False)
    assert str((tmp_path / "cache" / "w.pt").resolve()) in str(info.value)
    assert not info.value.transient and "dataset.source_dir" not in str(info.value)


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------
def tiny_params(**clip) -> dict:
    params = yaml.safe_load(render_params_yaml())
    params["clip"]["toy"].update(TINY, steps=6, batch_size=16, warmup_steps=2, n_images=48, n_holdout=32)
    params["clip"].update(clip)
    params["model"]["stages"] = [[1, 1], [2, 2]]
    return params


@pytest.fixture
def project(tmp_path, monkeypatch, mlflow_uri, prefect_harness):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def the_run(uri):
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("cascade-clip").experiment_id],
                               filter_string=f"tags.`{TAG_STAGE}` = 'backbone'")  # not its pipeline's parent run
    return client, run


def run_backbone(*argv):
    return run_stage(backbone_stage.NAME, backbone_stage.main, backbone_stage.SECTIONS, list(argv))


def test_stage_toy_source_writes_weights_metrics_curve_and_a_run(project, mlflow_uri):
    params = tiny_params()
    params["dataset"]["demo"]["rotation"] = 90.0
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_backbone() == 0
    arch, state, meta = load_backbone(project / "artifacts/backbone")
    assert meta["source"] == "toy" and arch["vision_cfg"]["layers"] == 2
    assert meta["pretraining"]["metrics"]["zero_shot_chance"] == pytest.approx(1 / 16)
    assert meta["pretraining"]["world_rotation"] == 90.0  # dataset.demo.rotation: the world it learned
    assert (project / "artifacts/backbone/stage_params.yaml").exists()
    metrics = json.loads((project / backbone_stage.METRICS).read_text())
    for key in ("zero_shot_acc", "zero_shot_acc_seen", "zero_shot_acc_unseen", "compositional_triples",
                "cos/red_circle/red_square", "pretrain_final_loss", "parameters"):
        assert key in metrics, key
    rows = list(csv.DictReader((project / backbone_stage.CURVE).open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))

    client, run = the_run(mlflow_uri)
    assert run.info.status == "FINISHED" and run.data.tags[TAG_STAGE] == "backbone"
    assert run.data.tags["clip.sha256"] == meta["sha256"]
    assert run.data.params["clip.source"] == "toy" and run.data.params["clip.toy.steps"] == "6"
    assert "text.batch_size" not in run.data.params and "dataset.name" not in run.data.params
    assert run.data.params["dataset.demo.rotation"] == "90.0"  # the one dataset param it reads
    assert run.data.metrics["zero_shot_acc"] == metrics["zero_shot_acc"]
    history = client.get_metric_history(run.info.run_id, "pretrain_loss")
    assert sorted(m.step for m in history) == list(range(1, 7))
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [float(r["loss"]) for r in rows]


def test_stage_file_source_copies_the_checkpoint_into_the_local_format(project, mlflow_uri):
    torch.save(tiny_clip().state_dict(), project / "mine.pt")
    write_arch(project)
    params = tiny_params(source="file", file="mine.pt", arch="tiny-clip.json")
    (project / "file.yaml").write_text(yaml.safe_dump(params))
    assert run_backbone("--params", "file.yaml") == 0
    arch, state, meta = load_backbone(project / "artifacts/backbone")
    assert meta["source"] == "file" and meta["source_sha256"] == sha256(project / "mine.pt")
    assert_same_weights(state, tiny_clip())
    assert (project / backbone_stage.CURVE).read_text().strip() == "step,loss,lr,logit_scale"
    _, run = the_run(mlflow_uri)
    assert run.data.metrics["parameters"] == meta["parameters"]


def test_stage_openai_source_offline_fails_naming_the_file_and_writes_nothing(project, mlflow_uri, capsys):
    params = tiny_params(source="openai", download=False)
    (project / "openai.yaml").write_text(yaml.safe_dump(params))
    assert run_backbone("--params", "openai.yaml") == 1
    message = capsys.readouterr().err.split("error [backbone]: ", 1)[1]  # what run_stage prints last
    assert str(project / "data/cache/clip/ViT-B-16.pt") in message and "openaipublic" in message
    assert not (project / "artifacts").exists()
    _, run = the_run(mlflow_uri)
    assert run.info.status == "FAILED"


@pytest.mark.parametrize(("plan", "transient"), [(["503"], True), (["429"], True), (["cut:100"], True),
                                                 (["404"], False)])
def test_only_passing_download_failures_are_retried(tmp_path, plan, transient):
    # pipeline.data.download decides what is worth another try; the backbone stage's task retries those
    with FileServer(b"weights" * 100, plan=plan) as server:
        clip = ClipConfig(source="openai", cache_dir=tmp_path / "cache", url=server.url("w.pt"))
        with pytest.raises(WeightsUnavailable, match="download failed") as info:
            fetch_openai_weights(clip, progress=False)
    assert info.value.transient is transient and "dataset.source_dir" not in str(info.value)


def test_an_offline_machine_is_not_worth_retrying(tmp_path):
    clip = ClipConfig(source="openai", cache_dir=tmp_path / "cache", url="http://no-such-host.invalid/w.pt")
    with pytest.raises(WeightsUnavailable, match="is unknown") as info:
        fetch_openai_weights(clip, progress=False)
    assert not info.value.transient and "curl" in str(info.value)
