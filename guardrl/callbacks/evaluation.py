"""Evaluation: held-out prompts scored during a run and by `guardrl validate` (guardrl/evaluation.py).

During `guardrl fit` it evaluates before the first iteration, every `every_n_iterations` iterations and after
the last one of a finished run; `guardrl validate --config <run config> --ckpt_path <checkpoint>` runs it once
on a saved checkpoint (the base model without --ckpt_path). Each evaluation writes, at x = GRPO iteration:

    <name>/proxy                 the run's own rewards on the evaluation images
    <name>/<metric>              each metric (a Reward's mean, a Metric's compute())
    <name>/proxy/<group>, <name>/<metric>/<group>   per prompt group (group_field set)
    <name>/grid                  the first `grid_prompts` prompts' images, the same seeds every time

and `guardrl validate` also writes `<log dir>/evaluation.json` and prints the table.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional, Union

import lightning as L
from lightning.pytorch.callbacks import Callback
from torchmetrics import Metric

from guardrl.evaluation import (
    EvaluationResult,
    SamplerSettings,
    check_metrics,
    evaluate,
    load_eval_prompts,
)
from guardrl.logs import write_scalars
from guardrl.options import require_int
from guardrl.rewards import Reward

log = logging.getLogger(__name__)


class Evaluation(Callback):
    # the options' prefix in messages; OverOptimizationWatch says "watch"
    option = "evaluation"

    def __init__(
        self,
        prompts: str,
        metrics: Optional[list[Union[Reward, Metric]]] = None,
        every_n_iterations: int = 10,
        samples_per_prompt: int = 2,
        max_prompts: Optional[int] = None,
        prompt_field: str = "prompt",
        group_field: Optional[str] = None,
        image_field: Optional[str] = None,
        sampler: str = "ode",
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        weights: str = "auto",
        seed: int = 1234,
        batch_size: int = 16,
        grid_prompts: int = 4,
        evaluate_at_end: bool = True,
        name: str = "eval",
    ) -> None:
        """
        Args:
            prompts: held-out prompts (.txt, or .jsonl with the prompt under `prompt_field`), never trained
                on; read whole.
            metrics: what to score besides the run's own rewards: guardrl Rewards (PickScore, HPSv2.1,
                ImageReward, GenEval, OCR, a remote or VLM-judge reward...) and torchmetrics Metrics with
                update(images, prompts).
            every_n_iterations: evaluation cadence in GRPO iterations (also before the first one).
            samples_per_prompt: images per prompt, image j of prompt i from its own fixed seed.
            max_prompts: only the first this many prompts (null: all).
            prompt_field: the .jsonl field holding the prompt.
            group_field: a .jsonl field grouping the prompts (GenEval's `tag`): every metric is also logged
                per group.
            image_field: editing models: the .jsonl field naming each prompt's conditioning image.
            sampler: "ode" (deterministic, as shipped) or "sde" (the training SDE's noise level).
            num_inference_steps: sampler steps (null: the run's sampling.num_inference_steps).
            guidance_scale: CFG scale (null: the run's sampling.guidance_scale).
            height: image height in pixels (null: the backbone's).
            width: image width in pixels (null: the backbone's).
            weights: "auto" (the EMA when the run keeps one, model.grpo.ema_decay; else the policy), "ema" or
                "policy".
            seed: the evaluation noise's seed: the same images at every evaluation, on any number of ranks.
            batch_size: images sampled at once per rank (memory bound).
            grid_prompts: prompts in the logged image grid (0: no grid).
            evaluate_at_end: evaluate after the last iteration of a run that reaches model.max_iterations.
            name: the log tags' prefix (two evaluations in one run need two names).
        """
        owner = self.option
        self.settings = SamplerSettings(
            samples_per_prompt=samples_per_prompt,
            sampler=sampler,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            weights=weights,
            seed=seed,
            batch_size=batch_size,
        )
        self.settings.check(owner)
        require_int(f"{owner}.every_n_iterations", every_n_iterations, minimum=1)
        require_int(f"{owner}.grid_prompts", grid_prompts, minimum=0)
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"{owner}.name must be a non-empty tag prefix without '/', got {name!r}")
        self.metrics = list(metrics or [])
        self.metric_names = check_metrics(
            self.metrics, f"{owner}.{self.metrics_option}", self.needs_direction
        )
        self.prompts_path = prompts
        self.prompts = load_eval_prompts(
            prompts, owner, prompt_field, group_field, image_field, max_prompts, self.prompts_option
        )
        self.every_n_iterations = every_n_iterations
        self.grid_prompts = grid_prompts
        self.evaluate_at_end = evaluate_at_end
        self.name = name
        self.last_evaluated: Optional[int] = None  # resumable: no second evaluation of one iteration
        self.last_result: Optional[EvaluationResult] = None
        # (iteration, logged scalars) of the run's first and latest evaluation: the end-of-run summary's
        # held-out line (the first is resumable)
        self.first_scalars: Optional[tuple[int, dict[str, float]]] = None
        self.last_scalars: Optional[tuple[int, dict[str, float]]] = None

    metrics_option = "metrics"
    prompts_option = "prompts"
    needs_direction = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name, prompts=self.prompts_path)

    # ----- when
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.last_evaluated is None:
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.num_iterations % self.every_n_iterations == 0:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        budget = pl_module.max_iterations
        finished = budget is not None and pl_module.num_iterations >= budget
        if self.evaluate_at_end and finished and self.last_evaluated != pl_module.num_iterations:
            self.run(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # `guardrl validate`: one evaluation of the loaded checkpoint (GRPOModule.validation_step is empty)
        result = self.run(trainer, pl_module)
        # Trainer.log_dir broadcasts from rank zero: every rank asks, or rank zero waits forever
        directory = trainer.log_dir or trainer.default_root_dir
        if trainer.is_global_zero:
            self._report(directory, result)

    # ----- what
    def run(self, trainer: L.Trainer, pl_module) -> EvaluationResult:
        result = evaluate(
            pl_module, self.prompts, self.metrics, self.settings, self.option, self.grid_prompts
        )
        self.last_evaluated = result.iteration
        self.last_result = result
        scalars = self.scalars(result)
        if trainer.state.fn == "fit":
            self.last_scalars = (result.iteration, scalars)
            if self.first_scalars is None:
                self.first_scalars = self.last_scalars
        write_scalars(trainer, scalars, result.iteration)
        if trainer.is_global_zero and result.grid is not None:
            self._log_grid(trainer, result)
        self.after_evaluation(trainer, pl_module, result)
        return result

    def scalars(self, result: EvaluationResult) -> dict[str, float]:
        return result.scalars(self.name)

    def after_evaluation(self, trainer: L.Trainer, pl_module, result: EvaluationResult) -> None:
        """A subclass's reaction to an evaluation (OverOptimizationWatch: its alarm)."""

    def _log_grid(self, trainer: L.Trainer, result: EvaluationResult) -> None:
        from guardrl.callbacks.image_grid import captions, make_grid
        from guardrl.logger_media import log_image, log_text

        assert result.grid is not None and result.grid_proxy is not None
        per_prompt = self.settings.samples_per_prompt
        rows = result.grid.shape[0] // per_prompt
        grid = make_grid(result.grid, result.grid_proxy, per_prompt, rows)
        text = captions(result.grid_prompts, result.grid_proxy, per_prompt, rows)
        log_image(trainer, f"{self.name}/grid", grid, result.iteration, caption=text)
        log_text(trainer, f"{self.name}/grid_captions", text, result.iteration)

    def _report(self, directory: str, result: EvaluationResult) -> None:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "evaluation.json" if self.name == "eval" else f"{self.name}.json")
        settings = {k: v for k, v in vars(self.settings).items()}
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"prompts": self.prompts_path, "settings": settings, **result.as_dict()}, f, indent=2)
        os.replace(path + ".tmp", path)
        lines = [f"guardrl validate: {result.num_images} images of {self.prompts_path} at iteration "
                 f"{result.iteration}"]
        for tag, value in self.scalars(result).items():
            lines.append(f"  {tag:<40} {value:.6g}")
        lines.append(f"  written to {path}")
        print("\n".join(lines), flush=True)

    # ----- resume
    def state_dict(self) -> dict[str, Any]:
        return {"last_evaluated": self.last_evaluated, "first_scalars": self.first_scalars}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_evaluated = state_dict.get("last_evaluated")
        first = state_dict.get("first_scalars")
        self.first_scalars = None if first is None else (int(first[0]), dict(first[1]))
