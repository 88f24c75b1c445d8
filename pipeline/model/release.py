"""Import a checkpoint of the authors' release (mmsegmentation EncoderDecoder) into our format.

The release's layout is backbone.* (prompted CLIP ViT), decode_head.* (NGA weights, class-query
projections, cascade decoders) and text_encoder.* (CLIP text tower). Its decoder layers are
torch TransformerDecoderLayers whose forward never calls self_attn or norm1, and only the last
layer's attention logits reach the output, so that layer's v, proj, FFN and norms have no effect.
Those weights are dropped (and counted); anything else that does not map is an error.
"""

from __future__ import annotations

import logging
import pickle
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from pipeline.config import ModelConfig
from pipeline.model.build import build_model
from pipeline.model.checkpoint import write_model_file
from pipeline.model.presets import preset_arch, preset_model_config
from pipeline.model.state import StateDictError, check_state_dict

log = logging.getLogger(__name__)

_DECODER = r"decode_head\.cascade_decoders\.(\d+)\.layers\.(\d+)\."

# (release key pattern, our key template); the first match wins
KEY_MAP: list[tuple[str, str]] = [
    (r"backbone\.proj_layers$", "encoder.tap_proj"),
    (r"backbone\.ln_layers\.(\d+)\.(weight|bias)$", r"encoder.tap_norms.\1.\2"),
    (r"backbone\.prompt_proj\.(weight|bias)$", r"encoder.prompts.proj.\1"),
    (r"backbone\.prompt_norm\.(weight|bias)$", r"encoder.prompts.norm.\1"),
    (r"backbone\.(class_embedding|positional_embedding|proj)$", r"encoder.\1"),
    (r"backbone\.((?:conv1|ln_pre|ln_post|transformer)\..+)$", r"encoder.\1"),
    (r"decode_head\.weights_s(\d+)$", "head.aggregators.{s_minus_1}.weights"),
    (r"decode_head\.q_projs\.(\d+)\.(weight|bias)$", r"head.text_projs.\1.\2"),
    (_DECODER + r"multihead_attn\.(q|k|v|proj)\.(weight|bias)$", r"head.decoders.\1.layers.\2.\3.\4"),
    (_DECODER + r"linear1\.(weight|bias)$", r"head.decoders.\1.layers.\2.ffn_in.\3"),
    (_DECODER + r"linear2\.(weight|bias)$", r"head.decoders.\1.layers.\2.ffn_out.\3"),
    (_DECODER + r"norm2\.(weight|bias)$", r"head.decoders.\1.layers.\2.attn_norm.\3"),
    (_DECODER + r"norm3\.(weight|bias)$", r"head.decoders.\1.layers.\2.ffn_norm.\3"),
    (r"text_encoder\.(.+)$", r"text_encoder.\1"),
]
_PROMPT_SETS = ("backbone.prompt_embeddings", "backbone.deep_prompt_embeddings")  # concatenated into one tensor


def _dropped_reason(key: str, num_layers: int) -> str | None:
    """Why a release key is dropped, or None when it must be mapped."""
    if key == "decode_head.loss_decode.criterion.empty_weight":
        return "loss buffer empty_weight"
    match = re.match(_DECODER + r"(.+)$", key)
    if match is None:
        return None
    layer, rest = int(match.group(2)), match.group(3)
    if rest.startswith("self_attn."):
        return "decoder self_attn (never called)"
    if rest.startswith("norm1."):
        return "decoder norm1 (never called)"
    if layer == num_layers - 1 and re.match(r"(multihead_attn\.(v|proj)|linear1|linear2|norm2|norm3)\.", rest):
        return "last-layer v/proj/FFN/norms (no effect on the output)"
    return None


def _map_key(key: str) -> str | None:
    for pattern, template in KEY_MAP:
        match = re.match(pattern, key)
        if match is None:
            continue
        if "{s_minus_1}" in template:
            return template.format(s_minus_1=int(match.group(1)) - 1)
        return match.expand(template)
    return None


def convert_release_state(
    state: Mapping[str, torch.Tensor], model_cfg: ModelConfig, arch: dict, *, source: str = "release checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Map a release state dict to ours; returns (our state dict, dropped-key counts by reason).

    Raises StateDictError listing every release key that neither maps nor is a known dead weight,
    and every key of our model left missing or with the wrong shape.
    """
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    ours: dict[str, torch.Tensor] = {}
    dropped: Counter[str] = Counter()
    unknown: list[str] = []
    for key, value in state.items():
        if key in _PROMPT_SETS:
            continue
        reason = _dropped_reason(key, model_cfg.decoder_layers)
        if reason is not None:
            dropped[reason] += 1
            continue
        target = _map_key(key)
        if target is None:
            unknown.append(key)
        else:
            ours[target] = value
    if all(k in state for k in _PROMPT_SETS):
        ours["encoder.prompts.embeddings"] = torch.cat([state[k] for k in _PROMPT_SETS], dim=0)
    elif any(k in state for k in _PROMPT_SETS):
        unknown.extend(k for k in _PROMPT_SETS if k in state)
    if unknown:
        listed = "\n".join(f"    {k}" for k in unknown)
        raise StateDictError(f"{source}: {len(unknown)} release key(s) map to nothing in our model:\n{listed}")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in build_model(model_cfg, arch).state_dict().items()}
    check_state_dict(expected, ours, source=source)
    return ours, dict(dropped)


def release_model_config(model_cfg: ModelConfig) -> ModelConfig:
    """`model_cfg` with the release's behaviour: cascade, double CLS, stored random taps kept frozen."""
    return model_cfg.model_copy(
        update={"variant": "cascade", "release_double_cls": True, "tap_init": "random", "tap_trainable": False}
    )


def read_release_checkpoint(src: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of an mmseg checkpoint {'meta', 'state_dict', 'optimizer'} (or a bare state dict)."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: release checkpoint not found")
    try:
        checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            raise ValueError(
                f"{src}: cannot be read with weights_only=True (it pickles other objects: {str(exc).splitlines()[0]}); "
                "pass allow_pickle=True only if you trust the file"
            ) from None
        warnings.warn(f"{src}: loading with full unpickling (allow_pickle=True); only do this for trusted files", stacklevel=2)
        checkpoint = torch.load(src, map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"{src}: expected an mmseg checkpoint with a 'state_dict', got {type(checkpoint).__name__}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def import_release_checkpoint(
    src: str | Path,
    out: str | Path,
    preset: str | None = None,
    allow_pickle: bool = False,
    *,
    model_cfg: ModelConfig | None = None,
    arch: dict | None = None,
) -> dict:
    """Convert a release checkpoint to our model file; returns a summary dict.

    `preset` (voc12, coco, context59; demo for the toy arch) picks the model config and CLIP
    architecture; `model_cfg` and `arch` (open_clip format) replace either, for checkpoints of any
    other size (preset None: both must be given). Release-compatible behaviour is switched on
    (double CLS, stored random taps kept frozen).
    """
    if preset is None and (model_cfg is None or arch is None):
        raise ValueError("give a preset, or both model_cfg and arch")
    model_cfg = release_model_config(model_cfg if model_cfg is not None else preset_model_config(preset))
    arch = arch if arch is not None else preset_arch(preset)
    state = read_release_checkpoint(src, allow_pickle=allow_pickle)
    ours, dropped = convert_release_state(state, model_cfg, arch, source=str(src))
    log.info(
        "%s: dropped %d unused release tensors: %s",
        src, sum(dropped.values()), ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items())),
    )
    path = write_model_file(ours, model_cfg, arch, out)
    return {
        "source": str(src),
        "out": str(path),
        "preset": preset,
        "release_tensors": len(state),
        "imported_tensors": len(ours),
        "dropped": dropped,
        "model_config": model_cfg.model_dump(mode="json"),
    }
