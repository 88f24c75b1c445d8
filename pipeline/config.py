"""Typed parameters: params.yaml parsed into one validated `Params` object.

Every field carries a one-line docstring (shown by `cascade-clip params`). Unknown keys, wrong
types and invalid values raise `ParamsError`, whose message names each key path, what is wrong
and the valid choices, before any stage does work.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import CascadeError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"
PRESETS_DIR = REPO_ROOT / "presets"
ABLATIONS_FILE = "ablations.yaml"  # in PRESETS_DIR: the ablation grids (pipeline.experiments), not a preset
DEMO_PRESET = "demo"  # model preset without a file: the schema defaults (the demo world)
IGNORE_INDEX = 255  # label value for "no class" in every prepared label map


class ParamsError(CascadeError, ValueError):
    """params.yaml (or a preset / override) is invalid; the message lists every problem."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


# --------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------
class DemoConfig(Section):
    n_train: int = Field(1200, ge=1)
    """number of training images generated for the demo world"""
    n_val: int = Field(200, ge=1)
    """number of validation images generated for the demo world"""
    image_size: int = Field(96, ge=32, le=1024)
    """side of the square demo images, in pixels"""
    min_objects: int = Field(1, ge=1)
    """fewest objects drawn in one image"""
    max_objects: int = Field(3, ge=1)
    """most objects drawn in one image"""
    min_object_size: float = Field(0.3, gt=0, le=1)
    """smallest object size, as a fraction of the image side"""
    max_object_size: float = Field(0.5, gt=0, le=1)
    """largest object size, as a fraction of the image side"""
    rotation: float = Field(0.0, ge=0, le=360)
    """range in degrees of each object's random turn around upright (0 = upright, 360 = any orientation); the toy CLIP is pretrained on the same world"""
    workers: int = Field(2, ge=1)
    """processes drawing images in parallel"""

    @model_validator(mode="after")
    def _ranges(self) -> DemoConfig:
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) must be <= max_objects ({self.max_objects})")
        if self.min_object_size > self.max_object_size:
            raise ValueError("min_object_size must be <= max_object_size")
        return self


def catalog_dataset(name: str, *, real: bool = False) -> str:
    """`name` if pipeline/data/catalog.yaml has it (real=True: a dataset built from official files),
    else a ValueError listing the valid choices. The catalog is the one list of dataset names."""
    from pipeline.data.catalog import dataset_names  # light (reads catalog.yaml); imported late: no cycle

    names = dataset_names(real=real)
    if name not in names:
        raise ValueError(f"invalid value {name!r}; valid choices: {', '.join(map(repr, names))}")
    return name


def catalog_class_count(name: str) -> int:
    """The number of classes of catalog dataset `name` (for model presets: counted in FLOPs)."""
    from pipeline.data.catalog import get_dataset  # light (reads catalog.yaml); imported late: no cycle

    return len(get_dataset(name).classes)


class SourceMirror(Section):
    url: str
    """where to download the source file from instead of the catalog's URL (http:// or https://)"""
    md5: str | None = None
    """md5 of the file served there (at least one of md5 and sha256)"""
    sha256: str | None = None
    """sha256 of the file served there"""
    size: int | None = Field(None, ge=1)
    """its size in bytes (null = not checked)"""

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{url!r} is not an http:// or https:// URL; for a file you already have, use dataset.source_dir")
        return url

    @model_validator(mode="after")
    def _checksum(self) -> SourceMirror:
        if not (self.md5 or self.sha256):
            raise ValueError("a mirror needs the md5 or sha256 of the file it serves: a file from another place is only "
                             "used when its checksum is known")
        return self


class DatasetConfig(Section):
    name: str = "demo"
    """dataset from the catalog (pipeline/data/catalog.yaml)"""
    unseen_split: str | None = None
    """named unseen-class split from the catalog; null = the dataset's default split"""
    source_dir: Path | None = None
    """folder with archives or extracted files you already have (real datasets only)"""
    cache_dir: Path = Path("data/cache")
    """where downloads are kept between runs"""
    download: bool = True
    """fetch source files missing from source_dir and cache_dir from their official URLs (false = fail listing them)"""
    download_retries: int = Field(5, ge=0)
    """tries after a transient network error, per file (the budget renews while bytes keep arriving)"""
    download_backoff: float = Field(2.0, ge=0)
    """seconds before the first retry of a download; doubles after each failed try (at most 300)"""
    download_timeout: float = Field(60.0, gt=0)
    """seconds a download connection may stay silent before the try counts as failed"""
    verify_checksums: bool = True
    """check source archives' sizes and checksums against the catalog before use"""
    workers: int = Field(2, ge=1)
    """processes converting a real dataset's images and labels in parallel"""
    mirrors: dict[str, SourceMirror] = {}
    """per source file of the dataset (its catalog name, e.g. voc2012, sbd): another URL and the checksum of the file served there; every source not listed comes from the catalog's URL, checked against the catalog's checksum"""
    demo: DemoConfig = DemoConfig()
    """size and drawing settings of the synthetic demo world"""

    @field_validator("name")
    @classmethod
    def _in_catalog(cls, name: str) -> str:
        return catalog_dataset(name)

    @model_validator(mode="after")
    def _mirrored_sources(self) -> DatasetConfig:
        if self.mirrors:
            from pipeline.data.catalog import get_dataset  # light (reads catalog.yaml); imported late: no cycle

            sources = list(get_dataset(self.name).extra.get("sources") or {})
            unknown = sorted(set(self.mirrors) - set(sources))
            if unknown:
                raise ValueError(f"mirrors: {', '.join(unknown)} not a source of dataset {self.name!r}; its sources: "
                                 f"{', '.join(sources) or 'none (it is drawn, not downloaded)'}")
        return self


# --------------------------------------------------------------------------------------------
# clip
# --------------------------------------------------------------------------------------------
class ToyClipConfig(Section):
    embed_dim: int = Field(64, ge=8)
    """joint image-text embedding width"""
    image_size: int = Field(64, ge=16)
    """input side the toy CLIP is pretrained at, in pixels"""
    patch_size: int = Field(8, ge=2)
    """ViT patch side, in pixels"""
    width: int = Field(64, ge=8)
    """vision transformer width"""
    layers: int = Field(12, ge=1)
    """vision transformer blocks (12 keeps the paper's stage split)"""
    head_width: int = Field(32, ge=8)
    """vision attention head width (heads = width / head_width)"""
    text_width: int = Field(64, ge=8)
    """text transformer width"""
    text_layers: int = Field(4, ge=1)
    """text transformer blocks"""
    text_heads: int = Field(4, ge=1)
    """text attention heads"""
    context_length: int = Field(24, ge=8)
    """text context length in tokens"""
    pool: Literal["tok", "avg"] = "tok"
    """image embedding (open_clip pool_type): tok = the class token, as OpenAI's CLIP; avg = the mean of the patch tokens"""
    steps: int = Field(600, ge=1)
    """contrastive pretraining steps"""
    batch_size: int = Field(96, ge=2)
    """image-caption pairs per pretraining step"""
    lr: float = Field(2e-3, gt=0)
    """peak AdamW learning rate of the pretraining"""
    warmup_steps: int = Field(40, ge=0)
    """linear warm-up steps before cosine decay"""
    n_images: int = Field(4000, ge=16)
    """captioned images generated for pretraining"""
    single_object_fraction: float = Field(1.0, ge=0, le=1)
    """share of pretraining images with one object (one-object captions teach shape fastest)"""
    max_objects: int = Field(3, ge=2)
    """most objects in a multi-object pretraining image (they have 2..max_objects)"""
    min_object_size: float = Field(0.45, gt=0, le=1)
    """smallest pretraining object, as a fraction of the image side"""
    max_object_size: float = Field(0.75, gt=0, le=1)
    """largest pretraining object, as a fraction of the image side"""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay of the pretraining (not applied to gains, biases and the logit scale)"""
    n_holdout: int = Field(320, ge=1)
    """held-out single-object images for the zero-shot check, spread evenly over the classes"""
    threads: int = Field(2, ge=0)
    """CPU threads torch uses while pretraining (0 = torch's default)"""

    @model_validator(mode="after")
    def _sizes(self) -> ToyClipConfig:
        if self.min_object_size > self.max_object_size:
            raise ValueError("min_object_size must be <= max_object_size")
        if self.width % self.head_width:
            raise ValueError(f"width ({self.width}) must be a multiple of head_width ({self.head_width})")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        return self


class ClipConfig(Section):
    source: Literal["toy", "openai", "file", "open_clip"] = "toy"
    """where CLIP weights come from: pretrain a toy CLIP on the demo world, OpenAI's ViT-B/16, a local file, or open_clip (clip.model + clip.pretrained)"""
    arch: str = "ViT-B-16-quickgelu"
    """open_clip architecture name (or path of an open_clip model-config .json) used with source openai or file"""
    file: Path | None = None
    """local checkpoint (OpenAI JIT .pt or open_clip state dict) for source file"""
    sha256: str | None = None
    """expected sha256 of the checkpoint file; null = not checked (openai: the one in OpenAI's URL)"""
    cache_dir: Path = Path("data/cache/clip")
    """where downloaded CLIP weights are kept"""
    url: str | None = None
    """download URL of source openai's weights (http:// or https:// only); null = OpenAI's URL for clip.arch"""
    download: bool = True
    """fetch missing openai weights from the internet; false = only use a file already in cache_dir"""
    allow_pickle: bool = False
    """read a checkpoint that is a TorchScript archive or a full pickle (both can run code when loaded: trusted files only); OpenAI's own files, verified by their sha256, are read without it"""
    model: str = "ViT-B-16"
    """open_clip model-config name of source open_clip: any plain ViT (ViT-B-16, ViT-L-14, ViT-H-14, ...)"""
    pretrained: str | None = None
    """weights of source open_clip: an open_clip pretrained tag of clip.model (laion2b_s34b_b88k, openai, ...), an hf-hub: name, or a local checkpoint file"""
    toy: ToyClipConfig = ToyClipConfig()
    """architecture and pretraining of the toy CLIP (source toy)"""

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"{url!r} is not an http:// or https:// URL; give the weights' web address, or use a "
                                 "local file with clip.source: file, clip.file: <path>")
        return url

    @model_validator(mode="after")
    def _file_given(self) -> ClipConfig:
        if self.source == "file" and self.file is None:
            raise ValueError("source is 'file' but clip.file is not set; give the path of a local checkpoint")
        if self.source == "open_clip" and not self.pretrained:
            raise ValueError("source is 'open_clip' but clip.pretrained is not set; give an open_clip pretrained tag "
                             "of clip.model (e.g. laion2b_s34b_b88k), an hf-hub: name or a local checkpoint file")
        return self


# --------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------
class TextConfig(Section):
    templates: Literal["dataset", "single", "paper15", "custom"] = "dataset"
    """prompt-template set: the dataset's own (catalog), a named set, or custom_templates"""
    custom_templates: list[str] = []
    """templates with one '{}' for the class name, used when templates is 'custom'"""
    batch_size: int = Field(256, ge=1)
    """prompts encoded per forward pass of the text tower"""
    per_template: bool = False
    """also write every (class, template) embedding, [C, T, D], as per_template.npy"""

    @model_validator(mode="after")
    def _custom(self) -> TextConfig:
        if self.templates == "custom" and not self.custom_templates:
            raise ValueError("templates is 'custom' but custom_templates is empty")
        for t in self.custom_templates:
            if t.count("{}") != 1:
                raise ValueError(f"custom template {t!r} must contain exactly one '{{}}'")
        return self


# --------------------------------------------------------------------------------------------
# model and loss
# --------------------------------------------------------------------------------------------
# The model variants' names; pipeline.model.build.VARIANTS maps each to its builder (a test keeps
# the two equal; the list stays here because the model package imports this module, not the reverse).
Variant = Literal["cascade", "zegclip", "fusion", "frozen", "multi_decoder_last", "multi_decoder_fusion"]


class ModelConfig(Section):
    variant: Variant = "cascade"
    """named builder: cascade (the paper), zegclip (one stage {12}), fusion (taps fused, one decoder), frozen (no prompts), multi_decoder_last / multi_decoder_fusion (Table 7: three decoders on block 12 / on the sum of blocks 6-12)"""
    stages: list[tuple[int, int]] | None = None
    """cascade stages as inclusive 1-based block ranges, ordered and inside the encoder depth; null = from the depth (12 blocks: the paper's [6,8],[9,11],[12,12]; else the same fractions, see depth_stages)"""
    aggregator: Literal["nga", "nga_fixed", "sum", "trainable_sum", "concat", "attention"] = "nga"
    """how a stage merges its blocks' features (Table 8): nga = trainable NGA (the paper's), nga_fixed = Gaussian weights kept fixed"""
    nga_sigma: float = Field(1.0, gt=0)
    """sigma of the Neighborhood Gaussian Aggregation initial weights"""
    prompt_tokens: int = Field(10, ge=0)
    """deep visual prompt tokens per block (VOC 10, Context 35, COCO 50)"""
    prompt_dropout: float = Field(0.1, ge=0, lt=1)
    """dropout on the projected prompts"""
    shared_text_proj: bool = False
    """one Linear(2D->D) for all stages instead of one per stage (ablation, Table 9)"""
    decoder_layers: int = Field(3, ge=1)
    """cross-attention layers per stage decoder"""
    decoder_heads: int = Field(8, ge=1)
    """attention heads in each decoder layer"""
    decoder_ffn_ratio: int = Field(4, ge=1)
    """FFN hidden width as a multiple of the decoder width"""
    decoder_dropout: float = Field(0.1, ge=0, lt=1)
    """dropout in decoder attention and FFN"""
    tap_init: Literal["random", "clip"] = "random"
    """tap LayerNorm/projection init: random as in the release, or copied from CLIP's ln_post/proj"""
    tap_trainable: bool = False
    """train the tap LayerNorms and projections (frozen in the release)"""
    release_double_cls: bool = False
    """add the class embedding to the CLS token twice, as the authors' release does"""
    image_size: int | None = Field(None, ge=16)
    """input side in pixels whose token grid the CLIP position embedding is resized to at build (null = CLIP's own)"""

    @model_validator(mode="after")
    def _stages(self) -> ModelConfig:
        if self.stages is not None:
            check_stage_ranges(self.stages)
        return self

    def stages_for(self, depth: int) -> list[tuple[int, int]]:
        """The stages used on an encoder of `depth` blocks: model.stages, else `depth_stages(depth)`."""
        if self.stages is None:
            return depth_stages(depth)
        check_stage_ranges(self.stages, depth)
        return [tuple(stage) for stage in self.stages]


def depth_stages(depth: int) -> list[tuple[int, int]]:
    """The paper's stage split scaled to an encoder of `depth` blocks.

    The paper taps a 12-block ViT as {6-8}, {9-11}, {12}: stages start at 1/2 and 3/4 of the depth
    and the last block is a stage of its own. The same fractions (rounded down, at least block 1)
    give {12-17}, {18-23}, {24} for 24 blocks, {16-23}, {24-31}, {32} for 32 and {3}, {4-5}, {6}
    for 6; boundaries that coincide at small depths merge ({1}, {2} for 2 blocks, {1} for 1).
    """
    if depth < 1:
        raise ValueError(f"an encoder has at least one block, got depth {depth}")
    starts = sorted({max(1, depth // 2), max(1, 3 * depth // 4), depth})
    ends = [start - 1 for start in starts[1:]] + [depth]
    return list(zip(starts, ends))


def check_stage_ranges(stages: list[tuple[int, int]], depth: int | None = None) -> None:
    """Stages must be non-empty, ordered, non-overlapping ranges of 1-based blocks inside `depth`."""
    if not stages:
        raise ValueError("stages is empty; give at least one block range such as [[12, 12]]")
    previous_end = 0
    for start, end in stages:
        if start < 1 or end < start:
            raise ValueError(f"stage [{start}, {end}] is not a range of 1-based blocks with start <= end")
        if start <= previous_end:
            raise ValueError(f"stage [{start}, {end}] overlaps or precedes the stage before it (ends at block {previous_end})")
        if depth is not None and end > depth:
            raise ValueError(f"stage [{start}, {end}] goes past the encoder depth ({depth} blocks); valid blocks are 1..{depth}")
        previous_end = end


class LossConfig(Section):
    focal_weight: float = Field(100.0, ge=0)
    """weight of the sigmoid focal loss (beta in Table 18)"""
    dice_weight: float = Field(1.0, ge=0)
    """weight of the dice loss (alpha in Table 18)"""
    focal_alpha: float = Field(0.25, ge=0, le=1)
    """focal loss alpha"""
    focal_gamma: float = Field(2.0, ge=0)
    """focal loss gamma"""
    aux_weight: float = Field(0.0, ge=0)
    """weight of auxiliary losses on every decoder layer's masks (0 = off, as the release)"""


# --------------------------------------------------------------------------------------------
# training, pseudo-labels, self-training, evaluation, tracking
# --------------------------------------------------------------------------------------------
class TrainConfig(Section):
    iterations: int = Field(600, ge=1)
    """optimiser steps (VOC 20k, Context 40k, COCO 80k in the paper)"""
    batch_size: int = Field(8, ge=1)
    """images per step per process"""
    grad_accum: int = Field(1, ge=1)
    """micro-batches accumulated per optimiser step"""
    lr: float = Field(1e-3, gt=0)
    """base AdamW learning rate (2e-5 in the paper at batch 16)"""
    lr_mult: float = Field(10.0, gt=0)
    """learning-rate multiplier of prompts and decode head"""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay"""
    weight_decay_rule: Literal["release", "no_norms"] = "release"
    """which parameters decay: release = every trainable one (norms, prompt embeddings, NGA weights too); no_norms = not those"""
    warmup_iters: int = Field(50, ge=0)
    """linear warm-up iterations (1500 in the paper)"""
    warmup_ratio: float = Field(1e-6, gt=0, le=1)
    """learning rate at step 0 as a fraction of the base"""
    poly_power: float = Field(0.9, gt=0)
    """power of the poly decay"""
    min_lr: float = Field(1e-6, ge=0)
    """absolute floor of the poly decay, the same for every parameter group (lr_mult does not scale it)"""
    crop_size: int = Field(96, ge=16)
    """training crop side in pixels (512 in the paper)"""
    scale: tuple[int, int] = (384, 96)
    """base (long, short) scale the random rescale multiplies (2048x512 in the paper)"""
    ratio_range: tuple[float, float] = (0.5, 2.0)
    """random rescale factor range"""
    cat_max_ratio: float = Field(0.75, gt=0, le=1)
    """largest share of a crop one class may take (crop retried otherwise)"""
    flip_prob: float = Field(0.5, ge=0, le=1)
    """horizontal flip probability"""
    photometric: bool = True
    """random brightness, contrast, saturation and hue distortion"""
    normalization: Literal["backbone", "imagenet"] = "backbone"
    """pixel mean/std: the CLIP backbone's own, or ImageNet's as the authors' release"""
    amp: Literal["none", "bf16", "fp16"] = "none"
    """mixed precision: bf16 on CPU or CUDA, fp16 on CUDA only"""
    checkpoint_every: int = Field(100, ge=1)
    """iterations between resumable checkpoints"""
    log_every: int = Field(10, ge=1)
    """iterations between logged loss/lr points"""
    num_workers: int = Field(1, ge=0)
    """data-loader worker processes"""
    device: str = "auto"
    """torch device: auto, cpu, cuda, cuda:N"""
    threads: int = Field(2, ge=0)
    """CPU threads torch uses (pinned: CPU results depend on it; 0 = torch's default, all cores)"""
    deterministic: bool = False
    """deterministic algorithms in torch and cuDNN (bit-exact GPU reruns; slower on GPU)"""

    @model_validator(mode="after")
    def _ranges(self) -> TrainConfig:
        if self.ratio_range[0] > self.ratio_range[1]:
            raise ValueError("ratio_range must be (low, high) with low <= high")
        return self


class PseudoConfig(Section):
    checkpoint: Literal["half", "final"] = "half"
    """inductive checkpoint that labels: at half the schedule (the release) or the final one"""
    threshold: float = Field(0.0, ge=0, le=1)
    """pixels whose best unseen score is below this stay ignored (0 keeps all, as the release)"""
    n_overlays: int = Field(6, ge=0)
    """pseudo-label overlays logged as pictures"""


class SelfTrainConfig(Section):
    iterations: int = Field(300, ge=1)
    """self-training steps (VOC 10k, Context 20k, COCO 40k in the paper)"""
    mode: Literal["offline", "online"] = "offline"
    """offline: stored pseudo-labels (pipeline default); online: recomputed each step, as the release"""
    init: Literal["half", "final"] = "half"
    """inductive checkpoint self-training starts from: half the schedule (the release) or final"""
    warmup_iters: int = Field(20, ge=0)
    """linear warm-up iterations of the self-training schedule (1500 in the release: it restarts the warm-up)"""
    batch_size: int | None = Field(None, ge=1)
    """images per self-training step per process (VOC 32 in the release); null = train.batch_size"""


class EvaluateConfig(Section):
    mode: Literal["slide", "whole"] = "slide"
    """sliding-window or whole-image inference"""
    short_side: int = Field(144, ge=16)
    """test images are resized so their short side is this (512 in the paper, enlarging most VOC images; the demo enlarges its 96-pixel images 1.5x)"""
    max_long_side: int = Field(576, ge=16)
    """upper bound of the long side after resizing (2048 in the paper)"""
    crop_size: int = Field(96, ge=16)
    """sliding-window side (512 in the paper)"""
    stride: int = Field(64, ge=1)
    """sliding-window stride (426 in the paper)"""
    calibration: float = Field(0.1, ge=0, le=1)
    """subtracted from seen-class scores of the inductive model (0.1 in the release)"""
    cross_dataset: str | None = None
    """evaluate on another (real) catalog dataset's val split with all its classes; null = the training dataset"""
    n_overlays: int = Field(8, ge=0)
    """validation images drawn as image / truth / prediction overlays"""
    batch_size: int = Field(8, ge=1)
    """images per inference batch"""

    @field_validator("cross_dataset")
    @classmethod
    def _in_catalog(cls, name: str | None) -> str | None:
        return None if name is None else catalog_dataset(name, real=True)


class TrackingConfig(Section):
    tracking_uri: str | None = None
    """MLflow tracking URI; null = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db at the repo root"""
    experiment: str = "cascade-clip"
    """MLflow experiment name"""


class Params(Section):
    seed: int = 0
    """global random seed"""
    dataset: DatasetConfig = DatasetConfig()
    """which dataset and how it is prepared"""
    clip: ClipConfig = ClipConfig()
    """the CLIP backbone weights"""
    text: TextConfig = TextConfig()
    """class text embeddings"""
    model: ModelConfig = ModelConfig()
    """the Cascade-CLIP model"""
    loss: LossConfig = LossConfig()
    """training loss"""
    train: TrainConfig = TrainConfig()
    """inductive training"""
    pseudo: PseudoConfig = PseudoConfig()
    """offline pseudo-labels"""
    self_train: SelfTrainConfig = SelfTrainConfig()
    """transductive self-training"""
    evaluate: EvaluateConfig = EvaluateConfig()
    """evaluation"""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow tracking"""

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        if self.clip.source == "toy" and self.model.stages is not None:
            try:
                check_stage_ranges(self.model.stages, self.clip.toy.layers)
            except ValueError as exc:
                raise ValueError(f"model.stages: {exc}") from None
        if self.clip.source == "open_clip":
            from pipeline.model.clip import openclip_arch  # imported late: the model package imports this module

            depth = openclip_arch(self.clip.model, self.clip.pretrained)["vision_cfg"]["layers"]  # no download
            if self.model.stages is not None:
                try:
                    check_stage_ranges(self.model.stages, depth)
                except ValueError as exc:
                    raise ValueError(f"model.stages: {exc} ({self.clip.model})") from None
        return self

    def section_dict(self, *sections: str) -> dict[str, Any]:
        """The named sections as plain JSON-ready data (all sections when none are named); a dotted
        name such as "dataset.demo.rotation" gives just that key, nested as in params.yaml."""
        data = self.model_dump(mode="json")
        picked: dict[str, Any] = {}
        for name in sections or tuple(data):
            *parents, leaf = name.split(".")
            source, target = data, picked
            for part in parents:
                source, target = source[part], target.setdefault(part, {})
            target[leaf] = source[leaf]
        return picked


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def load_params(
    path: str | Path = DEFAULT_PARAMS,
    *,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Params:
    """Read params.yaml, optionally merge a preset (presets/NAME.yaml) and dotted overrides, validate."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: file not found; pass --params with the path of your params.yaml")
    data = _read_yaml(path)
    source = str(path)
    if preset is not None:
        data = deep_merge(data, _read_yaml(preset_path(preset)))
        source += f" + preset {preset}"
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return validate_params(data, source=source)


def validate_params(data: dict[str, Any], *, source: str = "params") -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(format_validation_error(exc, source)) from None


def preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))) or "none"
        raise ParamsError(f"unknown preset {name!r}; valid presets: {known}")
    return path


def model_preset_names() -> list[str]:
    """The presets that define a model (model-info, bench, import-checkpoint): "demo", the schema
    defaults, then every presets/NAME.yaml that trains one, i.e. not the ablation grids
    (ablations.yaml) and not a cross-dataset preset (it evaluates another preset's model)."""
    names = [DEMO_PRESET]
    for path in sorted(PRESETS_DIR.glob("*.yaml")):
        data = _read_yaml(path)
        if path.name != ABLATIONS_FILE and not (data.get("evaluate") or {}).get("cross_dataset"):
            names.append(path.stem)
    return names


def preset_params(name: str) -> Params:
    """The parameters of a model preset: presets/NAME.yaml over the schema defaults (not over
    params.yaml, so a local edit does not change a preset); "demo" is the defaults themselves."""
    if name not in model_preset_names():
        raise ParamsError(f"unknown model preset {name!r}; valid: {', '.join(model_preset_names())}")
    if name == DEMO_PRESET:
        return Params()
    return validate_params(_read_yaml(preset_path(name)), source=f"preset {name}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the mapping at `loc` (for listing valid keys)."""
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return None
    return model


def format_validation_error(exc: ValidationError, source: str) -> str:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            owner = _model_at(loc[:-1])
            valid = ", ".join(owner.model_fields) if owner else "?"
            problems.append(f"{key}: unknown key; valid keys here: {valid}")
        elif kind in ("literal_error", "enum"):
            expected = err.get("ctx", {}).get("expected", "")
            problems.append(f"{key}: invalid value {err['input']!r}; valid choices: {expected}")
        elif kind == "value_error":
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{key}: {message}" if loc else message)  # cross-section checks name their keys
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            problems.append(f"{key}: {err['msg']}{shown}")
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"{source} is invalid ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n{lines}"


def params_hash(data: dict[str, Any]) -> str:
    """A short, stable hash of JSON-ready parameters (key order does not matter)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def describe_fields(model: type[BaseModel] = Params, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key path, default, one-line description) for every leaf field, for docs and `cascade-clip params`."""
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(describe_fields(annotation, f"{path}."))
        else:
            default = field.default
            shown = json.dumps(default, default=str) if not isinstance(default, tuple) else json.dumps(list(default))
            rows.append((path, shown, field.description or ""))
    return rows


def render_params_yaml(params: Params | None = None) -> str:
    """params.yaml text for `params` (default: the schema defaults), one comment line per field."""
    data = (params or Params()).model_dump(mode="json")
    lines = ["# Cascade-CLIP parameters. Every key is validated against pipeline/config.py before any work;",
             "# `cascade-clip params` lists them all. Defaults run the offline demo world on a CPU.", ""]
    _render(Params, data, 0, lines)
    return "\n".join(lines) + "\n"


def _render(model: type[BaseModel], data: dict[str, Any], indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    for name, field in model.model_fields.items():
        annotation = field.annotation
        lines.append(f"{pad}# {field.description}")
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"{pad}{name}:")
            _render(annotation, data[name], indent + 1, lines)
            if indent == 0:
                lines.append("")
        else:
            value = yaml.safe_dump(data[name], default_flow_style=True, width=1000).strip()
            value = value.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"{pad}{name}: {value}")
