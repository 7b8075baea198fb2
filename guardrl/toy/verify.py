"""The exact verifier: does an image show what its prompt states? Rules, in order:

1. Pixels -> classes. Each pixel takes the nearest of background + palette colors if it lies within
   COLOR_TOLERANCE (RGB distance, [0, 1] units) of it, else it is "unknown". Palette colors are >= 1.0 apart,
   so 0.35 leaves no ambiguity and absorbs generator noise (to reach it, Gaussian noise of std 0.03 needs
   an 11.7-sigma chi(3) excursion: about 1e-28 per pixel).
   With `quantized=True` every pixel takes its nearest color, however far (verification of the
   palette-quantized image: it forgives color drift and judges only the layout).
2. Objects = 8-connected components of one palette color; components smaller than the image size's
   `min_component_area` (12 px at 32 x 32, a quarter of the smallest triangle) are speckle and ignored.
3. Shape of a component: the masks of all shapes (`world.shape_mask`) are fitted to its bounding box; the best
   IoU names the shape if it is >= SHAPE_MIN_IOU, beats the runner-up by SHAPE_MIN_MARGIN and the box is no
   more elongated than MAX_ASPECT; otherwise the shape is unknown (a blob between a square and a disc is
   neither). Clean renders match their mask exactly (IoU 1); two different shapes overlap at most 0.89.
4. Checks (pass = all):
   colors    the set of colors with objects equals the prompt's colors (none missing, no extra one);
   counts    each prompt color has exactly the prompt's number of objects;
   shapes    every object of a prompt color has the prompt's shape (and there is at least one);
   position  (position prompts only) one object per color, and the relation's axis dominates:
             along > across on bounding-box centres (`world.relation_offsets`); renders keep
             along >= 2 * across.

`python -m guardrl.toy.verify --check 2000` prints clean pass rates, mismatch acceptance and noise robustness.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from guardrl.toy.grammar import as_spec, enumerate_specs, near_misses, sample_specs
from guardrl.toy.render import render_batch
from guardrl.toy.world import COLORS, SHAPES, PromptSpec, geometry, palette_rgb, relation_offsets, shape_mask

COLOR_TOLERANCE = 0.35
SHAPE_MIN_IOU = 0.8
SHAPE_MIN_MARGIN = 0.05
MAX_ASPECT = 1.25
UNKNOWN = -1  # pixel class of a color far from the palette; 0 is the background, 1.. are COLORS in order


def palette_tensor(device: torch.device | str = "cpu") -> torch.Tensor:
    """(1 + len(COLORS), 3) float32 in [0, 1]: background first, then COLORS (index = pixel class)."""
    return torch.from_numpy(palette_rgb()).float().div(255.0).to(device)


def as_image_batch(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 1] from a tensor (3, H, W) / (N, 3, H, W) or an array (H, W, 3) /
    (N, H, W, 3); uint8 inputs are divided by 255."""
    if isinstance(images, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(images))
        tensor = tensor.unsqueeze(0) if tensor.ndim == 3 else tensor
        tensor = tensor.permute(0, 3, 1, 2)
    else:
        tensor = images.unsqueeze(0) if images.ndim == 3 else images
    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise ValueError(
            f"expected images (N, 3, H, W) or arrays (N, H, W, 3), got shape {tuple(images.shape)}"
        )
    if tensor.dtype == torch.uint8:
        return tensor.float().div(255.0)
    return tensor.detach().float()


def nearest_palette(images_N3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index_NHW, distance_NHW): each pixel's nearest background/palette class and its RGB distance to it."""
    palette_K3 = palette_tensor(images_N3HW.device)
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2: one small matmul instead of an (N, K, 3, H, W) difference tensor
    dots_NKHW = torch.einsum("nchw,kc->nkhw", images_N3HW, palette_K3)
    norms_N1HW, palette_norms_1K11 = (
        images_N3HW.square().sum(1, keepdim=True),
        palette_K3.square().sum(1).view(1, -1, 1, 1),
    )
    squared_NKHW = norms_N1HW - 2 * dots_NKHW + palette_norms_1K11
    squared_NHW, index_NHW = squared_NKHW.min(dim=1)
    return index_NHW, squared_NHW.clamp_(min=0).sqrt()


def classify_pixels(images_N3HW: torch.Tensor, quantized: bool = False) -> torch.Tensor:
    """(N, H, W) int64 pixel classes: UNKNOWN, 0 background, 1.. palette colors (rule 1)."""
    index_NHW, distance_NHW = nearest_palette(images_N3HW)
    if quantized:
        return index_NHW
    return torch.where(distance_NHW <= COLOR_TOLERANCE, index_NHW, UNKNOWN)


def quantize(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Replace every pixel by its nearest background/palette color: (N, 3, H, W) float in [0, 1]."""
    index_NHW, _ = nearest_palette(as_image_batch(images))
    return palette_tensor(index_NHW.device)[index_NHW].permute(0, 3, 1, 2).contiguous()


def label_components(classes_NHW: torch.Tensor) -> torch.Tensor:
    """8-connected components of equal palette class (> 0), for a whole batch at once.

    Returns (N, H, W) int64: the smallest flat pixel index (y * W + x) of each pixel's component, and H * W
    for background and unknown pixels. Works on the edge list (pairs of same-class 8-neighbours), so its cost
    follows the object pixels, not the frame: each pass gives both ends of every edge the smaller of their
    labels, then lets every pixel take its label's label (pointer jumping: a label is a pixel of the same
    component), which converges in a few passes even on the speckle of a noisy image.
    """
    N, H, W = classes_NHW.shape
    is_colored = classes_NHW > 0
    # compact ids 0..M-1 of the colored pixels, increasing with the flat index (so minima agree)
    colored_ids = torch.full((N, H, W), -1, dtype=torch.long, device=classes_NHW.device)
    num_colored = int(is_colored.sum())
    colored_ids[is_colored] = torch.arange(num_colored, device=classes_NHW.device)
    all_ = slice(None)
    ends_u, ends_v = [], []
    # right, down, down-right, down-left: each unordered neighbour pair once
    for (ya, xa), (yb, xb) in [
        ((all_, slice(0, W - 1)), (all_, slice(1, W))),
        ((slice(0, H - 1), all_), (slice(1, H), all_)),
        ((slice(0, H - 1), slice(0, W - 1)), (slice(1, H), slice(1, W))),
        ((slice(0, H - 1), slice(1, W)), (slice(1, H), slice(0, W - 1))),
    ]:
        class_a, class_b = classes_NHW[:, ya, xa], classes_NHW[:, yb, xb]
        linked = (class_a == class_b) & (class_a > 0)
        ends_u.append(colored_ids[:, ya, xa][linked])
        ends_v.append(colored_ids[:, yb, xb][linked])
    u, v = torch.cat(ends_u), torch.cat(ends_v)
    labels = torch.arange(num_colored, device=classes_NHW.device)
    while True:
        smaller = torch.minimum(labels[u], labels[v])
        updated = labels.scatter_reduce(0, u, smaller, "amin").scatter_reduce_(0, v, smaller, "amin")
        updated = updated[updated]
        if torch.equal(updated, labels):
            break
        labels = updated
    flat_index = torch.nonzero(is_colored.view(N, H * W))[
        :, 1
    ]  # y * W + x of each colored pixel, compact order
    out = torch.full((N, H, W), H * W, dtype=torch.long, device=classes_NHW.device)
    out[is_colored] = flat_index[labels]
    return out


@dataclass(frozen=True)
class Component:
    """One object found in an image: color, area, inclusive bounding box, shape (None: unknown), its IoU."""

    color: str
    area: int
    x0: int
    y0: int
    x1: int
    y1: int
    shape: str | None
    shape_iou: float

    @property
    def center2(self) -> tuple[int, int]:
        """Doubled bounding-box centre, comparable with `render.PlacedObject.center2`."""
        return self.x0 + self.x1 + 1, self.y0 + self.y1 + 1


def classify_shape(mask: np.ndarray) -> tuple[str | None, float]:
    """(shape or None, best IoU) of a component's boolean mask cropped to its bounding box (rule 3)."""
    height, width = mask.shape
    ious = []
    for shape in SHAPES:
        template = shape_mask(shape, width, height)
        ious.append((mask & template).sum() / (mask | template).sum())
    order = np.argsort(ious)[::-1]
    best, runner_up = float(ious[order[0]]), float(ious[order[1]])
    aspect = max(width, height) / min(width, height)
    if best < SHAPE_MIN_IOU or best - runner_up < SHAPE_MIN_MARGIN or aspect > MAX_ASPECT:
        return None, best
    return SHAPES[order[0]], best


@dataclass(frozen=True)
class ComponentTable:
    """Every component of a batch (speckle included), one entry per component in each (M,) int64 tensor,
    sorted by image then by first pixel; `labels_NHW` is `label_components`' output."""

    labels_NHW: torch.Tensor
    image_index: torch.Tensor
    label: torch.Tensor  # flat index (y * W + x) of the component's first pixel
    color_class: torch.Tensor  # 1.. (COLORS[color_class - 1])
    area: torch.Tensor
    x0: torch.Tensor
    y0: torch.Tensor
    x1: torch.Tensor
    y1: torch.Tensor


def component_table(classes_NHW: torch.Tensor) -> ComponentTable:
    _, H, W = classes_NHW.shape
    labels = label_components(classes_NHW)
    is_object = labels < H * W
    image_index, ys, xs = torch.nonzero(is_object, as_tuple=True)
    keys = image_index * (H * W) + labels[is_object]
    unique_keys, inverse, areas = torch.unique(keys, return_inverse=True, return_counts=True)

    def reduce(values: torch.Tensor, how: str, start: int) -> torch.Tensor:
        return torch.full_like(unique_keys, start).scatter_reduce(0, inverse, values, how)

    return ComponentTable(
        labels_NHW=labels,
        image_index=unique_keys // (H * W),
        label=unique_keys % (H * W),
        color_class=classes_NHW.reshape(-1)[unique_keys],  # the class at the component's first pixel
        area=areas,
        x0=reduce(xs, "amin", W),
        y0=reduce(ys, "amin", H),
        x1=reduce(xs, "amax", -1),
        y1=reduce(ys, "amax", -1),
    )


def find_components(classes_NHW: torch.Tensor, min_area: int) -> list[list[Component]]:
    """Objects of each image (components of >= `min_area` pixels), in raster order of their first pixel."""
    table = component_table(classes_NHW)
    found: list[list[Component]] = [[] for _ in range(classes_NHW.shape[0])]
    labels = table.labels_NHW.numpy()
    for c in torch.nonzero(table.area >= min_area).flatten().tolist():
        n, label = int(table.image_index[c]), int(table.label[c])
        x0, y0, x1, y1 = (int(t[c]) for t in (table.x0, table.y0, table.x1, table.y1))
        shape, iou = classify_shape(labels[n, y0 : y1 + 1, x0 : x1 + 1] == label)
        color = COLORS[int(table.color_class[c]) - 1]
        found[n].append(Component(color, int(table.area[c]), x0, y0, x1, y1, shape, iou))
    return found


@dataclass(frozen=True)
class Verdict:
    """Per-check results of one image against one prompt; `position` is None for prompts without relation."""

    colors: bool
    counts: bool
    shapes: bool
    position: bool | None
    objects: tuple[Component, ...]

    @property
    def passed(self) -> bool:
        return self.colors and self.counts and self.shapes and self.position is not False


def judge(objects: Sequence[Component], spec: PromptSpec) -> Verdict:
    """Apply the checks of rule 4 to the objects found in one image."""
    expected = {obj.color: (spec.count, obj.shape) for obj in spec.objects}
    by_color = {color: [o for o in objects if o.color == color] for color in expected}
    colors = {o.color for o in objects} == set(expected)
    counts = all(len(by_color[color]) == count for color, (count, _) in expected.items())
    shapes = all(
        found and all(o.shape == shape for o in found)
        for found, (_, shape) in zip(by_color.values(), expected.values())
    )
    position = None
    if spec.relation is not None:
        first, second = (by_color[obj.color] for obj in spec.objects)
        position = len(first) == 1 and len(second) == 1
        if position:
            along, across = relation_offsets(spec.relation, first[0].center2, second[0].center2)
            position = along > across
    return Verdict(colors, counts, shapes, position, tuple(objects))


def find_objects(images: torch.Tensor | np.ndarray, quantized: bool = False) -> list[list[Component]]:
    """Rules 1-3 for a batch: the objects of each image, ready to be judged against any number of prompts."""
    batch = as_image_batch(images).cpu()
    height, width = batch.shape[-2:]
    if height != width:
        raise ValueError(f"toy images are square, got {height} x {width}")
    return find_components(classify_pixels(batch, quantized), geometry(int(height)).min_component_area)


def verify_batch(
    images: torch.Tensor | np.ndarray, prompts: Sequence[PromptSpec | str], quantized: bool = False
) -> list[Verdict]:
    """Verdicts for a batch: images (N, 3, H, W) float in [0, 1] (a generator's output) or uint8 renders."""
    found = find_objects(images, quantized)
    if len(prompts) != len(found):
        raise ValueError(f"{len(found)} images but {len(prompts)} prompts")
    return [judge(objects, as_spec(prompt)) for objects, prompt in zip(found, prompts)]


def verify(image: torch.Tensor | np.ndarray, prompt: PromptSpec | str, quantized: bool = False) -> Verdict:
    """Verdict of one image: (H, W, 3) uint8 array or (3, H, W) float tensor."""
    return verify_batch(image, [prompt], quantized)[0]


def pass_rate(
    images: torch.Tensor | np.ndarray, prompts: Sequence[PromptSpec | str], quantized: bool = False
) -> float:
    verdicts = verify_batch(images, prompts, quantized)
    return sum(v.passed for v in verdicts) / len(verdicts)


def run_verifier_checks(
    num_images: int = 2000, image_size: int = 32, seed: int = 0
) -> dict[str, float | int]:
    """The verifier's self-checks (the numbers quoted in docs/toy_world.md).

    clean/*            pass rate of renders against their own prompt, strict and quantized
    mismatch/random    acceptance of each render against a random other prompt whose objects differ
    mismatch/near      acceptance against every `near_misses` prompt (one attribute changed);
                       _prompts: how many
    noise_<std>/*      pass rate after adding Gaussian noise of that std per channel, clamped to [0, 1]
    """
    specs = sample_specs(num_images, seed)
    images = render_batch(specs, [seed * 1_000_003 + i for i in range(num_images)], image_size)
    results = {"clean/strict": pass_rate(images, specs), "clean/quantized": pass_rate(images, specs, True)}

    # Judging reuses the clean images' objects: only the prompt changes.
    found = find_objects(images)
    rng = np.random.default_rng(seed + 1)
    every_spec = enumerate_specs()
    accepted = 0
    for objects, spec in zip(found, specs):
        other = spec
        while sorted(map(repr, other.instances())) == sorted(map(repr, spec.instances())):
            other = every_spec[int(rng.integers(len(every_spec)))]
        accepted += judge(objects, other).passed
    results["mismatch/random"] = accepted / num_images
    near = [judge(objects, edit).passed for objects, spec in zip(found, specs) for edit in near_misses(spec)]
    results["mismatch/near"] = sum(near) / len(near)
    results["mismatch/near_prompts"] = len(near)

    generator = torch.Generator().manual_seed(seed)
    for std in (0.03, 0.1, 0.2, 0.3):
        noisy = (images + std * torch.randn(images.shape, generator=generator)).clamp(0, 1)
        results[f"noise_{std}/strict"] = pass_rate(noisy, specs)
        results[f"noise_{std}/quantized"] = pass_rate(noisy, specs, True)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Verifier self-checks on clean, mismatched and noised renders."
    )
    parser.add_argument("--check", type=int, default=2000, metavar="N", help="number of renders")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    for name, value in run_verifier_checks(args.check, args.image_size, args.seed).items():
        print(f"{name:28s} {value:d}" if isinstance(value, int) else f"{name:28s} {value:.4f}")
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
