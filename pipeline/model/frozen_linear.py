"""Linear layers whose weights get no gradient, through the faster of oneDNN and MKL on the CPU.

The frozen CLIP blocks are most of the model's arithmetic, forward and backward, so their linear
layers go through `frozen_linear`. Which fp32 library is faster depends on the CPU: on a 2-core
AVX-512 CPU oneDNN's linear took 0.73-0.92 of torch's (MKL's) time on the ViT's shapes, on a 2-core
AVX2 one (AMD EPYC) 1.13-1.21 (`python -m benchmarks.bench_linear`, docs/performance.md). So
`frozen_linear` takes oneDNN for fp32 CPU tensors (outside autocast) when the CPU has AVX-512 and
the layer is wide enough to gain (`LINEAR_ENV` overrides the choice), torch's own matmul everywhere
else (CUDA, bf16/fp16, weights that need a gradient, narrow layers, AVX2 CPUs). Under
torch.no_grad no weight needs one, so at inference the trainable layers (decoders, text
projections) take the same path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from pipeline.errors import CascadeError


def _onednn_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return torch.backends.mkldnn.is_available() and ops is not None and hasattr(ops, "_linear_pointwise")


ONEDNN = _onednn_available()
"""whether this torch build has oneDNN's linear"""
LINEAR_ENV = "CASCADE_CLIP_LINEAR"
"""environment variable choosing the CPU library of wide frozen layers: auto (the default), onednn or torch"""


class LinearChoiceError(CascadeError, ValueError):
    """`LINEAR_ENV` holds a value other than auto, onednn or torch."""


def preferred_library(capability: str, choice: str | None) -> str:
    """"onednn" or "torch": the library wide frozen fp32 layers take on a CPU whose vector
    capability (`torch.backends.cpu.get_cpu_capability()`) is `capability`, with `LINEAR_ENV` set
    to `choice` (None or "auto": oneDNN where the CPU has AVX-512, torch's MKL elsewhere)."""
    choice = (choice or "auto").strip().lower()
    if choice not in ("auto", "onednn", "torch"):
        raise LinearChoiceError(f"{LINEAR_ENV}={choice!r}: expected auto, onednn or torch (unset it for auto: oneDNN "
                                "on AVX-512 CPUs, torch's MKL elsewhere; `python -m benchmarks.bench_linear` shows "
                                "which is faster on this CPU)")
    if choice == "auto":
        return "onednn" if capability.upper().startswith("AVX512") else "torch"
    return choice


def _library_from_environment() -> tuple[str, LinearChoiceError | None]:
    """This CPU's library and, for a bad `LINEAR_ENV`, the error that the first `frozen_linear` call
    raises (inside a stage or command, which print it; importing the package never fails)."""
    try:
        return preferred_library(torch.backends.cpu.get_cpu_capability(), os.environ.get(LINEAR_ENV)), None
    except LinearChoiceError as exc:
        return "torch", exc


CPU_LIBRARY, _choice_error = _library_from_environment()
"""CPU_LIBRARY: what wide frozen fp32 layers take on this CPU ("onednn" or "torch"), before `ONEDNN`
is checked"""
MIN_MACS = 1 << 24
"""smallest product rows x in x out sent to oneDNN (below it, per-call overhead)"""
MIN_WIDTH = 256
"""narrowest in or out width sent to oneDNN (and, on torch's path, given a scale inside the product:
`_torch_linear`). Measured on a 2-core AVX-512 CPU, oneDNN's time over
MKL's: 0.63-0.93 for the paper-size layers (in and out 512-3072, 50-2048 rows, from 2^25 multiply-
adds), 0.85-1.13 for width-64 layers (the demo's, 1160-6240 rows), so those stay with MKL
(`python -m benchmarks.bench_linear`)"""
_use_onednn = ONEDNN and CPU_LIBRARY == "onednn"


@contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """Inside, `frozen_linear` takes oneDNN's path (where it applies) if `enabled`, whatever the CPU;
    off, it is plain torch, e.g. for FLOP counters (which have no formula for oneDNN's op) or
    comparisons."""
    global _use_onednn
    previous = _use_onednn
    _use_onednn = enabled and ONEDNN
    try:
        yield
    finally:
        _use_onednn = previous


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, scale: float = 1.0) -> torch.Tensor:
    """scale * (x @ weight.T) + bias, for x [..., in], weight [out, in], bias [out] or None.

    x may need a gradient; weight and bias get none (oneDNN's path is taken only when they do not
    require one, or under torch.no_grad). Equal to `scale * F.linear(x, weight) + bias` up to float
    rounding.
    """
    if _choice_error is not None:
        raise _choice_error
    if not _takes_onednn(x, weight, bias):
        return _torch_linear(x, weight, bias, scale)
    flat = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and x.requires_grad:
        out = _FrozenLinear.apply(flat, weight, bias, scale)
    else:
        out = _onednn_linear(flat, weight, bias, scale)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` through `frozen_linear`: oneDNN when the layer's weights need no gradient."""
    return frozen_linear(x, layer.weight, layer.bias)


def _torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """torch's own scale * (x @ weight.T) + bias. A wide layer with a bias takes the scale inside
    the product (addmm's alpha: no extra pass over the output); a narrow one (the demo's width 64)
    scales afterwards, as it always has, so its results stay the same to the bit."""
    if scale == 1.0:
        return F.linear(x, weight, bias)
    if bias is not None and min(weight.shape) >= MIN_WIDTH:
        out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight.t(), alpha=scale)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    out = F.linear(x, weight)
    return out * scale if bias is None else torch.add(bias, out, alpha=scale)


def _takes_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        _use_onednn
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)))
        and min(weight.shape) >= MIN_WIDTH
        and x.numel() * weight.shape[0] >= MIN_MACS
    )


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """scale * (x @ weight.T) + bias for 2-D x, with oneDNN (weight may be a transposed view).

    The weight is used as it is, not packed: a packed copy (`_reorder_linear_weight`) was 3-5%
    faster on the ViT-B/16 blocks but doubles the frozen weights in memory (twice more in training)."""
    if scale == 1.0:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    out = torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "").mul_(scale)
    return out.add_(bias) if bias is not None else out


class _FrozenLinear(torch.autograd.Function):
    """oneDNN's linear for 2-D x that needs a gradient: d/dx = scale * grad @ weight, also oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.scale = scale
        return _onednn_linear(x, weight, bias, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (weight,) = ctx.saved_tensors
        grad_x = _onednn_linear(grad.contiguous(), weight.t(), None, ctx.scale) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None
