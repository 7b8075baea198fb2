"""Render a PromptSpec into an image: black background, flat palette colors, no anti-aliasing.

Deterministic: all randomness comes from `numpy.random.default_rng(seed)` (never a global RNG), so the same
(spec, seed, image_size) gives the same bytes on every machine.

A scene is a layout of size x size boxes (sizes from `world.geometry`), one per object instance, placed
uniformly at random inside a `border`, with at least `gap` background pixels between any two boxes, and for
position prompts with the relation's axis dominating twice over (along >= 2 * across, see
`world.relation_offsets`): a scene never states two relations at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from guardrl.toy.grammar import as_spec
from guardrl.toy.world import (
    DEFAULT_IMAGE_SIZE,
    PALETTE,
    ObjectSpec,
    PromptSpec,
    geometry,
    relation_offsets,
    shape_mask,
)

# Placement is sequential rejection sampling, vectorized: each object draws CANDIDATES_PER_OBJECT boxes at
# once and takes the first that fits; if none fits, the scene restarts. At 32 x 32, three-object scenes
# almost never restart and position scenes restart about once on average (the first object can leave no room
# for the relation). MAX_RESTARTS only guards against an impossible request; valid sizes never reach it.
CANDIDATES_PER_OBJECT = 256
MAX_RESTARTS = 100
RELATION_DOMINANCE = 2


@dataclass(frozen=True)
class PlacedObject:
    """An object drawn in the box [x, x + size) x [y, y + size)."""

    obj: ObjectSpec
    x: int
    y: int
    size: int

    @property
    def center2(self) -> tuple[int, int]:
        """Doubled centre (exact integers)."""
        return 2 * self.x + self.size, 2 * self.y + self.size

    def is_apart_from(self, other: PlacedObject, gap: int) -> bool:
        """At least `gap` background pixels between the two boxes along x or along y."""
        return (
            self.x + self.size + gap <= other.x
            or other.x + other.size + gap <= self.x
            or self.y + self.size + gap <= other.y
            or other.y + other.size + gap <= self.y
        )


def sample_layout(
    spec: PromptSpec, rng: np.random.Generator, image_size: int = DEFAULT_IMAGE_SIZE
) -> list[PlacedObject]:
    """Boxes for every object instance of `spec`, in `spec.instances()` order."""
    geo = geometry(image_size)
    for _ in range(MAX_RESTARTS):
        placed: list[PlacedObject] = []
        for obj in spec.instances():
            sizes = rng.integers(geo.min_object_size, geo.max_object_size + 1, size=CANDIDATES_PER_OBJECT)
            highs = image_size - geo.border - sizes
            xs = rng.integers(geo.border, highs + 1)
            ys = rng.integers(geo.border, highs + 1)
            fits = np.ones(CANDIDATES_PER_OBJECT, dtype=bool)
            for other in placed:
                fits &= (
                    (xs + sizes + geo.gap <= other.x)
                    | (other.x + other.size + geo.gap <= xs)
                    | (ys + sizes + geo.gap <= other.y)
                    | (other.y + other.size + geo.gap <= ys)
                )
            if spec.relation is not None and placed:
                along, across = relation_offsets(
                    spec.relation, placed[0].center2, (2 * xs + sizes, 2 * ys + sizes)
                )
                fits &= (along > 0) & (along >= RELATION_DOMINANCE * across)
            if not fits.any():
                break  # this object found no room: restart the scene
            i = int(np.argmax(fits))
            placed.append(PlacedObject(obj, int(xs[i]), int(ys[i]), int(sizes[i])))
        else:
            return placed
    raise RuntimeError(f"no layout found for {spec} at image size {image_size}")


def draw(layout: Sequence[PlacedObject], image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """(H, W, 3) uint8 image of a layout."""
    image = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    for placed in layout:
        box = image[placed.y : placed.y + placed.size, placed.x : placed.x + placed.size]
        box[shape_mask(placed.obj.shape, placed.size, placed.size)] = PALETTE[placed.obj.color]
    return image


def render(prompt: PromptSpec | str, seed: int, image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """(H, W, 3) uint8 render of a prompt (a PromptSpec or a sentence of the grammar)."""
    return draw(sample_layout(as_spec(prompt), np.random.default_rng(seed), image_size), image_size)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1], the layout generators produce."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def render_tensor(prompt: PromptSpec | str, seed: int, image_size: int = DEFAULT_IMAGE_SIZE) -> torch.Tensor:
    return to_tensor(render(prompt, seed, image_size))


def render_batch(
    prompts: Sequence[PromptSpec | str], seeds: Sequence[int], image_size: int = DEFAULT_IMAGE_SIZE
) -> torch.Tensor:
    """(N, 3, H, W) float32 renders, image i of prompts[i] with seeds[i]."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    return torch.stack([render_tensor(prompt, seed, image_size) for prompt, seed in zip(prompts, seeds)])
