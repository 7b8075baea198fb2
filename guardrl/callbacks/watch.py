"""OverOptimizationWatch: proxy and gold side by side on held-out prompts, and an alarm when they part.

Every `every_n_iterations` GRPO iterations the current policy samples images for held-out prompts with fixed
seeds (ODE by default: the deterministic sampler people ship; SDE as an option), scores them with the proxy
(the run's own `model.rewards`) and with gold metrics (torchmetrics Metrics with `update(images, prompts)`,
aggregated over ranks, see guardrl/gold.py), and logs, at x = iteration:

    watch/proxy              mean proxy reward on the evaluation images
    gold/<name>              each gold metric
    gold/average             Average(gold): each metric relative to its first evaluation (1.00 at the start;
                             inverted for lower-is-better metrics), averaged, as GRPO-Guard's main table does
    watch/gold_drop          best gold/average so far minus the current one
    watch/proxy_gain         current proxy minus the proxy at the best-gold evaluation
    watch/diverging          1 when the proxy has risen since the best gold while gold fell by > tolerance

When diverging `patience` evaluations in a row it warns; with `stop_on_divergence` it stops the run. With
`keep_best_gold` the state at each new best gold/average is saved as `best_gold.ckpt` (atomically, with
everything needed to resume or export from it), so the kept checkpoint is the best-gold one.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics import Metric

from guardrl.data.prompts import check_prompt_file, iter_prompt_file
from guardrl.logs import write_scalars

log = logging.getLogger(__name__)


class OverOptimizationWatch(Callback):
    def __init__(
        self,
        eval_prompts: str,
        gold: list[Metric],
        every_n_iterations: int = 10,
        samples_per_prompt: int = 2,
        max_prompts: Optional[int] = None,
        sampler: str = "ode",
        tolerance: float = 0.02,
        patience: int = 1,
        stop_on_divergence: bool = False,
        keep_best_gold: bool = True,
        seed: int = 1234,
    ) -> None:
        """
        Args:
            eval_prompts: held-out prompts (.txt or .jsonl), never trained on; read whole (an evaluation set).
            gold: gold metrics (e.g. guardrl.gold.ImageDetail, guardrl.toy.gold.VerifierPassRate).
            every_n_iterations: evaluation cadence in GRPO iterations (also evaluates before the first one).
            samples_per_prompt: images per prompt, each from its own fixed seed.
            max_prompts: use only the first this many prompts.
            sampler: "ode" (eta = 0, the shipped sampler) or "sde" (the rollout sampler, same noise level).
            tolerance: how far gold/average may fall below its best (while the proxy rose) before it counts.
            patience: diverging evaluations in a row before the warning (and the stop).
            stop_on_divergence: stop the run when the watch fires.
            keep_best_gold: save `best_gold.ckpt` next to the other checkpoints at each new best gold/average.
            seed: seed of the evaluation noise (the same images are drawn at every evaluation).
        """
        if not gold:
            raise ValueError("watch.gold must list at least one gold metric (e.g. guardrl.gold.ImageDetail)")
        for metric in gold:
            if not isinstance(metric, Metric) or getattr(metric, "higher_is_better", None) is None:
                raise ValueError(
                    f"watch.gold: {type(metric).__name__} must be a torchmetrics Metric with "
                    "higher_is_better set"
                )
        if not isinstance(every_n_iterations, int) or every_n_iterations < 1:
            raise ValueError(f"watch.every_n_iterations must be an integer >= 1, got {every_n_iterations!r}")
        if not isinstance(samples_per_prompt, int) or samples_per_prompt < 1:
            raise ValueError(f"watch.samples_per_prompt must be an integer >= 1, got {samples_per_prompt!r}")
        if sampler not in ("ode", "sde"):
            raise ValueError(f"watch.sampler must be 'ode' or 'sde', got {sampler!r}")
        if not tolerance >= 0:
            raise ValueError(f"watch.tolerance must be >= 0, got {tolerance!r}")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"watch.patience must be an integer >= 1, got {patience!r}")
        check_prompt_file(eval_prompts, "watch.eval_prompts")
        prompts = list(iter_prompt_file(eval_prompts, option="watch.eval_prompts"))[:max_prompts]
        if not prompts:
            raise ValueError(f"watch.eval_prompts={eval_prompts!r} contains no prompt")
        self.prompts = prompts
        self.gold = gold
        self.every_n_iterations = every_n_iterations
        self.samples_per_prompt = samples_per_prompt
        self.sampler = sampler
        self.tolerance = tolerance
        self.patience = patience
        self.stop_on_divergence = stop_on_divergence
        self.keep_best_gold = keep_best_gold
        self.seed = seed
        # Resumable state (state_dict below).
        self.reference: Optional[dict[str, float]] = None
        self.best: Optional[dict[str, float]] = None  # {"gold": ..., "proxy": ..., "iteration": ...}
        self.diverging_in_a_row = 0
        self.fired_at: Optional[int] = None

    # ----- when
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.backbone.takes_condition_image:
            # its evaluation prompts carry no conditioning images: it cannot sample an editing model
            raise ValueError(
                f"OverOptimizationWatch: {type(pl_module.backbone).__name__} edits images, and the watch's "
                "eval_prompts have no conditioning images; remove the watch from trainer.callbacks for "
                "editing runs"
            )
        if self.reference is None:
            self._evaluate(trainer, pl_module, iteration=pl_module.num_iterations)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.num_iterations % self.every_n_iterations == 0:
            self._evaluate(trainer, pl_module, iteration=pl_module.num_iterations)

    # ----- what
    @torch.no_grad()
    def _images(self, module) -> tuple[torch.Tensor, list[str]]:
        rank, world = module.global_rank, module.trainer.world_size
        prompts = [p for i, p in enumerate(self.prompts) if i % world == rank]
        prompts = [p for p in prompts for _ in range(self.samples_per_prompt)]
        if not prompts:
            return torch.zeros(0), []
        generator = torch.Generator(device=module.device).manual_seed(self.seed + rank)
        noise = module.backbone.initial_noise(len(prompts), generator, module.device)
        return module.sample(prompts, noise, self.sampler, generator), prompts

    def _evaluate(self, trainer: L.Trainer, module, iteration: int) -> None:
        images, prompts = self._images(module)
        proxy_sum = torch.zeros((), dtype=torch.float64, device=module.device)
        if prompts:
            proxy, _ = module.score(images, prompts)
            proxy_sum = proxy.double().sum()
        totals = module.all_gather(
            torch.stack(
                [proxy_sum, torch.tensor(float(len(prompts)), dtype=torch.float64, device=module.device)]
            )
        )
        totals = totals.reshape(-1, 2).sum(0)
        proxy_mean = float(totals[0] / totals[1].clamp(min=1))
        values = {}
        for metric in self.gold:
            metric.to(module.device)
            metric.reset()
            if prompts:
                metric.update(images, prompts)
            values[_metric_name(metric)] = float(metric.compute())  # torchmetrics syncs across ranks here
        if self.reference is None:
            self.reference = dict(values)
        average = sum(
            _relative(values[name], self.reference[name], metric.higher_is_better)
            for name, metric in zip(values, self.gold)
        ) / len(values)
        new_best = self.best is None or average > self.best["gold"]
        if new_best:
            self.best = {"gold": average, "proxy": proxy_mean, "iteration": iteration}
        drop = self.best["gold"] - average
        gain = proxy_mean - self.best["proxy"]
        diverging = drop > self.tolerance and gain > 0
        self.diverging_in_a_row = self.diverging_in_a_row + 1 if diverging else 0
        metrics = {
            "watch/proxy": proxy_mean,
            "gold/average": average,
            "watch/gold_drop": drop,
            "watch/proxy_gain": gain,
            "watch/diverging": float(diverging),
        }
        metrics.update({f"gold/{name}": value for name, value in values.items()})
        write_scalars(trainer, metrics, iteration)
        if new_best and self.keep_best_gold and iteration > 0:
            trainer.save_checkpoint(self._best_path(trainer))
        if self.diverging_in_a_row >= self.patience and self.fired_at is None:
            self.fired_at = iteration
            if trainer.is_global_zero:
                log.warning(
                    "guardrl: over-optimization at iteration %d: the proxy rose by %.4g since iteration %d "
                    "while gold/average fell by %.4g (tolerance %.4g)%s",
                    iteration,
                    gain,
                    self.best["iteration"],
                    drop,
                    self.tolerance,
                    "; stopping (watch.stop_on_divergence)" if self.stop_on_divergence else "",
                )
            if self.stop_on_divergence:
                trainer.should_stop = True

    def _best_path(self, trainer: L.Trainer) -> str:
        from guardrl.checkpointing import find_iteration_checkpoint

        checkpoint = find_iteration_checkpoint(trainer)
        directory = (
            checkpoint.dirpath
            if checkpoint is not None and checkpoint.dirpath
            else os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        )
        return os.path.join(directory, "best_gold.ckpt")

    # ----- resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "best": self.best,
            "diverging_in_a_row": self.diverging_in_a_row,
            "fired_at": self.fired_at,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = state_dict["reference"]
        self.best = state_dict["best"]
        self.diverging_in_a_row = state_dict["diverging_in_a_row"]
        self.fired_at = state_dict["fired_at"]


def _metric_name(metric: Metric) -> str:
    name = type(metric).__name__
    return "".join(("_" + c.lower()) if c.isupper() and i else c.lower() for i, c in enumerate(name))


def _relative(value: float, reference: float, higher_is_better: bool) -> float:
    eps = 1e-12
    if higher_is_better:
        return value / max(reference, eps)
    return max(reference, eps) / max(value, eps)
