"""Evaluation speed at evaluate.batch_size 1 against larger batches, side by side in one process.

    python -m benchmarks.bench_eval_batch [MODEL] [--sizes 1 8] [--threads 2]

Scores the demo val split (the evaluate stage's work for one model) with the trained model
(default artifacts/train/model.safetensors) and prints images/s per batch size, the speed-up
over the first size, and whether the metrics agree. Run after `dvc repro evaluate`.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks._demo import INDUCTIVE, PREPARED, load_scoring
from pipeline.data.prepared import read_manifest
from pipeline.engine.evaluate import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(INDUCTIVE), help="model file (default: %(default)s)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8], help="evaluate.batch_size values")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scoring = load_scoring(args.model)
    n_images = len(read_manifest(PREPARED, "val"))
    first = None
    for size in args.sizes:
        cfg = scoring.params.evaluate.model_copy(update={"batch_size": size})
        start = time.perf_counter()
        [result] = evaluate(scoring.model, scoring.embeddings, PREPARED, scoring.classes, cfg=cfg,
                            normalize=scoring.normalize, progress=False)
        seconds = time.perf_counter() - start
        first = first or (seconds, result.metrics)
        same = all(abs(result.metrics[k] - first[1][k]) < 1e-6 for k in result.metrics)
        print(f"batch_size {size}: {n_images} images in {seconds:.1f} s, {n_images / seconds:.1f} img/s, "
              f"{first[0] / seconds:.2f}x batch_size {args.sizes[0]}, hIoU {result.metrics['hIoU']:.2f} "
              f"({'same metrics' if same else 'metrics differ'})")


if __name__ == "__main__":
    main()
