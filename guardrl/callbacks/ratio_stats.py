"""RatioStatsCallback: the per-denoising-step diagnostics of the GRPO-Guard paper, in the run's loggers.

For each trained sampler step k (0 = pure noise), over all updates of one GRPO iteration and all ranks:
    ratio/mean_t{k}, ratio/std_t{k}     of the ratio used for clipping (exp of the variant's log-ratio)
    clip/frac_pos_upper_t{k}            share of positive-advantage samples with ratio > 1 + c
    clip/frac_neg_lower_t{k}            share of negative-advantage samples with ratio < 1 - c
    grad/norm_t{k}                      norm of the gradient of step k's loss (mean over updates)
    ratio/log_ratio_t{k}      histogram of the log-ratio used for clipping
    ratio/raw_log_ratio_t{k}  histogram of the plain log r, whatever the variant
The x axis is the GRPO iteration, as for every scalar guardrl logs. Loggers without a histogram type (MLflow,
CSV) get each histogram's summary scalars instead (guardrl/logger_media.py).
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from guardrl.algorithm import clip_shares
from guardrl.logger_media import log_histogram
from guardrl.logs import write_scalars


class RatioStatsCallback(Callback):
    def __init__(self, log_histograms: bool = True, histogram_every_n_iterations: int = 1) -> None:
        """
        Args:
            log_histograms: write the per-step log-ratio histograms.
            histogram_every_n_iterations: histogram cadence (scalars follow trainer.log_every_n_steps).
        """
        every = histogram_every_n_iterations
        if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
            raise ValueError(
                f"ratio_stats.histogram_every_n_iterations must be an integer >= 1, got {every!r}"
            )
        self.log_histograms = log_histograms
        self.histogram_every_n_iterations = histogram_every_n_iterations

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        if not outputs or "step_stats" not in outputs:
            return
        iteration = pl_module.num_iterations - 1  # the iteration just finished; Lightning logs at this step
        write_histograms = (
            self.log_histograms
            and trainer.is_global_zero
            and (iteration + 1) % self.histogram_every_n_iterations == 0
        )
        metrics: dict[str, torch.Tensor | float] = {}
        for stats in outputs["step_stats"]:
            k = stats.step_index
            # Collectives run on every rank; only rank zero writes (see DESIGN.md).
            log_ratio = pl_module.all_gather(stats.cat("log_ratio")).reshape(-1).double()
            raw_log_ratio = pl_module.all_gather(stats.cat("raw_log_ratio")).reshape(-1).double()
            advantages = pl_module.all_gather(stats.cat("advantages")).reshape(-1)
            # The loss's own clip flags (uint8 for the collective: not every backend gathers bools).
            clipped = [
                pl_module.all_gather(stats.cat(name).to(torch.uint8)).reshape(-1)
                for name in ("clipped_upper", "clipped_lower")
            ]
            shares = clip_shares(*clipped, advantages)
            ratio = log_ratio.exp()
            metrics[f"ratio/mean_t{k}"] = ratio.mean()
            metrics[f"ratio/std_t{k}"] = ratio.std(unbiased=False)
            metrics[f"ratio/log_ratio_mean_t{k}"] = log_ratio.mean()
            metrics[f"ratio/raw_log_ratio_mean_t{k}"] = raw_log_ratio.mean()
            metrics[f"clip/frac_pos_upper_t{k}"] = shares["pos_upper"].float()
            metrics[f"clip/frac_neg_lower_t{k}"] = shares["neg_lower"].float()
            if stats.grad_norms:
                metrics[f"grad/norm_t{k}"] = float(sum(stats.grad_norms) / len(stats.grad_norms))
            if write_histograms:
                log_histogram(trainer, f"ratio/log_ratio_t{k}", log_ratio.cpu(), iteration)
                log_histogram(trainer, f"ratio/raw_log_ratio_t{k}", raw_log_ratio.cpu(), iteration)
        # Only the steps trained in this iteration are written: no stale values for the others (logs.py).
        write_scalars(trainer, metrics, iteration)
