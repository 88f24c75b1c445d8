"""Toy-CLIP pretraining step time: what each speed-up of the backbone stage buys, side by side.

    python -m benchmarks.bench_pretrain_step [--steps 6] [--threads 2]

Times one contrastive step of the default toy CLIP (params.yaml's clip.toy, random weights, a
batch of demo captions) with: open_clip's plain forward and for-each AdamW; each distinct caption
encoded once (pipeline.engine.pretrain.batch_contrastive_loss); plus fused AdamW; plus the image
tower's blocks batch-first (pipeline.engine.pretrain.batch_first_blocks; the three are what the
stage uses); plus GELU in place of QuickGELU (a different model, not adopted). The variants
run interleaved in one process; medians are printed with their ratio to the plain step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import open_clip
import torch

from pipeline.config import load_params
from pipeline.data.catalog import get_dataset
from pipeline.engine.pretrain import batch_contrastive_loss, batch_first_blocks, parameter_groups
from pipeline.model.clip import create_clip, make_tokenizer, toy_arch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    toy = load_params(ROOT / "params.yaml").clip.toy
    names = get_dataset("demo").classes
    generator = torch.Generator().manual_seed(0)
    captions = [f"a photo of a {names[i]}" for i in torch.randint(0, len(names), (toy.batch_size,), generator=generator)]
    images = torch.randn(toy.batch_size, 3, toy.image_size, toy.image_size, generator=generator)
    loss_fn = open_clip.loss.ClipLoss()

    variants = {}
    for name, quick_gelu, dedup, fused, batch_first in (("plain forward, AdamW", True, False, False, False),
                                                        ("distinct captions once", True, True, False, False),
                                                        ("+ fused AdamW", True, True, True, False),
                                                        ("+ batch-first blocks (the stage)", True, True, True, True),
                                                        ("+ GELU (not adopted)", False, True, True, True)):
        arch = toy_arch(toy) | {"quick_gelu": quick_gelu}
        torch.manual_seed(0)
        model = create_clip(arch).train()
        optimizer = torch.optim.AdamW(parameter_groups(model, toy.weight_decay), lr=1e-5, fused=fused)
        variants[name] = (model, optimizer, make_tokenizer(arch)(captions), dedup, batch_first)

    def step(model, optimizer, tokens, dedup, batch_first) -> None:
        with batch_first_blocks(model) if batch_first else nullcontext():
            if dedup:
                loss = batch_contrastive_loss(model, loss_fn, images, tokens)
            else:
                loss = loss_fn(*model(images, tokens))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()

    for variant in variants.values():
        step(*variant)
    times = {name: [] for name in variants}
    for _ in range(args.steps):
        for name, variant in variants.items():
            start = time.perf_counter()
            step(*variant)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain forward, AdamW"])
    print(f"batch {toy.batch_size}, {toy.image_size} px, width {toy.width}, {args.threads} threads, median of {args.steps} steps\n")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<28} {median:.3f} s/step  {median / base:.2f}x")


if __name__ == "__main__":
    main()
