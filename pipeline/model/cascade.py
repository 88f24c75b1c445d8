"""The top-level Cascade-CLIP model and its output container."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig
from pipeline.model.head import CascadeHead
from pipeline.model.image_encoder import PromptedVisionEncoder
from pipeline.model.text_encoder import TextEncoder, average_class_embeddings


def calibrated_scores(
    logits: torch.Tensor, seen_mask: torch.Tensor | None = None, calibration: float = 0.0, *, inplace: bool = False
) -> torch.Tensor:
    """sigmoid(logits) [B, C, ...] minus `calibration` on the classes where seen_mask [C] is true.

    `inplace` turns `logits` itself into the scores when autograd does not need it (no new tensor
    of the input size: on the CPU, touching a fresh one costs more than the arithmetic)."""
    differentiable = torch.is_grad_enabled() and logits.requires_grad
    scores = logits.sigmoid_() if inplace and not differentiable else logits.sigmoid()
    if seen_mask is not None and calibration:
        shape = (1, -1) + (1,) * (logits.dim() - 2)
        shift = calibration * seen_mask.to(scores.device, scores.dtype).reshape(shape)
        scores = scores - shift if differentiable else scores.sub_(shift)  # scores is ours to change
    return scores


class SegOutput:
    """What the model returns for a batch: every decoder layer's masks, and M at the input size.

    M is computed when `logits` is first read; `scores` of an output whose M was never read
    computes them without keeping M (inference needs only the scores)."""

    def __init__(
        self,
        *,
        layer_logits: list[list[torch.Tensor]],
        logits: torch.Tensor | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        """
        Args:
            layer_logits: per stage, per decoder layer, mask logits at feature resolution [B, C, h, w].
            logits: M [B, C, H, W] when already known; else computed from the stage masks.
            size: input size (H, W) that M is upsampled to (needed without `logits`).
        """
        if logits is None and size is None:
            raise ValueError("SegOutput needs the logits or the input size to compute them at")
        self.layer_logits = layer_logits
        self._logits = logits
        self.size = tuple(logits.shape[-2:]) if logits is not None else tuple(size)

    @property
    def logits(self) -> torch.Tensor:
        """M: sum of the stage masks, bilinearly upsampled to the input size [B, C, H, W] (pre-sigmoid)."""
        if self._logits is None:
            self._logits = self._upsampled()
        return self._logits

    @property
    def stage_logits(self) -> list[torch.Tensor]:
        """Each stage's mask (its last layer's) [B, C, h, w]."""
        return [layers[-1] for layers in self.layer_logits]

    def scores(self, calibration: float = 0.0, seen_mask: torch.Tensor | None = None) -> torch.Tensor:
        """sigmoid(M) [B, C, H, W], minus `calibration` on seen classes (seen_mask [C] bool)."""
        if self._logits is not None:
            return calibrated_scores(self._logits, seen_mask, calibration)
        return calibrated_scores(self._upsampled(), seen_mask, calibration, inplace=True)

    def _upsampled(self) -> torch.Tensor:
        masks = torch.stack(self.stage_logits).sum(dim=0)
        return F.interpolate(masks, size=self.size, mode="bilinear", align_corners=False)


class CascadeCLIP(nn.Module):
    """Frozen CLIP (image and text towers) + deep prompts + cascaded stage decoders.

    Call with images [B, 3, H, W] (already normalised) and class embeddings [C, D] of any class set.
    """

    def __init__(
        self,
        *,
        encoder: PromptedVisionEncoder,
        head: CascadeHead,
        text_encoder: TextEncoder,
        model_cfg: ModelConfig,
        arch: dict,
    ) -> None:
        """
        Args:
            encoder: images [B, 3, H, W] -> VisualFeatures (blocks [B, h*w, D], g [B, D]).
            head: (VisualFeatures, T [C, D]) -> per stage, per layer masks [B, C, h, w].
            text_encoder: CLIP's text tower, tokens [N, L] -> [N, D] (kept frozen).
            model_cfg: the configuration the model was built from (saved with it).
            arch: the open_clip arch config of its CLIP (saved with it).
        """
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.text_encoder = text_encoder
        self.model_cfg = model_cfg
        self.arch = arch
        self.clip_keys: frozenset[str] = frozenset()
        """state-dict keys whose tensors are the CLIP checkpoint's own (set by build_model when given one)"""
        self.backbone_ref = None
        """BackboneRef of the file those tensors came from; when set, `save` writes the reference instead of them"""
        self._freeze()

    @property
    def stages(self) -> list[tuple[int, int]]:
        """The stages this model decodes (variant-dependent; may differ from model_cfg.stages)."""
        return self.head.stages

    def forward(self, images: torch.Tensor, class_embeddings: torch.Tensor) -> SegOutput:
        # encoder, then every stage's decoder
        features = self.encoder(images)
        layer_logits = self.head(features, class_embeddings)
        # M = sum of stage masks at input resolution, computed when asked for
        return SegOutput(layer_logits=layer_logits, size=tuple(images.shape[-2:]))

    @torch.no_grad()
    def predict(
        self,
        images: torch.Tensor,
        class_embeddings: torch.Tensor,
        seen_mask: torch.Tensor | None = None,
        calibration: float = 0.0,
    ) -> torch.Tensor:
        """Arg-max class per pixel [B, H, W] int64 of the calibrated scores."""
        return self(images, class_embeddings).scores(calibration, seen_mask).argmax(dim=1)

    @torch.no_grad()
    def encode_text(
        self,
        class_names: Sequence[str],
        templates: Sequence[str],
        tokenizer: Callable[[list[str]], torch.Tensor],
        batch_size: int = 256,
    ) -> torch.Tensor:
        """Class embeddings [C, D] (METHOD.md: embed, normalise, average templates, normalise): every
        (class, template) prompt through the text tower, `batch_size` prompts at a time, then
        `average_class_embeddings`."""
        prompts = [template.format(name) for name in class_names for template in templates]
        device = self.text_encoder.positional_embedding.device
        chunks = [
            self.text_encoder(tokenizer(prompts[i : i + batch_size]).to(device)) for i in range(0, len(prompts), batch_size)
        ]
        embeddings = torch.cat(chunks).float().reshape(len(class_names), len(templates), -1)
        return average_class_embeddings(embeddings)

    # ---------------------------------------------------------------------------------------
    # freezing and optimiser groups, by explicit module membership
    # ---------------------------------------------------------------------------------------
    def _freeze(self) -> None:
        for p in self.encoder.clip_parameters():
            p.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        for p in self.encoder.tap_parameters():
            p.requires_grad_(self.model_cfg.tap_trainable)

    def _trainable_parts(self) -> dict[str, list[nn.Parameter]]:
        prompts = list(self.encoder.prompts.parameters()) if self.encoder.prompts is not None else []
        taps = self.encoder.tap_parameters() if self.model_cfg.tap_trainable else []
        return {"prompts": prompts, "taps": taps, "head": list(self.head.parameters())}

    def _no_decay_ids(self) -> set[int]:
        ids = {id(p) for m in self.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}
        if self.encoder.prompts is not None:
            ids |= {id(p) for p in self.encoder.prompts.embedding_parameters()}
        ids |= {id(p) for agg in self.head.aggregators for p in agg.no_decay_parameters()}
        return ids

    def param_groups(self, lr: float, weight_decay: float, lr_mult: float, no_decay_norms: bool = False) -> list[dict]:
        """AdamW groups: prompts, trainable taps and head at lr * lr_mult, each with weight decay.

        By default every trainable parameter decays, as in the release (METHOD.md, Optimisation:
        mmcv takes the longest matching custom key, so 'backbone'/'head' win over 'norm'/'ln').
        `no_decay_norms` exempts norms, prompt embeddings and aggregation weights (their own
        "_no_decay" groups). Frozen CLIP parameters are in no group."""
        no_decay = self._no_decay_ids() if no_decay_norms else set()
        groups = []
        for part, params in self._trainable_parts().items():
            for decay in (True, False):
                chosen = [p for p in params if p.requires_grad and (id(p) not in no_decay) == decay]
                if chosen:
                    groups.append({
                        "name": f"{part}" if decay else f"{part}_no_decay",
                        "params": chosen,
                        "lr": lr * lr_mult,
                        "lr_mult": lr_mult,
                        "weight_decay": weight_decay if decay else 0.0,
                    })
        return groups
