"""What every toy benchmark run records: `BenchmarkRecorder`, the Lightning callback that writes a run's
evaluations.csv (proxy and gold metrics on fixed evaluation sets) and ratios.csv (per-step log-ratio and clip
statistics), and those files' columns."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from guardrl.algorithm import clip_shares
from guardrl.toy.benchmark_csv import _append_csv, _read_csv, _truncate_csv
from guardrl.toy.gold import CHECKS, GOLD_DIRECTIONS, gold_metrics_with_errors
from guardrl.toy.render import render_batch

GOLD_NAMES = tuple(GOLD_DIRECTIONS)
CHECK_NAMES = tuple(f"check_{check}" for check in CHECKS)
# Every value with its standard error (`<name>_se`, guardrl.toy.gold.gold_metrics_with_errors). `proxy` is the
# run's reward; `learned_proxy` the learned proxy's log-probability form, recorded whatever the reward.
MEASURED = ("proxy", "learned_proxy", *GOLD_NAMES, *CHECK_NAMES)
EVAL_COLUMNS = ("iteration", "split", "sampler", *(c for n in MEASURED for c in (n, f"{n}_se")), "images")
RATIO_COLUMNS = (
    "iteration",
    "step",
    "log_ratio_mean",
    "log_ratio_std",
    "raw_log_ratio_mean",
    "raw_log_ratio_std",
    "clip_frac_pos_upper",
    "clip_frac_neg_lower",
    "clip_frac",
    "samples",
)


class BenchmarkRecorder(Callback):
    """Writes evaluations.csv (proxy and gold on fixed sets) and ratios.csv (per-step ratio statistics) into
    `directory`; resumable (rows past the resumed iteration are dropped, a missing evaluation is redone)."""

    def __init__(
        self,
        directory: str,
        eval_every: int,
        per_kind: int,
        splits: Sequence[str] = ("heldout", "train"),
        samplers: Sequence[str] = ("ode", "sde"),
        eval_seed: int = 0,
        keep_log_ratios: bool = False,
    ) -> None:
        if eval_every < 1 or per_kind < 1:
            raise ValueError(f"eval_every and per_kind must be >= 1, got {eval_every} and {per_kind}")
        self.directory = directory
        self.eval_every = eval_every
        self.per_kind = per_kind
        self.splits = tuple(splits)
        self.samplers = tuple(samplers)
        self.eval_seed = eval_seed
        self.keep_log_ratios = keep_log_ratios
        self.log_ratios: list[torch.Tensor] = []  # per sample, every step and update (calibration pilots)
        self._real: dict[str, torch.Tensor] = {}
        self._learned = None
        os.makedirs(directory, exist_ok=True)
        self.eval_path = os.path.join(directory, "evaluations.csv")
        self.ratio_path = os.path.join(directory, "ratios.csv")

    def on_train_start(self, trainer, pl_module) -> None:
        iteration = pl_module.num_iterations
        _truncate_csv(self.eval_path, EVAL_COLUMNS, lambda row: int(row["iteration"]) <= iteration)
        _truncate_csv(self.ratio_path, RATIO_COLUMNS, lambda row: int(row["iteration"]) < iteration)
        done = {int(row["iteration"]) for row in _read_csv(self.eval_path)}
        if iteration % self.eval_every == 0 and iteration not in done:
            self._evaluate(pl_module, iteration)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        iteration = pl_module.num_iterations - 1  # the iteration that just ran
        self._record_ratios(iteration, outputs)
        if pl_module.num_iterations % self.eval_every == 0 or trainer.should_stop:
            self._evaluate(pl_module, pl_module.num_iterations)

    def _record_ratios(self, iteration: int, outputs: dict[str, Any]) -> None:
        rows = []
        for stats in outputs["step_stats"]:
            log_ratio = stats.cat("log_ratio").double()
            raw = stats.cat("raw_log_ratio").double()
            if log_ratio.numel() == 0:
                continue
            if self.keep_log_ratios:
                self.log_ratios.append(log_ratio.clone())
            # the loss's own clip flags, counted as RatioStatsCallback counts them
            shares = clip_shares(
                stats.cat("clipped_upper"), stats.cat("clipped_lower"), stats.cat("advantages")
            )
            rows.append(
                {
                    "iteration": iteration,
                    "step": stats.step_index,
                    "log_ratio_mean": float(log_ratio.mean()),
                    "log_ratio_std": float(log_ratio.std(unbiased=False)),
                    "raw_log_ratio_mean": float(raw.mean()),
                    "raw_log_ratio_std": float(raw.std(unbiased=False)),
                    # as clip/frac_pos_upper_t{k}: the share of positive-advantage samples above 1 + c
                    "clip_frac_pos_upper": float(shares["pos_upper"]),
                    "clip_frac_neg_lower": float(shares["neg_lower"]),
                    "clip_frac": float(shares["outside_band"]),
                    "samples": log_ratio.numel(),
                }
            )
        _append_csv(self.ratio_path, RATIO_COLUMNS, rows)

    def _learned_proxy(self):
        if self._learned is None:
            from guardrl.toy.proxy_reward import ToyProxyReward

            self._learned = ToyProxyReward()
        return self._learned

    def _real_images(self, split: str, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        if split not in self._real:  # reference renders for the realism distance, other seeds than the noise
            self._real[split] = render_batch(prompts, [s + 1_000_000 for s in seeds])
        return self._real[split]

    @torch.no_grad()
    def _evaluate(self, module, iteration: int) -> None:
        from guardrl.toy.evaluate import evaluation_set, generate

        rows = []
        for split in self.splits:
            items = evaluation_set(split, self.per_kind, self.eval_seed)
            prompts, seeds = [p for p, _ in items], [s for _, s in items]
            for sampler in self.samplers:
                with module.policy.use_weights("policy") as transformer:
                    images = generate(
                        module.backbone,
                        prompts,
                        seeds,
                        module.sampling.num_inference_steps,
                        module.sampling.guidance_scale,
                        sde=sampler == "sde",
                        sde_seed=self.eval_seed,
                        transformer=transformer,
                        scales=module.noise_scales.cpu(),
                        sde_type=module.sampling.sde_type,
                    )
                proxy, _ = module.score(images.to(module.device), prompts)
                learned = self._learned_proxy()(images, prompts)
                row = {"iteration": iteration, "split": split, "sampler": sampler, "images": len(prompts)}
                for name, values in (("proxy", proxy), ("learned_proxy", learned)):
                    values = values.double()
                    row[name] = float(values.mean())
                    row[f"{name}_se"] = float(values.std() / len(values) ** 0.5)
                row.update(
                    gold_metrics_with_errors(
                        images, prompts, self._real_images(split, prompts, seeds), seed=iteration
                    )
                )
                rows.append(row)
        _append_csv(self.eval_path, EVAL_COLUMNS, rows)
