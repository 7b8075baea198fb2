"""A reward that misbehaves on purpose, for testing how a run survives faults (docs/reliability.md)."""

from __future__ import annotations

import time
from typing import Optional

import torch

from guardrl.rewards.base import Reward
from guardrl.rewards.jpeg import JpegCompressibility


class FaultInjectionReward(Reward):
    """JPEG compressibility, except on chosen calls (0-based, counted per process): a NaN score, an
    exception, or a sleep. Not for training anything real."""

    def __init__(
        self,
        nan_at_calls: Optional[list[int]] = None,
        raise_at_calls: Optional[list[int]] = None,
        sleep_at_calls: Optional[list[int]] = None,
        sleep_s: float = 5.0,
        weight: float = 1.0,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        self.nan_at_calls = set(nan_at_calls or [])
        self.raise_at_calls = set(raise_at_calls or [])
        self.sleep_at_calls = set(sleep_at_calls or [])
        self.sleep_s = sleep_s
        self.inner = JpegCompressibility()
        self.calls = 0

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        call, self.calls = self.calls, self.calls + 1
        if call in self.raise_at_calls:
            raise ConnectionError(f"injected failure at call {call}")
        if call in self.sleep_at_calls:
            time.sleep(self.sleep_s)
        scores = self.inner.score(images, prompts)
        if call in self.nan_at_calls:
            scores = scores.clone()
            scores[0] = float("nan")
        return scores
