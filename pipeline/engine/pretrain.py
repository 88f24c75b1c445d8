"""Toy CLIP pretraining on the demo world, and the checks that it really learned.

The toy CLIP (pipeline.model.clip.toy_arch) learns from captioned demo images with open_clip's
contrastive loss, as real CLIP learned from the web: every one of the 16 colour x shape classes,
seen and unseen alike, is named in captions ("a photo of a red circle and a blue star").
By default every image holds one object: captions that name one object teach shape far faster
(`single_object_fraction` below 1 mixes in scenes of 2..max_objects objects; 0.8 cost 5 points
of zero-shot accuracy at 150 steps).

Deterministic for a seed on CPU: the images come from `scene_rng(seed, "pretrain", i)`, the
initial weights from `torch.manual_seed(seed)`, the batch order from a numpy generator.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from tqdm import tqdm

from pipeline.config import ToyClipConfig
from pipeline.data.catalog import get_dataset, template_set
from pipeline.data.transforms import OPENAI_CLIP
from pipeline.data.shapes import ShapesWorld, scene_rng
from pipeline.model.clip import create_clip, make_tokenizer, toy_arch
from pipeline.model.image_encoder import prompted_block
from pipeline.text import class_embeddings, similarity

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps its learned temperature at 100
CURVE_FIELDS = ("step", "loss", "lr", "logit_scale")  # columns of PretrainResult.curve


@dataclass(frozen=True)
class CaptionedImages:
    images: torch.Tensor  # [N, 3, H, W] uint8 RGB
    captions: list[str]  # one caption per image
    objects: list[tuple[int, ...]]  # class ids drawn in each image, in drawing order


@dataclass
class PretrainResult:
    curve: list[dict[str, float]]  # one row per step: step (1-based), loss, lr, logit_scale
    seconds: float  # wall time of the optimisation loop
    images_per_class: list[int] = field(default_factory=list)  # captioned occurrences of each class

    @property
    def final_loss(self) -> float:
        """Mean loss over the last tenth of the steps (less noisy than the last step)."""
        tail = self.curve[-max(1, len(self.curve) // 10):]
        return float(np.mean([row["loss"] for row in tail]))


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def pretrain_images(world: ShapesWorld, toy: ToyClipConfig, seed: int, *, progress: bool = True) -> CaptionedImages:
    """`toy.n_images` captioned scenes at the toy input size, a `single_object_fraction` share with one object."""
    images, captions, objects = [], [], []
    for index in tqdm(range(toy.n_images), desc="drawing pretraining images", unit="img", disable=not progress):
        rng = scene_rng(seed, "pretrain", index)
        single = rng.random() < toy.single_object_fraction
        n_objects = 1 if single else int(rng.integers(2, toy.max_objects + 1))
        scene = world.draw(rng, size=toy.image_size, n_objects=n_objects,
                           min_size=toy.min_object_size, max_size=toy.max_object_size)
        images.append(scene.image)
        captions.append(world.caption(scene.objects))
        objects.append(scene.objects)
    return CaptionedImages(_to_tensor(images), captions, objects)


def holdout_images(world: ShapesWorld, toy: ToyClipConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`toy.n_holdout` single-object images ("holdout" split) with class i mod C: ([N,3,H,W] uint8, [N] ids)."""
    n_classes = len(world.classes)
    images, labels = [], []
    for index in range(toy.n_holdout):
        class_id = index % n_classes
        scene = world.draw(scene_rng(seed, "holdout", index), size=toy.image_size, n_objects=1,
                           min_size=toy.min_object_size, max_size=toy.max_object_size, class_ids=[class_id])
        images.append(scene.image)
        labels.append(class_id)
    return _to_tensor(images), torch.tensor(labels)


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# optimisation
# --------------------------------------------------------------------------------------------
def cosine_lr(step: int, *, peak_lr: float, total_steps: int, warmup_steps: int) -> float:
    """Learning rate at optimiser step `step` (0-based): linear warm-up to `peak_lr`, cosine decay to 0."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * peak_lr * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def parameter_groups(model: CLIP, weight_decay: float) -> list[dict]:
    """AdamW groups as open_clip trains: decay on matrices, none on gains, biases, tokens and the logit scale."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def batch_order(n_items: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """[steps, batch_size] item indices: shuffled epochs, one after another, from a seeded generator."""
    rng = np.random.default_rng([seed, 7])
    needed = steps * batch_size
    epochs = [rng.permutation(n_items) for _ in range(math.ceil(needed / n_items))]
    return np.concatenate(epochs)[:needed].reshape(steps, batch_size)


def batch_contrastive_loss(model: CLIP, loss_fn: Callable, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ClipLoss of one batch, as `loss_fn(*model(images, tokens))`, with each distinct caption encoded once.

    The demo's captions repeat within a batch (16 single-object captions among 96 images), so the
    text tower runs on the distinct ones and their features are gathered back per image: the same
    loss and gradients up to float rounding, 0.87x the step time (python -m benchmarks.bench_pretrain_step).
    """
    distinct, inverse = torch.unique(tokens, dim=0, return_inverse=True)
    image_features = model.encode_image(images, normalize=True)
    text_features = model.encode_text(distinct, normalize=True)[inverse]
    return loss_fn(image_features, text_features, model.logit_scale.exp())


@contextmanager
def batch_first_blocks(model: CLIP) -> Iterator[None]:
    """Inside, the image tower's residual blocks compute their function through `prompted_block`
    (batch-first, scaled_dot_product_attention): in training, nn.MultiheadAttention turns a
    batch-first input into a transposed one, on which autograd's matmul runs one small matmul per
    token position. The same loss and gradients up to float rounding; 0.6x the step time
    (python -m benchmarks.bench_pretrain_step). Nothing changes for a sequence-first tower."""
    transformer = model.visual.transformer
    blocks = list(transformer.resblocks) if getattr(transformer, "batch_first", False) else []
    for block in blocks:
        block.forward = _block_forward.__get__(block)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def _block_forward(block, q_x: torch.Tensor, k_x=None, v_x=None, attn_mask=None) -> torch.Tensor:
    if k_x is not None or v_x is not None or attn_mask is not None:
        raise ValueError("batch_first_blocks runs self-attention blocks without a mask only")
    return prompted_block(block, q_x, None)


def pretrain_clip(
    model: CLIP,
    tokenizer: Callable[[list[str]], torch.Tensor],
    data: CaptionedImages,
    toy: ToyClipConfig,
    *,
    seed: int,
    progress: bool = True,
) -> PretrainResult:
    """Train `model` in place with open_clip's ClipLoss on `data`; returns the per-step curve."""
    if toy.batch_size > len(data.captions):
        raise ValueError(f"batch_size ({toy.batch_size}) is larger than the number of pretraining images ({len(data.captions)})")
    tokens = tokenizer(data.captions)
    order = torch.from_numpy(batch_order(len(data.captions), toy.batch_size, toy.steps, seed))
    loss_fn = open_clip.loss.ClipLoss()
    # fused: one kernel per parameter group instead of one per update op (python -m benchmarks.bench_pretrain_step)
    optimizer = torch.optim.AdamW(parameter_groups(model, toy.weight_decay), lr=toy.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(toy.steps), desc="pretraining toy CLIP", unit="step", disable=not progress)
    curve = []
    with batch_first_blocks(model):
        for step in bar:
            lr = cosine_lr(step, peak_lr=toy.lr, total_steps=toy.steps, warmup_steps=toy.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # one contrastive step
            index = order[step]
            loss = batch_contrastive_loss(model, loss_fn, OPENAI_CLIP.batch(data.images[index]), tokens[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
                row = {"step": step + 1, "loss": loss.item(), "lr": lr, "logit_scale": model.logit_scale.exp().item()}
            curve.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
    model.eval()
    counts = np.bincount([c for objs in data.objects for c in set(objs)], minlength=0)
    return PretrainResult(curve=curve, seconds=time.perf_counter() - start, images_per_class=counts.tolist())


# --------------------------------------------------------------------------------------------
# did it learn? zero-shot classification and compositional text embeddings
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def zero_shot_accuracy(
    model: CLIP,
    tokenizer: Callable[[list[str]], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    seen_ids: Sequence[int],
    batch_size: int = 256,
) -> dict[str, float]:
    """Share of single-object images whose arg-max over the class prompts is their class.

    Returns zero_shot_acc (all images), zero_shot_acc_seen / zero_shot_acc_unseen (images of seen /
    unseen classes) and zero_shot_chance (1 / C).
    """
    model.eval()
    text = class_embeddings(model, tokenizer, class_names, templates).embeddings
    features = torch.cat([
        F.normalize(model.encode_image(OPENAI_CLIP.batch(images[i : i + batch_size])).float(), dim=-1)
        for i in range(0, len(images), batch_size)
    ])
    correct = (features @ text.T).argmax(dim=1) == labels
    seen = torch.isin(labels, torch.tensor(list(seen_ids), dtype=labels.dtype))
    return {
        "zero_shot_acc": float(correct.float().mean()),
        "zero_shot_acc_seen": float(correct[seen].float().mean()) if seen.any() else float("nan"),
        "zero_shot_acc_unseen": float(correct[~seen].float().mean()) if (~seen).any() else float("nan"),
        "zero_shot_chance": 1.0 / len(class_names),
    }


NAMED_PAIRS = (("red circle", "red square"), ("red circle", "blue circle"), ("red circle", "green star"),
               ("blue star", "blue triangle"), ("blue star", "yellow star"), ("blue star", "red circle"))


def compositionality(embeddings: torch.Tensor | np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Do text embeddings of '<colour> <shape>' classes share structure along colour and shape?

    A triple (anchor, partner, stranger) holds when cos(anchor, partner) > cos(anchor, stranger),
    where the partner shares exactly one attribute with the anchor and the stranger none (e.g.
    cos(red circle, red square) > cos(red circle, green star)). Reported: the share of triples
    that hold (all, same-colour partners, same-shape partners), the mean cosine of same-colour,
    same-shape and unrelated pairs, and the cosine of the NAMED_PAIRS present.
    """
    sim = similarity(embeddings)
    parts = [name.split(" ", 1) for name in class_names]
    n = len(class_names)
    holds = {"colour": [], "shape": []}
    for a in range(n):
        strangers = [d for d in range(n) if parts[d][0] != parts[a][0] and parts[d][1] != parts[a][1]]
        for b in range(n):
            if b == a:
                continue
            same_colour, same_shape = parts[b][0] == parts[a][0], parts[b][1] == parts[a][1]
            if same_colour != same_shape:
                holds["colour" if same_colour else "shape"].extend(sim[a, b] > sim[a, d] for d in strangers)
    kinds = {"colour": [], "shape": [], "none": []}
    for a, b in combinations(range(n), 2):
        same_colour, same_shape = parts[a][0] == parts[b][0], parts[a][1] == parts[b][1]
        if same_colour != same_shape:
            kinds["colour" if same_colour else "shape"].append(sim[a, b])
        elif not same_colour:
            kinds["none"].append(sim[a, b])
    every = holds["colour"] + holds["shape"]
    out = {
        "compositional_triples": float(np.mean(every)) if every else float("nan"),
        "compositional_triples_colour": float(np.mean(holds["colour"])) if holds["colour"] else float("nan"),
        "compositional_triples_shape": float(np.mean(holds["shape"])) if holds["shape"] else float("nan"),
        "cos_same_colour_mean": float(np.mean(kinds["colour"])) if kinds["colour"] else float("nan"),
        "cos_same_shape_mean": float(np.mean(kinds["shape"])) if kinds["shape"] else float("nan"),
        "cos_unrelated_mean": float(np.mean(kinds["none"])) if kinds["none"] else float("nan"),
    }
    index = {name: i for i, name in enumerate(class_names)}
    for first, second in NAMED_PAIRS:
        if first in index and second in index:
            out[f"cos/{first.replace(' ', '_')}/{second.replace(' ', '_')}"] = float(sim[index[first], index[second]])
    return out


# --------------------------------------------------------------------------------------------
# all of it: the backbone stage's toy source
# --------------------------------------------------------------------------------------------
@dataclass
class ToyClip:
    arch: dict  # open_clip model config of the toy CLIP
    model: CLIP  # pretrained, eval mode
    result: PretrainResult
    metrics: dict[str, float]  # zero-shot accuracy, compositionality, loss and time figures
    rotation: float = 0.0  # the demo world's object rotation range (degrees) it was pretrained on

    @property
    def summary(self) -> dict:
        """What clip.json records about the pretraining."""
        return {"metrics": self.metrics, "images_per_class": self.result.images_per_class, "world_rotation": self.rotation}


def pretrain_toy_clip(toy: ToyClipConfig, seed: int, *, rotation: float = 0.0, progress: bool = True) -> ToyClip:
    """Draw the captioned demo images, pretrain the toy CLIP on them, and check what it learned.

    `rotation` is the demo world's object rotation range in degrees (`dataset.demo.rotation`):
    the toy CLIP learns the world the segmentation stages later see.

    The checks use the demo catalog: its class names, its prompt templates and its default unseen
    split (for the seen/unseen break-down of the zero-shot accuracy).
    """
    entry = get_dataset("demo")
    world = ShapesWorld(entry, rotation=rotation)
    arch = toy_arch(toy)
    threads = torch.get_num_threads()
    if toy.threads:
        torch.set_num_threads(toy.threads)
    try:
        data = pretrain_images(world, toy, seed, progress=progress)
        torch.manual_seed(seed)
        model = create_clip(arch)
        tokenizer = make_tokenizer(arch)
        result = pretrain_clip(model, tokenizer, data, toy, seed=seed, progress=progress)
        images, labels = holdout_images(world, toy, seed)
        templates = template_set(entry.templates)
        metrics = zero_shot_accuracy(model, tokenizer, images, labels, entry.classes, templates,
                                     seen_ids=entry.seen_ids())
        text = class_embeddings(model, tokenizer, entry.classes, templates).embeddings
        metrics |= compositionality(text, entry.classes)
    finally:
        torch.set_num_threads(threads)
    metrics |= {
        "pretrain_initial_loss": result.curve[0]["loss"],
        "pretrain_final_loss": result.final_loss,
        "pretrain_seconds": result.seconds,
    }
    return ToyClip(arch=arch, model=model, result=result, metrics=metrics, rotation=rotation)
