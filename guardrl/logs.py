"""Scalars written at an explicit x = GRPO iteration, straight to the loggers.

Why not `LightningModule.log`: its on-step results are kept in a collection that Lightning re-logs at every
logging step, so a per-step tag (`ratio/mean_t{k}`) of a denoising step that was not trained in this
iteration (timestep sub-sampling) would be written again with the previous iteration's value: a stale
point that looks like data. Here each iteration writes exactly what it measured, at step = iteration, and
flushes, so a killed run's events are on disk up to its last finished iteration.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger


def write_scalars(trainer: L.Trainer, metrics: Mapping[str, float | torch.Tensor], iteration: int) -> None:
    """Write `metrics` (already reduced over ranks) at x = `iteration` to every logger, on the
    trainer.log_every_n_steps cadence; call on every rank."""
    values = {name: float(value) for name, value in metrics.items()}
    # Callbacks (checkpoint monitors, the progress bar) read trainer.callback_metrics, whatever the cadence.
    trainer.callback_metrics.update({name: torch.tensor(value) for name, value in values.items()})
    if not trainer.is_global_zero or not values or not should_log(trainer, iteration):
        return
    for logger in trainer.loggers:
        logger.log_metrics(values, step=iteration)


def flush_loggers(trainer: L.Trainer) -> None:
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.flush()


def should_log(trainer: L.Trainer, iteration: int) -> bool:
    """trainer.log_every_n_steps, counted in GRPO iterations (iteration is 0-based)."""
    return (iteration + 1) % max(trainer.log_every_n_steps, 1) == 0 or trainer.should_stop
