"""A tiny end-to-end training setup (demo data + tiny random CLIP), shared by engine tests and
the torchrun worker. Not a test module."""

from pathlib import Path

import torch

from pipeline.config import DatasetConfig, DemoConfig, LossConfig, TrainConfig
from pipeline.data.dataset import SegmentationDataset
from pipeline.data.prepared import ClassInfo, prepare_demo
from pipeline.data.transforms import label_lut
from pipeline.engine.setup import normalizer, train_transform
from tests.tiny import class_embeddings, tiny_model


def make_data(root: Path, n_train: int = 24, size: int = 32) -> ClassInfo:
    if not (root / "manifest.parquet").exists():
        root.mkdir(parents=True, exist_ok=True)
        cfg = DatasetConfig(demo=DemoConfig(n_train=n_train, n_val=4, image_size=size, workers=1))
        prepare_demo(cfg, seed=0, root=root, progress=False)
    return ClassInfo.read(root / "classes.json")


def train_cfg(**overrides) -> TrainConfig:
    base = dict(iterations=8, batch_size=4, lr=1e-3, warmup_iters=2, crop_size=32, scale=(64, 32),
                checkpoint_every=4, log_every=1, num_workers=0, device="cpu", threads=0)
    return TrainConfig(**(base | overrides))


def setup(root: Path, *, dropout: float = 0.1, cfg: TrainConfig | None = None, seed: int = 0):
    classes = make_data(root)
    model = tiny_model(seed=seed, prompt_dropout=dropout, decoder_dropout=dropout)
    cfg = cfg or train_cfg()
    dataset = SegmentationDataset(root, "train", transform=train_transform(cfg, normalizer("backbone")),
                                  lut=label_lut(classes.seen_ids, classes.num_classes), seed=seed)
    embeddings = class_embeddings(num_classes=classes.num_classes)[classes.seen_ids]
    return model, embeddings, dataset, cfg, LossConfig()


def trainable_vector(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
