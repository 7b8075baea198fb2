"""Callbacks: ratio statistics, checkpoint-and-exit on signals, LoRA export, held-out evaluation, the
over-optimization watch,
and what people expect to see (progress bar, image grids, the run's config)."""

from guardrl.callbacks.evaluation import Evaluation
from guardrl.callbacks.image_grid import ImageGridCallback
from guardrl.callbacks.lora_export import LoraExport
from guardrl.callbacks.preemption import GracefulShutdown
from guardrl.callbacks.progress import GRPOProgressBar
from guardrl.callbacks.ratio_stats import RatioStatsCallback
from guardrl.callbacks.run_summary import RunSummaryCallback
from guardrl.callbacks.watch import OverOptimizationWatch

__all__ = [
    "Evaluation",
    "GRPOProgressBar",
    "GracefulShutdown",
    "ImageGridCallback",
    "LoraExport",
    "OverOptimizationWatch",
    "RatioStatsCallback",
    "RunSummaryCallback",
]
