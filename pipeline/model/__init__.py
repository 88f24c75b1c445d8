"""Cascade-CLIP model package: frozen CLIP + deep visual prompts + cascaded stage decoders.

Imports only torch, open_clip, timm, numpy, safetensors and pipeline.config.
"""

from pipeline.model.build import VARIANTS, build_model
from pipeline.model.cascade import CascadeCLIP, SegOutput, calibrated_scores
from pipeline.model.checkpoint import load, load_trainable, model_extra, save, save_trainable
from pipeline.model.clip import arch_config, create_clip, load_clip_state, make_tokenizer, read_clip_checkpoint
from pipeline.model.loss import LossOutput, count_masks, segmentation_loss
from pipeline.model.state import StateDictError
from pipeline.model.text_encoder import average_class_embeddings

__all__ = [
    "VARIANTS",
    "CascadeCLIP",
    "LossOutput",
    "SegOutput",
    "StateDictError",
    "arch_config",
    "average_class_embeddings",
    "build_model",
    "calibrated_scores",
    "count_masks",
    "create_clip",
    "load",
    "load_clip_state",
    "load_trainable",
    "make_tokenizer",
    "model_extra",
    "read_clip_checkpoint",
    "save",
    "save_trainable",
    "segmentation_loss",
]
