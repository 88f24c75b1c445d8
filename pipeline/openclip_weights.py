"""Source open_clip: any plain open_clip ViT, its weights fetched and loaded by open_clip itself.

    clip.model        an open_clip model-config name (ViT-B-16, ViT-L-14, ...)
    clip.pretrained   an open_clip pretrained tag of clip.model (laion2b_s34b_b88k, openai, ...), an
                      hf-hub: name (its open_clip_config.json must describe clip.model's architecture),
                      or a local checkpoint file

The architecture is `pipeline.model.clip.openclip_arch` (a plain ViT, checked by `check_arch` before
anything is fetched). The weights file is fetched into clip.cache_dir by open_clip's own downloaders
(its pretrained table's URL or Hugging Face hub entry), its sha256 is checked against clip.sha256 when
given and recorded, and `open_clip.create_model(clip.model, pretrained=<that file>)` loads it strictly.
Pixel mean/std come from the weights' preprocessing config (the tag's, or the hub repo's), so the
`backbone` normalisation of the training stages uses what these weights were trained with.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP
from open_clip.pretrained import download_pretrained_from_hf

from pipeline.config import ClipConfig
from pipeline.io import sha256_file
from pipeline.model.clip import check_arch, create_clip, openclip_arch
from pipeline.weights import Pretrained, WeightsError, WeightsUnavailable, verify_sha256

log = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
HUB_CONFIG_FILE = "open_clip_config.json"


def is_hub_name(pretrained: str) -> bool:
    """Whether clip.pretrained names a Hugging Face hub repository (hf-hub:org/name)."""
    return pretrained.startswith(HF_HUB_PREFIX)


def pretrained_tag(clip: ClipConfig) -> dict[str, Any]:
    """open_clip's pretrained-table entry of clip.pretrained for clip.model ({} when it is no tag)."""
    if is_hub_name(clip.pretrained):
        return {}
    return dict(open_clip.get_pretrained_cfg(clip.model, clip.pretrained) or {})


def rooted_paths(clip: ClipConfig, root) -> dict[str, str]:
    """The ClipConfig update that resolves source open_clip's local checkpoint file (clip.pretrained when
    it is neither a tag nor a hub name) with `root` (a callable: project-relative path -> absolute)."""
    if clip.pretrained and not is_hub_name(clip.pretrained) and not pretrained_tag(clip):
        return {"pretrained": str(root(clip.pretrained))}
    return {}


# --------------------------------------------------------------------------------------------
# the checkpoint file
# --------------------------------------------------------------------------------------------
def openclip_checkpoint(clip: ClipConfig) -> tuple[Path, dict[str, Any]]:
    """Source open_clip's checkpoint: fetched into clip.cache_dir by open_clip (tag or hub) or a local
    file, sha256-verified against clip.sha256 when set, and a description for clip.json."""
    cache_dir = str(clip.cache_dir)
    tag = pretrained_tag(clip)
    if is_hub_name(clip.pretrained):
        repo = clip.pretrained[len(HF_HUB_PREFIX):]
        path = _fetch(lambda: download_pretrained_from_hf(repo, cache_dir=cache_dir), clip)
        origin = {"source_hub": clip.pretrained}
    elif tag:
        path = _fetch(lambda: open_clip.download_pretrained(tag, cache_dir=cache_dir), clip)
        origin = {"source_tag": clip.pretrained, "source_url": tag.get("url") or f"hf-hub:{tag.get('hf_hub', '')}"}
    elif Path(clip.pretrained).is_file():
        path, origin = clip.pretrained, {}
    else:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(clip.model)) or "none"
        raise WeightsError(f"clip.pretrained: {clip.pretrained!r} is neither an open_clip pretrained tag of "
                           f"{clip.model} (its tags: {tags}), nor an hf-hub: name, nor an existing file")
    path = Path(path)
    if clip.sha256:
        digest = verify_sha256(path, clip.sha256, fix="Check clip.pretrained and clip.sha256 (a damaged cached "
                                                      "file: delete it to fetch it again)")
    else:
        digest = sha256_file(path)
    return path, {**origin, "source_file": str(path), "source_sha256": digest}


def _fetch(download, clip: ClipConfig) -> str:
    """Run one of open_clip's downloaders; a failure becomes `WeightsUnavailable` saying how to go on."""
    try:
        path = download()
    except Exception as exc:  # open_clip and huggingface_hub raise many kinds; all mean "not fetched"
        passing = (TimeoutError, ConnectionError)  # worth the stage's retries; a 404 or no such repo is not
        transient = isinstance(exc, passing) or isinstance(exc.__cause__, passing)
        raise WeightsUnavailable(
            f"open_clip could not fetch {clip.model} weights {clip.pretrained!r} into {Path(clip.cache_dir).resolve()} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). On a machine with internet "
            f"run the backbone stage once (or open_clip.create_model('{clip.model}', pretrained='{clip.pretrained}', "
            f"cache_dir=...)) and copy the cache folder here, or set clip.pretrained to the checkpoint file's path",
            transient=transient) from exc
    if not path:
        raise WeightsUnavailable(f"open_clip has no download for {clip.model} weights {clip.pretrained!r}")
    return path


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
def load_openclip(clip: ClipConfig, *, progress: bool = True) -> Pretrained:
    """Source open_clip: the checked architecture, its weights fetched and loaded strictly by open_clip."""
    del progress  # open_clip's downloaders show their own progress
    arch = openclip_arch(clip.model, clip.pretrained)
    hub_preprocess = _check_hub_config(clip, arch) if is_hub_name(clip.pretrained) else {}
    path, details = openclip_checkpoint(clip)
    try:
        model = open_clip.create_model(
            clip.model, pretrained=str(path), cache_dir=str(clip.cache_dir),
            force_quick_gelu=bool(arch.get("quick_gelu")), precision="fp32", device="cpu",
        )
    except (RuntimeError, ValueError, KeyError) as exc:
        problems = " ".join(str(exc).split())  # torch lists every missing, unexpected and misshaped key
        raise WeightsError(f"{path} does not fit open_clip model {clip.model}: {problems[:2000]}") from None
    _check_built_as(model, arch, clip.model)
    mean, std = _pixel_statistics(pretrained_tag(clip) or hub_preprocess, model)
    details = {"arch_name": clip.model, "open_clip_model": clip.model, "open_clip_pretrained": clip.pretrained,
               "mean": mean, "std": std, **details}
    return Pretrained(arch=arch, model=model.float().eval(), details=details)


def _check_hub_config(clip: ClipConfig, arch: dict) -> dict:
    """The hub repository's architecture must be clip.model's; returns the repo's preprocessing config."""
    repo = clip.pretrained[len(HF_HUB_PREFIX):]
    cache_dir = str(clip.cache_dir)
    path = _fetch(lambda: download_pretrained_from_hf(repo, filename=HUB_CONFIG_FILE, cache_dir=cache_dir), clip)
    data = json.loads(Path(path).read_text())
    hub_arch = check_arch(data.get("model_cfg", data), source=f"{clip.pretrained}/{HUB_CONFIG_FILE}")
    if _without_quick_gelu(hub_arch) != _without_quick_gelu(arch):
        raise WeightsError(f"clip.pretrained {clip.pretrained}: its architecture ({HUB_CONFIG_FILE}) is not clip.model "
                           f"{clip.model}'s; set clip.model to the matching open_clip config")
    if hub_arch.get("quick_gelu"):
        arch["quick_gelu"] = True
    return dict(data.get("preprocess_cfg") or {})


def _without_quick_gelu(arch: dict) -> dict:
    return {k: v for k, v in arch.items() if k != "quick_gelu"}


def _check_built_as(model: torch.nn.Module, arch: dict, name: str) -> None:
    """open_clip's model must be what `arch` rebuilds (every later stage builds it from clip.json)."""
    if not isinstance(model, CLIP):
        raise WeightsError(f"open_clip built {type(model).__name__} for {name}, not a plain CLIP")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in create_clip(arch).state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if expected != actual:
        differ = sorted(set(expected) ^ set(actual)) or sorted(k for k in expected if expected[k] != actual[k])
        raise WeightsError(f"open_clip's {name} differs from its recorded architecture at {', '.join(differ[:5])}")


def _pixel_statistics(preprocess: dict, model: CLIP) -> tuple[list[float], list[float]]:
    """Mean and std (0..1 scale) the weights were trained with: their preprocessing config, else open_clip's."""
    own = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = preprocess.get("mean") or own.get("mean") or open_clip.constants.OPENAI_DATASET_MEAN
    std = preprocess.get("std") or own.get("std") or open_clip.constants.OPENAI_DATASET_STD
    return [float(m) for m in mean], [float(s) for s in std]
