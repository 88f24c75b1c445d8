"""Tiny random-initialised configurations shared by the model tests (no tests here)."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig
from pipeline.model import build_model

EMBED = 32


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run ~100x slower with 2 OpenMP threads when the other core is busy; use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
