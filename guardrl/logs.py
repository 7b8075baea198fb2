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
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


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
        elif isinstance(logger, CSVLogger):
            # CSVLogger keeps rows in memory until every flush_logs_every_n_steps-th step (default 100).
            logger.save()


def should_log(trainer: L.Trainer, iteration: int) -> bool:
    """trainer.log_every_n_steps, counted in GRPO iterations (iteration is 0-based)."""
    return (iteration + 1) % max(trainer.log_every_n_steps, 1) == 0 or trainer.should_stop


def log_iteration(
    module: L.LightningModule,
    iteration: int,
    rewards: torch.Tensor,
    per_reward: Mapping[str, torch.Tensor],
    advantages: torch.Tensor,
    losses: Mapping[str, list],
    skipped: bool,
    dropped_groups: int = 0,
) -> dict:
    """The iteration's scalars over all ranks: reward mean/std (finite rewards only) and per reward, dropped
    groups, loss, KL, gradient norm, optimizer steps, lr, skips. Collectives on every rank in the same order;
    rank zero writes. Returns the metrics (the run summary reads reward/mean and reward/std)."""
    import logging

    all_rewards = module.all_gather(rewards.detach()).reshape(-1).double()
    finite = all_rewards[torch.isfinite(all_rewards)]  # dropped groups' NaN/inf rewards are left out
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=all_rewards.device)
    metrics: dict = {
        "reward/mean": finite.mean() if finite.numel() else nan,
        "reward/std": finite.std(unbiased=False) if finite.numel() else nan,
    }
    for name, values in per_reward.items():
        metrics[f"reward/{name}/mean"] = module.all_gather(values.detach()).double().nanmean()
    dropped = int(module.all_gather(torch.tensor(dropped_groups, device=module.device)).sum())
    metrics["train/dropped_groups"] = dropped
    trainer = module.trainer
    if dropped and not skipped and trainer.is_global_zero:
        logging.getLogger("guardrl.module").warning(
            "guardrl: iteration %d: %d prompt group(s) with a non-finite reward were left out of the "
            "update; the other groups trained",
            iteration,
            dropped,
        )
    local = {"advantages/abs_mean": advantages.abs().mean()}
    if losses["loss"]:
        local["train/loss"] = torch.stack(losses["loss"]).mean()
        local["train/kl"] = torch.stack(losses["kl"]).mean()
    if losses["grad_norm"]:
        local["grad/norm"] = torch.stack(losses["grad_norm"]).mean()
    names = sorted(local)
    means = module.all_gather(torch.stack([local[n].detach().double() for n in names])).reshape(
        -1, len(names)
    )
    metrics.update(zip(names, means.mean(dim=0)))
    metrics.update(
        {
            "train/num_optimizer_steps": len(losses["grad_norm"]),
            "train/iteration": iteration,
            "train/lr": module.optimizers().param_groups[0]["lr"],
            "train/skipped_update": float(skipped),
            "train/num_skipped_updates": module.skipped_updates.total,
        }
    )
    write_scalars(trainer, metrics, iteration)
    module.log(
        "reward",
        metrics["reward/mean"].float(),
        prog_bar=True,
        logger=False,
        on_step=True,
        on_epoch=False,
        batch_size=rewards.numel(),
    )
    return metrics
