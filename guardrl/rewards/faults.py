"""A reward that misbehaves on purpose, for testing how a run survives faults (docs/reliability.md)."""

from __future__ import annotations

import random
import time
from typing import Optional

import numpy as np
import torch

from guardrl.rewards.base import Reward
from guardrl.rewards.jpeg import JpegCompressibility


class FaultInjectionReward(Reward):
    """JPEG compressibility, except on chosen calls (0-based, counted per process): NaN scores (on the samples
    `nan_samples`, default all of them), an exception, or a sleep. With `noise_std` > 0 it is also
    stochastic, drawing from the global torch, numpy and Python generators, as user rewards may (random
    crops, sampled captions); a resumed run must restore all three to score like the uninterrupted one. Not
    for training anything real."""

    def __init__(
        self,
        nan_at_calls: Optional[list[int]] = None,
        nan_samples: Optional[list[int]] = None,
        raise_at_calls: Optional[list[int]] = None,
        sleep_at_calls: Optional[list[int]] = None,
        sleep_s: float = 5.0,
        noise_std: float = 0.0,
        weight: float = 1.0,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        self.nan_at_calls = set(nan_at_calls or [])
        self.nan_samples = None if nan_samples is None else list(nan_samples)
        self.raise_at_calls = set(raise_at_calls or [])
        self.sleep_at_calls = set(sleep_at_calls or [])
        self.sleep_s = sleep_s
        self.noise_std = noise_std
        self.inner = JpegCompressibility()
        self.calls = 0

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        call, self.calls = self.calls, self.calls + 1
        if call in self.raise_at_calls:
            raise ConnectionError(f"injected failure at call {call}")
        if call in self.sleep_at_calls:
            time.sleep(self.sleep_s)
        scores = self.inner.score(images, prompts)
        if self.noise_std > 0:
            size = len(scores)
            noise = (
                torch.randn(size, dtype=torch.float64)
                + torch.from_numpy(np.random.standard_normal(size))
                + torch.tensor([random.gauss(0.0, 1.0) for _ in range(size)], dtype=torch.float64)
            )
            scores = scores + self.noise_std * noise.to(scores.dtype)
        if call in self.nan_at_calls:
            scores = scores.clone()
            scores[slice(None) if self.nan_samples is None else self.nan_samples] = float("nan")
        return scores
