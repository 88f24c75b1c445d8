"""Model tools behind the CLI: size and FLOPs, an inference benchmark, release-checkpoint import.

Each returns a JSON-ready dict.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.model.aggregation import WeightedSum, nga_initial_weights
from pipeline.config import LossConfig
from pipeline.errors import CascadeError
from pipeline.model.build import build_model
from pipeline.model.cascade import CascadeCLIP
from pipeline.model.checkpoint import referenced_keys
from pipeline.model.clip import create_clip
from pipeline.model.loss import segmentation_loss
from pipeline.model.presets import preset as preset_row
from pipeline.model.presets import preset_arch, preset_model_config
from pipeline.model.release import import_release_checkpoint

__all__ = ["model_info", "bench_inference", "bench_train_step", "import_release_checkpoint", "count_flops"]


def _build_preset(name: str, variant: str, device: str | torch.device = "cpu") -> CascadeCLIP:
    with torch.device(device):
        return build_model(preset_model_config(name, variant), preset_arch(name))


def file_bytes(model: CascadeCLIP, *, skip: set[str] = frozenset()) -> int:
    """Bytes of the model's tensors (but `skip`) in a model file (the metadata's few kB not counted)."""
    return sum(v.numel() * v.element_size() for k, v in model.state_dict().items() if k not in skip)


def count_flops(model: CascadeCLIP, image_size: int, num_classes: int) -> int:
    """FLOPs of one forward pass on one image (works on the meta device); multiply-adds = FLOPs / 2."""
    device = model.encoder.positional_embedding.device
    images = torch.zeros(1, 3, image_size, image_size, device=device)
    classes = torch.zeros(num_classes, model.encoder.embed_dim, device=device)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(images, classes)
    model.train(was_training)
    return counter.get_total_flops()


def model_info(preset: str, variant: str = "cascade", image_size: int = 512) -> dict:
    """Parameters, multiply-adds and FLOPs of one image, the bytes of its model file (with a reference to
    the backbone file, as the stages write it, and self-contained), stage split and NGA initial weights.

    The model is built on the meta device, so this is fast at paper size.
    """
    row = preset_row(preset)
    with torch.device("meta"):  # built on a CLIP checkpoint, as training does, so its model files can refer to it
        clip = create_clip(preset_arch(preset))
        model = build_model(preset_model_config(preset, variant), preset_arch(preset), clip.state_dict())
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parts = {
        "image_encoder_clip": sum(p.numel() for p in model.encoder.clip_parameters()),
        "prompts": sum(p.numel() for p in model.encoder.prompts.parameters()) if model.encoder.prompts is not None else 0,
        "taps": sum(p.numel() for p in model.encoder.tap_parameters()),
        "head": sum(p.numel() for p in model.head.parameters()),
        "text_encoder": sum(p.numel() for p in model.text_encoder.parameters()),
    }
    flops = count_flops(model, image_size, row["num_classes"])
    return {
        "preset": preset,
        "variant": variant,
        "image_size": image_size,
        "num_classes": row["num_classes"],
        "prompt_tokens": model.model_cfg.prompt_tokens,
        "params_total": total,
        "params_trainable": trainable,
        "params_by_part": parts,
        "flops": flops,
        "macs": flops // 2,
        "gmacs": round(flops / 2e9, 2),
        "model_file_bytes": file_bytes(model, skip=referenced_keys(model)),
        "model_file_bytes_self_contained": file_bytes(model),
        "backbone_file_bytes": sum(v.numel() * v.element_size() for v in clip.state_dict().values()),
        "stages": [list(s) for s in model.stages],
        "aggregators": [type(agg).__name__ for agg in model.head.aggregators],
        "nga_initial_weights": initial_nga_weights(model),
    }


def initial_nga_weights(model: CascadeCLIP) -> list[list[float] | None]:
    """Per stage, the NGA initial weights (None for stages without NGA weights)."""
    cfg = model.model_cfg
    out = []
    for agg, (start, end) in zip(model.head.aggregators, model.stages):
        if isinstance(agg, WeightedSum) and cfg.aggregator == "nga":
            out.append([round(w, 4) for w in nga_initial_weights(end - start + 1, cfg.nga_sigma).tolist()])
        else:
            out.append(None)
    return out


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


AMP_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}
"""autocast dtype of each `amp` mode of bench_inference ("none": fp32, no autocast)"""

PAPER_TABLE12 = {"gpu": "RTX 3090", "batch_size": 1, "fps": {"cascade": 18.4, "zegclip": 20.9}}
"""the paper's Table 12 (COCO-Stuff model): frames per second of each variant on one RTX 3090"""


class DeviceError(CascadeError, ValueError):
    """A benchmark asked for a device this machine or this torch build does not have."""


def bench_inference(
    preset: str,
    variants: Sequence[str] = ("cascade", "zegclip"),
    amp: Literal["none", "fp16", "bf16"] = "none",
    image_size: int = 512,
    runs: int = 5,
    warmup: int = 2,
    batch_size: int = 1,
    device: str = "cpu",
    threads: int | None = None,
) -> dict:
    """Median latency and throughput (FPS) of randomly initialised preset models, in one process:
    images to label maps (`CascadeCLIP.predict`: the forward, scores at the input size, arg-max).

    At batch 1 the FPS is the paper's Table 12 measure (`PAPER_TABLE12`, in the result for
    comparison). On CUDA each call is timed by the wall clock between two `torch.cuda.synchronize()`,
    as mmsegmentation's tools/benchmark.py does, rather than by CUDA events: the frame rate then
    includes the host's work, as an application's would. Peak RSS is the process's high-water mark
    after each variant (it only grows); on CUDA the peak GPU memory of each variant is reported too
    (its counter reset before each).

    Args:
        preset: model preset name ("demo", "coco", ...).
        variants: model variants, timed one after the other.
        amp: "none" (fp32), or autocast to "fp16" or "bf16" on the device (fp16 is meant for CUDA;
            torch's CPU autocast accepts it but is slow).
        image_size: side of the random square images, in pixels.
        runs: timed forward passes per variant; their median is reported.
        warmup: untimed forward passes per variant first.
        batch_size: images per forward pass [B, 3, image_size, image_size].
        device: torch device ("cpu", "cuda", "cuda:N").
        threads: torch's CPU threads for the run (None keeps the current setting).

    Raises:
        DeviceError: the device is not available (CUDA without a GPU), or bf16 on a GPU without it.
        ValueError: an unknown `amp` mode.
    """
    if amp != "none" and amp not in AMP_DTYPES:
        raise ValueError(f"amp {amp!r}: use none, {', '.join(AMP_DTYPES)}")
    dev = _check_device(device, amp)
    with _torch_threads(threads):
        return _bench(preset, variants, amp, image_size, runs, warmup, batch_size, dev)


def _check_device(device: str, amp: str = "none") -> torch.device:
    """`device` as a torch.device with an index on CUDA, or a DeviceError naming the fix."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"--device {device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: CUDA is not available (torch {torch.__version__}, "
                          f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); "
                          "run on a machine with an NVIDIA GPU and a CUDA build of torch, or use --device cpu")
    dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    if dev.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"--amp bf16: {torch.cuda.get_device_name(dev)} has no bfloat16; use --amp fp16")
    return dev


def _device_name(device: torch.device) -> str:
    """The GPU's name on CUDA; the CPU's model name (Linux's /proc/cpuinfo) on CPU, else its architecture."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as handle:
                names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        except OSError:
            names = []
        return names[0] if names and names[0] else (platform.processor() or platform.machine() or "cpu")
    return str(device)


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to `threads` inside (None keeps them), restored on the way out."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _bench(preset: str, variants: Sequence[str], amp: str, image_size: int, runs: int, warmup: int,
           batch_size: int, device: torch.device) -> dict:
    row = preset_row(preset)
    cuda = device.type == "cuda"
    results: dict[str, dict] = {}
    for variant in variants:
        model = _build_preset(preset, variant, "cpu").to(device).eval()
        images = torch.randn(batch_size, 3, image_size, image_size, device=device)
        classes = torch.nn.functional.normalize(torch.randn(row["num_classes"], model.encoder.embed_dim, device=device), dim=-1)
        autocast = torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp in AMP_DTYPES else nullcontext()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode(), autocast:
            # to the label map, as a user's inference: forward, scores at the input size, arg-max
            latency = _median_seconds(lambda: model.predict(images, classes), runs=runs, warmup=warmup, device=device)
        fps = round(batch_size / latency, 3)
        results[variant] = {
            "median_latency_s": _significant(latency),
            "fps": fps,
            "images_per_s": fps,
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            "runs": runs,
        }
        if cuda:
            results[variant]["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        del model, images, classes
        if cuda:
            torch.cuda.empty_cache()
    out = {
        "preset": preset,
        "amp": amp,
        "image_size": image_size,
        "batch_size": batch_size,
        "device": str(device),
        "device_name": _device_name(device),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "variants": results,
        "paper_table12": PAPER_TABLE12,
    }
    if "cascade" in results and "zegclip" in results:
        out["cascade_over_zegclip_latency"] = round(
            results["cascade"]["median_latency_s"] / results["zegclip"]["median_latency_s"], 3
        )
    return out


def bench_train_step(
    preset: str,
    variants: Sequence[str] = ("cascade",),
    image_size: int = 512,
    batch_size: int = 1,
    runs: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    threads: int | None = None,
) -> dict:
    """Median time of one full training step (forward, the release's loss, backward, AdamW) of
    randomly initialised preset models on random images and labels, fp32. The step trains over
    all the preset's classes, as self-training does (the inductive step sees fewer: a bit faster).

    Raises:
        DeviceError: the device is not available (CUDA without a GPU).
    """
    _check_device(device)
    with _torch_threads(threads):
        row = preset_row(preset)
        results: dict[str, dict] = {}
        for variant in variants:
            torch.manual_seed(0)
            model = _build_preset(preset, variant, "cpu").to(device).train()
            classes = torch.nn.functional.normalize(torch.randn(row["num_classes"], model.encoder.embed_dim, device=device), dim=-1)
            images = torch.randn(batch_size, 3, image_size, image_size, device=device)
            labels = torch.randint(0, row["num_classes"], (batch_size, image_size, image_size), device=device)
            optimizer = torch.optim.AdamW(model.param_groups(2e-4, 0.01, 10.0), lr=2e-4)

            def train_step() -> None:
                optimizer.zero_grad(set_to_none=True)
                segmentation_loss(model(images, classes), labels, LossConfig()).total.backward()
                optimizer.step()

            step = _median_seconds(train_step, runs=runs, warmup=warmup, device=device)
            results[variant] = {"median_step_s": _significant(step), "images_per_s": round(batch_size / step, 3),
                                "classes": row["num_classes"], "peak_rss_mb": round(_peak_rss_mb(), 1), "runs": runs}
            del model, optimizer
        return {"preset": preset, "image_size": image_size, "batch_size": batch_size, "device": device,
                "torch_threads": torch.get_num_threads(), "variants": results}


def _median_seconds(step: Callable[[], object], *, runs: int, warmup: int, device: str | torch.device) -> float:
    """Median wall time of `step` over `runs` calls, after `warmup` untimed ones (CUDA synchronised
    around each call)."""
    times = []
    for i in range(warmup + runs):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _significant(seconds: float, digits: int = 4) -> float:
    """A time rounded to `digits` significant figures: a fixed number of decimals would turn a
    32.48 ms step into 0.032 s, 1.5% off the throughput reported beside it."""
    return float(f"{seconds:.{digits}g}")


def _sync(device: str | torch.device) -> None:
    """Wait for the work queued on `device` (CUDA); nothing to wait for on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
