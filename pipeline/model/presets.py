"""Named model presets, read from the parameter presets: presets/NAME.yaml (the paper's release
configurations) over the schema defaults, and "demo" (the defaults). Every number of a row comes
from there or from the dataset catalog; this module holds none of its own."""

from __future__ import annotations

from pipeline.config import ModelConfig, Params, catalog_class_count, preset_params
from pipeline.model.clip import arch_config


def model_row(params: Params) -> dict:
    """The model facts of a parameter set, as model-info, bench and import-checkpoint use them.

    arch: open_clip architecture name (clip.model for source open_clip), or "toy" for the toy CLIP
    (clip.toy); stages: model.stages, else derived from the encoder depth; image_size: input side
    in pixels (model.image_size, else the training crop); prompt_tokens: P; num_classes: the
    dataset's classes in the catalog (counted in FLOPs); release: the preset reproduces the
    authors' release (release-compatible behaviour: double CLS, random frozen taps)."""
    return {
        "arch": {"toy": "toy", "open_clip": params.clip.model}.get(params.clip.source, params.clip.arch),
        "image_size": params.model.image_size or params.train.crop_size,
        "prompt_tokens": params.model.prompt_tokens,
        "num_classes": catalog_class_count(params.dataset.name),
        "stages": params.model.stages_for(arch_config(params.clip)["vision_cfg"]["layers"]),
        "release": params.model.release_double_cls,
    }


def preset(name: str) -> dict:
    """The row of a model preset (pipeline.config.model_preset_names; another name: ParamsError)."""
    return model_row(preset_params(name))


def preset_arch(name: str) -> dict:
    """The open_clip arch config of a preset."""
    return arch_config(preset_params(name).clip)


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
