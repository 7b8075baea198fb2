"""GRPOModule: the one orchestrator. One `training_step` = one GRPO iteration (SPEC.md section 2):

    1. encode the prompts (frozen text encoders, cached)
    2. roll out with the old policy (no grad): SDE on the SDE steps, Euler elsewhere
    3. decode and score; group advantages (rewards all-gathered, groups never span ranks)
    4. update: for each inner epoch, minibatch and trained step, recompute mu_theta, take the configured
       ratio variant, the clipped loss (+ KL), backward; optimizer step every `gradient_accumulation_steps`
    5. sync the old-policy snapshot on its cadence; EMA after each optimizer step
    6. return detached per-step statistics for RatioStatsCallback; log rewards, loss, KL

Only the iteration lives here. Everything backbone-specific is behind `FlowBackbone` and `FlowPolicy`
(adapters, snapshots, compile); the math is in sampling/ and algorithm/; sampling and scoring images in
rollouts.py, which noise, weights and SDE window a run samples with in run_sampling.py; the advantages
(group or GDPO, over ranks, null control) in run_advantages.py; the update phase
(step 4) in update.py; non-finite handling in faults.py; the checkpoint format
in checkpointing.py (`TrainableStateCheckpointing`); the iteration's scalars in logs.py. Manual
optimization, because one iteration takes several optimizer steps.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import ModelParallelStrategy

from guardrl.algorithm import RATIO_VARIANTS, effective_clip_range
from guardrl.checkpointing import TrainableStateCheckpointing
from guardrl.checks import (
    check_batch_sizes,
    check_group_size,
    check_optimizer_for_strategy,
    check_reward_aggregation,
    check_rewards,
)
from guardrl.faults import SkippedUpdates, nonfinite_on_any_rank
from guardrl.logs import flush_loggers, log_iteration, write_scalars
from guardrl.options import FaultOptions, GRPOOptions, SamplingOptions, check_compatible
from guardrl.perf import PerformanceOptions, PhaseMeter, compute_dtype, peak_flops_of
from guardrl.policy import FlowBackbone, FlowPolicy, LoraSpec
from guardrl.rewards import Reward
from guardrl.rollouts import rollout_and_score, score_images
from guardrl.run_advantages import iteration_advantages, null_control
from guardrl.run_sampling import old_policy_rollout, sample_images
from guardrl.sampling import noise_scales
from guardrl.sharding import shard_policy
from guardrl.types import PromptBatch, Trajectory
from guardrl.update import update_policy

log = logging.getLogger(__name__)


class GRPOModule(TrainableStateCheckpointing, L.LightningModule):
    def __init__(
        self,
        backbone: FlowBackbone,
        rewards: list[Reward],
        sampling: SamplingOptions = SamplingOptions(),
        grpo: GRPOOptions = GRPOOptions(),
        lora: Optional[LoraSpec] = LoraSpec(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        group_size: int = 4,
        max_iterations: Optional[int] = None,
        seed: int = 0,
        faults: FaultOptions = FaultOptions(),
        performance: PerformanceOptions = PerformanceOptions(),
    ) -> None:
        """
        Args:
            backbone: the flow-matching model (SD3Backbone, FluxBackbone, TinySD3Backbone, ...).
            rewards: proxy rewards, summed with their weights.
            sampling: how rollouts are sampled.
            grpo: the GRPO update.
            lora: LoRA settings; null for full fine-tuning.
            optimizer: built over the trainable parameters (default AdamW).
            lr_scheduler: optional, stepped after every optimizer step.
            group_size: samples per prompt (linked from data.group_size).
            max_iterations: stop after this many GRPO iterations (trainer.max_steps counts optimizer steps).
            seed: seed of the rollout noise and of the timestep/minibatch choices, mixed with the iteration
                number (and the rank for the noise), so a resumed run draws what the original would have.
            faults: what to do about non-finite values and failing rewards (docs/reliability.md).
            performance: gradient checkpointing, torch.compile, per-phase timing (docs/performance.md).
        """
        super().__init__()
        check_rewards(rewards)
        check_reward_aggregation(grpo.reward_aggregation, rewards)
        check_group_size(group_size)
        if max_iterations is not None and max_iterations < 1:
            raise ValueError(f"model.max_iterations must be >= 1 or null, got {max_iterations}")
        check_compatible(sampling, grpo)
        self.save_hyperparameters(ignore=["backbone", "rewards", "optimizer", "lr_scheduler"])
        # Plain dicts, not dataclass objects, so that checkpoints load with torch.load(weights_only=True).
        for name, value in list(self.hparams.items()):
            if dataclasses.is_dataclass(value):
                self.hparams[name] = dataclasses.asdict(value)
        self.faults = faults
        self.performance = performance
        self._meter: Optional[PhaseMeter] = None  # performance.timing, from on_train_start
        self._compiled = False
        self._sharded = False
        self.sampling = sampling
        self.grpo = grpo
        self.group_size = group_size
        self.max_iterations = max_iterations
        self.seed = seed
        self.policy = FlowPolicy(
            backbone, lora, ema_decay=grpo.ema_decay, keep_reference=grpo.needs_reference
        )
        self.rewards = torch.nn.ModuleList(rewards)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.ratio_fn = RATIO_VARIANTS[grpo.ratio_variant]
        self.automatic_optimization = False
        # Checkpoints keep only trainable state (adapters / snapshots), so loading is not strict.
        self.strict_loading = False
        # Counters that shape the rest of the run; all are in the checkpoint (on_save_checkpoint).
        self.num_iterations = 0
        self.stream_position = 0
        self.skipped_updates = SkippedUpdates(faults.max_consecutive_nonfinite)
        self._rng_to_restore: Optional[list] = None

    @property
    def backbone(self) -> FlowBackbone:
        return self.policy.backbone

    @property
    def num_skipped_updates(self) -> int:
        return self.skipped_updates.total

    # ------------------------------------------------------------------ setup
    def configure_model(self) -> None:
        self.policy.build()
        if self.performance.gradient_checkpointing:
            self.policy.enable_gradient_checkpointing()
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, ModelParallelStrategy) and not self._sharded:
            # FSDP2 (guardrl/sharding.py): after the adapters exist, so that they shard with their blocks.
            shard_policy(self.policy, self.device_mesh)
            self._sharded = True
        self.sigmas = self.backbone.sigmas(self.sampling.num_inference_steps)
        start, end = self.sampling.sde_steps_range()
        self.noise_scales = noise_scales(
            self.sigmas, self.sampling.noise_level, self.sampling.sde_type, range(start, end)
        )
        self.num_latent_elements = self.backbone.latent_numel()
        self.clip_range = effective_clip_range(
            self.grpo.clip_range,
            self.grpo.clip_range_unit,
            self.sampling.log_prob_reduction,
            self.num_latent_elements,
        )

    def _phase(self, name: str):
        return self._meter.phase(name) if self._meter is not None else nullcontext()

    def setup(self, stage: str) -> None:
        # Before any weights load: batch sizes the update cannot split are refused here, not mid-iteration.
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "prompts_per_batch"):
            check_batch_sizes(
                self.grpo,
                datamodule.prompts_per_batch,
                datamodule.group_size,
                self.performance.rollout_chunks,
            )

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.policy.trainable_parameters())
        check_optimizer_for_strategy(optimizer, self.trainer.strategy)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer)}}

    # ------------------------------------------------------------------ one GRPO iteration
    def training_step(self, batch: PromptBatch, batch_idx: int) -> dict[str, Any]:
        if batch.group_size != self.group_size:
            raise ValueError(
                f"data.group_size={batch.group_size} differs from model.group_size={self.group_size}"
            )
        check_batch_sizes(
            self.grpo, len(batch) // self.group_size, self.group_size, self.performance.rollout_chunks
        )
        use_cfg = self.backbone.uses_true_cfg and self.sampling.guidance_scale > 1.0
        with self._phase("encode"):
            cond = self.backbone.encode_prompts(batch.prompts, with_negative=use_cfg, images=batch.images)
        trajectory, images, rewards, per_reward = rollout_and_score(
            batch.prompts,
            cond,
            self.performance.rollout_chunks,
            self.performance.overlap_rewards,
            self._rollout,
            self.backbone.decode,
            # whole groups of group_size, so a groupwise reward never merges two groups with one prompt
            lambda images, prompts: self.score(images, prompts, self.group_size),
            self._phase,
        )
        # A group with a non-finite reward is dropped from the update (zero advantages) and the others train;
        # only when every group of every rank is dropped is the update skipped (counted as a fault).
        dropped_N = ~torch.isfinite(rewards.reshape(-1, self.group_size)).all(dim=1)
        every_group = self.trainer.strategy.reduce_boolean_decision(bool(dropped_N.all()), all=True)
        problem = nonfinite_on_any_rank(
            self.trainer.strategy,
            {
                "reward": rewards if every_group else torch.zeros(()),
                "rollout log-prob": trajectory.log_prob_old_BT,
            },
        )
        usable = rewards.masked_fill(dropped_N.repeat_interleave(self.group_size), 0.0)
        advantages = (
            null_control(self, iteration_advantages(self, usable, per_reward, dropped_N))
            if problem is None
            else torch.zeros_like(rewards)
        )
        step_stats, losses = [], {"loss": [], "kl": [], "grad_norm": []}
        if problem is None:
            with self._phase("update"):
                step_stats, losses, problem = update_policy(self, trajectory, cond, advantages)

        iteration = self.num_iterations
        self.num_iterations += 1
        self.stream_position = batch.stream_position
        self.skipped_updates.record(problem, iteration, announce=self.trainer.is_global_zero)
        if self.num_iterations % self.grpo.old_policy_sync_every == 0:
            self.policy.sync_old()
        if self.max_iterations is not None and self.num_iterations >= self.max_iterations:
            self.trainer.should_stop = True

        metrics = log_iteration(
            self,
            iteration,
            rewards,
            per_reward,
            advantages,
            losses,
            skipped=problem is not None,
            dropped_groups=int(dropped_N.sum()),
        )
        if self.sampling.sde_window_strategy != "fixed" and trajectory.step_indices:
            # where this iteration's moving window was (its first stochastic step)
            write_scalars(self.trainer, {"sampling/sde_window_start": trajectory.step_indices[0]}, iteration)
        if self._meter is not None:
            write_scalars(self.trainer, self._meter.end_iteration(len(batch)), iteration)
        if self.performance.compile and not self._compiled:
            # After the first iteration, which ran eagerly under the FLOP counter (guardrl/perf.py).
            self.policy.compile_transformers(self.performance.compile_backend, self.performance.compile_mode)
            self._compiled = True
        self.skipped_updates.stop_if_too_many(problem, iteration)
        return {
            "step_stats": step_stats,
            "clip_range": self.clip_range,
            "rewards": rewards.detach(),
            "advantages": advantages.detach(),
            "images": images.detach(),
            "prompts": batch.prompts,
            # this iteration's headline numbers over all ranks (RunSummaryCallback's end-of-run summary)
            "reward_mean": float(metrics["reward/mean"]),
            "reward_std": float(metrics["reward/std"]),
            "skipped": problem is not None,
        }

    def iteration_seed(self, *key: int) -> int:
        # SeedSequence mixes (seed, iteration, ...) into well-separated streams.
        return int(np.random.SeedSequence([self.seed, *key]).generate_state(1)[0])

    def _rollout(self, cond, batch_size: int, chunk: int) -> Trajectory:
        return old_policy_rollout(self, cond, batch_size, chunk)

    def sample(
        self,
        prompts: list[str],
        noise: torch.Tensor,
        sampler: str = "sde",
        generator: Optional[torch.Generator] = None,
        weights: str = "policy",
        images: Optional[list[torch.Tensor]] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] of `prompts` from `noise` (B, ...) with the run's sampler (sigmas,
        guidance; "sde": the training SDE, its noise from `generator`; "ode": Euler on every step) and one
        weight set of the policy; an evaluation may give its own step count and guidance. The one way
        callbacks and benchmarks sample from a run (run_sampling.py)."""
        return sample_images(
            self, prompts, noise, sampler, generator, weights, images, num_inference_steps, guidance_scale
        )

    def score(
        self, images: torch.Tensor, prompts: list[str], group_size: Optional[int] = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total, per reward) for images (B, 3, H, W) in [0, 1]: every reward with the run's retries and
        timeout, the total their weighted sum. The one way the run, its callbacks and the benchmarks score
        images. `group_size`: the images are consecutive groups of that many per prompt (a groupwise reward
        scores each; training passes model.group_size)."""
        return score_images(self.rewards, images, prompts, self.faults, group_size)

    def validation_step(self, batch, batch_idx: int) -> None:
        """`guardrl validate` runs the run's Evaluation callbacks (guardrl/callbacks/evaluation.py) on the
        loaded checkpoint; the step itself has nothing to do (its one-item loader only starts the loop)."""

    # ------------------------------------------------------------------ around the iterations
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # After every callback has written this iteration's scalars: flush, so a killed run keeps its events.
        flush_loggers(self.trainer)

    def on_fit_start(self) -> None:
        # Lightning has moved every child module to the device; frozen modules the backbone offloads
        # (model.backbone.offload_text_encoders / offload_vae) go back to CPU memory until they are used.
        self.backbone.offload()

    def on_train_start(self) -> None:
        self.stop_if_finished()
        perf = self.performance
        if perf.timing:
            dtype = compute_dtype(self.trainer.precision, self.backbone.model_dtype)
            self._meter = PhaseMeter(
                self.device, peak_flops_of(self.device, dtype, perf.peak_flops), perf.throughput_window
            )
        self.restore_rng_states()  # last: after everything the restore itself may have drawn
