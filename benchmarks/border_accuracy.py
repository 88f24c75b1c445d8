"""Pixel accuracy on object borders against object interiors, for a trained model on the val split.

    python -m benchmarks.border_accuracy [MODEL] [--threads 1]   (default artifacts/train/model.safetensors, uncalibrated)

Border pixels are object pixels within 4 pixels of another label (background included): there a
patch token mixes the object with what surrounds it. Run after `dvc repro evaluate`.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy import ndimage

from benchmarks._demo import INDUCTIVE, PREPARED, load_scoring
from pipeline.data.prepared import read_manifest
from pipeline.engine.evaluate import predict_split

BORDER_PX = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(INDUCTIVE), help="model file (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scoring = load_scoring(args.model)
    counts = {"border": [0, 0], "interior": [0, 0]}  # [right, all]
    for _, _, label, scores in predict_split(scoring.model, scoring.embeddings, PREPARED, read_manifest(PREPARED, "val"),
                                             cfg=scoring.params.evaluate, normalize=scoring.normalize,
                                             desc="border accuracy"):
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
    main()
