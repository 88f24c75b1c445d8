"""Linear layers whose weights get no gradient, through oneDNN on the CPU.

On this project's CPUs torch's fp32 matmul (MKL) reaches about 120-140 GFLOP/s on the ViT's
shapes where oneDNN's linear reaches 150-195 (`python -m benchmarks.bench_vs_release --profile`
and docs/performance.md). The frozen CLIP blocks are most of the model's arithmetic, forward and
backward, so their linear layers go through `frozen_linear`: oneDNN for fp32 CPU tensors (outside
autocast) when the layer is wide enough to gain, torch's own `F.linear` everywhere else (CUDA,
bf16/fp16, weights that need a gradient, narrow layers). Under torch.no_grad no weight needs
one, so at inference the trainable layers (decoders, text projections) take the same path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def _onednn_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return torch.backends.mkldnn.is_available() and ops is not None and hasattr(ops, "_linear_pointwise")


ONEDNN = _onednn_available()
"""whether this torch build has oneDNN's linear"""
MIN_MACS = 1 << 24
"""smallest product rows x in x out sent to oneDNN (below it, per-call overhead)"""
MIN_WIDTH = 256
"""narrowest in or out width sent to oneDNN. Measured on a 2-core AVX-512 CPU, oneDNN's time over
MKL's: 0.63-0.93 for the paper-size layers (in and out 512-3072, 50-2048 rows, from 2^25 multiply-
adds), 0.85-1.13 for width-64 layers (the demo's, 1160-6240 rows), so those stay with MKL
(`python -m benchmarks.bench_linear`)"""
_use_onednn = ONEDNN


@contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """Inside, `frozen_linear` takes oneDNN's path (where it applies) only if `enabled`: off, it is
    plain torch, e.g. for FLOP counters (which have no formula for oneDNN's op) or comparisons."""
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
    if not _takes_onednn(x, weight, bias):
        out = F.linear(x, weight) if scale != 1.0 else F.linear(x, weight, bias)
        if scale != 1.0:
            out = out * scale if bias is None else torch.add(bias, out, alpha=scale)
        return out
    flat = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and x.requires_grad:
        out = _FrozenLinear.apply(flat, weight, bias, scale)
    else:
        out = _onednn_linear(flat, weight, bias, scale)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` through `frozen_linear`: oneDNN when the layer's weights need no gradient."""
    return frozen_linear(x, layer.weight, layer.bias)


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
