"""The test sizes (not a test module): a tiny random-initialised Cascade-CLIP for the model and
engine tests, and parameter overrides that shrink every stage to seconds for end-to-end tests of
the real pipeline.

Training runs long enough (40 steps, a checkpoint every 4; self-training 24) for the fault-injection
tests to kill a stage after a checkpoint and still find it running; a whole `dvc repro` at this size
takes about two minutes on 2 cores, most of it the start-up of seven stage processes."""

import torch
import torch.nn.functional as F
import yaml

from pipeline.config import ModelConfig, deep_merge, render_params_yaml
from pipeline.model import build_model

EMBED = 32


def tiny_arch(image_size: int = 32, layers: int = 12) -> dict:
    """A 12-block ViT of width 32 (2 heads, patch 8) and a 1-layer text tower, open_clip format."""
    return {
        "embed_dim": EMBED,
        "quick_gelu": True,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def tiny_cfg(**overrides) -> ModelConfig:
    return ModelConfig(**{"prompt_tokens": 3, "decoder_heads": 4, **overrides})


def tiny_model(seed: int = 0, arch: dict | None = None, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(**overrides), arch or tiny_arch())


def class_embeddings(num_classes: int = 5, seed: int = 1) -> torch.Tensor:
    return F.normalize(torch.randn(num_classes, EMBED, generator=torch.Generator().manual_seed(seed)), dim=-1)


def images(batch: int = 2, size: int = 32, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


TINY_OVERRIDES = {
    "dataset": {"demo": {"n_train": 16, "n_val": 6, "image_size": 48, "workers": 1}},
    "clip": {"toy": {"embed_dim": 32, "image_size": 32, "width": 32, "head_width": 16, "text_width": 32,
                     "text_layers": 1, "steps": 4, "batch_size": 16, "warmup_steps": 1, "n_images": 64,
                     "n_holdout": 16, "threads": 1}},
    "model": {"prompt_tokens": 2, "decoder_heads": 4},
    "train": {"iterations": 40, "batch_size": 2, "crop_size": 48, "scale": [96, 48], "warmup_iters": 1,
              "checkpoint_every": 4, "log_every": 4, "num_workers": 0},
    "self_train": {"iterations": 24, "warmup_iters": 2},
    "pseudo": {"n_overlays": 2},
    "evaluate": {"short_side": 48, "max_long_side": 96, "crop_size": 48, "stride": 32, "n_overlays": 2},
}


def tiny_params_yaml(extra: dict | None = None) -> str:
    params = yaml.safe_load(render_params_yaml())
    params = deep_merge(params, TINY_OVERRIDES)
    if extra:
        params = deep_merge(params, extra)
    return yaml.safe_dump(params, sort_keys=False)
