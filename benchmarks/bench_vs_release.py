"""Our model against the authors' release, side by side in one process: parity first, then time.

    python -m benchmarks.bench_vs_release RELEASE_REPO [--image-size 512] [--classes 171] [--threads 2]
        [--runs 5] [--train-runs 3] [--batch 1 8] [--tiny] [--json FILE]

RELEASE_REPO is a fetched copy of HVision-NKU/Cascade-CLIP (a git directory or a checkout), read at
run time: its network is built by its own classes with benchmarks/release_parity.py's stand-ins
for mmcv/mmseg. At paper size that is its COCO-Stuff config: ViT-B/16 (12 blocks, width 768),
the `coco` preset's prompt tokens (50) and stages ({6-8}, {9-11}, {12}), IMAGE x IMAGE inputs and
CLASSES classes (COCO-Stuff's unseen split); `--tiny` builds release_parity's tiny network instead
(finishes in seconds). Every weight is seeded-random (release_parity's `randomise`, the decoders
scaled to logits of std 3); nothing is downloaded. The release's state dict goes into our model
(the `coco` preset's config, release behaviour on) through a release-format checkpoint and
`import_release_checkpoint`, so both hold the same weights; the class embeddings are random unit
rows, the same for both.

1. Parity: one image through both in eval mode, logits (the release's pred_masks) and inference
   scores (sigmoid, seen classes - 0.1); exits with status 1, timing nothing, if either differs by
   more than 1e-5 of the release's largest logit.
2. Timings in one process, fp32 on the CPU at --threads, interleaved (release, ours, release, ours,
   ...) after one untimed round:
   - inference at each --batch under torch.no_grad: the forward to inference scores at the input
     size (release: extract_feat + decode_head.forward in eval mode, which returns both; ours:
     model(images, T).scores(0.1, seen)); median of --runs;
   - one training step at batch 2: the forward in train mode, the mean logit as the loss,
     backward, AdamW over the model's trainable parameters; median of --train-runs.
3. The machine's fp32 peak, before and after the timings: the median of ten 2048x2048 matmuls,
   in GFLOP/s, by torch.mm (MKL) and by oneDNN's linear (which our frozen blocks use; on this
   project's CPUs it is the faster one), the peak being the largest; the forward's GFLOP for one image (torch.utils.flop_counter, attention counted
   through its math path, since the counter has no formula for the CPU's fused kernel), and the
   fraction of the peak each model reaches.

Prints a table: medians, ours/release, trainable parameters, GFLOP, fraction of peak, the 1-minute
load average before and after, torch version and threads; `--json FILE` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.release_parity import (
    ALL_CLASSES,
    IMAGE,
    RELEASE_REPO,
    SEED,
    SEEN,
    build_release,
    install_stand_ins,
    our_configs,
    randomise,
    release_config,
    release_sources,
    scale_decoders,
)
from pipeline.config import ModelConfig
from pipeline.data.catalog import get_dataset
from pipeline.model import CascadeCLIP, load
from pipeline.model.frozen_linear import CPU_LIBRARY, ONEDNN, onednn
from pipeline.model.presets import preset_arch, preset_model_config
from pipeline.model.release import import_release_checkpoint

PRESET = "coco"  # our model's preset at paper size
DATASET = "coco_stuff164k"  # its unseen split marks the seen classes of the inference scores
CALIBRATION = 0.1  # subtracted from the seen classes' scores, as the release's inference does
RTOL = 1e-5  # allowed difference, relative to the release's largest logit (scores: the same bound)
TRAIN_BATCH = 2
PEAK_SIDE = 2048  # the matmul that measures the machine's fp32 peak


@dataclass
class Pair:
    """The two networks with the same weights, and what both are called with."""

    release: nn.Module
    """the release's CascadeCLIP segmentor (its own classes, stand-in registries)"""
    ours: CascadeCLIP
    """our model, holding the release's weights"""
    text: torch.Tensor
    """class embeddings [C, D], unit rows"""
    seen: torch.Tensor
    """seen classes [C] bool (their scores get - CALIBRATION)"""
    image_size: int
    """input side in pixels"""
    commit: str
    """the release's commit ('unknown' for a plain copy)"""
    size: str
    """the network's size, in words"""


# ---------------------------------------------------------------------------------------------
# building both
# ---------------------------------------------------------------------------------------------
def paper_release_config(text_file: str, model_cfg: ModelConfig, arch: dict, classes: int, seen: list[int]) -> dict:
    """release_parity's config with every size taken from our config and arch (the release's COCO config)."""
    vision, text = arch["vision_cfg"], arch["text_cfg"]
    depth, width, embed = vision["layers"], vision["width"], arch["embed_dim"]
    taps = [b - 1 for start, end in model_cfg.stages for b in range(start, end + 1) if b != depth]  # 0-based
    if len(model_cfg.stages) != 3 or len(taps) != 6 or tuple(model_cfg.stages[-1]) != (depth, depth):
        raise SystemExit(f"the release's head decodes taps [:3], [3:6] and the last block; stages {model_cfg.stages} "
                         "do not fit it")
    config = release_config(text_file)
    config["backbone"] |= {
        "patch_size": vision["patch_size"], "width": width, "heads": width // vision.get("head_width", 64),
        "output_dim": embed, "layers": depth, "input_resolution": model_cfg.image_size, "out_indices": taps,
        "num_tokens": model_cfg.prompt_tokens, "prompt_dim": width, "total_d_layer": depth - 1,
    }
    config["text_encoder"] |= {
        "context_length": text["context_length"], "vocab_size": text["vocab_size"], "embed_dim": embed,
        "transformer_width": text["width"], "transformer_heads": text["heads"], "transformer_layers": text["layers"],
    }
    config["decode_head"] |= {
        "img_size": model_cfg.image_size, "in_channels": embed, "channels": embed, "num_classes": len(seen),
        "seen_idx": seen, "all_idx": list(range(classes)), "embed_dims": embed,
        "num_layers": model_cfg.decoder_layers, "num_heads": model_cfg.decoder_heads, "use_stages": len(taps),
    }
    config["decode_head"]["loss_decode"] |= {"num_classes": len(seen), "dec_layers": model_cfg.decoder_layers}
    config |= {
        "context_length": text["context_length"], "class_names": [f"class{c}" for c in range(classes)],
        "base_class": seen, "novel_class": [c for c in range(classes) if c not in seen],
        "both_class": list(range(classes)),
    }
    return config


def build_pair(repo: Path, tmp: Path, *, tiny: bool, image_size: int, classes: int) -> Pair:
    """Both networks from one seeded set of weights (the release's, imported into ours)."""
    commit = release_sources(repo, tmp)
    install_stand_ins(tmp)
    gen = torch.Generator().manual_seed(SEED)
    if tiny:
        configs = our_configs()
        model_cfg, arch, seen, classes = ModelConfig(**configs["model_config"]), configs["arch"], SEEN, len(ALL_CLASSES)
    else:
        model_cfg = preset_model_config(PRESET).model_copy(update={"image_size": image_size})
        arch = preset_arch(PRESET)
        unseen = set(get_dataset(DATASET).unseen_ids())
        seen = [c for c in range(classes) if c not in unseen]
    text = F.normalize(torch.randn(classes, arch["embed_dim"], generator=gen), dim=-1)
    text_file = tmp / "class_embeddings.npy"
    np.save(text_file, text.numpy())
    if tiny:
        config = release_config(str(text_file))
    else:
        config = paper_release_config(str(text_file), model_cfg, arch, classes, seen)
    with contextlib.redirect_stdout(io.StringIO()):  # the release prints its masks and taps while it builds
        release = build_release(config)
    randomise(release, gen)
    scale_decoders(release, torch.randn(1, 3, model_cfg.image_size, model_cfg.image_size, generator=gen), text)
    torch.save({"meta": {}, "state_dict": dict(release.state_dict()), "optimizer": {}}, tmp / "release.pth")
    summary = import_release_checkpoint(tmp / "release.pth", tmp / "ours.safetensors", model_cfg=model_cfg, arch=arch)
    ours = load(summary["out"])
    (tmp / "release.pth").unlink()
    seen_mask = torch.zeros(classes, dtype=torch.bool)
    seen_mask[seen] = True
    vision = arch["vision_cfg"]
    size = (f"ViT-B/{vision['patch_size']}" if vision["width"] == 768 else f"ViT/{vision['patch_size']}") + (
        f", {vision['layers']} blocks, width {vision['width']}, {model_cfg.image_size}x{model_cfg.image_size}, "
        f"{classes} classes ({len(seen)} seen), {model_cfg.prompt_tokens} prompt tokens, "
        f"stages {[list(s) for s in model_cfg.stages]}")
    return Pair(release, ours, text, seen_mask, model_cfg.image_size, commit, ("tiny: " if tiny else "") + size)


# ---------------------------------------------------------------------------------------------
# what is compared and timed
# ---------------------------------------------------------------------------------------------
def release_forward(release: nn.Module, images: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
    """The release's network: pred_masks [B, C, H, W], and in eval mode its inference scores as pred."""
    return release.decode_head.forward([release.extract_feat(images), text])


def inference_calls(pair: Pair, images: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Each model's forward to inference scores at the input size."""
    return {
        "release": lambda: release_forward(pair.release, images, pair.text)["pred"],
        "ours": lambda: pair.ours(images, pair.text).scores(CALIBRATION, pair.seen),
    }


def difference(ours: torch.Tensor, release: torch.Tensor, allowed: float) -> dict[str, float]:
    diff = (ours - release).abs().max().item()
    scale = release.abs().max().item()
    return {"max_abs": diff, "max_release": scale, "relative": diff / scale, "allowed_abs": allowed}


def parity(pair: Pair, image: torch.Tensor) -> dict[str, dict[str, float]]:
    """Differences of the logits and the inference scores on one image, eval mode. Both may differ
    by RTOL of the release's largest logit (sigmoid's slope is at most 1/4, so matching logits give
    scores within a quarter of that)."""
    pair.release.eval()
    pair.ours.eval()
    with torch.no_grad():
        theirs = release_forward(pair.release, image, pair.text)
        mine = pair.ours(image, pair.text)
        allowed = RTOL * theirs["pred_masks"].abs().max().item()
        return {"logits": difference(mine.logits, theirs["pred_masks"], allowed),
                "scores": difference(mine.scores(CALIBRATION, pair.seen), theirs["pred"], allowed)}


def parity_failures(differences: dict[str, dict[str, float]]) -> list[str]:
    return [name for name, d in differences.items() if d["max_abs"] > d["allowed_abs"]]


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_calls(pair: Pair, images: torch.Tensor) -> dict[str, Callable[[], None]]:
    """Each model's training step: train-mode forward, mean logit, backward, AdamW (the release's COCO lr)."""
    forwards = {
        "release": lambda: release_forward(pair.release, images, pair.text)["pred_masks"],
        "ours": lambda: pair.ours(images, pair.text).logits,
    }
    models = {"release": pair.release, "ours": pair.ours}

    def step(forward: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            forward().mean().backward()
            optimizer.step()

        return run

    calls = {}
    for name, model in models.items():
        model.train()
        calls[name] = step(forwards[name], torch.optim.AdamW(trainable(model), lr=2e-5, weight_decay=0.01))
    return calls


def interleaved(calls: dict[str, Callable[[], object]], *, runs: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of the calls taken in turn (a, b, a, b, ...), after `warmup` untimed rounds."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    return times


def matmul_gflops(side: int = PEAK_SIDE, runs: int = 10) -> dict[str, float]:
    """fp32 GFLOP/s of a side x side matmul (median of `runs` after two untimed), by torch.mm (MKL)
    and, where torch has it, by oneDNN's linear (the library our frozen blocks use on AVX-512 CPUs)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(side, side, generator=gen), torch.randn(side, side, generator=gen)
    calls = {"torch.mm": lambda: a @ b}
    if ONEDNN:
        calls["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    times = interleaved(calls, runs=runs, warmup=2)
    return {name: 2 * side**3 / statistics.median(t) / 1e9 for name, t in times.items()}


@contextlib.contextmanager
def attention_counted() -> Iterator[None]:
    """Attention as plain matmuls that FlopCounterMode counts: SDPA through its math path,
    nn.MultiheadAttention off its fused fast path (the counter has no formula for the CPU kernels)."""
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


def forward_flops(call: Callable[[], object]) -> int:
    """FLOPs of one call (with grad enabled: the counter's module tracker fails on parameters under no_grad;
    our frozen linear layers through torch's matmul, which the counter knows)."""
    with attention_counted(), onednn(False), FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def measure(pair: Pair, *, batches: list[int], runs: int, train_runs: int) -> dict:
    gen = torch.Generator().manual_seed(SEED + 1)
    side = pair.image_size
    one = torch.randn(1, 3, side, side, generator=gen)
    differences = parity(pair, one)
    out: dict = {"parity": differences}
    if parity_failures(differences):
        return out
    out["trainable_params"] = {"release": sum(p.numel() for p in trainable(pair.release)),
                               "ours": sum(p.numel() for p in trainable(pair.ours))}
    out["forward_flops"] = {name: forward_flops(call) for name, call in inference_calls(pair, one).items()}
    out["peak_gflops_before"] = matmul_gflops()
    timings: dict[str, dict[str, list[float]]] = {}
    for batch in batches:
        images = torch.randn(batch, 3, side, side, generator=gen)
        with torch.no_grad():
            timings[f"inference, batch {batch}"] = interleaved(inference_calls(pair, images), runs=runs)
        del images
        gc.collect()
    images = torch.randn(TRAIN_BATCH, 3, side, side, generator=gen)
    timings[f"training step, batch {TRAIN_BATCH}"] = interleaved(train_calls(pair, images), runs=train_runs)
    out["peak_gflops_after"] = matmul_gflops()
    peak = max(*out["peak_gflops_before"].values(), *out["peak_gflops_after"].values())
    out["timings"] = {name: medians(t) for name, t in timings.items()}
    out["fraction_of_peak"] = {}
    for batch in batches:
        seconds = out["timings"][f"inference, batch {batch}"]
        out["fraction_of_peak"][f"batch {batch}"] = {
            name: out["forward_flops"][name] * batch / seconds[f"{name}_s"] / 1e9 / peak for name in ("release", "ours")
        }
    return out


def profiles(pair: Pair, *, rows: int = 10) -> dict[str, str]:
    """torch.profiler's top `rows` operators by self CPU time, per model, for one inference at batch 1
    and one training step at batch TRAIN_BATCH (each after one unprofiled call)."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(SEED + 2)
    side = pair.image_size
    out = {}

    def profiled(title: str, call: Callable[[], object]) -> None:
        call()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
        out[title] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40)

    pair.release.eval()
    pair.ours.eval()
    with torch.no_grad():
        for name, call in inference_calls(pair, torch.randn(1, 3, side, side, generator=gen)).items():
            profiled(f"{name}, inference, batch 1", call)
    for name, call in train_calls(pair, torch.randn(TRAIN_BATCH, 3, side, side, generator=gen)).items():
        profiled(f"{name}, training step, batch {TRAIN_BATCH}", call)
    return out


def medians(times: dict[str, list[float]]) -> dict:
    release, ours = statistics.median(times["release"]), statistics.median(times["ours"])
    return {"release_s": release, "ours_s": ours, "ratio": ours / release,
            "runs_release_s": times["release"], "runs_ours_s": times["ours"]}


def report(result: dict) -> str:
    """The printed table."""
    lines = [
        f"ours against the release ({result['release']['repository']} {result['release']['commit'][:7]}), "
        f"fp32, CPU, torch {result['torch']}, {result['threads']} threads, OpenMP wait: {result['openmp_wait']}",
        f"CPU: {result['cpu']}",
        f"network: {result['size']}",
    ]
    for name, d in result["parity"].items():
        lines.append(f"parity, one image, eval: {name} max |ours - release| {d['max_abs']:.3g}, "
                     f"relative to max |release| {d['max_release']:.3g}: {d['relative']:.3g} "
                     f"(allowed: {d['allowed_abs']:.3g})")
    if "timings" not in result:
        return "\n".join(lines)
    peaks = ", ".join(f"{name} {result['peak_gflops_before'][name]:.1f} before, {result['peak_gflops_after'][name]:.1f} after"
                      for name in result["peak_gflops_before"])
    lines.append(f"fp32 matmul {PEAK_SIDE}x{PEAK_SIDE}, GFLOP/s: {peaks} (peak: the largest)")
    lines += ["", f"{'median (s)':<26}{'release':>12}{'ours':>12}{'ours/release':>14}{'runs':>6}"]
    for name, t in result["timings"].items():
        runs = len(t["runs_ours_s"])
        lines.append(f"{name:<26}{t['release_s']:>12.4g}{t['ours_s']:>12.4g}{t['ratio']:>14.3f}{runs:>6}")
    lines += ["", f"{'':<26}{'release':>12}{'ours':>12}{'ours/release':>14}"]
    params, flops = result["trainable_params"], result["forward_flops"]
    lines.append(f"{'trainable parameters':<26}{params['release']:>12,}{params['ours']:>12,}"
                 f"{params['ours'] / params['release']:>14.3f}")
    lines.append(f"{'forward GFLOP, 1 image':<26}{flops['release'] / 1e9:>12.4g}{flops['ours'] / 1e9:>12.4g}"
                 f"{flops['ours'] / flops['release']:>14.3f}")
    for name, fraction in result["fraction_of_peak"].items():
        lines.append(f"{'fraction of peak, ' + name:<26}{fraction['release']:>12.2f}"
                     f"{fraction['ours']:>12.2f}")
    lines += ["", f"load average (1 min): {result['load_before']:.2f} before, {result['load_after']:.2f} after"]
    return "\n".join(lines)


def openmp_wait() -> str:
    settings = [f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ]
    return ", ".join(settings) or "libgomp's default"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", type=Path, help=f"a fetched copy of {RELEASE_REPO} (git directory or checkout)")
    parser.add_argument("--image-size", type=int, default=512, help="input side in pixels (paper size: 512)")
    parser.add_argument("--classes", type=int, default=171, help="classes (COCO-Stuff: 171)")
    parser.add_argument("--threads", type=int, default=2, help="torch's CPU threads")
    parser.add_argument("--runs", type=int, default=5, help="timed inference calls per model and batch")
    parser.add_argument("--train-runs", type=int, default=3, help="timed training steps per model")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="inference batch sizes")
    parser.add_argument("--tiny", action="store_true",
                        help=f"release_parity's tiny network ({IMAGE}x{IMAGE}, {len(ALL_CLASSES)} classes; "
                             "--image-size and --classes ignored)")
    parser.add_argument("--json", type=Path, help="also write the result to this JSON file")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top 10 operators (self CPU time) of each model's inference "
                             "at batch 1 and training step")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    # the release imports timm.models.layers, which timm deprecates
    warnings.filterwarnings("ignore", "Importing from timm.models.layers is deprecated", FutureWarning)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        pair = build_pair(args.repo, Path(tmp), tiny=args.tiny, image_size=args.image_size, classes=args.classes)
    result = {
        "command": "python -m benchmarks.bench_vs_release " + " ".join(sys.argv[1:] if argv is None else argv),
        "release": {"repository": RELEASE_REPO, "commit": pair.commit},
        "size": pair.size,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "openmp_wait": openmp_wait(),
        "cpu": f"{torch.backends.cpu.get_cpu_capability()}, frozen wide layers on "
               f"{'oneDNN' if CPU_LIBRARY == 'onednn' and ONEDNN else 'torch (MKL)'}",
        **measure(pair, batches=args.batch, runs=args.runs, train_runs=args.train_runs),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }
    print(report(result))
    if args.profile and not parity_failures(result["parity"]):
        result["profiles"] = profiles(pair)
        for title, table in result["profiles"].items():
            print(f"\nprofile: {title}\n{table}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    failed = parity_failures(result["parity"])
    if failed:
        print(f"PARITY FAILED: {', '.join(failed)} differ by more than {RTOL:g} of the release's largest logit; "
              "nothing was timed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
