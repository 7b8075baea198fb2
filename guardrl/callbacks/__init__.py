"""Callbacks: ratio and clip statistics per denoising step."""

from guardrl.callbacks.ratio_stats import RatioStatsCallback

__all__ = ["RatioStatsCallback"]
