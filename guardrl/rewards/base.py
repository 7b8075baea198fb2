"""The reward interface: score decoded images against their prompts."""

from __future__ import annotations

import importlib
import math
from typing import Callable

import torch
from torch import nn


class Reward(nn.Module):
    """Scores a batch of images. Subclasses implement `score`; `forward` checks what comes back.

    Rewards are `nn.Module`s so Lightning moves them to the right device and model-based rewards keep their
    weights in one place; their parameters are frozen and never in a checkpoint's trainable state.
    """

    def __init__(self, weight: float = 1.0, name: str | None = None) -> None:
        """
        Args:
            weight: multiplier of this reward in the total (rewards are summed).
            name: tag suffix in the logs (`reward/<name>/mean`); defaults to the class's snake_case name.
        """
        super().__init__()
        self.name = name or _snake_case(type(self).__name__)
        # A NaN or infinite weight would turn every total reward, and so every advantage, into NaN.
        if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)):
            raise ValueError(
                f"reward {self.name!r}: weight (model.rewards[...].init_args.weight) must be a finite "
                f"number, got {weight!r}"
            )
        self.weight = weight

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """images: (B, 3, H, W) float in [0, 1]; returns (B,) rewards."""
        raise NotImplementedError

    # True for rewards that score a prompt's images together (guardrl.rewards.GroupReward): they get the
    # batch's group size
    scores_groups = False

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, prompts: list[str], group_size: int | None = None
    ) -> torch.Tensor:
        """Score and check. `group_size`: the batch is consecutive groups of this many images of one prompt
        (GRPO's data.group_size in training, samples_per_prompt in an evaluation); only rewards that score
        groups use it."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"reward {self.name!r}: expected images of shape (B, 3, H, W), got {tuple(images.shape)}"
            )
        if len(prompts) != images.shape[0]:
            raise ValueError(
                f"reward {self.name!r}: {images.shape[0]} images but {len(prompts)} prompts; it needs one "
                "prompt per image"
            )
        if self.scores_groups and group_size is not None:
            rewards = self.score(images, prompts, group_size=group_size)  # type: ignore[call-arg]
        else:
            rewards = self.score(images, prompts)
        if not isinstance(rewards, torch.Tensor):
            raise ValueError(
                f"reward {self.name!r} returned a {type(rewards).__name__}, expected a tensor of shape "
                f"({images.shape[0]},)"
            )
        if rewards.shape != (images.shape[0],):
            raise ValueError(
                f"reward {self.name!r} returned shape {tuple(rewards.shape)}, expected ({images.shape[0]},)"
            )
        return rewards.float()


def build_component(spec, default: Callable, option: str, expected: str):
    """A reward's pluggable part (OCR recogniser, GenEval detector...) from a config value: a string is a
    local path / hub id given to `default`; a {"class_path", "init_args"} dict (as in a config file) is
    imported and built; a callable is used as is."""
    if isinstance(spec, str):
        return default(spec)
    if isinstance(spec, dict) and isinstance(spec.get("class_path"), str):
        module_name, _, class_name = spec["class_path"].rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError) as error:
            raise ValueError(f"{option}: cannot import class_path {spec['class_path']!r} ({error})") from None
        return cls(**spec.get("init_args", {}))
    if callable(spec):
        return spec
    raise ValueError(
        f"{option} must be a local path or hub id, a {{class_path, init_args}} dict or a callable "
        f"{expected}; got {type(spec).__name__}"
    )


def _snake_case(name: str) -> str:
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and not name[i - 1].isupper():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)
