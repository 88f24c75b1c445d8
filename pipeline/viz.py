"""Pictures people would rather look at than read: label overlays, per-class IoU bars,
confusion matrices, similarity heatmaps. matplotlib, returns Figures; no file I/O. The backend is
the caller's (importing this module chooses none): the stages and `cascade-clip predict` choose Agg."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from pipeline.config import IGNORE_INDEX


def colorize(label: np.ndarray, palette: list[list[int]]) -> np.ndarray:
    """[H, W] class ids -> [H, W, 3] uint8; ignore (255) is black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    table[IGNORE_INDEX] = 0
    return table[label]


def overlay(image: np.ndarray, label: np.ndarray, palette: list[list[int]], alpha: float = 0.55) -> np.ndarray:
    """Image with the label's colours blended in (ignored pixels left as they are)."""
    colours = colorize(label, palette).astype(np.float32)
    mask = (label != IGNORE_INDEX)[..., None]
    blended = np.where(mask, (1 - alpha) * image + alpha * colours, image)
    return blended.astype(np.uint8)


def _legend(ax, names: list[str], palette: list[list[int]], ids: set[int]) -> None:
    handles = [Patch(color=np.asarray(palette[i]) / 255, label=names[i]) for i in sorted(ids)]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, frameon=False)


def overlay_grid(samples: list[dict], names: list[str], palette: list[list[int]], unseen: set[int] = frozenset()):
    """Rows of (image, ground truth, prediction) with a legend of the classes present; unseen marked *."""
    rows = max(len(samples), 1)
    fig, axes = plt.subplots(rows, 3, figsize=(9, 2.9 * rows), squeeze=False)
    labelled = [f"{n}*" if i in unseen else n for i, n in enumerate(names)]
    for r, sample in enumerate(samples):
        present = set(np.unique(sample["label"]).tolist()) | set(np.unique(sample["prediction"]).tolist())
        present.discard(IGNORE_INDEX)
        panels = [(sample["image"], sample.get("id", "")), (overlay(sample["image"], sample["label"], palette), "ground truth"),
                  (overlay(sample["image"], sample["prediction"], palette), sample.get("title", "prediction"))]
        for c, (picture, title) in enumerate(panels):
            axes[r, c].imshow(picture)
            axes[r, c].set_title(title, fontsize=8)
            axes[r, c].axis("off")
        _legend(axes[r, 2], labelled, palette, present)
    fig.suptitle("* = unseen class", fontsize=8, y=0.995)
    fig.tight_layout()
    return fig


def legend_figure(image: np.ndarray, label: np.ndarray, names: list[str], palette: list[list[int]]):
    """A prediction overlay with a legend of the classes it contains and their pixel shares."""
    fig, ax = plt.subplots(figsize=(6, 6 * image.shape[0] / max(image.shape[1], 1)))
    ax.imshow(overlay(image, label, palette))
    ax.axis("off")
    present = [int(i) for i in np.unique(label) if i != IGNORE_INDEX]
    shares = [f"{names[i]} ({np.mean(label == i) * 100:.0f}%)" for i in range(len(names))]
    _legend(ax, shares, palette, set(present))
    fig.tight_layout()
    return fig


def iou_bars(names: list[str], iou: np.ndarray, unseen: set[int], title: str = "IoU per class"):
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 3.6))
    values = np.nan_to_num(iou * 100, nan=0.0)
    colours = ["#d95f02" if i in unseen else "#1b9e77" for i in range(len(names))]
    ax.bar(range(len(names)), values, color=colours)
    ax.set_xticks(range(len(names)), names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(handles=[Patch(color="#1b9e77", label="seen"), Patch(color="#d95f02", label="unseen")], fontsize=8)
    fig.tight_layout()
    return fig


def matrix_heatmap(matrix: np.ndarray, names: list[str], title: str, *, normalise_rows: bool = False, vmin=None, vmax=None):
    values = matrix.astype(np.float64)
    if normalise_rows:
        values = values / np.maximum(values.sum(1, keepdims=True), 1)
    size = max(5, 0.32 * len(names))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(values, cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
