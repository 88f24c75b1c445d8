"""CLIP through open_clip: architecture configs, random construction and strict weight loading.

An "arch config" is a plain dict in open_clip's model-config format
(`embed_dim`, `vision_cfg`, `text_cfg`, `quick_gelu`). Nothing here downloads anything.
"""

from __future__ import annotations

import copy
import logging
import pickle
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import open_clip
import torch
from open_clip.model import CLIP

from pipeline.config import ClipConfig, ToyClipConfig
from pipeline.model.state import load_state_strict

log = logging.getLogger(__name__)

TOY_VOCAB_SIZE = 49408  # the CLIP BPE vocabulary, so open_clip's tokenizer works unchanged
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")  # ints stored in OpenAI JIT archives
_JIT_DERIVED_KEYS = ("attn_mask",)  # buffers a TorchScript state_dict includes that open_clip rebuilds itself


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
    """Arch config for a `ClipConfig`: the toy CLIP's, or open_clip's bundled config for `clip.arch`."""
    if clip.source == "toy":
        return toy_arch(clip.toy)
    return named_arch(clip.arch)


def named_arch(name: str) -> dict:
    """open_clip's bundled model config for an architecture name such as "ViT-B-16-quickgelu"."""
    arch = open_clip.get_model_config(name)
    if arch is None:
        known = ", ".join(n for n in open_clip.list_models() if n.startswith("ViT-"))
        raise ValueError(f"unknown open_clip architecture {name!r}; bundled ViT configs: {known}")
    return copy.deepcopy(arch)


def create_clip(arch: Mapping) -> CLIP:
    """A randomly initialised open_clip CLIP for `arch` (nothing is downloaded)."""
    arch = copy.deepcopy(dict(arch))
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


def read_clip_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read CLIP weights: an OpenAI JIT archive or an open_clip state dict (.pt/.bin/.safetensors).

    A {"state_dict": ...} wrapper and a "module." key prefix are removed, as are the integer
    entries OpenAI archives carry (input_resolution, context_length, vocab_size).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CLIP checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = _read_torch_file(path)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    for key in _OPENAI_EXTRA_KEYS:
        state.pop(key, None)
    return state


def _read_torch_file(path: Path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the only reader
            archive = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError:
        pass  # not a TorchScript archive: a plain torch.save file
    else:
        log.info("%s: read as a TorchScript (OpenAI JIT) archive", path)
        state = dict(archive.state_dict())
        for key in _JIT_DERIVED_KEYS:
            state.pop(key, None)
        return state
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path}: not a TorchScript archive and not loadable with weights_only=True: {exc}") from None
