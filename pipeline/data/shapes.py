"""The demo world: colour x shape objects on textured backgrounds, drawn with scikit-image.

Pure functions of a seed: `scene_rng(seed, split, index)` gives every image its own generator,
so a scene does not depend on how many processes draw the dataset or in which order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from skimage.draw import disk, polygon
from skimage.transform import resize

from pipeline.config import IGNORE_INDEX
from pipeline.data.catalog import DatasetEntry

SPLIT_CODES = {"train": 0, "val": 1, "pretrain": 2, "holdout": 3}
# orientation (radians) at which each shape stands upright: squares axis-aligned, triangles and
# stars with a point up; objects turn around it by at most half the world's rotation range
UPRIGHT = {"circle": 0.0, "square": -math.pi / 4, "triangle": -math.pi / 2, "star": -math.pi / 2, "cross": 0.0}
MAX_OVERLAP = 0.3  # a new object may cover at most this share of its own area already taken
PLACEMENT_TRIES = 20


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # [H, W, 3] uint8 RGB
    label: np.ndarray  # [H, W] uint8 class ids, IGNORE_INDEX on the background
    objects: tuple[int, ...]  # class id of every drawn object, in drawing order

    @property
    def present(self) -> list[int]:
        """Class ids with at least one visible pixel, ascending."""
        values = np.unique(self.label)
        return [int(v) for v in values if v != IGNORE_INDEX]


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


class ShapesWorld:
    """Draws scenes of the demo dataset described by a catalog entry (its colours and shapes).

    `rotation` is the range, in degrees, of the random turn of each object around its upright
    orientation: 0 draws every object upright, 360 in any orientation.
    """

    def __init__(self, entry: DatasetEntry, rotation: float = 0.0):
        if not 0 <= rotation <= 360:
            raise ValueError(f"rotation must be a range in degrees between 0 and 360, got {rotation}")
        self.rotation = math.radians(rotation)
        self.classes = entry.classes
        self.colours: dict[str, tuple[int, int, int]] = {k: tuple(v) for k, v in entry.extra["colours"].items()}
        self.shapes: list[str] = list(entry.extra["shapes"])
        self.class_parts: list[tuple[str, str]] = []
        for name in self.classes:
            colour, shape = name.split(" ", 1)
            if colour not in self.colours or shape not in self.shapes or shape not in _SHAPE_DRAWERS:
                raise ValueError(f"demo class {name!r} is not '<colour> <shape>' with a known colour and shape")
            self.class_parts.append((colour, shape))

    def draw(
        self,
        rng: np.random.Generator,
        *,
        size: int,
        n_objects: int,
        min_size: float,
        max_size: float,
        class_ids: list[int] | None = None,
    ) -> Scene:
        """One scene with `n_objects` objects (classes drawn uniformly unless `class_ids` is given)."""
        image = _background(rng, size)
        label = np.full((size, size), IGNORE_INDEX, dtype=np.uint8)
        taken = np.zeros((size, size), dtype=bool)
        if class_ids is None:
            class_ids = [int(c) for c in rng.integers(0, len(self.classes), n_objects)]
        drawn = []
        for class_id in class_ids:
            colour, shape = self.class_parts[class_id]
            rows, cols = self._place(rng, shape, size, min_size, max_size, taken)
            if rows.size == 0:
                continue
            rgb = np.asarray(self.colours[colour], dtype=np.int16) + rng.integers(-18, 19, 3)
            shading = rng.integers(-10, 11, (rows.size, 3))
            image[rows, cols] = np.clip(rgb + shading, 0, 255).astype(np.uint8)
            label[rows, cols] = class_id
            taken[rows, cols] = True
            drawn.append(class_id)
        return Scene(image=image, label=label, objects=tuple(drawn))

    def caption(self, class_ids: list[int] | tuple[int, ...]) -> str:
        """'a photo of a red circle and a blue star' for the objects in drawing order (duplicates once)."""
        names = list(dict.fromkeys(self.classes[c] for c in class_ids))
        if not names:
            return "a photo of a textured background"
        body = names[0] if len(names) == 1 else ", ".join(f"a {n}" for n in names[:-1])[2:] + f" and a {names[-1]}"
        return f"a photo of a {body}"

    def _place(self, rng, shape, size, min_size, max_size, taken):
        best = (np.empty(0, int), np.empty(0, int))
        best_overlap = 1.0
        for _ in range(PLACEMENT_TRIES):
            extent = rng.uniform(min_size, max_size) * size
            radius = extent / 2
            centre = rng.uniform(radius, size - radius, 2)
            turn = rng.uniform(-0.5, 0.5)
            angle = UPRIGHT[shape] + turn * self.rotation
            rows, cols = _SHAPE_DRAWERS[shape](centre, radius, angle, size)
            if rows.size == 0:
                continue
            overlap = float(taken[rows, cols].mean())
            if overlap < best_overlap:
                best, best_overlap = (rows, cols), overlap
            if overlap <= MAX_OVERLAP:
                break
        return best


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-saturation texture: smooth noise at two scales in a random grey/brown tone."""
    coarse = resize(rng.normal(size=(max(size // 16, 2),) * 2), (size, size), order=3, mode="reflect")
    fine = resize(rng.normal(size=(max(size // 4, 2),) * 2), (size, size), order=1, mode="reflect")
    texture = 0.7 * coarse + 0.3 * fine
    tone = rng.uniform(70, 170)
    tint = rng.uniform(-12, 12, 3)
    amplitude = rng.uniform(12, 30)
    pixels = tone + tint[None, None, :] + amplitude * texture[..., None]
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _regular_polygon(centre, radius, angle, size, n_points, inner=None):
    """Vertices of a regular polygon (or a star when `inner` radius ratio is given), rasterised."""
    steps = n_points * (2 if inner else 1)
    theta = angle + np.arange(steps) * 2 * math.pi / steps
    radii = np.full(steps, radius)
    if inner:
        radii[1::2] = radius * inner
    rows = centre[0] + radii * np.sin(theta)
    cols = centre[1] + radii * np.cos(theta)
    return polygon(rows, cols, shape=(size, size))


def _circle(centre, radius, angle, size):
    return disk(tuple(centre), radius * 0.85, shape=(size, size))


def _square(centre, radius, angle, size):
    return _regular_polygon(centre, radius, angle, size, 4)


def _triangle(centre, radius, angle, size):
    return _regular_polygon(centre, radius, angle, size, 3)


def _star(centre, radius, angle, size):
    return _regular_polygon(centre, radius, angle, size, 5, inner=0.4)


def _cross(centre, radius, angle, size):
    arm = 0.34
    pts = [(1, arm), (arm, arm), (arm, 1), (-arm, 1), (-arm, arm), (-1, arm),
           (-1, -arm), (-arm, -arm), (-arm, -1), (arm, -1), (arm, -arm), (1, -arm)]
    c, s = math.cos(angle), math.sin(angle)
    rows = [centre[0] + radius * (y * c + x * s) for x, y in pts]
    cols = [centre[1] + radius * (x * c - y * s) for x, y in pts]
    return polygon(rows, cols, shape=(size, size))


_SHAPE_DRAWERS = {"circle": _circle, "square": _square, "triangle": _triangle, "star": _star, "cross": _cross}
