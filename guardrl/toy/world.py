"""The toy world's vocabulary and geometry: palette, shapes, scene specs and object sizes per image size.

Plain data and integer geometry only (no randomness, no torch), so that the renderer and the verifier share
one definition of what "a red triangle" is and what "left of" means.

Coordinates: x to the right, y down, pixel (x, y) covers [x, x + 1) x [y, y + 1). Centres are kept doubled
(`2 * x0 + size`) so that every geometric test is exact integer arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

BACKGROUND_RGB = (0, 0, 0)

# The six corners of the RGB cube that are neither black nor white, plus white. Any two of these (and black,
# the background) are at least 1.0 apart in [0, 1] RGB units, so a pixel within 0.35 of one color is at
# least 0.65 from every other: nearest-color assignment cannot be ambiguous under small generator noise.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Object A <relation> object B; "above" means A is higher in the image (smaller y).
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
KINDS: tuple[str, ...] = ("single_object", "counting", "two_object", "position")
MAX_COUNT = 3

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, DEFAULT_IMAGE_SIZE = 16, 64, 32


@dataclass(frozen=True)
class ObjectSpec:
    """One kind of object: a palette color and a shape."""

    color: str
    shape: str

    def __post_init__(self) -> None:
        if self.color not in PALETTE:
            raise ValueError(f"color {self.color!r} is not in the palette {COLORS}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape {self.shape!r} is not one of {SHAPES}")


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for, as structure.

    single_object  one object:                      PromptSpec((red_circle,))
    counting       `count` (2..3) copies of one:     PromptSpec((red_circle,), count=3)
    two_object     two objects of different colors:  PromptSpec((red_circle, blue_square))
    position       the same, plus objects[0] <relation> objects[1]

    Two-object prompts need different colors so that each object is identified by its color alone; the shape
    is then a separate check rather than part of the matching (one failure cannot hide another).
    """

    objects: tuple[ObjectSpec, ...]
    count: int = 1
    relation: str | None = None

    def __post_init__(self) -> None:
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a prompt has 1 or 2 objects, got {len(self.objects)}")
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be in [1, {MAX_COUNT}], got {self.count}")
        if len(self.objects) == 2:
            if self.count != 1:
                raise ValueError("counting prompts have one object; two-object prompts have count 1")
            if self.objects[0].color == self.objects[1].color:
                raise ValueError(
                    f"the two objects must have different colors, both are {self.objects[0].color}"
                )
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(f"relation {self.relation!r} is not one of {RELATIONS}")
            if len(self.objects) != 2:
                raise ValueError("a relation needs two objects")

    @property
    def kind(self) -> str:
        if len(self.objects) == 1:
            return "single_object" if self.count == 1 else "counting"
        return "two_object" if self.relation is None else "position"

    def instances(self) -> list[ObjectSpec]:
        """One entry per object drawn in the scene."""
        return list(self.objects) * self.count


def relation_offsets(
    relation: str, center_a2: tuple[int, int], center_b2: tuple[int, int]
) -> tuple[int, int]:
    """(along, across) offsets of doubled centres for "A <relation> B".

    `along` > 0 when the relation's sign holds (e.g. B's centre is right of A's for "left of"); `across` is
    the absolute offset on the other axis. The renderer asks along >= 2 * across, the verifier only
    along > across (the relation's axis dominates), so a generator may be sloppier than the renders.
    """
    dx, dy = center_b2[0] - center_a2[0], center_b2[1] - center_a2[1]
    if relation == "left of":
        return dx, abs(dy)
    if relation == "right of":
        return -dx, abs(dy)
    if relation == "above":
        return dy, abs(dx)
    if relation == "below":
        return -dy, abs(dx)
    raise ValueError(f"relation {relation!r} is not one of {RELATIONS}")


@cache
def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Boolean (height, width) mask of a shape filling a width x height box, touching all four sides.

    Pixel centres are tested in doubled integer coordinates (no anti-aliasing, no float rounding):
      square    the whole box;
      circle    the inscribed ellipse (a disc when width == height);
      triangle  apex at the top centre, base on the bottom row (row y spans a half-width (y + 1) / height of
                the box's half-width), so its two base corners and its apex are all inside the box's edges.
    The verifier fits the same masks to a component's bounding box, which is why they are defined for any box.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r} is not one of {SHAPES}")
    ys, xs = np.mgrid[0:height, 0:width]
    offset_x, offset_y = 2 * xs + 1 - width, 2 * ys + 1 - height
    if shape == "square":
        mask = np.ones((height, width), dtype=bool)
    elif shape == "circle":
        mask = offset_x**2 * height**2 + offset_y**2 * width**2 <= width**2 * height**2
    else:
        mask = height * np.abs(offset_x) <= (ys + 1) * width
    mask.setflags(write=False)
    return mask


@dataclass(frozen=True)
class Geometry:
    """Object sizes and spacing for one image size (all in pixels; objects are size x size boxes).

    At the default 32 x 32, objects are 9-12 px. The lower bound keeps shapes distinguishable: a 9 px triangle
    has a 1 px apex row and a 9 px base, and two different shapes of 9-12 px overlap at most 0.85 (IoU, circle
    vs square), well below the exact 1.0 of the right one. (A throwaway 16 x 16 prototype with 5-9 px
    objects got colors and counts learned but corners poorly formed.) The upper bound lets three objects and
    their gaps fit in the frame with room left for random placement. Both scale linearly with the image size
    (18-24 px at 64), with a floor of 5 px so that at 16 x 16 (5-6 px objects) a triangle still has a 1 px
    apex and a disc still lacks the square's corners (IoU 0.84-0.89 with the square: usable, not roomy).
    """

    image_size: int
    min_object_size: int
    max_object_size: int
    gap: int  # background pixels between two objects' boxes, at least; keeps 8-connected components apart
    border: int  # background pixels between a box and the frame, at least; keeps bounding boxes unclipped
    min_component_area: int  # smaller same-color components are treated as noise by the verifier


@cache
def geometry(image_size: int = DEFAULT_IMAGE_SIZE) -> Geometry:
    if not isinstance(image_size, int) or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"image_size must be an int in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size!r}"
        )
    min_object_size = max(5, -(-9 * image_size // 32))
    max_object_size = max(min_object_size + 1, 12 * image_size // 32)
    # A component below a quarter of the smallest object (the smallest triangle: 49 px at 32 x 32) cannot be
    # an object drawn at a valid size; ignoring it lets generator speckle pass without hiding a real object.
    smallest_area = int(shape_mask("triangle", min_object_size, min_object_size).sum())
    return Geometry(
        image_size=image_size,
        min_object_size=min_object_size,
        max_object_size=max_object_size,
        gap=max(2, image_size // 16),
        border=max(1, image_size // 32),
        min_component_area=max(3, smallest_area // 4),
    )


def palette_rgb() -> np.ndarray:
    """(1 + len(COLORS), 3) uint8: the background first, then COLORS in order (the verifier's class ids)."""
    return np.array([BACKGROUND_RGB, *PALETTE.values()], dtype=np.uint8)
