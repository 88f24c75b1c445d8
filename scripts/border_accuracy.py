"""Pixel accuracy on object borders against object interiors, for a trained model on the val split.

    python scripts/border_accuracy.py [MODEL]   (default artifacts/train/model.safetensors, uncalibrated)

Border pixels are object pixels within 4 pixels of another label (background included): there a
patch token mixes the object with what surrounds it. Run after `dvc repro evaluate`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from pipeline.config import load_params
from pipeline.data.prepared import ClassInfo, read_manifest
from pipeline.engine.evaluate import predict_split
from pipeline.engine.setup import load_text_embeddings, normalizer
from pipeline.model import load
from pipeline.weights import read_backbone_meta
from stages.evaluate import BACKBONE, INDUCTIVE, PREPARED, TEXT

BORDER_PX = 4


def main() -> None:
    model_file = Path(sys.argv[1] if len(sys.argv) > 1 else INDUCTIVE)
    params = load_params("params.yaml")
    root = Path(PREPARED)
    classes = ClassInfo.read(root / "classes.json")
    embeddings = load_text_embeddings(Path(TEXT), classes)
    normalize = normalizer(params.train.normalization, read_backbone_meta(Path(BACKBONE)))
    model = load(model_file).eval()
    counts = {"border": [0, 0], "interior": [0, 0]}  # [right, all]
    for _, _, label, scores in predict_split(model, embeddings, root, read_manifest(root, "val"), cfg=params.evaluate,
                                             normalize=normalize, desc="border accuracy"):
        pred = scores.argmax(0).numpy()
        inside = label != 255
        border = np.zeros_like(inside)
        for value in np.unique(label[inside]):
            mask = label == value
            border |= mask & ~ndimage.binary_erosion(mask, iterations=BORDER_PX)
        for name, mask in (("border", inside & border), ("interior", inside & ~border)):
            counts[name][0] += int((pred[mask] == label[mask]).sum())
            counts[name][1] += int(mask.sum())
    pixels = sum(n for _, n in counts.values())
    misses = sum(n - ok for ok, n in counts.values())
    for name, (ok, n) in counts.items():
        print(f"{name}: {n} px ({n / pixels:.0%} of object pixels), accuracy {ok / n:.1%}, {(n - ok) / misses:.0%} of misses")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
