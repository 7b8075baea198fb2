"""Rule-based rewards of the toy world, computed exactly from pixels (no learned model).

    ToyColorShare   the share of the image's pixels drawn in one of the prompt's colours

Used by the learning benchmark (guardrl/toy/learning.py) as a reward a person can check by eye: an image of "a
red circle and a blue square" scores the fraction of its pixels that are red or blue, with the verifier's
colour rule (a pixel is a palette colour when it lies within COLOR_TOLERANCE of it in RGB,
guardrl/toy/verify.py). It can be raised by drawing the asked objects bigger or brighter, or by painting the
background in their colour; it is a learning signal, not a gold metric."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from guardrl.rewards.base import Reward
from guardrl.toy.grammar import as_spec
from guardrl.toy.verify import as_image_batch, classify_pixels
from guardrl.toy.world import COLORS, PromptSpec


@lru_cache(maxsize=4096)
def _prompt_classes(prompt: str | PromptSpec) -> tuple[int, ...]:
    """Pixel classes (verify.classify_pixels: 1.. = COLORS in order) of the prompt's colours."""
    return tuple(sorted({1 + COLORS.index(obj.color) for obj in as_spec(prompt).objects}))


def prompt_color_share(images: torch.Tensor, prompts: Sequence[str | PromptSpec]) -> torch.Tensor:
    """(N,) float: per image, the share of its H x W pixels classified as one of its prompt's colours."""
    classes_NHW = classify_pixels(as_image_batch(images))
    wanted_NK = torch.zeros(
        classes_NHW.shape[0], 1 + len(COLORS), dtype=torch.bool, device=classes_NHW.device
    )
    for n, prompt in enumerate(prompts):
        wanted_NK[n, list(_prompt_classes(prompt))] = True
    # UNKNOWN (-1) pixels match nothing: gather at class 0 (background, never wanted) for them.
    gathered = torch.gather(wanted_NK, 1, classes_NHW.clamp(min=0).flatten(1))
    return gathered.float().mean(dim=1)


class ToyColorShare(Reward):
    """reward = share of pixels in the prompt's colours, in [0, 1] (prompts must be in the toy grammar)."""

    def __init__(self, weight: float = 1.0, name: str | None = "toy_color_share") -> None:
        super().__init__(weight=weight, name=name)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return prompt_color_share(images.detach().float().clamp(0, 1), prompts).to(images.device)
