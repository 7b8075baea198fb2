"""OverOptimizationWatch: proxy and gold side by side on held-out prompts, and an alarm when they part.

An `Evaluation` (guardrl/callbacks/evaluation.py: its own prompts, steps, guidance, image size, fixed seeds,
EMA weights when the run keeps them; ODE by default) whose metrics are gold: guardrl Rewards (PickScore,
HPSv2.1, ImageReward, GenEval, ...) or torchmetrics Metrics with `update(images, prompts)` and
`higher_is_better` set (guardrl/gold.py). Every `every_n_iterations` GRPO iterations it logs, at
x = iteration:

    watch/proxy              mean proxy reward (the run's own rewards) on the evaluation images
    gold/<name>              each gold metric (and gold/<name>/<group>, watch/proxy/<group> with group_field)
    gold/average             Average(gold): each metric relative to its first evaluation (1.00 at the start;
                             inverted for lower-is-better metrics), averaged, as GRPO-Guard's main table does
    watch/gold_drop          best gold/average so far minus the current one
    watch/proxy_gain         current proxy minus the proxy at the best-gold evaluation
    watch/diverging          1 when the proxy has risen since the best gold while gold fell by > tolerance
    watch/grid               the first grid_prompts prompts' images (the same seeds every time)

When diverging `patience` evaluations in a row it warns; with `stop_on_divergence` it stops the run. With
`keep_best_gold` the state at each new best gold/average is saved as `best_gold.ckpt` (atomically, with
everything needed to resume or export from it), so the kept checkpoint is the best-gold one.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Union

import lightning as L
from torchmetrics import Metric

from guardrl.callbacks.evaluation import Evaluation
from guardrl.evaluation import EvaluationResult, higher_is_better
from guardrl.rewards import Reward

log = logging.getLogger(__name__)


class OverOptimizationWatch(Evaluation):
    option = "watch"
    metrics_option = "gold"
    prompts_option = "eval_prompts"
    needs_direction = True  # gold/average compares each metric with its first value

    def __init__(
        self,
        eval_prompts: str,
        gold: list[Union[Reward, Metric]],
        every_n_iterations: int = 10,
        samples_per_prompt: int = 2,
        max_prompts: Optional[int] = None,
        sampler: str = "ode",
        tolerance: float = 0.02,
        patience: int = 1,
        stop_on_divergence: bool = False,
        keep_best_gold: bool = True,
        seed: int = 1234,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        weights: str = "auto",
        prompt_field: str = "prompt",
        group_field: Optional[str] = None,
        image_field: Optional[str] = None,
        batch_size: int = 16,
        grid_prompts: int = 4,
    ) -> None:
        """
        Args:
            eval_prompts: held-out prompts (.txt or .jsonl), never trained on; read whole (an evaluation set).
            gold: gold metrics: guardrl Rewards (e.g. guardrl.rewards.PickScore) or torchmetrics Metrics with
                higher_is_better set (e.g. guardrl.gold.ImageDetail, guardrl.toy.gold.VerifierPassRate).
            every_n_iterations: evaluation cadence in GRPO iterations (also evaluates before the first one).
            samples_per_prompt: images per prompt, each from its own fixed seed.
            max_prompts: use only the first this many prompts.
            sampler: "ode" (eta = 0, the shipped sampler) or "sde" (the rollout sampler, same noise level).
            tolerance: how far gold/average may fall below its best (while the proxy rose) before it counts.
            patience: diverging evaluations in a row before the warning (and the stop).
            stop_on_divergence: stop the run when the watch fires.
            keep_best_gold: save `best_gold.ckpt` next to the other checkpoints at each new best gold/average.
            seed: seed of the evaluation noise (the same images are drawn at every evaluation).
            num_inference_steps: sampler steps (null: the run's).
            guidance_scale: CFG scale (null: the run's).
            height: image height in pixels (null: the backbone's).
            width: image width in pixels (null: the backbone's).
            weights: "auto" (the EMA when the run keeps one), "ema" or "policy".
            prompt_field: the .jsonl field holding the prompt.
            group_field: a .jsonl field grouping the prompts; gold metrics are also logged per group.
            image_field: editing models: the .jsonl field naming each prompt's conditioning image.
            batch_size: images sampled at once per rank.
            grid_prompts: prompts in the logged image grid (0: none).
        """
        if not gold:
            raise ValueError(
                "watch.gold must list at least one gold metric (e.g. guardrl.gold.ImageDetail or "
                "guardrl.rewards.PickScore)"
            )
        if not tolerance >= 0:
            raise ValueError(f"watch.tolerance must be >= 0, got {tolerance!r}")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"watch.patience must be an integer >= 1, got {patience!r}")
        super().__init__(
            eval_prompts,
            gold,
            every_n_iterations=every_n_iterations,
            samples_per_prompt=samples_per_prompt,
            max_prompts=max_prompts,
            prompt_field=prompt_field,
            group_field=group_field,
            image_field=image_field,
            sampler=sampler,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            weights=weights,
            seed=seed,
            batch_size=batch_size,
            grid_prompts=grid_prompts,
            evaluate_at_end=False,
            name="watch",
        )
        self.gold = self.metrics
        self.tolerance = tolerance
        self.patience = patience
        self.stop_on_divergence = stop_on_divergence
        self.keep_best_gold = keep_best_gold
        # Resumable state (state_dict below).
        self.reference: Optional[dict[str, float]] = None
        self.best: Optional[dict[str, float]] = None  # {"gold": ..., "proxy": ..., "iteration": ...}
        self.diverging_in_a_row = 0
        self.fired_at: Optional[int] = None
        self._latest: dict[str, float] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.reference is None:
            self.run(trainer, pl_module)

    # ----- what
    def scalars(self, result: EvaluationResult) -> dict[str, float]:
        values = result.metrics
        if self.reference is None:
            self.reference = dict(values)
        average = sum(
            _relative(values[name], self.reference[name], higher_is_better(metric))
            for name, metric in zip(self.metric_names, self.gold)
        ) / len(values)
        proxy = result.proxy
        self._new_best = self.best is None or average > self.best["gold"]
        if self._new_best:
            self.best = {"gold": average, "proxy": proxy, "iteration": result.iteration}
        assert self.best is not None
        drop = self.best["gold"] - average
        gain = proxy - self.best["proxy"]
        diverging = drop > self.tolerance and gain > 0
        self.diverging_in_a_row = self.diverging_in_a_row + 1 if diverging else 0
        self._latest = {"drop": drop, "gain": gain}
        # watch/proxy, gold/<name> and, with groups, watch/proxy/<group>, gold/<name>/<group>
        metrics = result.scalars("gold", proxy_tag="watch/proxy")
        metrics.update(
            {
                "gold/average": average,
                "watch/gold_drop": drop,
                "watch/proxy_gain": gain,
                "watch/diverging": float(diverging),
            }
        )
        return metrics

    def after_evaluation(self, trainer: L.Trainer, pl_module, result: EvaluationResult) -> None:
        iteration = result.iteration
        if self._new_best and self.keep_best_gold and iteration > 0 and trainer.state.fn == "fit":
            trainer.save_checkpoint(self._best_path(trainer))
        if self.diverging_in_a_row >= self.patience and self.fired_at is None:
            assert self.best is not None
            self.fired_at = iteration
            if trainer.is_global_zero:
                log.warning(
                    "guardrl: over-optimization at iteration %d: the proxy rose by %.4g since iteration %d "
                    "while gold/average fell by %.4g (tolerance %.4g)%s",
                    iteration,
                    self._latest["gain"],
                    self.best["iteration"],
                    self._latest["drop"],
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
            **super().state_dict(),
            "reference": self.reference,
            "best": self.best,
            "diverging_in_a_row": self.diverging_in_a_row,
            "fired_at": self.fired_at,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.reference = state_dict["reference"]
        self.best = state_dict["best"]
        self.diverging_in_a_row = state_dict["diverging_in_a_row"]
        self.fired_at = state_dict["fired_at"]


def _relative(value: float, reference: float, higher_is_better: bool) -> float:
    eps = 1e-12
    if higher_is_better:
        return value / max(reference, eps)
    return max(reference, eps) / max(value, eps)
