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


def encoder_depth(clip: CLIP) -> int:
    """Blocks of the CLIP's vision transformer."""
    return len(clip.visual.transformer.resblocks)


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
    """Wire a CascadeCLIP from an open_clip CLIP for the given stages, aggregator and prompting.

    Every entry of `stages` gets its own aggregator, class-query projection and decoder; a range
    listed twice is tapped once and decoded twice.
    """
    visual = clip.visual
    depth = encoder_depth(clip)
    width, dim = visual.proj.shape
    # a stage may repeat (several decoders on the same feature, Table 7); the distinct ones must be valid
    distinct = list(dict.fromkeys(stages))
    check_stage_ranges(distinct, depth)
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
    tap_blocks = [b for start, end in distinct for b in range(start, end + 1) if b != depth]
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
    """The paper's model: the configured stages (model.stages, else derived from the depth), aggregator and prompts."""
    stages = model_cfg.stages_for(encoder_depth(clip))
    return assemble(model_cfg, clip, arch, stages=stages, aggregator=model_cfg.aggregator, prompts=True)


def build_zegclip(model_cfg: ModelConfig, clip: CLIP, arch: dict) -> CascadeCLIP:
    """ZegCLIP baseline: one stage, the last block only."""
    depth = encoder_depth(clip)
    return assemble(model_cfg, clip, arch, stages=[(depth, depth)], aggregator=model_cfg.aggregator, prompts=True)


def build_fusion(model_cfg: ModelConfig, clip: CLIP, arch: dict) -> CascadeCLIP:
    """Multi-layer fusion (Fig. 2b): every block of the configured stages summed into one feature, one decoder."""
    stages = model_cfg.stages_for(encoder_depth(clip))
    span = (stages[0][0], stages[-1][1])
    return assemble(model_cfg, clip, arch, stages=[span], aggregator="sum", prompts=True)


def build_multi_decoder_last(model_cfg: ModelConfig, clip: CLIP, arch: dict) -> CascadeCLIP:
    """Table 7 "Last-layer" (paper Sec. 4.4, "Cascade-CLIP vs. other methods with multi-decoder").

    Cascade-CLIP's decoders without its cascade: one independent decoder per configured stage
    (three for the paper's {6-8}, {9-11}, {12}), but every decoder is fed the LAST block's features.
    Each decoder keeps its own class-query projection, and the decoders' masks are summed and
    upsampled exactly as the cascade's. Same decoders, projections and prompts as `cascade`, so the
    trainable count equals Cascade-CLIP's ("equivalent parameter amounts", 40.5M in Table 7) less
    the NGA weights, which a single block has nothing to aggregate with (6 for the paper's stages).
    """
    depth = encoder_depth(clip)
    stages = [(depth, depth)] * len(model_cfg.stages_for(depth))
    return assemble(model_cfg, clip, arch, stages=stages, aggregator=model_cfg.aggregator, prompts=True)


def build_multi_decoder_fusion(model_cfg: ModelConfig, clip: CLIP, arch: dict) -> CascadeCLIP:
    """Table 7 "Multi-layer fusion" (paper Sec. 4.4, "Cascade-CLIP vs. other methods with multi-decoder").

    The features of the same blocks Cascade-CLIP uses (every block of the configured stages, 6-12
    for the paper's) are fused directly, by plain sum as in Fig. 2(b) and the `fusion` variant, into
    ONE feature; one independent decoder per configured stage (three) is fed that same fused
    feature, each with its own class-query projection, and their masks are summed as the cascade's.
    Trainable count: Cascade-CLIP's less the NGA weights (6), which direct fusion does not have.
    """
    stages = model_cfg.stages_for(encoder_depth(clip))
    span = (stages[0][0], stages[-1][1])
    return assemble(model_cfg, clip, arch, stages=[span] * len(stages), aggregator="sum", prompts=True)


def build_frozen(model_cfg: ModelConfig, clip: CLIP, arch: dict) -> CascadeCLIP:
    """Frozen CLIP (Table 10): the cascade without visual prompts."""
    stages = model_cfg.stages_for(encoder_depth(clip))
    return assemble(model_cfg, clip, arch, stages=stages, aggregator=model_cfg.aggregator, prompts=False)


VARIANTS: dict[str, Callable[[ModelConfig, CLIP, dict], CascadeCLIP]] = {
    "cascade": build_cascade,
    "zegclip": build_zegclip,
    "fusion": build_fusion,
    "frozen": build_frozen,
    "multi_decoder_last": build_multi_decoder_last,
    "multi_decoder_fusion": build_multi_decoder_fusion,
}


def build_model(
    model_cfg: ModelConfig,
    arch: dict,
    clip_state: Mapping[str, torch.Tensor] | None = None,
) -> CascadeCLIP:
    """The model of `model_cfg.variant` on a CLIP of `arch` (random when `clip_state` is None).

    With `clip_state`, the model's `clip_keys` name the state-dict entries that are that checkpoint's
    tensors unchanged (model files can then refer to the checkpoint instead of copying them)."""
    if model_cfg.variant not in VARIANTS:
        raise ValueError(f"unknown variant {model_cfg.variant!r}; valid: {', '.join(VARIANTS)}")
    clip = create_clip(arch)
    if clip_state is None:
        return VARIANTS[model_cfg.variant](model_cfg, clip, arch)
    load_clip_state(clip, clip_state)
    loaded = {id(tensor) for tensor in clip.state_dict(keep_vars=True).values()}
    model = VARIANTS[model_cfg.variant](model_cfg, clip, arch)
    # the checkpoint's tensors the model uses as they are (not the resized position embedding)
    model.clip_keys = frozenset(k for k, v in model.state_dict(keep_vars=True).items() if id(v) in loaded)
    return model
