"""Gold metrics for the over-optimization watch: torchmetrics Metrics with `update(images, prompts)`.

A gold metric measures what the proxy reward is meant to stand for, without being the proxy. Its states are
sums with `dist_reduce_fx="sum"`, so `compute()` aggregates over every rank's evaluation images.

`ImageDetail` is the stand-in for the tiny random-weight model, whose proxy is JPEG compressibility: a policy
that games compressibility flattens its images, so the mean per-image pixel standard deviation falls while the
proxy rises. The toy world's gold metrics take the same (images, prompts) and are used as they are:
`guardrl.toy.gold.VerifierPassRate` (`quantized: true` for the pass rate after colour quantization) and
`guardrl.toy.gold.OffPaletteFraction`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric


class ImageDetail(Metric):
    """Mean over images of the pixel standard deviation (over channels and pixels); higher is better."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, prompts: Sequence[str]) -> None:
        self.total += images.detach().double().flatten(1).std(dim=1).sum()
        self.count += images.shape[0]

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)
