"""Training and test transforms (the release's mmseg pipeline), on numpy arrays.

Training: random rescale of a (long, short) scale by a ratio range, random crop with at most
`cat_max_ratio` of the crop one class (judged on the dataset's classes, unseen ones included, as the
release, which maps unseen pixels to ignore only inside the model), then the label mapping (`lut`),
horizontal flip, photometric distortion, normalisation, padding to the crop with the ignore label.
Test: resize keeping the aspect ratio so the short side is the test scale (long side bounded).
Labels are only ever resized with nearest neighbour and only ever padded with IGNORE_INDEX, so no
transform invents a label value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from skimage.color import hsv2rgb, rgb2hsv

from pipeline.config import IGNORE_INDEX

CROP_TRIES = 10  # mmseg's RandomCrop tries at most this many crops for cat_max_ratio

# Pixel statistics per RGB channel: the only copy of them in the code. OpenAI CLIP's are given on
# the 0..1 scale, as open_clip gives them and clip.json records them; the release's on 0..255, as
# its config gives them.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # what OpenAI's CLIP and the toy CLIP were trained with
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # the release's (mmseg's ImageNet) normalisation, on 0..255
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class Normalize:
    """Pixel normalisation, the only one: (pixel - mean) / std per RGB channel."""

    mean: tuple[float, float, float]  # per RGB channel, on the 0..255 scale
    std: tuple[float, float, float]

    @classmethod
    def from_unit(cls, mean: Sequence[float], std: Sequence[float]) -> Normalize:
        """From statistics on the 0..1 scale (open_clip's convention)."""
        return cls(tuple(m * 255.0 for m in mean), tuple(s * 255.0 for s in std))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One image for segmentation: uint8 [H, W, 3] -> float32 [3, H, W], on the 0..255 scale."""
        out = (image.astype(np.float32) - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(out.transpose(2, 0, 1))

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """A batch as open_clip's preprocessing does it: uint8 [N, 3, H, W] -> float [N, 3, H, W], scaled
        to 0..1 first, then standardised with the statistics on that scale."""
        x = images.float().div_(255.0)
        mean = torch.tensor([m / 255.0 for m in self.mean], dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor([s / 255.0 for s in self.std], dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


OPENAI_CLIP = Normalize.from_unit(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
IMAGENET = Normalize(IMAGENET_MEAN, IMAGENET_STD)


def label_lut(class_ids: list[int], num_classes: int) -> np.ndarray:
    """A 256-entry table mapping dataset class ids to positions in `class_ids`; all else -> ignore.

    The inductive mapping is `label_lut(seen_ids, C)`: unseen pixels become IGNORE_INDEX and seen
    classes are renumbered 0..S-1, the order of the text embeddings the model is given.
    """
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for position, class_id in enumerate(class_ids):
        if not 0 <= class_id < num_classes:
            raise ValueError(f"class id {class_id} outside 0..{num_classes - 1}")
        lut[class_id] = position
    return lut


def resize_pair(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int]):
    """Resize to (height, width): image bilinear, label nearest."""
    height, width = size
    image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    if label is not None:
        label = np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))
    return image, label


def rescale_size(height: int, width: int, long_side: float, short_side: float) -> tuple[int, int]:
    """mmseg's keep-ratio rescale: the largest size with long <= long_side and short <= short_side."""
    factor = min(long_side / max(height, width), short_side / min(height, width))
    return max(int(height * factor + 0.5), 1), max(int(width * factor + 0.5), 1)


@dataclass(frozen=True)
class TrainTransform:
    """The release's training pipeline. Call with an rng, an RGB uint8 image, a uint8 label map of
    dataset class ids and the mapping to training ids (`label_lut`), applied once the crop is chosen."""

    crop_size: int
    scale: tuple[int, int]  # (long, short) base scale
    ratio_range: tuple[float, float]
    cat_max_ratio: float
    flip_prob: float
    photometric: bool
    normalize: Normalize

    def __call__(self, rng: np.random.Generator, image: np.ndarray, label: np.ndarray,
                 lut: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        # random rescale
        ratio = rng.uniform(*self.ratio_range)
        size = rescale_size(*label.shape, self.scale[0] * ratio, self.scale[1] * ratio)
        image, label = resize_pair(image, label, size)
        # random crop, retried while one class covers more than cat_max_ratio of it; then the mapping
        # to training ids (unseen -> ignore when inductive), so unseen classes count in the crop rule
        image, label = self._crop(rng, image, label)
        if lut is not None:
            label = lut[label]
        # flip
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(rng, image)
        # normalise and pad to the crop (image with 0 after normalisation, label with ignore)
        tensor = self.normalize(np.ascontiguousarray(image))
        return pad_to(tensor, label, self.crop_size)

    def _crop(self, rng, image, label):
        height, width = label.shape
        crop_h, crop_w = min(self.crop_size, height), min(self.crop_size, width)
        for _ in range(CROP_TRIES):
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            window = label[top : top + crop_h, left : left + crop_w]
            if self.cat_max_ratio >= 1.0:
                break
            counts = np.bincount(window[window != IGNORE_INDEX].ravel(), minlength=1)
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return image[top : top + crop_h, left : left + crop_w], window


def pad_to(image: np.ndarray, label: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad a [3, H, W] image with 0 and an [H, W] label with IGNORE_INDEX to at least size x size."""
    _, height, width = image.shape
    pad_h, pad_w = max(size - height, 0), max(size - width, 0)
    if pad_h or pad_w:
        image = np.pad(image, ((0, 0), (0, pad_h), (0, pad_w)))
        label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def photometric_distortion(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """mmseg's PhotoMetricDistortion: brightness, contrast (before or after), saturation, hue; each with p=0.5."""
    img = image.astype(np.float32)
    if rng.random() < 0.5:
        img = img + rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        img = img * rng.uniform(0.5, 1.5)
    img = np.clip(img, 0, 255)
    do_saturation, do_hue = rng.random() < 0.5, rng.random() < 0.5
    if do_saturation or do_hue:
        hsv = rgb2hsv(img / 255.0)
        if do_saturation:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 1)
        if do_hue:
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-18, 18) / 180.0) % 1.0
        img = hsv2rgb(hsv) * 255.0
    if not contrast_first and rng.random() < 0.5:
        img = img * rng.uniform(0.5, 1.5)
    return np.clip(img, 0, 255).astype(np.uint8)


def eval_size(height: int, width: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """Test-time size: short side = short_side, long side at most max_long_side, ratio kept."""
    return rescale_size(height, width, max_long_side, short_side)
