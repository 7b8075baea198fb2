"""The toy proxy's labelled data: clean renders with per-pixel color and shape labels, per-combination counts
and centre bins (`labelled_renders`), and the training batch of a (seed, step) (`training_batch`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from guardrl.toy.grammar import as_spec
from guardrl.toy.proxy_net import COMBINATIONS, ProxyConfig, combination_index
from guardrl.toy.render import draw, sample_layout, to_tensor
from guardrl.toy.world import COLORS, KINDS, SHAPES, PromptSpec, shape_mask

IGNORE = -100  # centre label of a combination without exactly one instance (cross_entropy's ignore_index)


def labelled_renders(
    prompts: Sequence[str | PromptSpec], seeds: Sequence[int], config: ProxyConfig = ProxyConfig()
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(images, labels) of clean renders. The images are `render.render_batch(prompts, seeds)` exactly (the
    same `draw(sample_layout(spec, default_rng(seed)))`); the labels are read off the same layouts."""
    size, last_bin, bin2 = config.image_size, config.num_bins - 1, 2 * config.bin_size
    images, color_maps, shape_maps = [], [], []
    counts = np.zeros((len(prompts), len(COMBINATIONS)), dtype=np.int64)
    centre_x = np.full((len(prompts), len(COMBINATIONS)), IGNORE, dtype=np.int64)
    centre_y = centre_x.copy()
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        layout = sample_layout(as_spec(prompt), np.random.default_rng(seed), size)
        images.append(to_tensor(draw(layout, size)))
        color_map, shape_map = np.zeros((size, size), np.int64), np.zeros((size, size), np.int64)
        for placed in layout:
            k = combination_index(placed.obj.color, placed.obj.shape)
            counts[i, k] += 1
            mask = shape_mask(placed.obj.shape, placed.size, placed.size)
            box = (slice(placed.y, placed.y + placed.size), slice(placed.x, placed.x + placed.size))
            color_map[box][mask] = 1 + COLORS.index(placed.obj.color)
            shape_map[box][mask] = 1 + SHAPES.index(placed.obj.shape)
            cx2, cy2 = placed.center2  # doubled, so bin = centre // bin_size = center2 // (2 * bin_size)
            centre_x[i, k], centre_y[i, k] = min(cx2 // bin2, last_bin), min(cy2 // bin2, last_bin)
        color_maps.append(color_map)
        shape_maps.append(shape_map)
    # a centre is a target only for a combination drawn once (three circles have no one centre)
    centre_x[counts != 1], centre_y[counts != 1] = IGNORE, IGNORE
    labels = {
        "color": torch.from_numpy(np.stack(color_maps)),
        "shape": torch.from_numpy(np.stack(shape_maps)),
        "count": torch.from_numpy(counts),
        "total": torch.from_numpy(counts.sum(1)),
        "x": torch.from_numpy(centre_x),
        "y": torch.from_numpy(centre_y),
    }
    return torch.stack(images), labels


def training_batch(
    seed: int, step: int, batch_size: int, train_prompts: dict[str, list[str]], config: ProxyConfig
) -> tuple[list[str], torch.Tensor, dict[str, torch.Tensor]]:
    """(prompts, images, labels), a pure function of (seed, step): kinds uniformly (GenEval weighs its kinds
    equally; by count, position prompts would be 77% of the training split), a training prompt uniformly
    within the kind, a render seed. Clean renders, no augmentation."""
    rng = np.random.default_rng([seed, step])
    kinds = rng.integers(len(KINDS), size=batch_size)
    prompts = [train_prompts[KINDS[k]][int(rng.integers(len(train_prompts[KINDS[k]])))] for k in kinds]
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=batch_size)]
    images, labels = labelled_renders(prompts, seeds, config)
    return prompts, images, labels
