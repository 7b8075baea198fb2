"""Which stored denoising steps an iteration trains (grpo.num_train_timesteps, grpo.timestep_selection)."""

from __future__ import annotations

from typing import Optional

import torch

TIMESTEP_SELECTIONS = ("random", "first")


def choose_trained_steps(
    num_stored: int, wanted: Optional[int], selection: str, generator: torch.Generator
) -> list[int]:
    """Positions j in the trajectory to train this iteration, ascending. All of them when `wanted` is None or
    covers them; else the first `wanted` ("first") or a random subset drawn from `generator` ("random"; the
    caller seeds it by iteration only, so every rank and every variant of a seed trains the same steps, which
    FSDP needs and a fair comparison wants)."""
    if selection not in TIMESTEP_SELECTIONS:
        raise ValueError(
            "grpo.timestep_selection must be one of "
            f"{', '.join(map(repr, TIMESTEP_SELECTIONS))}; got {selection!r}"
        )
    if wanted is None or wanted >= num_stored:
        return list(range(num_stored))
    if selection == "first":
        return list(range(wanted))
    return sorted(torch.randperm(num_stored, generator=generator)[:wanted].tolist())
