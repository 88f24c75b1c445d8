"""CLIP through open_clip: architecture configs, random construction and strict weight loading.

An "arch config" is a plain dict in open_clip's model-config format
(`embed_dim`, `vision_cfg`, `text_cfg`, `quick_gelu`). Nothing here downloads anything: `check_arch`
admits only the keys of a plain ViT CLIP (no Hugging Face or timm towers, which open_clip and timm
would fetch from the internet) with sizes in plausible ranges, and every CLIP is built through it.
"""

from __future__ import annotations

import copy
import logging
import pickle
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP

from pipeline.config import ClipConfig, ToyClipConfig
from pipeline.errors import CascadeError
from pipeline.model.state import load_state_strict

log = logging.getLogger(__name__)

TOY_VOCAB_SIZE = 49408  # the CLIP BPE vocabulary, so open_clip's tokenizer works unchanged
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")  # ints stored in OpenAI JIT archives
_JIT_DERIVED_KEYS = ("attn_mask",)  # buffers a TorchScript state_dict includes that open_clip rebuilds itself


class ArchError(CascadeError, ValueError):
    """An arch config (a file's metadata, clip.json, a model-config .json) that is not a plain, sane ViT CLIP."""


# The keys of a plain ViT CLIP, each with its kind: (low, high) for an int, ("float", low, high), a set of
# choices, or bool. The caps admit every OpenAI and LAION ViT up to ViT-bigG-14 (width 1664, 48 blocks) and
# refuse what would allocate absurd amounts of memory. Anything else (hf_*, timm_*, act/norm kwargs, ...) is
# refused: some of those make open_clip or timm download weights or build towers this package cannot read.
_SIDE = (1, 4096)
_ARCH_KEYS: dict[str, Any] = {"embed_dim": (1, 4096), "quick_gelu": bool, "vision_cfg": dict, "text_cfg": dict}
_VISION_KEYS: dict[str, Any] = {
    "image_size": _SIDE,  # or [height, width]
    "layers": (1, 64),
    "width": (1, 2048),
    "head_width": (1, 512),
    "mlp_ratio": ("float", 0.25, 16.0),
    "patch_size": (1, 256),
    "pool_type": {"tok", "avg"},
    "no_ln_pre": bool,
    "final_ln_after_pool": bool,
    "ls_init_value": ("float", 0.0, 10.0),
}
_TEXT_KEYS: dict[str, Any] = {
    "context_length": (1, 1024),
    "vocab_size": (1, 1 << 18),
    "width": (1, 2048),
    "heads": (1, 64),
    "layers": (1, 64),
    "mlp_ratio": ("float", 0.25, 16.0),
    "pool_type": {"argmax", "first", "last"},
    "no_causal_mask": bool,
    "embed_cls": bool,
    "pad_id": (0, 1 << 18),
    "eos_id": (0, 1 << 18),
    "ls_init_value": ("float", 0.0, 10.0),
}
_DOWNLOAD_MARKS = ("hf_", "timm_", "pretrained")  # keys that name remote models or weights


def check_arch(arch: Any, *, source: str) -> dict:
    """`arch` itself if it is a plain ViT CLIP config with sane sizes, else `ArchError` naming `source` and the key.

    Every path that builds a CLIP from a file (model files, clip.json, a model-config .json) calls this
    before building, so a file cannot make open_clip or timm download anything or allocate without bound.
    """
    if not isinstance(arch, Mapping):
        raise ArchError(f"{source}: arch: expected an open_clip model config (a mapping), got {type(arch).__name__}; "
                        "write the file again with this version")
    _check_keys(arch, _ARCH_KEYS, "arch", source)
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in arch:
            raise ArchError(f"{source}: arch.{key}: missing; an open_clip model config needs embed_dim, vision_cfg "
                            "and text_cfg")
    vision, text = arch["vision_cfg"], arch["text_cfg"]
    _check_keys(vision, _VISION_KEYS, "arch.vision_cfg", source)
    _check_keys(text, _TEXT_KEYS, "arch.text_cfg", source)
    width, head_width = vision.get("width", 768), vision.get("head_width", 64)
    if width % head_width:
        raise ArchError(f"{source}: arch.vision_cfg.width: {width} is not a multiple of head_width {head_width}")
    if text.get("width", 512) % text.get("heads", 8):
        raise ArchError(f"{source}: arch.text_cfg.width: {text.get('width', 512)} is not a multiple of heads "
                        f"{text.get('heads', 8)}")
    return dict(arch)


def _check_keys(cfg: Any, allowed: Mapping[str, Any], where: str, source: str) -> None:
    if not isinstance(cfg, Mapping):
        raise ArchError(f"{source}: {where}: expected a mapping, got {type(cfg).__name__}")
    for key, value in cfg.items():
        path = f"{where}.{key}"
        if key not in allowed:
            why = (" (it names a remote model or weights, which open_clip or timm would download)"
                   if any(mark in str(key) for mark in _DOWNLOAD_MARKS) else "")
            raise ArchError(f"{source}: {path}: not allowed in a CLIP architecture{why}; allowed keys here: "
                            f"{', '.join(allowed)}. Use a file written by this package or a plain ViT model config")
        problem = _value_problem(key, value, allowed[key])
        if problem:
            raise ArchError(f"{source}: {path}: {problem} (got {value!r}); the file is damaged or not for this package")


def _value_problem(key: str, value: Any, kind: Any) -> str | None:
    """What is wrong with one value of an arch config (None: nothing)."""
    if kind is dict:
        return None if isinstance(value, Mapping) else "expected a mapping"
    if kind is bool:
        return None if isinstance(value, bool) else "expected true or false"
    if isinstance(kind, set):
        return None if value in kind else f"expected one of {', '.join(sorted(kind))}"
    if kind[0] == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and kind[1] <= value <= kind[2]
        return None if ok else f"expected a number in {kind[1]}..{kind[2]}"
    low, high = kind
    values = value if key == "image_size" and isinstance(value, list) and len(value) == 2 else [value]
    ok = all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in values)
    return None if ok else f"expected an integer in {low}..{high}" + (" (or two)" if key == "image_size" else "")


def toy_arch(toy: ToyClipConfig) -> dict:
    """The open_clip model config of the toy CLIP (QuickGELU, like OpenAI's models)."""
    return {
        "embed_dim": toy.embed_dim,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": toy.image_size,
            "layers": toy.layers,
            "width": toy.width,
            "patch_size": toy.patch_size,
            "head_width": toy.head_width,
            "pool_type": toy.pool,
        },
        "text_cfg": {
            "context_length": toy.context_length,
            "vocab_size": TOY_VOCAB_SIZE,
            "width": toy.text_width,
            "heads": toy.text_heads,
            "layers": toy.text_layers,
        },
    }


def arch_config(clip: ClipConfig) -> dict:
    """Arch config for a `ClipConfig`: the toy CLIP's, source open_clip's (`openclip_arch`), or open_clip's
    bundled config for `clip.arch`."""
    if clip.source == "toy":
        return toy_arch(clip.toy)
    if clip.source == "open_clip":
        return openclip_arch(clip.model, clip.pretrained)
    return named_arch(clip.arch)


def openclip_arch(model: str, pretrained: str | None = None) -> dict:
    """The arch config of source open_clip, read without downloading anything: open_clip's config for
    the name `model` (bundled, or added with open_clip.add_model_config), with quick_gelu set as
    `pretrained`'s tag was trained (open_clip's pretrained table), checked to be a plain ViT."""
    arch = open_clip.get_model_config(model)
    if arch is None:
        known = ", ".join(n for n in open_clip.list_models() if _is_plain_vit(open_clip.get_model_config(n)))
        raise ArchError(f"clip.model: unknown open_clip model {model!r}; plain ViT configs: {known}")
    problem = _plain_vit_problem(arch)
    if problem:
        raise ArchError(f"clip.model: {model!r} is not a plain ViT CLIP ({problem}); Cascade-CLIP prompts and taps "
                        "the blocks of open_clip's own VisionTransformer: use a ViT config such as ViT-B-16, "
                        "ViT-L-14 or ViT-H-14")
    arch = copy.deepcopy(dict(arch))
    tag = open_clip.get_pretrained_cfg(model, pretrained) if pretrained else {}
    if tag.get("quick_gelu") and not arch.get("quick_gelu"):
        arch["quick_gelu"] = True  # the weights were trained with QuickGELU (OpenAI's): build them so
    return check_arch(arch, source=f"open_clip model {model}")


def _plain_vit_problem(arch: Any) -> str | None:
    """Why an open_clip model config is not a plain ViT CLIP (None: it is one, up to `check_arch`'s details)."""
    if not isinstance(arch, Mapping):
        return "no model config"
    vision, text = arch.get("vision_cfg") or {}, arch.get("text_cfg") or {}
    if "timm_model_name" in vision:
        return f"its image tower is timm's {vision['timm_model_name']}"
    if isinstance(vision.get("layers"), (list, tuple)):
        return "its image tower is a ResNet"
    if "multimodal_cfg" in arch:
        return "it is a captioning model (CoCa)"
    if "hf_model_name" in text or "hf_tokenizer_name" in text:
        return "its text tower or tokenizer comes from Hugging Face"
    if arch.get("custom_text"):
        return "it has open_clip's custom text tower, not CLIP's"
    return None


def _is_plain_vit(arch: Any) -> bool:
    """Whether source open_clip accepts this model config (for listing the valid names)."""
    if _plain_vit_problem(arch) is not None:
        return False
    try:
        check_arch(arch, source="open_clip")
    except ArchError:
        return False
    return True


def named_arch(name: str) -> dict:
    """open_clip's bundled model config for an architecture name such as "ViT-B-16-quickgelu"."""
    arch = open_clip.get_model_config(name)
    if arch is None:
        known = ", ".join(n for n in open_clip.list_models() if n.startswith("ViT-"))
        raise ValueError(f"unknown open_clip architecture {name!r}; bundled ViT configs: {known}")
    return copy.deepcopy(arch)


def create_clip(arch: Mapping) -> CLIP:
    """A randomly initialised open_clip CLIP for `arch`, checked by `check_arch` first (nothing is downloaded)."""
    arch = copy.deepcopy(check_arch(arch, source="CLIP architecture"))
    return CLIP(
        embed_dim=arch.pop("embed_dim"),
        vision_cfg=arch.pop("vision_cfg"),
        text_cfg=arch.pop("text_cfg"),
        quick_gelu=arch.pop("quick_gelu", False),
        **arch,
    )


def make_tokenizer(arch: Mapping) -> open_clip.tokenizer.SimpleTokenizer:
    """CLIP's BPE tokenizer with the context length of `arch`'s text tower."""
    return open_clip.tokenizer.SimpleTokenizer(context_length=arch["text_cfg"].get("context_length", 77))


def load_clip_state(model: CLIP, state_dict: Mapping[str, torch.Tensor], allow_missing: Iterable[str] = ()) -> None:
    """Copy `state_dict` into `model`, checking every key and shape (all problems in one error)."""
    load_state_strict(model, state_dict, source="CLIP checkpoint", allow_missing=allow_missing)


def read_clip_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read CLIP weights: an open_clip state dict (.safetensors, or .pt/.bin saved with torch.save) or,
    with `allow_pickle`, an OpenAI JIT (TorchScript) archive or a file that needs full unpickling.

    TorchScript archives and pickles can run code when loaded, so without `allow_pickle` they are
    refused with a `ValueError` that says what the file is; `torch.jit.load` is never reached then.
    A {"state_dict": ...} wrapper and a "module." key prefix are removed, as are the integer
    entries OpenAI archives carry (input_resolution, context_length, vocab_size).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CLIP checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    elif is_torchscript(path):
        state = _read_torchscript(path, allow_pickle)
    else:
        state = _read_torch_file(path, allow_pickle)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    for key in (*_OPENAI_EXTRA_KEYS, *_JIT_DERIVED_KEYS):
        state.pop(key, None)
    return state


def is_torchscript(path: Path) -> bool:
    """Whether `path` is a TorchScript archive (a zip with compiled code), found without loading it."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())


_CONVERT = ("or convert it once, where you trust it, to a .safetensors state dict (its state_dict() saved with "
            "safetensors.torch.save_file) and point clip.file at that")


def _read_torchscript(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise ValueError(f"{path}: a TorchScript archive (such as OpenAI's JIT .pt), which can run code when loaded; "
                         f"set clip.allow_pickle: true only if you trust the file, {_CONVERT}")
    warnings.warn(f"{path}: loading a TorchScript archive (allow_pickle); only do this for trusted files", stacklevel=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the only reader
        archive = torch.jit.load(str(path), map_location="cpu")
    log.info("%s: read as a TorchScript (OpenAI JIT) archive", path)
    return dict(archive.state_dict())


def _read_torch_file(path: Path, allow_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            raise ValueError(f"{path}: holds pickled objects besides tensors, which can run code when loaded "
                             f"({str(exc).splitlines()[0]}); set clip.allow_pickle: true only if you trust the "
                             f"file, {_CONVERT}") from None
    warnings.warn(f"{path}: loading with full unpickling (allow_pickle); only do this for trusted files", stacklevel=3)
    return torch.load(path, map_location="cpu", weights_only=False)
