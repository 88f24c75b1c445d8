"""Named model presets as one table: the paper's three release configurations and the demo."""

from __future__ import annotations

from pipeline.config import ClipConfig, ModelConfig
from pipeline.model.clip import arch_config, named_arch

PAPER_STAGES = [(6, 8), (9, 11), (12, 12)]

# arch: open_clip architecture name, or "toy" for the ToyClipConfig defaults
# image_size: input side in pixels; prompt_tokens: P; num_classes: classes counted in FLOPs
# release: whether the authors' release reproduces it (switches on release-compatible behaviour)
PRESETS: dict[str, dict] = {
    "voc12": {"arch": "ViT-B-16-quickgelu", "image_size": 512, "prompt_tokens": 10, "num_classes": 20, "stages": PAPER_STAGES, "release": True},
    "coco": {"arch": "ViT-B-16-quickgelu", "image_size": 512, "prompt_tokens": 50, "num_classes": 171, "stages": PAPER_STAGES, "release": True},
    "context59": {"arch": "ViT-B-16-quickgelu", "image_size": 512, "prompt_tokens": 35, "num_classes": 59, "stages": PAPER_STAGES, "release": True},
    "demo": {"arch": "toy", "image_size": 96, "prompt_tokens": 10, "num_classes": 16, "stages": PAPER_STAGES, "release": False},
}


def preset(name: str) -> dict:
    """The table row of a preset (a copy)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def preset_arch(name: str) -> dict:
    """The open_clip arch config of a preset."""
    row = preset(name)
    return arch_config(ClipConfig()) if row["arch"] == "toy" else named_arch(row["arch"])


def preset_model_config(name: str, variant: str = "cascade") -> ModelConfig:
    """The ModelConfig of a preset; release presets reproduce the release's behaviour (double CLS,
    random frozen taps)."""
    row = preset(name)
    return ModelConfig(
        variant=variant,
        stages=row["stages"],
        prompt_tokens=row["prompt_tokens"],
        image_size=row["image_size"],
        release_double_cls=row["release"],
        tap_init="random",
        tap_trainable=False,
    )
