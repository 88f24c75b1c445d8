"""Class text embeddings (METHOD.md, "Text embeddings") and their on-disk format.

Every (class, template) prompt goes through CLIP's text tower; the prompt embeddings are
L2-normalised, averaged over templates and L2-normalised again (`average_class_embeddings`).

    <folder>/embeddings.parquet   one row per class (TEXT_SCHEMA)
    <folder>/embeddings.npy       [C, D] float32, rows in class-id order, unit norm
    <folder>/templates.json       the template set's name and its templates
    <folder>/per_template.npy     [C, T, D] float32 unit-norm prompt embeddings (optional)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from open_clip.model import CLIP

from pipeline.config import TextConfig
from pipeline.data.catalog import template_set
from pipeline.data.prepared import ClassInfo
from pipeline.model.clip import make_tokenizer
from pipeline.model.text_encoder import average_class_embeddings

TEXT_SCHEMA = pa.schema(
    [
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("class_id", pa.int32(), nullable=False),
        pa.field("seen", pa.bool_(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32()), nullable=False),  # unit norm, length D
    ]
)
EMBEDDINGS_PARQUET = "embeddings.parquet"
EMBEDDINGS_NPY = "embeddings.npy"
PER_TEMPLATE_NPY = "per_template.npy"
TEMPLATES_JSON = "templates.json"

Tokenizer = Callable[[list[str]], torch.Tensor]


@dataclass(frozen=True)
class Templates:
    name: str  # the template set's name ("single", "paper15", "custom")
    templates: tuple[str, ...]


@dataclass(frozen=True)
class ClassEmbeddings:
    embeddings: torch.Tensor  # [C, D] unit-norm class embeddings
    prompts: torch.Tensor  # [C, T, D] unit-norm embeddings of every (class, template)
    prompt_norms: torch.Tensor  # [C, T] norms of the prompt embeddings before normalising


def resolve_templates(cfg: TextConfig, classes: ClassInfo) -> Templates:
    """The template set `cfg` names: the dataset's own (classes.json), a catalog set, or the custom list."""
    if cfg.templates == "dataset":
        return Templates(classes.template_set, tuple(classes.templates))
    if cfg.templates == "custom":
        return Templates("custom", tuple(cfg.custom_templates))
    return Templates(cfg.templates, template_set(cfg.templates))


def backbone_tokenizer(arch: dict, meta: dict) -> Tokenizer:
    """The tokenizer of a backbone (its arch config and clip.json): open_clip's own for source open_clip
    (`open_clip.get_tokenizer` of clip.model), else CLIP's BPE with the text tower's context length."""
    context_length = arch["text_cfg"].get("context_length", 77)
    if meta.get("source") == "open_clip":
        return open_clip.get_tokenizer(meta["open_clip_model"], context_length=context_length)
    return make_tokenizer(arch)


@torch.no_grad()
def encode_prompts(model: CLIP, tokenizer: Tokenizer, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """[N, D] text-tower embeddings of `prompts` (not normalised), `batch_size` prompts per pass."""
    device = model.positional_embedding.device
    chunks = [
        model.encode_text(tokenizer(list(prompts[i : i + batch_size])).to(device)).float()
        for i in range(0, len(prompts), batch_size)
    ]
    return torch.cat(chunks).cpu()


def class_embeddings(
    model: CLIP,
    tokenizer: Tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> ClassEmbeddings:
    """Embed every (class, template), then L2-normalise, average over templates, L2-normalise."""
    if not templates:
        raise ValueError("no prompt templates given")
    prompts = [template.format(name) for name in class_names for template in templates]
    raw = encode_prompts(model, tokenizer, prompts, batch_size).reshape(len(class_names), len(templates), -1)
    return ClassEmbeddings(
        embeddings=average_class_embeddings(raw),
        prompts=F.normalize(raw, dim=-1),
        prompt_norms=raw.norm(dim=-1),
    )


def similarity(embeddings: torch.Tensor | np.ndarray) -> np.ndarray:
    """[C, C] cosine similarities of the rows of `embeddings`."""
    x = F.normalize(torch.as_tensor(np.asarray(embeddings), dtype=torch.float32), dim=-1)
    return (x @ x.T).numpy()


# --------------------------------------------------------------------------------------------
# on disk
# --------------------------------------------------------------------------------------------
def embeddings_table(classes: ClassInfo, embeddings: np.ndarray) -> pa.Table:
    """One row per class: name, id, seen flag and its embedding (TEXT_SCHEMA)."""
    seen = set(classes.seen_ids)
    rows = [
        {"class_name": name, "class_id": i, "seen": i in seen, "embedding": embeddings[i].tolist()}
        for i, name in enumerate(classes.names)
    ]
    return pa.Table.from_pylist(rows, schema=TEXT_SCHEMA)


def write_text_embeddings(folder: Path, classes: ClassInfo, result: ClassEmbeddings, templates: Templates,
                          *, per_template: bool = False) -> None:
    """Write the files listed in the module docstring into `folder` (which must exist)."""
    embeddings = result.embeddings.numpy().astype(np.float32)
    pq.write_table(embeddings_table(classes, embeddings), folder / EMBEDDINGS_PARQUET)
    np.save(folder / EMBEDDINGS_NPY, embeddings)
    (folder / TEMPLATES_JSON).write_text(json.dumps({"name": templates.name, "templates": list(templates.templates)}, indent=2))
    if per_template:
        np.save(folder / PER_TEMPLATE_NPY, result.prompts.numpy().astype(np.float32))


# --------------------------------------------------------------------------------------------
# pictures and summaries
# --------------------------------------------------------------------------------------------
MAX_TICK_LABELS = 60  # more classes than this: the heatmap has no per-class tick labels


def similarity_figure(sim: np.ndarray, names: Sequence[str], unseen_ids: Sequence[int] = ()) -> Figure:
    """Class-by-class cosine-similarity heatmap; unseen classes are marked with '*' and red labels."""
    n = len(names)
    side = min(4 + 0.32 * n, 24)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(sim, cmap="viridis", vmin=min(float(sim.min()), 0.0), vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="cosine similarity")
    unseen = set(unseen_ids)
    if n <= MAX_TICK_LABELS:
        labels = [f"{name}*" if i in unseen else name for i, name in enumerate(names)]
        ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
        for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
            for i, tick in enumerate(ticks):
                if i in unseen:
                    tick.set_color("tab:red")
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if sim[i, j] > 0.6 else "white")
    ax.set_title(f"class text embeddings: cosine similarity ({n} classes, * = unseen)")
    return fig


def embedding_summary(result: ClassEmbeddings, seen_ids: Sequence[int], unseen_ids: Sequence[int]) -> dict[str, float]:
    """Scalars worth tracking: prompt norms, and how close classes (and unseen to seen) are."""
    sim = similarity(result.embeddings)
    n = sim.shape[0]
    off = sim[~np.eye(n, dtype=bool)] if n > 1 else np.zeros(1)
    summary = {
        "classes": float(n),
        "templates": float(result.prompts.shape[1]),
        "embedding_dim": float(result.embeddings.shape[1]),
        "prompt_norm_mean": float(result.prompt_norms.mean()),
        "prompt_norm_min": float(result.prompt_norms.min()),
        "prompt_norm_max": float(result.prompt_norms.max()),
        "similarity_offdiag_mean": float(off.mean()),
        "similarity_offdiag_max": float(off.max()),
    }
    if len(seen_ids) and len(unseen_ids):
        summary["similarity_unseen_to_nearest_seen_mean"] = float(sim[np.ix_(list(unseen_ids), list(seen_ids))].max(axis=1).mean())
    return summary
