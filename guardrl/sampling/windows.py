"""Which sampler steps are SDE steps in a given iteration: the SDE window strategies (docs/math.md, "SDE
windows"). Steps outside the window are deterministic Euler steps; only the window's steps are stored and
trained.

    fixed    the whole range `sampling.sde_window` every iteration (FlowGRPO).
    random   a window of `sde_window_size` steps at a uniformly random position inside the range, drawn
             anew each iteration from a seed of (run seed, iteration) that leaves out the rank, so every rank
             uses the same window (Flow-GRPO-Fast: flow_grpo's `sde_window_size` / `sde_window_range`).
    sliding  a window of `sde_window_size` steps that starts at the range's first step and moves by
             `sde_window_stride` steps (default: its size) every `sde_window_slide_every` iterations; past the
             end of the range it stays at the range's last position, or with `sde_window_wrap` starts over
             at the first (MixGRPO's "progressive" strategy and its roll_back flag, Tencent-Hunyuan/MixGRPO
             fastvideo/train_grpo_flux.py).

The window is a pure function of the iteration number (and, for `random`, the run's seed), both of which
every checkpoint holds: a resumed run trains exactly the windows the uninterrupted run would have.
"""

from __future__ import annotations

import torch

WINDOW_STRATEGIES = ("fixed", "random", "sliding")


def sde_window_at(
    strategy: str,
    window_range: tuple[int, int],
    size: int | None,
    iteration: int,
    random_seed: int = 0,
    slide_every: int = 1,
    stride: int | None = None,
    wrap: bool = False,
) -> tuple[int, int]:
    """The half-open window [start, end) of SDE steps of `iteration` (0-based).

    Args:
        strategy: one of WINDOW_STRATEGIES (sampling.sde_window_strategy).
        window_range: [first, last) sampler steps the window may cover (sampling.sde_window).
        size: steps per window for "random" and "sliding" (sampling.sde_window_size); unused for "fixed".
        random_seed: "random": the seed of this iteration's draw (the caller mixes run seed and iteration).
        slide_every, stride, wrap: "sliding" (sampling.sde_window_slide_every / _stride / _wrap).
    """
    first, last = window_range
    if strategy == "fixed":
        return first, last
    if strategy not in WINDOW_STRATEGIES:
        raise ValueError(
            f"sde_window_strategy (sampling.sde_window_strategy) must be one of {WINDOW_STRATEGIES}, got "
            f"{strategy!r}"
        )
    if size is None or not 1 <= size <= last - first:
        raise ValueError(
            f"sde_window_size (sampling.sde_window_size) must be an integer in [1, {last - first}] (the "
            f"steps of sampling.sde_window={[first, last]}) with sde_window_strategy {strategy!r}, got "
            f"{size!r}"
        )
    positions = last - first - size + 1  # window starts first, first + 1, ..., last - size
    if strategy == "random":
        generator = torch.Generator().manual_seed(random_seed)
        start = first + int(torch.randint(positions, (1,), generator=generator))
        return start, start + size
    step = size if stride is None else stride
    moves = iteration // slide_every
    if wrap:
        # the starts first, first + step, ... that fit, in a cycle (MixGRPO's roll_back)
        fitting = (positions - 1) // step + 1
        start = first + (moves % fitting) * step
    else:
        # past the end the window stays at the last position (MixGRPO clips its start there)
        start = min(first + moves * step, last - size)
    return start, start + size
