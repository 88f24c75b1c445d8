"""The iteration-based training loop shared by inductive training and self-training.

Deterministic on CPU for a seed: sample k of the training stream is image perm_e[k mod n] of
epoch e = k // n (perm_e seeded by (seed, e)), augmented with a generator seeded by (seed, k), so
batches depend only on the step, not on worker processes or on where a run was resumed. A
checkpoint (trainable weights, optimiser, CPU and CUDA RNG states, step, the loss curve and the
loss-averaging window) is written atomically every `checkpoint_every` steps; `train()` resumes
from it only when its resume key (the digests of everything the result depends on: parameters,
input files, code) matches, else starts over and says which entry changed.
DDP (torchrun) shards each global batch across ranks and all-reduces the mask count.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.config import LossConfig, TrainConfig
from pipeline.data.dataset import SegmentationDataset
from pipeline.engine.schedule import poly_lr
from pipeline.io import atomic_file
from pipeline.model import CascadeCLIP, count_masks, segmentation_loss
from pipeline.model.checkpoint import trainable_state
from pipeline.model.state import check_state_dict

log = logging.getLogger(__name__)

ResumeKey = Mapping[str, str]  # what a run's result depends on: entry name -> digest
LabelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits [B, C, H, W], labels) -> labels


class SampleStream(torch.utils.data.Dataset):
    """Position k of an endless, seeded stream of augmented samples (see module docstring)."""

    def __init__(self, dataset: SegmentationDataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:  # positions are unbounded; the sampler decides which are read
        return 2**62

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))}
        return self._perms[epoch]

    def __getitem__(self, position: int) -> dict:
        epoch, offset = divmod(position, len(self.dataset))
        return self.dataset.load(int(self._perm(epoch)[offset]), np.random.default_rng([self.seed, 1, position]))


class StepSampler(torch.utils.data.Sampler):
    """Stream positions this rank reads for steps start..end-1 (all micro-batches, in order)."""

    def __init__(self, *, start: int, end: int, batch: int, accum: int, rank: int, world: int):
        self.start, self.end, self.batch, self.accum, self.rank, self.world = start, end, batch, accum, rank, world

    def __iter__(self):
        per_step = self.batch * self.accum * self.world
        for step in range(self.start, self.end):
            for micro in range(self.accum):
                first = step * per_step + (micro * self.world + self.rank) * self.batch
                yield from range(first, first + self.batch)

    def __len__(self) -> int:
        return (self.end - self.start) * self.accum * self.batch


@dataclass
class Schedule:
    """What differs between inductive training and self-training."""

    iterations: int
    warmup_iters: int
    half_checkpoint: Path | None = None  # where to write the model at half the schedule


@dataclass
class TrainResult:
    steps_run: int  # steps executed by this call (0 when the checkpoint was already final)
    resumed_from: int
    final_loss: float
    seconds: float
    curve: list[dict] = field(default_factory=list)  # rows: step, loss, focal, dice, lr

    @property
    def steps_per_second(self) -> float:
        return self.steps_run / self.seconds if self.seconds else float("nan")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp fp16 needs CUDA; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def build_optimizer(model: CascadeCLIP, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the model's trainable groups (lr x `cfg.lr_mult`, decay per `cfg.weight_decay_rule`)."""
    no_decay_norms = cfg.weight_decay_rule == "no_norms"
    groups = model.param_groups(cfg.lr, cfg.weight_decay, cfg.lr_mult, no_decay_norms=no_decay_norms)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig, schedule: Schedule) -> float:
    """Every group's lr at `step`, as mmcv's PolyLrUpdater with linear warm-up: poly decay from the
    group's own initial lr (cfg.lr x its lr_mult) to the absolute floor cfg.min_lr, warm-up applied
    to that. Returns the first group's lr (the one the release's log shows)."""
    for group in optimizer.param_groups:
        group["lr"] = poly_lr(step, base_lr=cfg.lr * group.get("lr_mult", 1.0), max_steps=schedule.iterations,
                              power=cfg.poly_power, min_lr=cfg.min_lr, warmup_steps=schedule.warmup_iters,
                              warmup_ratio=cfg.warmup_ratio)
    return optimizer.param_groups[0]["lr"]


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, model: CascadeCLIP, optimizer, scaler, step: int, resume_key: ResumeKey,
                    curve: list[dict], window: list[float], device: torch.device) -> None:
    state = {
        "step": step,
        "resume_key": dict(resume_key),
        "model": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "torch_rng": torch.get_rng_state(),
        # the training device's generator (dropout on the GPU); every DDP rank's equals rank 0's, as
        # all start from the same seed and draw the same amounts
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "curve": [[row[k] for k in CURVE_KEYS] for row in curve],
        "window": list(window),  # losses since the last logged point: a resumed curve equals an uninterrupted one
    }
    with atomic_file(path) as handle:
        torch.save(state, handle)


CURVE_KEYS = ("step", "loss", "focal", "dice", "lr")  # lr: the first param group's (x lr_mult)


def changed_entries(saved: Mapping[str, str], current: ResumeKey) -> list[str]:
    """Names of the resume-key entries that differ between a checkpoint and this run (sorted)."""
    return sorted(name for name in set(saved) | set(current) if saved.get(name) != current.get(name))


def load_checkpoint(path: Path, resume_key: ResumeKey) -> dict | None:
    """The checkpoint at `path` if it exists and was made from the same inputs, else None (logged)."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state.get("resume_key")
    if saved is None:
        reason = "it was written by an earlier version of cascade-clip, which did not record its inputs"
    else:
        changed = changed_entries(saved, resume_key)
        reason = f"{', '.join(changed)} changed since it was written" if changed else ""
    if reason:
        log.warning("not resuming from %s: %s; starting from step 0 (the checkpoint is replaced at the first new one)",
                    path, reason)
        return None
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    """The generators as the checkpoint saved them: the CPU's, and the CUDA device's when both the
    checkpoint and this run train on CUDA (else dropout after the resume differs, with a warning)."""
    torch.set_rng_state(state["torch_rng"])
    cuda = state.get("cuda_rng")
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    elif (device.type == "cuda") != (cuda is not None):
        log.warning("the checkpoint was written on %s, this run trains on %s: dropout after the resume differs "
                    "from an uninterrupted run", "CUDA" if cuda is not None else "the CPU", device)


@contextmanager
def torch_settings(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
    """torch's thread count (`cfg.threads`, so CPU results do not depend on the core count) and,
    with `cfg.deterministic`, deterministic algorithms and cuDNN; restored on the way out."""
    threads, algorithms = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        if device.type == "cuda":  # cuBLAS reads it when its first handle is made
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(algorithms)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------
def train(
    model: CascadeCLIP,
    class_embeddings: torch.Tensor,
    dataset: SegmentationDataset,
    *,
    cfg: TrainConfig,
    loss_cfg: LossConfig,
    schedule: Schedule,
    seed: int,
    checkpoint: Path,
    resume_key: ResumeKey,
    label_fn: LabelFn | None = None,
    on_log: Callable[[dict], None] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    save_model: Callable[[CascadeCLIP, Path], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `model`'s trainable parameters on `dataset` for `schedule.iterations` steps.

    class_embeddings [C, D] are the training class set (labels index into it). `label_fn`
    rewrites each batch's labels from that step's logits before the loss (online self-training).
    Resumes from `checkpoint` when it was written with the same `resume_key`; returns the loss curve.
    """
    rank, world = distributed()
    device = resolve_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    with torch_settings(cfg, device):
        torch.manual_seed(seed)
        model.to(device)
        class_embeddings = class_embeddings.to(device)
        optimizer = build_optimizer(model, cfg)
        scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None

        start, curve, window = 0, [], []
        state = load_checkpoint(checkpoint, resume_key)
        if state is not None:
            check_state_dict({k: v.shape for k, v in trainable_state(model).items()}, state["model"], source=str(checkpoint))
            model.load_state_dict(state["model"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            if scaler is not None and state["scaler"]:
                scaler.load_state_dict(state["scaler"])
            restore_rng(state, device)
            start = int(state["step"])
            curve = [dict(zip(CURVE_KEYS, row)) for row in state["curve"]]
            window = [float(x) for x in state.get("window", [])]
            log.info("resuming from %s at step %d of %d", checkpoint, start, schedule.iterations)
        if start >= schedule.iterations:
            return TrainResult(0, start, curve[-1]["loss"] if curve else math.nan, 0.0, curve)

        wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        sampler = StepSampler(start=start, end=schedule.iterations, batch=cfg.batch_size, accum=cfg.grad_accum, rank=rank, world=world)
        loader = torch.utils.data.DataLoader(
            SampleStream(dataset, seed), batch_size=cfg.batch_size, sampler=sampler,
            num_workers=cfg.num_workers, persistent_workers=False, drop_last=False,
            generator=torch.Generator().manual_seed(seed),  # keeps the global RNG (dropout) untouched
        )
        batches = iter(loader)
        model.train()
        bar = tqdm(range(start, schedule.iterations), initial=start, total=schedule.iterations,
                   desc="training", unit="it", disable=not progress or rank != 0)
        began = time.perf_counter()
        for step in bar:
            lr = set_lr(optimizer, step, cfg, schedule)
            optimizer.zero_grad(set_to_none=True)
            parts = {"loss": 0.0, "focal": 0.0, "dice": 0.0}
            for micro in range(cfg.grad_accum):
                batch = next(batches)
                images, labels = batch["image"].to(device), batch["label"].to(device)
                sync = wrapped.no_sync() if world > 1 and micro < cfg.grad_accum - 1 else nullcontext()
                with sync:
                    with autocast(device, cfg.amp):
                        output = wrapped(images, class_embeddings)
                    if label_fn is not None:
                        labels = label_fn(output.logits, labels)
                    num_masks = _global_mask_count(labels, class_embeddings.shape[0], world, device)
                    losses = segmentation_loss(output, labels, loss_cfg, num_masks=num_masks)
                    loss = losses.total / cfg.grad_accum
                    (scaler.scale(loss) if scaler else loss).backward()
                parts["loss"] += losses.total.item() / cfg.grad_accum
                parts["focal"] += losses.focal.item() / cfg.grad_accum
                parts["dice"] += losses.dice.item() / cfg.grad_accum
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            done = step + 1
            window.append(parts["loss"])
            if done % cfg.log_every == 0 or done == schedule.iterations:
                row = {"step": done, **{k: float(np.mean(window)) if k == "loss" else v for k, v in parts.items()}, "lr": lr}
                window = []
                curve.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
                if on_log and rank == 0:
                    on_log(row)
            if rank == 0 and save_model and schedule.half_checkpoint and done == max(schedule.iterations // 2, 1):
                save_model(model, schedule.half_checkpoint)
            if rank == 0 and (done % cfg.checkpoint_every == 0 or done == schedule.iterations):
                save_checkpoint(checkpoint, model, optimizer, scaler, done, resume_key, curve, window, device)
                if on_checkpoint:
                    on_checkpoint(done)
        bar.close()
        seconds = time.perf_counter() - began
        if world > 1:
            dist.barrier()
        return TrainResult(schedule.iterations - start, start, curve[-1]["loss"] if curve else math.nan, seconds, curve)


def _global_mask_count(labels: torch.Tensor, num_classes: int, world: int, device: torch.device) -> float:
    """Present (image, class) pairs, averaged over ranks as the release's loss does."""
    count = torch.tensor(float(count_masks(labels, num_classes)), device=device)
    if world > 1:
        dist.all_reduce(count)
        count = count / world
    return max(float(count), 1.0)
