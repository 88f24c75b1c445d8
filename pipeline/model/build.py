"""Builders: a plain dict of named variants, each wiring already-built parts into a CascadeCLIP."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from open_clip.model import CLIP
from torch import nn

from pipeline.config import ModelConfig, check_stage_ranges
from pipeline.model.aggregation import AggregatorKind, build_aggregator
from pipeline.model.cascade import CascadeCLIP
from pipeline.model.clip import create_clip, load_clip_state
from pipeline.model.decoder import StageDecoder
from pipeline.model.head import CascadeHead
from pipeline.model.image_encoder import PromptedVisionEncoder
from pipeline.model.prompts import DeepVisualPrompts
from pipeline.model.text_encoder import TextEncoder


def encoder_grid(model_cfg: ModelConfig, clip: CLIP) -> tuple[int, int] | None:
    """Token grid the position embedding is resized to at build (None keeps CLIP's)."""
    if model_cfg.image_size is None:
        return None
    patch = clip.visual.patch_size[0]
    return (model_cfg.image_size // patch, model_cfg.image_size // patch)


def assemble(
    model_cfg: ModelConfig,
    clip: CLIP,
    arch: dict,
    *,
    stages: list[tuple[int, int]],
    aggregator: AggregatorKind,
    prompts: bool,
) -> CascadeCLIP:
    """Wire a CascadeCLIP from an open_clip CLIP for the given stages, aggregator and prompting."""
    visual = clip.visual
    depth = len(visual.transformer.resblocks)
    width, dim = visual.proj.shape
    check_stage_ranges(stages, depth)
    use_prompts = prompts and model_cfg.prompt_tokens > 0
    deep_prompts = (
        DeepVisualPrompts(
            depth=depth,
            num_tokens=model_cfg.prompt_tokens,
            width=width,
            patch_size=visual.patch_size[0],
            dropout=model_cfg.prompt_dropout,
        )
        if use_prompts
        else None
    )
    tap_blocks = [b for start, end in stages for b in range(start, end + 1) if b != depth]
    encoder = PromptedVisionEncoder(
        visual=visual,
        grid=encoder_grid(model_cfg, clip),
        prompts=deep_prompts,
        tap_blocks=tap_blocks,
        tap_init=model_cfg.tap_init,
        release_double_cls=model_cfg.release_double_cls,
    )
    num_projs = 1 if model_cfg.shared_text_proj else len(stages)
    head = CascadeHead(
        stages=stages,
        aggregators=[
            build_aggregator(aggregator, num_blocks=end - start + 1, dim=dim, sigma=model_cfg.nga_sigma, heads=model_cfg.decoder_heads)
            for start, end in stages
        ],
        text_projs=[nn.Linear(2 * dim, dim) for _ in range(num_projs)],
        decoders=[
            StageDecoder(
                dim=dim,
                heads=model_cfg.decoder_heads,
                num_layers=model_cfg.decoder_layers,
                ffn_ratio=model_cfg.decoder_ffn_ratio,
                dropout=model_cfg.decoder_dropout,
            )
            for _ in stages
        ],
    )
    return CascadeCLIP(encoder=encoder, head=head, text_encoder=TextEncoder(clip=clip), model_cfg=model_cfg, arch=dict(arch))


def build_cascade(model_cfg: ModelConfig, clip: CLIP, arch: dict) -> CascadeCLIP:
    """The paper's model: the configured stages, aggregator and prompts."""
    stages = [tuple(s) for s in model_cfg.stages]
    return assemble(model_cfg, clip, arch, stages=stages, aggregator=model_cfg.aggregator, prompts=True)


def build_zegclip(model_cfg: ModelConfig, clip: CLIP, arch: dict) -> CascadeCLIP:
    """ZegCLIP baseline: one stage, the last block only."""
    depth = len(clip.visual.transformer.resblocks)
    return assemble(model_cfg, clip, arch, stages=[(depth, depth)], aggregator=model_cfg.aggregator, prompts=True)


def build_fusion(model_cfg: ModelConfig, clip: CLIP, arch: dict) -> CascadeCLIP:
    """Multi-layer fusion (Fig. 2b): every block of the configured stages summed into one feature, one decoder."""
    span = (model_cfg.stages[0][0], model_cfg.stages[-1][1])
    return assemble(model_cfg, clip, arch, stages=[span], aggregator="sum", prompts=True)


def build_frozen(model_cfg: ModelConfig, clip: CLIP, arch: dict) -> CascadeCLIP:
    """Frozen CLIP (Table 10): the cascade without visual prompts."""
    stages = [tuple(s) for s in model_cfg.stages]
    return assemble(model_cfg, clip, arch, stages=stages, aggregator=model_cfg.aggregator, prompts=False)


VARIANTS: dict[str, Callable[[ModelConfig, CLIP, dict], CascadeCLIP]] = {
    "cascade": build_cascade,
    "zegclip": build_zegclip,
    "fusion": build_fusion,
    "frozen": build_frozen,
}


def build_model(
    model_cfg: ModelConfig,
    arch: dict,
    clip_state: Mapping[str, torch.Tensor] | None = None,
) -> CascadeCLIP:
    """The model of `model_cfg.variant` on a CLIP of `arch` (random when `clip_state` is None)."""
    if model_cfg.variant not in VARIANTS:
        raise ValueError(f"unknown variant {model_cfg.variant!r}; valid: {', '.join(VARIANTS)}")
    clip = create_clip(arch)
    if clip_state is not None:
        load_clip_state(clip, clip_state)
    return VARIANTS[model_cfg.variant](model_cfg, clip, arch)
