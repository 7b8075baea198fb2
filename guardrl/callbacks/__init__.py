"""Callbacks: ratio and clip statistics per denoising step; checkpoint-and-exit on signals."""

from guardrl.callbacks.lora_export import LoraExport
from guardrl.callbacks.preemption import GracefulShutdown
from guardrl.callbacks.ratio_stats import RatioStatsCallback

__all__ = ["GracefulShutdown", "LoraExport", "RatioStatsCallback"]
