"""Callbacks: ratio and clip statistics per denoising step; checkpoint-and-exit on signals."""

from guardrl.callbacks.lora_export import LoraExport
from guardrl.callbacks.preemption import GracefulShutdown
from guardrl.callbacks.ratio_stats import RatioStatsCallback

__all__ = ["GracefulShutdown", "LoraExport", "RatioStatsCallback"]

# What people expect to see (issue 6): the progress bar, image grids, the config summary.
from guardrl.callbacks.image_grid import ImageGridCallback  # noqa: E402
from guardrl.callbacks.progress import GRPOProgressBar  # noqa: E402
from guardrl.callbacks.run_summary import RunSummaryCallback  # noqa: E402

__all__ += ["GRPOProgressBar", "ImageGridCallback", "RunSummaryCallback"]
