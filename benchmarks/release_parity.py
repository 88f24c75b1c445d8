"""Golden values from the authors' release for tests/test_release_parity.py.

Builds the release's own network (HVision-NKU/Cascade-CLIP: VPTCLIPVisionTransformer,
CLIPTextEncoder, ATMSingleHeadSeg with SegLossPlus, inside its CascadeCLIP segmentor) from a fetched
copy of the repository, at a TINY size, on the CPU, with the smallest stand-ins for mmcv/mmseg
written below (registries, a build-only EncoderDecoder and BaseDecodeHead, no-op fp16 decorators,
names that are imported but never used). Every weight gets a seeded random value, the decoders'
large enough that the logits are of order 1-10. Writes

    OUT.safetensors  release/<key>: the release-format state dict (what a release .pth holds)
                     input/images [B, 3, S, S], input/class_embeddings [C, D] (unit rows),
                     input/labels [B, S, S] (dataset class ids, 255 ignored), input/seen [C_seen]
                     output/logits [B, C, S, S]: the head's pred_masks for all classes, eval mode
                     output/scores [B, C, S, S]: its inference scores (sigmoid, seen classes - 0.1)
                     output/loss_mask, output/loss_dice: forward_train's weighted loss terms
                     (seen classes, dropout off, labels remapped by the segmentor itself)
    OUT.json         release commit and config, our arch and model config, every tensor's shape

The golden file in tests/data was made from release commit
dadf40dcf1d596bede8e53e389250104eccce24b (HVision-NKU/Cascade-CLIP, "Update README.md") with

    python -m benchmarks.release_parity RELEASE_REPO --out tests/data/release_golden

where RELEASE_REPO is a fetched copy of it (torch 2.14.1, timm 1.0.31, CPU): a git directory (a bare mirror or a clone's .git; HEAD
is read with `git archive`) or a plain checkout. Nothing here is imported by the project.

Stand-ins beyond mmcv/mmseg, each because the release cannot be imported or built without it here:
- the release's `models/__init__.py` imports its dataset classes (mmseg datasets); a bare `models`
  package is put in its place so only the network modules are imported;
- its decode head creates the NGA weights with device='cuda'; they are created on the CPU;
- it imports `timm.models.layers.drop`, which timm >= 0.9 no longer exposes (the release pins
  timm 0.3.2); the attribute is added, pointing at timm's drop module.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tarfile
import tempfile
import types
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

RELEASE_REPO = "HVision-NKU/Cascade-CLIP"

# the tiny configuration: the paper's layout (12 blocks, taps after blocks 6..11, stages {6-8},
# {9-11}, {12}, 3-layer decoders) at width 32
IMAGE = 64  # input side; patch 8 -> an 8x8 token grid
PATCH = 8
WIDTH = 32  # visual width
VISUAL_HEADS = 4
DEPTH = 12
EMBED = 32  # CLIP embedding = decoder width
DECODER_HEADS = 4
PROMPTS = 3
TEXT_WIDTH, TEXT_HEADS, TEXT_LAYERS, CONTEXT, VOCAB = 32, 2, 1, 8, 64
OUT_INDICES = [5, 6, 7, 8, 9, 10]  # 0-based, as the release's COCO config
ALL_CLASSES = list(range(6))
NOVEL = [2, 5]
SEEN = [c for c in ALL_CLASSES if c not in NOVEL]
BATCH = 2
SEED = 20240719
LOGIT_STD = 3.0  # the final logits' standard deviation the decoders are scaled to


def release_config(text_embedding: str) -> dict:
    """The release segmentor's config at the tiny size (the COCO config's keys and choices)."""
    return {
        "type": "CascadeCLIP",
        "pretrained": None,
        "pretrained_text": None,
        "context_length": CONTEXT,
        "class_names": [f"class{c}" for c in ALL_CLASSES],
        "backbone": {
            "type": "VPTCLIPVisionTransformer", "patch_size": PATCH, "width": WIDTH, "heads": VISUAL_HEADS,
            "output_dim": EMBED, "get_embeddings": True, "drop_path_rate": 0.1, "layers": DEPTH,
            "input_resolution": IMAGE, "out_indices": OUT_INDICES, "num_tokens": PROMPTS, "prompt_dim": WIDTH,
            "total_d_layer": DEPTH - 1, "style": "pytorch",
        },
        "text_encoder": {
            "type": "CLIPTextEncoder", "context_length": CONTEXT, "vocab_size": VOCAB, "embed_dim": EMBED,
            "transformer_width": TEXT_WIDTH, "transformer_heads": TEXT_HEADS, "transformer_layers": TEXT_LAYERS,
            "style": "pytorch",
        },
        "decode_head": {
            "type": "ATMSingleHeadSeg", "img_size": IMAGE, "in_channels": EMBED, "channels": EMBED,
            "num_classes": len(SEEN), "seen_idx": SEEN, "all_idx": ALL_CLASSES, "embed_dims": EMBED,
            "num_layers": 3, "num_heads": DECODER_HEADS, "use_stages": len(OUT_INDICES),
            "loss_decode": {"type": "SegLossPlus", "num_classes": len(SEEN), "dec_layers": 3,
                            "mask_weight": 100.0, "dice_weight": 1.0, "loss_weight": 1.0},
        },
        "test_cfg": {"mode": "whole"},
        "base_class": SEEN,
        "novel_class": NOVEL,
        "both_class": ALL_CLASSES,
        "ft_backbone": False,
        "exclude_key": "prompt",
        "load_text_embedding": text_embedding,
    }


def our_configs() -> dict:
    """The same network in our terms: an open_clip arch and a ModelConfig (as JSON-ready dicts)."""
    return {
        "arch": {
            "embed_dim": EMBED,
            "quick_gelu": True,
            "vision_cfg": {"image_size": IMAGE, "layers": DEPTH, "width": WIDTH, "patch_size": PATCH,
                           "head_width": WIDTH // VISUAL_HEADS},
            "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": TEXT_WIDTH, "heads": TEXT_HEADS,
                         "layers": TEXT_LAYERS},
        },
        "model_config": {
            "variant": "cascade",
            "stages": [[OUT_INDICES[0] + 1, OUT_INDICES[2] + 1], [OUT_INDICES[3] + 1, OUT_INDICES[5] + 1], [DEPTH, DEPTH]],
            "aggregator": "nga",
            "prompt_tokens": PROMPTS,
            "decoder_layers": 3,
            "decoder_heads": DECODER_HEADS,
            "image_size": IMAGE,
            "release_double_cls": True,
            "tap_init": "random",
            "tap_trainable": False,
        },
    }


# ---------------------------------------------------------------------------------------------
# the release's sources
# ---------------------------------------------------------------------------------------------
def release_sources(repo: Path, into: Path) -> str:
    """Copy the release's `models/` into `into`; returns the commit (or 'unknown' for a plain copy)."""
    git_dir = repo / ".git" if (repo / ".git").is_dir() else repo
    if (git_dir / "HEAD").is_file() and (git_dir / "objects").is_dir():
        commit = subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", "HEAD"], check=True, capture_output=True,
                                text=True).stdout.strip()
        archive = subprocess.run(["git", f"--git-dir={git_dir}", "archive", "--format=tar", commit, "models"],
                                 check=True, capture_output=True).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(into, filter="data")
        return commit
    if not (repo / "models" / "decode_heads" / "decode_seg.py").is_file():
        raise SystemExit(f"{repo}: neither a git directory nor a checkout of {RELEASE_REPO}")
    subprocess.run(["cp", "-r", str(repo / "models"), str(into)], check=True)
    return "unknown"


# ---------------------------------------------------------------------------------------------
# stand-ins for mmcv / mmseg: only what the release's network modules import and build with
# ---------------------------------------------------------------------------------------------
class Registry:
    """Name -> class, filled by a `register_module()` decorator; `build` instantiates a config dict."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.classes: dict[str, type] = {}

    def register_module(self):
        def register(cls: type) -> type:
            self.classes[cls.__name__] = cls
            return cls

        return register

    def build(self, cfg: dict) -> nn.Module:
        cfg = dict(cfg)
        kind = cfg.pop("type")
        if kind not in self.classes:
            raise KeyError(f"{kind} is not in the {self.name} registry (registered: {sorted(self.classes)})")
        return self.classes[kind](**cfg)


class BaseDecodeHead(nn.Module):
    """The attributes an mmseg decode head sets that the release's head reads, and its loss."""

    def __init__(self, in_channels, channels, *, num_classes, loss_decode, ignore_index=255, align_corners=False):
        super().__init__()
        self.in_channels, self.channels, self.num_classes = in_channels, channels, num_classes
        self.ignore_index, self.align_corners = ignore_index, align_corners
        self.loss_decode = LOSSES.build(loss_decode)


class EncoderDecoder(nn.Module):
    """Builds the backbone and (through the subclass's `_init_decode_head`) the head; nothing else."""

    def __init__(self, backbone, decode_head, neck=None, auxiliary_head=None, train_cfg=None, test_cfg=None,
                 pretrained=None, init_cfg=None):
        super().__init__()
        if neck is not None or auxiliary_head is not None or pretrained is not None:
            raise NotImplementedError("the stand-in builds no neck, auxiliary head or pretrained weights")
        self.backbone = BACKBONES.build(backbone)
        self._init_decode_head(decode_head)
        self.train_cfg, self.test_cfg = train_cfg, test_cfg


class Unused:
    """A name the release imports but never uses on the paths run here."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("not part of the stand-ins")


def no_op_decorator(*args, **kwargs):
    return lambda fn: fn


def accuracy(pred, target, ignore_index=255):
    """Top-1 pixel accuracy in % (logged by the release beside the loss; not compared)."""
    valid = target != ignore_index
    return (pred.argmax(dim=1)[valid] == target[valid]).float().mean() * 100


def add_prefix(inputs: dict, prefix: str) -> dict:
    return {f"{prefix}.{k}": v for k, v in inputs.items()}


def resize(input, size=None, scale_factor=None, mode="nearest", align_corners=None, warning=False):
    return F.interpolate(input, size, scale_factor, mode, align_corners)


BACKBONES, HEADS, LOSSES, SEGMENTORS = (Registry(n) for n in ("backbone", "head", "loss", "segmentor"))


def install_stand_ins(release_root: Path) -> None:
    """Put the stand-in modules, the compatibility attributes and a bare `models` package in place."""
    def module(name: str, **attrs) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        return mod

    builder = module(
        "mmseg.models.builder", BACKBONES=BACKBONES, HEADS=HEADS, LOSSES=LOSSES, SEGMENTORS=SEGMENTORS,
        build_backbone=BACKBONES.build, build_head=HEADS.build, build_loss=LOSSES.build,
    )
    module("mmcv")
    module("mmcv.cnn", ConvModule=Unused)
    module("mmcv.runner", auto_fp16=no_op_decorator, force_fp32=no_op_decorator)
    module("mmseg")
    module("mmseg.core", add_prefix=add_prefix)
    module("mmseg.ops", Upsample=Unused, resize=resize)
    module("mmseg.models", builder=builder)
    module("mmseg.models.backbones", ResNet=Unused, VisionTransformer=Unused)
    module("mmseg.models.decode_heads")
    module("mmseg.models.decode_heads.decode_head", BaseDecodeHead=BaseDecodeHead)
    module("mmseg.models.losses", accuracy=accuracy)
    module("mmseg.models.segmentors")
    module("mmseg.models.segmentors.base", BaseSegmentor=Unused)
    module("mmseg.models.segmentors.encoder_decoder", EncoderDecoder=EncoderDecoder)
    # timm >= 0.9 no longer exposes the `drop` module under timm.models.layers
    import timm.layers.drop
    import timm.models.layers

    timm.models.layers.drop = timm.layers.drop
    # the release's package without its __init__ (which imports the dataset classes)
    package = module("models")
    package.__path__ = [str(release_root / "models")]


@contextlib.contextmanager
def cuda_literals_on_cpu() -> Iterator[None]:
    """torch.tensor(..., device='cuda') makes a CPU tensor inside (the head's NGA weights)."""
    original = torch.tensor

    def tensor(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return original(*args, **kwargs)

    torch.tensor = tensor
    try:
        yield
    finally:
        torch.tensor = original


def build_release(config: dict) -> nn.Module:
    """The release's segmentor, built by its own classes through the stand-in registries."""
    import models.backbone.img_encoder  # noqa: F401  (registers VPTCLIPVisionTransformer)
    import models.backbone.text_encoder  # noqa: F401  (registers CLIPTextEncoder)
    import models.decode_heads.decode_seg  # noqa: F401  (registers ATMSingleHeadSeg)
    import models.losses.atm_loss  # noqa: F401  (registers SegLossPlus)
    import models.segmentor.cascadeclip  # noqa: F401  (registers CascadeCLIP)

    with cuda_literals_on_cpu():
        return SEGMENTORS.build(config)


# ---------------------------------------------------------------------------------------------
# weights and inputs
# ---------------------------------------------------------------------------------------------
def randomise(segmentor: nn.Module, gen: torch.Generator) -> None:
    """Every parameter seeded-random and away from its init (norms off 1/0, biases non-zero)."""
    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen) * std

    with torch.no_grad():
        done: set[int] = set()
        for module in segmentor.modules():
            own = dict(module.named_parameters(recurse=False))
            if isinstance(module, nn.LayerNorm):
                own["weight"].copy_(1 + randn(*own["weight"].shape, std=0.2))
                own["bias"].copy_(randn(*own["bias"].shape, std=0.2))
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = own["weight"][0].numel()
                own["weight"].copy_(randn(*own["weight"].shape, std=fan_in**-0.5))
                if own.get("bias") is not None:
                    own["bias"].copy_(randn(*own["bias"].shape, std=0.1))
            elif isinstance(module, nn.MultiheadAttention):
                own["in_proj_weight"].copy_(randn(*own["in_proj_weight"].shape, std=module.embed_dim**-0.5))
                own["in_proj_bias"].copy_(randn(*own["in_proj_bias"].shape, std=0.1))
            elif isinstance(module, nn.Embedding):
                own["weight"].copy_(randn(*own["weight"].shape, std=0.02))
            else:
                for name, p in own.items():  # plain parameters: embeddings, projections, prompts, NGA weights
                    std = 0.1 if name.startswith("weights_s") else p.shape[-1] ** -0.5
                    base = p.detach().clone() if name.startswith("weights_s") else torch.zeros_like(p)
                    p.copy_(base + randn(*p.shape, std=std))
            done |= {id(p) for p in own.values()}
        missed = [n for n, p in segmentor.named_parameters() if id(p) not in done]
        if missed:
            raise RuntimeError(f"parameters left at their init: {missed}")


def scale_decoders(segmentor: nn.Module, images: torch.Tensor, text: torch.Tensor) -> float:
    """Scale every decoder's last-layer q (the logits are linear in it) to logits of std LOGIT_STD."""
    logits = head_logits(segmentor, images, text)
    factor = LOGIT_STD / logits.std().item()
    with torch.no_grad():
        for decoder in segmentor.decode_head.cascade_decoders:
            q = decoder.layers[-1].multihead_attn.q
            q.weight.mul_(factor)
            q.bias.mul_(factor)
    return factor


def head_logits(segmentor: nn.Module, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The head's pred_masks (sum of the stage masks at the input size) in eval mode."""
    segmentor.eval()
    with torch.no_grad():
        return segmentor.decode_head.forward([segmentor.extract_feat(images), text])["pred_masks"]


def make_inputs(gen: torch.Generator) -> dict[str, torch.Tensor]:
    images = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen)
    text = F.normalize(torch.randn(len(ALL_CLASSES), EMBED, generator=gen), dim=-1)
    # blocky label maps: 8x8 cells of random classes (seen, unseen and ignored), every image with seen classes
    cells = torch.randint(0, len(ALL_CLASSES) + 1, (BATCH, 8, 8), generator=gen)
    cells[cells == len(ALL_CLASSES)] = 255
    cells[:, 0, 0], cells[:, 0, 1] = SEEN[0], SEEN[1]
    labels = cells.repeat_interleave(IMAGE // 8, dim=1).repeat_interleave(IMAGE // 8, dim=2)
    return {"images": images, "class_embeddings": text, "labels": labels, "seen": torch.tensor(SEEN)}


def release_loss(segmentor: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """forward_train's loss terms, in train mode with every dropout off."""
    segmentor.train()
    for module in segmentor.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    metas = [{} for _ in range(BATCH)]
    losses = segmentor.forward_train(inputs["images"], metas, inputs["labels"].clone().unsqueeze(1))
    return {k.removeprefix("decode."): v.detach() for k, v in losses.items() if k.startswith("decode.loss_")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", type=Path, help=f"a fetched copy of {RELEASE_REPO} (git directory or checkout)")
    parser.add_argument("--out", type=Path, default=Path("tests/data/release_golden"),
                        help="output path without suffix (.safetensors and .json are written)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        commit = release_sources(args.repo, tmp)
        install_stand_ins(tmp)
        inputs = make_inputs(gen)
        text_file = tmp / "class_embeddings.npy"
        np.save(text_file, inputs["class_embeddings"].numpy())
        config = release_config(str(text_file))
        segmentor = build_release(config)
        randomise(segmentor, gen)
        factor = scale_decoders(segmentor, inputs["images"], inputs["class_embeddings"])
        logits = head_logits(segmentor, inputs["images"], inputs["class_embeddings"])
        segmentor.eval()
        with torch.no_grad():
            scores = segmentor.encode_decode(inputs["images"], [{} for _ in range(BATCH)])
        losses = release_loss(segmentor, inputs)
        state = {k: v.detach().clone().contiguous() for k, v in segmentor.state_dict().items()}
    tensors = {f"release/{k}": v for k, v in state.items()}
    tensors |= {f"input/{k}": v.contiguous() for k, v in inputs.items()}
    tensors |= {"output/logits": logits.contiguous(), "output/scores": scores.contiguous()}
    tensors |= {f"output/{k}": v.reshape(()) for k, v in losses.items()}
    config["load_text_embedding"] = "input/class_embeddings (written to a .npy)"
    meta = {
        "release": {"repository": RELEASE_REPO, "commit": commit, "config": config},
        "ours": our_configs(),
        "command": "python -m benchmarks.release_parity " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "seed": SEED,
        "decoder_q_scale": factor,
        "logits": {"min": logits.min().item(), "max": logits.max().item(), "std": logits.std().item()},
        "loss": {k: v.item() for k, v in losses.items()},
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out.with_suffix(".safetensors")), metadata={"release_commit": commit})
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    size = args.out.with_suffix(".safetensors").stat().st_size
    print(f"release {commit}: logits [{meta['logits']['min']:.2f}, {meta['logits']['max']:.2f}] std "
          f"{meta['logits']['std']:.2f}, loss {meta['loss']}; wrote {args.out}.safetensors ({size:,} bytes) and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
