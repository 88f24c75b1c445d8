"""Frozen CLIP ViT with deep visual prompts and projected taps of intermediate blocks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm, QuickGELU, ResidualAttentionBlock, VisionTransformer
from timm.layers import resample_abs_pos_embed
from torch import nn

from pipeline.model.frozen_linear import frozen_linear
from pipeline.model.prompts import DeepVisualPrompts


@dataclass
class VisualFeatures:
    """What the encoder hands the head."""

    blocks: dict[int, torch.Tensor]
    """1-based block -> L2-normalised patch features [B, h*w, embed_dim] (the last block via ln_post/proj)"""
    global_embedding: torch.Tensor
    """L2-normalised CLS embedding g [B, embed_dim]"""
    grid: tuple[int, int]
    """token grid (h, w) of the patch features"""


def resize_position_embedding(pos: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize the patch part of a [1 + h*w, width] position embedding from grid src to dst.

    timm's resampler, set to bilinear with align_corners=False and no antialiasing (not timm's default,
    bicubic with antialiasing); the class position is kept as it is.
    """
    if tuple(src) == tuple(dst):
        return pos
    resized = resample_abs_pos_embed(pos[None], new_size=list(dst), old_size=list(src), num_prefix_tokens=1,
                                     interpolation="bilinear", antialias=False)  # align_corners None: False
    return resized[0]


def prompted_block(block: ResidualAttentionBlock, x: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
    """One open_clip residual block on tokens x [B, N, W] with prompt tokens [B, P, W] as extra keys
    and values; returns x's tokens [B, N, W] (what the block gives them with the prompts among its
    inputs; the prompts' own outputs are not computed).

    The same function as `block(torch.cat([x, prompts], 1))[:, :N]`, computed batch-first with
    contiguous operands: the queries, attention rows, output projection and MLP cover only x's N
    tokens, attention goes through scaled_dot_product_attention (its fused kernels on CPU and CUDA),
    the linear layers through `frozen_linear` (oneDNN on the CPU), and none of them sees a
    transposed input (on which autograd's matmul falls back to one tiny matmul per token). Needs
    the block's weights frozen for the oneDNN path; with trainable ones it is plain torch.
    """
    attn = block.attn
    if getattr(block, "ln_1_kv", None) is not None or not attn._qkv_same_embed_dim:
        raise ValueError("prompted_block needs a self-attention block with one packed in-projection")
    batch, tokens, width = x.shape
    heads = attn.num_heads
    q, k, v = frozen_linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    if prompts is not None:
        kv_prompts = frozen_linear(block.ln_1(prompts), attn.in_proj_weight[width:], attn.in_proj_bias[width:])
        k_prompts, v_prompts = kv_prompts.chunk(2, dim=-1)
        k, v = torch.cat([k, k_prompts], dim=1), torch.cat([v, v_prompts], dim=1)
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, heads, tokens, head width]
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout if block.training else 0.0)
    out = frozen_linear(out.transpose(1, 2).reshape(batch, tokens, width), attn.out_proj.weight, attn.out_proj.bias)
    x = x + block.ls_1(out)
    return x + block.ls_2(_mlp(block.mlp, block.ln_2(x)))


_QUICK_GELU = 1.702  # QuickGELU(h) = h * sigmoid(1.702 h) = silu(1.702 h) / 1.702


def _mlp(mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """open_clip's MLP (c_fc, activation, c_proj) through `frozen_linear`. With QuickGELU (OpenAI's
    CLIP) the activation is one silu, its two scales riding in the linear layers, instead of
    three elementwise passes forward and five backward over the widest tensor."""
    fc, proj = mlp.c_fc, mlp.c_proj
    if not isinstance(mlp.gelu, QuickGELU):
        return frozen_linear(mlp.gelu(frozen_linear(x, fc.weight, fc.bias)), proj.weight, proj.bias)
    hidden = frozen_linear(x, fc.weight, fc.bias * _QUICK_GELU, scale=_QUICK_GELU)
    hidden = F.silu(hidden, inplace=not torch.is_grad_enabled())
    return frozen_linear(hidden, proj.weight, proj.bias, scale=1 / _QUICK_GELU)


class PromptedVisionEncoder(nn.Module):
    """CLIP's ViT (weights taken from an open_clip `VisionTransformer`) with deep prompts and taps.

    Each block sees [CLS, h*w patch tokens] with its P prompt tokens as extra keys and values
    (`prompted_block`: open_clip's residual block computed for the tokens whose outputs are used).
    A tapped block's hidden state passes the prompt norm, its own
    LayerNorm and a width->embed_dim projection without bias; the final state passes the prompt
    norm, CLIP's ln_post and proj. Patch tokens and the CLS embedding come out L2-normalised.
    """

    def __init__(
        self,
        *,
        visual: VisionTransformer,
        grid: tuple[int, int] | None = None,
        prompts: DeepVisualPrompts | None = None,
        tap_blocks: Sequence[int] = (),
        tap_init: Literal["random", "clip"] = "random",
        release_double_cls: bool = False,
    ) -> None:
        """
        Args:
            visual: open_clip ViT whose conv1 [width, 3, p, p], class_embedding [width],
                positional_embedding [1 + g*g, width], ln_pre, transformer blocks, ln_post and
                proj [width, embed_dim] are taken over (modules shared, not copied).
            grid: token grid (h, w) to resize the position embedding to now; None keeps CLIP's.
            prompts: deep visual prompts (one set per block) or None for no prompt tuning.
            tap_blocks: 1-based blocks (before the last) whose patch features are returned.
            tap_init: "random" (projection width^-0.5 * randn, as the release) or "clip"
                (every tap copies ln_post and proj).
            release_double_cls: add the class embedding to the CLS token twice, as the release.
        """
        super().__init__()
        if not isinstance(visual, VisionTransformer) or getattr(visual, "attn_pool", None) is not None:
            raise ValueError("the visual tower must be an open_clip VisionTransformer without attentional pooling")
        if visual.pool_type not in ("tok", "avg") or (visual.pool_type == "avg" and visual.final_ln_after_pool):
            raise ValueError(
                f"the visual tower pools with {visual.pool_type!r} (final_ln_after_pool={visual.final_ln_after_pool}); "
                "supported: the class token ('tok') or the average of patch tokens ('avg') with ln_post before pooling"
            )
        if tap_init not in ("random", "clip"):
            raise ValueError(f"tap_init must be 'random' or 'clip', got {tap_init!r}")
        depth = len(visual.transformer.resblocks)
        bad = [b for b in tap_blocks if not 1 <= b < depth]
        if bad:
            raise ValueError(f"tap blocks {bad} are outside 1..{depth - 1} (the last block is always returned)")
        width, embed_dim = visual.proj.shape
        self.depth = depth
        self.width = width
        self.embed_dim = embed_dim
        self.release_double_cls = release_double_cls
        self.pool_type = visual.pool_type
        # CLIP's weights
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        clip_grid = tuple(visual.grid_size)
        self.grid = tuple(grid) if grid is not None else clip_grid
        self.positional_embedding = nn.Parameter(
            resize_position_embedding(visual.positional_embedding.detach(), clip_grid, self.grid).clone()
        )
        self.ln_pre = visual.ln_pre
        self.transformer = visual.transformer
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        # prompts and taps
        if prompts is not None and prompts.embeddings.shape[0] != depth:
            raise ValueError(f"prompts have {prompts.embeddings.shape[0]} sets but the encoder has {depth} blocks")
        self.prompts = prompts
        self.tap_blocks = tuple(tap_blocks)
        self.tap_norms = nn.ModuleList(LayerNorm(width) for _ in self.tap_blocks)
        self.tap_proj = (
            nn.Parameter(width**-0.5 * torch.randn(len(self.tap_blocks), width, embed_dim)) if self.tap_blocks else None
        )
        if tap_init == "clip" and self.tap_blocks:
            with torch.no_grad():
                for norm in self.tap_norms:
                    norm.load_state_dict(self.ln_post.state_dict())
                self.tap_proj.copy_(self.proj.detach().expand_as(self.tap_proj))

    # ---------------------------------------------------------------------------------------
    # parameter membership (freezing and optimiser groups use these, never names)
    # ---------------------------------------------------------------------------------------
    def clip_parameters(self) -> list[nn.Parameter]:
        """Every parameter taken over from CLIP."""
        modules = (self.conv1, self.ln_pre, self.transformer, self.ln_post)
        return [self.class_embedding, self.positional_embedding, self.proj] + [p for m in modules for p in m.parameters()]

    def tap_parameters(self) -> list[nn.Parameter]:
        """The tap LayerNorms and projections."""
        return [*self.tap_norms.parameters(), *([self.tap_proj] if self.tap_proj is not None else [])]

    # ---------------------------------------------------------------------------------------
    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embedding [1 + h*w, width] for a token grid, resized at run time if needed."""
        return resize_position_embedding(self.positional_embedding, self.grid, grid)

    def forward(self, images: torch.Tensor) -> VisualFeatures:
        """
        Args:
            images: normalised images [B, 3, H, W].
        Returns:
            VisualFeatures with taps and the last block at grid (H // patch, W // patch).
        """
        # patch tokens, class token and position embedding
        x = self.conv1(images)
        batch, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        pos = self.position_embedding((h, w)).to(x.dtype)
        cls = self.class_embedding.to(x.dtype) + pos[0]
        if self.release_double_cls:
            cls = cls + self.class_embedding.to(x.dtype)
        x = torch.cat([cls.expand(batch, 1, -1), x + pos[1:]], dim=1)
        x = self.ln_pre(x)

        # blocks, each with a fresh prompt set; taps after the prompt norm. x holds [CLS, patches]
        # only: a block's prompt tokens are keys and values, never queries (their outputs would be
        # replaced by the next set), so no block computes outputs for them.
        taps: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.transformer.resblocks):
            prompts = self.prompts(index, batch) if self.prompts is not None else None
            x = prompted_block(block, x, prompts)
            if index + 1 in self.tap_blocks:
                tap = self.tap_blocks.index(index + 1)
                patches = self._prompt_norm(x[:, 1:])
                taps[index + 1] = F.normalize(frozen_linear(self.tap_norms[tap](patches), self.tap_proj[tap].t()), dim=-1)

        # last block: prompt norm, ln_post, CLIP's projection
        x = frozen_linear(self.ln_post(self._prompt_norm(x)), self.proj.t())
        taps[self.depth] = F.normalize(x[:, 1:], dim=-1)
        pooled = x[:, 1:].mean(dim=1) if self.pool_type == "avg" else x[:, 0]
        return VisualFeatures(blocks=taps, global_embedding=F.normalize(pooled, dim=-1), grid=(h, w))

    def _prompt_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.prompts.norm(x) if self.prompts is not None else x
