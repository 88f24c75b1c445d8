"""CLIP weights in one local format, whatever their source.

    <folder>/clip.safetensors   the full open_clip CLIP state dict, float32
    <folder>/clip.json          arch (open_clip model config), image_size, mean/std (0..1 scale),
                                source, sha256 of clip.safetensors, parameter counts, and the
                                source's own details (file, url, checksum, toy pretraining figures)

Sources (params clip.source): `openai` fetches OpenAI's checkpoint for clip.arch into
clip.cache_dir (sha256 checked; clip.url / clip.sha256 override OpenAI's URL and checksum; an
interrupted download resumes from its `.part` file: pipeline.data.download does the fetching and
hashing), `file` reads a local open_clip state dict.
TorchScript archives (OpenAI's JIT .pt) and full pickles can run code when loaded: they are read
only with clip.allow_pickle, or when their sha256 is that of OpenAI's own file for clip.arch.
Every architecture read from a file is checked by `pipeline.model.clip.check_arch` before anything
is built. The toy CLIP is trained by pipeline.engine.pretrain and saved here with `save_backbone`.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote, urlparse

import open_clip
import torch
from open_clip.model import CLIP
from safetensors.torch import load_file

from pipeline.config import ClipConfig
from pipeline.data.download import (
    ChecksumError,
    DownloadError,
    RetryPolicy,
    TransientDownloadError,
    download,
    verify_file,
)
from pipeline.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from pipeline.errors import CascadeError
from pipeline.io import sha256_file, write_safetensors
from pipeline.model.backbone_ref import BACKBONE_FILE, BackboneRef
from pipeline.model.clip import (
    arch_config,
    check_arch,
    create_clip,
    load_clip_state,
    named_arch,
    read_clip_checkpoint,
)
from pipeline.model.state import StateDictError, check_state_dict

log = logging.getLogger(__name__)

WEIGHTS_FILE = BACKBONE_FILE  # the weights file of a backbone folder
META_FILE = "clip.json"
FORMAT_VERSION = 1
CLIP_MEAN, CLIP_STD = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # pixel statistics every source here uses (0..1 scale)
OPENAI_TAG = "openai"
# one try per call, no retries here: the backbone stage's task retries (each resuming the `.part` file)
DOWNLOAD_POLICY = RetryPolicy(retries=0, timeout=60)


class WeightsError(CascadeError, ValueError):
    """CLIP weights that are missing, damaged (checksum) or do not fit their architecture."""


class WeightsUnavailable(WeightsError):
    """Weights that are neither in the cache nor downloadable; `transient` says whether retrying may help."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class Backbone(NamedTuple):
    arch: dict  # open_clip model config
    state: dict[str, torch.Tensor]  # full CLIP state dict, float32
    meta: dict  # clip.json


def verify_sha256(path: Path, expected: str, *, fix: str) -> str:
    """The file's sha256 (pipeline.data.download.verify_file); `WeightsError` naming both hashes and `fix`
    when it differs from `expected`."""
    try:
        return verify_file(path, None, {"sha256": expected.lower()}, fix=fix)["sha256"]
    except ChecksumError as exc:
        raise WeightsError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# architectures
# --------------------------------------------------------------------------------------------
def resolve_arch(clip: ClipConfig) -> dict:
    """The open_clip model config: the toy CLIP's, a bundled one by name, or a model-config .json file."""
    if clip.source == "toy":
        return arch_config(clip)
    if clip.arch.endswith(".json"):
        path = Path(clip.arch)
        if not path.is_file():
            raise WeightsError(f"clip.arch: model config {path} not found")
        try:
            arch = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise WeightsError(f"{path}: not an open_clip model config (not valid JSON: {exc}); check clip.arch") from None
        return check_arch(arch, source=str(path))
    try:
        return named_arch(clip.arch)
    except ValueError as exc:
        raise WeightsError(f"clip.arch: {exc}") from None


# --------------------------------------------------------------------------------------------
# source openai: OpenAI's checkpoint in the cache, downloaded when missing
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Download:
    url: str
    path: Path  # where the file is kept: clip.cache_dir / the URL's file name
    sha256: str | None  # expected checksum (None: not checked)


def openai_download(clip: ClipConfig) -> Download:
    """Where source openai's file comes from and is kept, and its checksum (clip.url / clip.sha256 override)."""
    url = clip.url or open_clip.get_pretrained_url(clip.arch, OPENAI_TAG)
    if not url:
        known = ", ".join(sorted(open_clip.list_pretrained_models_by_tag(OPENAI_TAG)))
        raise WeightsError(f"open_clip knows no OpenAI weights for clip.arch {clip.arch!r}; architectures with "
                           f"OpenAI weights: {known}. Or set clip.url (with clip.sha256) to fetch another file")
    name = Path(unquote(urlparse(url).path)).name
    if not name:
        raise WeightsError(f"clip.url {url!r} does not end in a file name")
    return Download(url=url, path=Path(clip.cache_dir) / name, sha256=clip.sha256 or _sha256_in_url(url))


def openai_sha256(arch: str) -> str | None:
    """The sha256 of OpenAI's own checkpoint of `arch` (from open_clip's URL); None where OpenAI published none."""
    url = open_clip.get_pretrained_url(arch, OPENAI_TAG)
    return _sha256_in_url(url) if url else None


def _sha256_in_url(url: str) -> str | None:
    """OpenAI's URLs carry the file's sha256 as the folder name (.../models/<sha256>/ViT-B-16.pt)."""
    folder = Path(urlparse(url).path).parent.name
    return folder.lower() if re.fullmatch(r"[0-9a-fA-F]{64}", folder) else None


def fetch_openai_weights(clip: ClipConfig, *, progress: bool = True) -> Path:
    """The path of source openai's checkpoint in clip.cache_dir: checked if present, else downloaded.

    Raises `WeightsUnavailable` (naming the path, the URL and how to place the file by hand) when
    the file is absent and cannot be downloaded, `WeightsError` when its checksum differs.
    """
    spec = openai_download(clip)
    if spec.path.is_file():
        if spec.sha256:
            verify_sha256(spec.path, spec.sha256,
                          fix=f"The file is damaged or not the OpenAI checkpoint of {clip.arch}: delete it to download "
                              "it again, or set clip.sha256 if you mean to use this file")
        log.info("using cached CLIP weights %s", spec.path)
        return spec.path
    if not clip.download:
        raise WeightsUnavailable(_absent_message(clip, spec, "clip.download is false"))
    checksums = {"sha256": spec.sha256.lower()} if spec.sha256 else {}
    try:  # a file that fails its checksum is deleted, so the next call downloads afresh
        download(spec.url, spec.path, checksums=checksums, policy=DOWNLOAD_POLICY, progress=progress,
                 keep_corrupt=False)
    except ChecksumError as exc:
        raise WeightsError(f"{spec.url}: the downloaded file does not match: {exc.failure}; nothing was kept. "
                           "Check clip.url / clip.sha256") from None
    except DownloadError as exc:  # what failed; the advice is the cache's (`_absent_message`), not a dataset's
        raise WeightsUnavailable(_absent_message(clip, spec, f"download failed: {exc.failure}"),
                                 transient=isinstance(exc, TransientDownloadError)) from exc
    except OSError as exc:  # a local error (the cache folder cannot be written); network errors are DownloadErrors
        raise WeightsUnavailable(_absent_message(clip, spec, f"download failed: {type(exc).__name__}: {exc}")) from exc
    return spec.path


def _absent_message(clip: ClipConfig, spec: Download, reason: str) -> str:
    checksum = f" (sha256 {spec.sha256})" if spec.sha256 else ""
    return (
        f"CLIP weights for {clip.arch} are not in the cache and could not be fetched ({reason}).\n"
        f"  expected file: {spec.path.resolve()}\n"
        f"  it comes from: {spec.url}\n"
        f"Place it by hand: on a machine with internet run\n"
        f"    curl -L -o {spec.path.name} '{spec.url}'\n"
        f"then copy {spec.path.name}{checksum} to {spec.path.resolve()} and run the stage again. "
        f"Or use a checkpoint you already have: clip.source: file, clip.file: <path>."
    )


# --------------------------------------------------------------------------------------------
# sources openai and file: checkpoint -> model, strictly
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pretrained:
    arch: dict
    model: CLIP  # float32, eval mode, weights loaded strictly
    details: dict[str, Any]  # where the weights came from (for clip.json)


def checkpoint_path(clip: ClipConfig, *, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """The local checkpoint of source openai, file or open_clip, checksum-verified, and its description."""
    if clip.source == "open_clip":
        from pipeline.openclip_weights import openclip_checkpoint  # imported late: it imports this module

        return openclip_checkpoint(clip)
    if clip.source == "openai":
        path = fetch_openai_weights(clip, progress=progress)
        spec = openai_download(clip)
        return path, {"source_url": spec.url, "source_file": str(path), "source_sha256": sha256_file(path)}
    if clip.source == "file":
        path = Path(clip.file)
        if not path.is_file():
            raise WeightsError(f"clip.file: {path} not found; give the path of an open_clip checkpoint "
                               "(.safetensors or .pt; an OpenAI JIT .pt needs clip.allow_pickle: true)")
        if clip.sha256:
            digest = verify_sha256(path, clip.sha256, fix="Check clip.file and clip.sha256")
        else:
            digest = sha256_file(path)
        return path, {"source_file": str(path), "source_sha256": digest}
    raise WeightsError(f"clip.source {clip.source!r} has no checkpoint file (the toy CLIP is pretrained, not loaded)")


def load_pretrained(clip: ClipConfig, *, progress: bool = True) -> Pretrained:
    """Source openai or file: fetch/verify the checkpoint, read it, load it strictly into clip.arch.

    A TorchScript archive or full pickle is read only with clip.allow_pickle, or when it is OpenAI's own
    checkpoint of clip.arch (its sha256 is the one in OpenAI's URL). Source open_clip: pipeline.openclip_weights.
    """
    if clip.source == "open_clip":
        from pipeline.openclip_weights import load_openclip  # imported late: it imports this module

        return load_openclip(clip, progress=progress)
    arch = resolve_arch(clip)
    path, details = checkpoint_path(clip, progress=progress)
    official = clip.source == "openai" and details["source_sha256"] == openai_sha256(clip.arch)
    try:
        with warnings.catch_warnings():
            if official:  # OpenAI's own file, verified by its sha256: no "trusted files only" warning
                warnings.filterwarnings("ignore", message=".*allow_pickle", category=UserWarning)
            state = read_clip_checkpoint(path, allow_pickle=clip.allow_pickle or official)
    except (ValueError, RuntimeError) as exc:
        raise WeightsError(f"{path}: cannot be read as CLIP weights: {exc}") from None
    model = create_clip(arch)
    try:
        load_clip_state(model, {k: _float32(v) for k, v in state.items()})
    except StateDictError as exc:
        raise WeightsError(f"{path} does not fit architecture {clip.arch}: {exc}") from None
    return Pretrained(arch=arch, model=model.float().eval(), details={"arch_name": clip.arch, **details})


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


# --------------------------------------------------------------------------------------------
# the local format
# --------------------------------------------------------------------------------------------
def parameter_counts(model: CLIP) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    visual = sum(p.numel() for p in model.visual.parameters())
    return {"parameters": total, "parameters_visual": visual, "parameters_text": total - visual}


def save_backbone(folder: Path, arch: Mapping, model: CLIP, *, source: str, details: Mapping[str, Any] | None = None) -> dict:
    """Write clip.safetensors and clip.json into `folder` (which must exist); returns the metadata."""
    state = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    weights = folder / WEIGHTS_FILE
    write_safetensors(state, weights, {"format": "pt", "source": source})
    meta = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "arch": dict(arch),
        "image_size": int(_image_size(arch)),
        "patch_size": int(arch["vision_cfg"].get("patch_size", 0)),
        "context_length": int(arch["text_cfg"].get("context_length", 77)),
        "embed_dim": int(arch["embed_dim"]),
        "vision_layers": int(arch["vision_cfg"]["layers"]),
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
        "sha256": sha256_file(weights),
        "size_bytes": weights.stat().st_size,
        **parameter_counts(model),
        **dict(details or {}),
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def _image_size(arch: Mapping) -> int:
    size = arch["vision_cfg"].get("image_size", 224)
    return size[0] if isinstance(size, (list, tuple)) else size


def read_backbone_meta(folder: str | Path) -> dict:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise WeightsError(f"{path}: backbone metadata not found; run `dvc repro backbone` first")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise WeightsError(f"{path}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}; re-run `dvc repro backbone`")
    return meta


def load_backbone(folder: str | Path) -> Backbone:
    """(arch, state, meta) of a backbone folder: sha256 verified, every key and shape checked against arch."""
    folder = Path(folder)
    meta = read_backbone_meta(folder)
    arch = check_arch(meta.get("arch"), source=str(folder / META_FILE))
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise WeightsError(f"{weights}: backbone weights not found; run `dvc repro backbone` first")
    verify_sha256(weights, meta["sha256"],
                  fix=f"The weights were changed or damaged after {META_FILE} recorded their sha256; re-run "
                      "`dvc repro backbone`")
    state = load_file(str(weights), device="cpu")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in create_clip(arch).state_dict().items()}
    try:
        check_state_dict(expected, state, source=str(weights))
    except StateDictError as exc:
        raise WeightsError(str(exc)) from None
    return Backbone(arch=arch, state=state, meta=meta)


def build_clip(backbone: Backbone) -> CLIP:
    """The open_clip CLIP of a loaded backbone, float32, in eval mode."""
    model = create_clip(backbone.arch)
    load_clip_state(model, backbone.state)
    return model.eval()


def backbone_reference(folder: str | Path, *, recorded_as: str | Path) -> BackboneRef:
    """The reference a model file built on the backbone in `folder` keeps instead of its CLIP tensors
    (`recorded_as`: the folder's path relative to the project root, as the stages name it)."""
    meta = read_backbone_meta(folder)
    return BackboneRef.of_file(Path(folder) / WEIGHTS_FILE, recorded_as=Path(recorded_as) / WEIGHTS_FILE,
                               source=f"{meta.get('source', '?')} {meta.get('arch_name') or ''}".strip())
