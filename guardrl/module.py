"""GRPOModule: the one orchestrator. One `training_step` = one GRPO iteration (SPEC.md section 2):

    1. encode the prompts (frozen text encoders, cached)
    2. roll out with the old policy (no grad): SDE on the SDE steps, Euler elsewhere
    3. decode and score; group advantages (rewards all-gathered, groups never span ranks)
    4. update: for each inner epoch, minibatch and trained step, recompute mu_theta, take the configured
       ratio variant, the clipped loss (+ KL), backward; optimizer step every `gradient_accumulation_steps`
    5. sync the old-policy snapshot on its cadence; EMA after each optimizer step
    6. return detached per-step statistics for RatioStatsCallback; log rewards, loss, KL

Everything backbone-specific is behind `FlowBackbone`; everything mathematical is in sampling/ and
algorithm/. Manual optimization, because one iteration takes several optimizer steps.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import ModelParallelStrategy

from guardrl.algorithm import (
    RATIO_VARIANTS,
    clipped_policy_loss,
    compute_ratio_terms,
    effective_clip_range,
    group_advantages,
    kl_to_reference,
    shuffle_within_groups,
)
from guardrl.checks import check_batch_sizes, check_group_size, check_optimizer_for_strategy, check_rewards
from guardrl.logs import flush_loggers, write_scalars
from guardrl.options import FaultOptions, GRPOOptions, SamplingOptions, check_compatible
from guardrl.perf import PerformanceOptions, PhaseMeter, compute_dtype, peak_flops_of
from guardrl.policy import FlowBackbone, FlowPolicy, LoraSpec
from guardrl.rewards import Reward, score_with_retries
from guardrl.rng import capture_rng_states_of_all_ranks, restore_rng_state_of_rank
from guardrl.sharding import full_tensor, shard_policy
from guardrl.sampling import noise_scales, sample_rollouts, step_mean_and_std
from guardrl.types import PromptBatch, StepStats, Trajectory

log = logging.getLogger(__name__)


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = [full_tensor(g.detach().float().norm()) for g in grads]  # FSDP2: whole norms of DTensor shards
    return torch.linalg.vector_norm(torch.stack(norms))


class GRPOModule(L.LightningModule):
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
        self._meter: Optional[PhaseMeter] = None
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
        self.num_skipped_updates = 0
        self.consecutive_skipped_updates = 0
        self._rng_to_restore: Optional[list] = None

    @property
    def backbone(self) -> FlowBackbone:
        return self.policy.backbone

    # ------------------------------------------------------------------ setup
    def configure_model(self) -> None:
        self.policy.build()
        if self.performance.gradient_checkpointing:
            self._enable_gradient_checkpointing()
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

    def _enable_gradient_checkpointing(self) -> None:
        transformer = self.backbone.transformer
        if not getattr(transformer, "_supports_gradient_checkpointing", False):
            raise ValueError(
                f"performance.gradient_checkpointing=true: {type(transformer).__name__} does not support gradient "
                "checkpointing (diffusers' _supports_gradient_checkpointing is false); set it to false"
            )
        # Only the trained transformer: the old-policy / EMA / reference copies of full fine-tuning run without
        # grad, where checkpointing does nothing.
        transformer.enable_gradient_checkpointing()

    def _compile_transformers(self) -> None:
        perf = self.performance
        modules = [self.backbone.transformer] + [
            getattr(self.policy, name)
            for name in ("old_transformer", "reference_transformer", "ema_transformer")
            if getattr(self.policy, name, None) is not None
        ]
        for module in modules:
            module.compile(backend=perf.compile_backend, mode=perf.compile_mode)
        self._compiled = True

    def _phase(self, name: str):
        return self._meter.phase(name) if self._meter is not None else contextlib.nullcontext()

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

    def _check_batch(self, batch: PromptBatch) -> None:
        size = len(batch)
        if batch.group_size != self.group_size:
            raise ValueError(
                f"data.group_size={batch.group_size} differs from model.group_size={self.group_size}"
            )
        if (size // self.group_size) % self.performance.rollout_chunks:
            raise ValueError(
                f"performance.rollout_chunks={self.performance.rollout_chunks} must divide the rank's "
                f"{size // self.group_size} prompt groups (data.prompts_per_batch)"
            )
        minibatch = self.grpo.minibatch_size or size
        if size % minibatch:
            raise ValueError(
                f"grpo.minibatch_size={minibatch} must divide the rank's batch of {size} samples "
                f"(data.prompts_per_batch * data.group_size)"
            )
        updates = self.grpo.num_inner_epochs * (size // minibatch)
        if updates % self.grpo.gradient_accumulation_steps:
            raise ValueError(
                f"grpo.gradient_accumulation_steps={self.grpo.gradient_accumulation_steps} must divide the "
                f"{updates} minibatch updates of an iteration (num_inner_epochs * batch / minibatch_size)"
            )

    # ------------------------------------------------------------------ one GRPO iteration
    def training_step(self, batch: PromptBatch, batch_idx: int) -> dict[str, Any]:
        self._check_batch(batch)
        use_cfg = self.backbone.uses_true_cfg and self.sampling.guidance_scale > 1.0
        with self._phase("encode"):
            cond = self.backbone.encode_prompts(batch.prompts, with_negative=use_cfg)
        trajectory, images, rewards, per_reward = self._rollout_and_score(cond, batch.prompts)
        # A group with a non-finite reward is dropped from the update (zero advantages) and the others train;
        # only when every group of every rank is dropped is the update skipped (counted as a fault).
        dropped_N = ~torch.isfinite(rewards.reshape(-1, self.group_size)).all(dim=1)
        every_group = self.trainer.strategy.reduce_boolean_decision(bool(dropped_N.all()), all=True)
        problem = self._nonfinite_on_any_rank(
            {
                "reward": rewards if every_group else torch.zeros(()),
                "rollout log-prob": trajectory.log_prob_old_BT,
            }
        )
        usable = rewards.masked_fill(dropped_N.repeat_interleave(self.group_size), 0.0)
        advantages = self._control(self._advantages(usable)) if problem is None else torch.zeros_like(rewards)
        step_stats, losses = [], {"loss": [], "kl": [], "grad_norm": []}
        if problem is None:
            with self._phase("update"):
                step_stats, losses, problem = self._update(trajectory, cond, advantages)

        iteration = self.num_iterations
        self.num_iterations += 1
        self.stream_position = batch.stream_position
        self._count_skip(problem, iteration)
        if self.num_iterations % self.grpo.old_policy_sync_every == 0:
            self.policy.sync_old()
        if self.max_iterations is not None and self.num_iterations >= self.max_iterations:
            self.trainer.should_stop = True

        metrics = self._log_iteration(
            iteration,
            rewards,
            per_reward,
            advantages,
            losses,
            skipped=problem is not None,
            dropped_groups=int(dropped_N.sum()),
        )
        if self._meter is not None:
            write_scalars(self.trainer, self._meter.end_iteration(len(batch)), iteration)
        if self.performance.compile and not self._compiled:
            # After the first iteration, which ran eagerly under the FLOP counter (guardrl/perf.py).
            self._compile_transformers()
        self._stop_if_too_many_skips(problem, iteration)
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

    def _seed(self, *key: int) -> int:
        # SeedSequence mixes (seed, iteration, ...) into well-separated streams.
        return int(np.random.SeedSequence([self.seed, *key]).generate_state(1)[0])

    def _generator(self, *key: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self._seed(*key))

    def _rollout_and_score(self, cond, prompts: list[str]):
        """Rollout, decode and reward of the rank's batch, in `performance.rollout_chunks` chunks of whole
        groups; with `overlap_rewards` each chunk is scored in a worker thread while the next one samples.
        Returns the joined trajectory, images, total rewards and per-reward scores, in batch order."""
        chunks = self.performance.rollout_chunks
        size = len(prompts) // chunks
        spans = [slice(c * size, (c + 1) * size) for c in range(chunks)]
        # One worker: chunks are scored in order, and a reward never runs twice at once.
        worker = (
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="guardrl-reward")
            if self.performance.overlap_rewards
            else None
        )
        trajectories, images, scored = [], [], []
        try:
            for c, span in enumerate(spans):
                with self._phase("rollout"):
                    # Chunk c's noise stream: (iteration, rank) unchunked, (iteration, rank, c) chunked.
                    key = (self.num_iterations, self.global_rank) + ((c,) if chunks > 1 else ())
                    trajectories.append(self._rollout(cond.select(span) if chunks > 1 else cond, size, key))
                with self._phase("decode"):
                    images.append(self.backbone.decode(trajectories[-1].final_latents))
                if worker is not None:
                    scored.append(worker.submit(self.score, images[-1], prompts[span]))
                else:
                    with self._phase("reward"):
                        scored.append(self.score(images[-1], prompts[span]))
            with self._phase("reward"):
                # Overlapped: the reward time still exposed after the last chunk; a reward's error re-raises here.
                scored = [s.result() if worker is not None else s for s in scored]
        finally:
            if worker is not None:
                worker.shutdown(wait=True, cancel_futures=True)
        rewards = torch.cat([total for total, _ in scored])
        per_reward = {name: torch.cat([parts[name] for _, parts in scored]) for name in scored[0][1]}
        return Trajectory.cat(trajectories), torch.cat(images), rewards, per_reward

    @torch.no_grad()
    def _rollout(self, cond, batch_size: int, key: tuple[int, ...]) -> Trajectory:
        # Noise differs per rank (the key includes the rank); the step choices of the update do not.
        generator = self._generator(*key)
        if self.sampling.same_noise_per_group:
            noise = self.backbone.initial_noise(batch_size // self.group_size, generator, self.device)
            noise = noise.repeat_interleave(self.group_size, dim=0)
        else:
            noise = self.backbone.initial_noise(batch_size, generator, self.device)
        # The old policy samples; when its snapshot equals the policy bitwise, running the policy adapter is
        # the same computation without the adapter switch.
        weights = "policy" if self.policy.old_equals_policy() else "old"
        with self.policy.use_weights(weights) as transformer:

            def velocity_fn(latents, t, step_index):
                return self.backbone.velocity(latents, t, cond, self.sampling.guidance_scale, transformer)

            return sample_rollouts(
                velocity_fn,
                noise,
                self.sigmas,
                self.noise_scales,
                self.sampling.log_prob_reduction,
                generator,
                storage_dtype=self.performance.trajectory_torch_dtype,
            )

    def score(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total, per reward) for images (B, 3, H, W) in [0, 1]: every reward with the run's retries and timeout,
        the total their weighted sum. The one way the run, its callbacks and the benchmarks score images."""
        faults = self.faults
        per_reward = {
            reward.name: score_with_retries(
                reward,
                images,
                prompts,
                faults.reward_max_attempts,
                faults.reward_retry_delay_s,
                faults.reward_timeout_s,
            )
            for reward in self.rewards
        }
        total = sum(reward.weight * per_reward[reward.name] for reward in self.rewards)
        return total, per_reward

    def _advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        # Groups never span ranks, so group statistics are local; the global std needs every rank's rewards.
        if self.grpo.std_scope == "global" and self.trainer.world_size > 1:
            gathered = self.all_gather(rewards).reshape(-1)
            advantages = group_advantages(gathered, self.group_size, "global", clip=self.grpo.adv_clip_max)
            start = self.global_rank * rewards.numel()
            return advantages[start : start + rewards.numel()]
        return group_advantages(rewards, self.group_size, self.grpo.std_scope, clip=self.grpo.adv_clip_max)

    def _control(self, advantages: torch.Tensor) -> torch.Tensor:
        """grpo.null_control: advantages permuted within each group (keyed by iteration and rank, so a resumed
        run draws the same permutation)."""
        if not self.grpo.null_control:
            return advantages
        generator = torch.Generator().manual_seed(self._seed(self.num_iterations, self.global_rank, 0xC0))
        return shuffle_within_groups(advantages, self.group_size, generator)

    def _trained_steps(self, trajectory: Trajectory, generator: torch.Generator) -> list[int]:
        """Positions j in the trajectory to train this iteration (same on every rank: FSDP needs it)."""
        count = trajectory.num_stored_steps
        wanted = self.grpo.num_train_timesteps
        if wanted is None or wanted >= count:
            return list(range(count))
        if self.grpo.timestep_selection == "first":
            return list(range(wanted))
        return sorted(torch.randperm(count, generator=generator)[:wanted].tolist())

    def _update(self, trajectory: Trajectory, cond, advantages: torch.Tensor):
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        params = self.policy.trainable_parameters()
        choice_gen = torch.Generator().manual_seed(self._seed(self.num_iterations))
        positions = self._trained_steps(trajectory, choice_gen)
        size = advantages.numel()
        minibatch = self.grpo.minibatch_size or size
        accumulation = self.grpo.gradient_accumulation_steps
        loss_scale = 1.0 / (len(positions) * accumulation)
        step_stats = {j: StepStats(step_index=trajectory.step_indices[j]) for j in positions}
        losses: dict[str, list] = {"loss": [], "kl": [], "grad_norm": []}
        num_minibatches = 0
        pending_losses: list[torch.Tensor] = []
        for _ in range(self.grpo.num_inner_epochs):
            # Same sample order as the rollout when one minibatch covers the batch: then the first update
            # recomputes the rollout's forward exactly and the ratio is exactly 1.
            order = torch.arange(size) if minibatch == size else torch.randperm(size, generator=choice_gen)
            for start in range(0, size, minibatch):
                index = order[start : start + minibatch].to(self.device)
                for j in positions:
                    before = self._grad_snapshot(params)
                    loss, kl = self._step_loss(trajectory, j, index, cond, advantages, step_stats[j])
                    self.manual_backward(loss * loss_scale)
                    losses["loss"].append(loss.detach())
                    pending_losses.append(loss.detach())
                    losses["kl"].append(kl)
                    if before is not None:
                        step_stats[j].grad_norms.append(self._grad_delta_norm(params, before) / loss_scale)
                num_minibatches += 1
                if num_minibatches % accumulation == 0:
                    grad_norm = _grad_norm(params)
                    # One collective per optimizer step: a NaN loss or gradient on any rank skips the update
                    # everywhere (gradients are already all-reduced, but the loss check must agree too).
                    problem = self._nonfinite_on_any_rank(
                        {"loss": torch.stack(pending_losses), "gradient norm": grad_norm}
                    )
                    pending_losses = []
                    if problem is not None:
                        optimizer.zero_grad(set_to_none=True)
                        return [step_stats[j] for j in positions], losses, problem
                    losses["grad_norm"].append(grad_norm)
                    if self.grpo.max_grad_norm is not None:
                        self.clip_gradients(
                            optimizer,
                            gradient_clip_val=self.grpo.max_grad_norm,
                            gradient_clip_algorithm="norm",
                        )
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if scheduler is not None:
                        scheduler.step()
                    self.policy.update_ema()
        return [step_stats[j] for j in positions], losses, None

    def _grad_snapshot(self, params):
        if not self.grpo.log_step_grad_norms:
            return None
        return [None if p.grad is None else p.grad.detach().clone() for p in params]

    @staticmethod
    def _grad_delta_norm(params, before) -> float:
        squares = []
        for p, old in zip(params, before):
            if p.grad is None:
                continue
            delta = p.grad.detach() if old is None else p.grad.detach() - old
            norm = delta.float().norm()
            squares.append(full_tensor(norm) ** 2)
        return float(torch.stack(squares).sum().sqrt()) if squares else 0.0

    def _step_loss(
        self, trajectory: Trajectory, j: int, index: torch.Tensor, cond, advantages, stats: StepStats
    ):
        """Clipped policy loss (+ beta KL) of stored step j on the samples `index`; records statistics."""
        latents = trajectory.latents_BTCHW[index, j].float()  # stored in performance.trajectory_dtype
        t, t_next = trajectory.sigma_T[j], trajectory.sigma_next_T[j]
        noise_scale = trajectory.noise_scale_T[j]
        step_cond = cond.select(index)
        velocity = self.backbone.velocity(latents, t, step_cond, self.sampling.guidance_scale)
        mean_theta, std = step_mean_and_std(velocity, latents, t, t_next, noise_scale)
        reduction = self.sampling.log_prob_reduction
        terms = compute_ratio_terms(
            trajectory.next_latents_BTCHW[index, j].float(),
            trajectory.mean_old_BTCHW[index, j],
            mean_theta,
            std,
            trajectory.dt_T[j].expand(len(index)),
            reduction,
        )
        policy_ratio = self.ratio_fn(terms)
        loss, _ = clipped_policy_loss(
            policy_ratio.log_ratio, advantages[index], policy_ratio.weight, self.clip_range
        )
        kl = torch.zeros((), device=loss.device)
        if self.grpo.needs_reference:
            with torch.no_grad(), self.policy.use_weights("reference") as reference:
                velocity_ref = self.backbone.velocity(
                    latents, t, step_cond, self.sampling.guidance_scale, reference
                )
                mean_ref, _ = step_mean_and_std(velocity_ref, latents, t, t_next, noise_scale)
            kl_B = kl_to_reference(mean_theta, mean_ref, std, reduction)
            kl = kl_B.mean()
            if self.grpo.kl_beta > 0:
                loss = loss + self.grpo.kl_beta * kl
            kl = kl.detach()
            stats.kl.append(kl_B.detach())
        stats.log_ratio.append(policy_ratio.log_ratio.detach())
        stats.raw_log_ratio.append(terms.raw_log_ratio.detach())
        stats.advantages.append(advantages[index].detach())
        return loss, kl

    # ------------------------------------------------------------------ faults
    def _nonfinite_on_any_rank(self, tensors: dict[str, torch.Tensor]) -> Optional[str]:
        """The name of the first non-finite tensor here, or a placeholder when only another rank has one;
        None when all ranks are clean. Every rank calls this at the same point (it is a collective)."""
        local = next((name for name, t in tensors.items() if not bool(torch.isfinite(t).all())), None)
        anywhere = self.trainer.strategy.reduce_boolean_decision(local is not None, all=False)
        if not anywhere:
            return None
        return local or "value on another rank"

    def _count_skip(self, problem: Optional[str], iteration: int) -> None:
        if problem is None:
            self.consecutive_skipped_updates = 0
            return
        self.num_skipped_updates += 1
        self.consecutive_skipped_updates += 1
        if self.trainer.is_global_zero:
            log.warning(
                "guardrl: iteration %d: non-finite %s; its update is skipped (%d in a row, %d in all; the run "
                "stops at faults.max_consecutive_nonfinite=%d in a row)",
                iteration,
                problem,
                self.consecutive_skipped_updates,
                self.num_skipped_updates,
                self.faults.max_consecutive_nonfinite,
            )

    def _stop_if_too_many_skips(self, problem: Optional[str], iteration: int) -> None:
        limit = self.faults.max_consecutive_nonfinite
        if problem is not None and self.consecutive_skipped_updates >= limit:
            raise RuntimeError(
                f"guardrl: {self.consecutive_skipped_updates} GRPO iterations in a row (the last: iteration "
                f"{iteration}) skipped their update because of a non-finite {problem}; stopping "
                f"(faults.max_consecutive_nonfinite={limit}). Resume from the last checkpoint with a lower "
                "learning rate, or check the reward for NaN/inf outputs."
            )

    # ------------------------------------------------------------------ logging and state
    def _log_iteration(
        self, iteration: int, rewards, per_reward, advantages, losses, skipped: bool, dropped_groups: int = 0
    ) -> dict:
        # Collectives on every rank, in the same order; rank zero writes (logs.write_scalars).
        all_rewards = self.all_gather(rewards.detach()).reshape(-1).double()
        finite = all_rewards[torch.isfinite(all_rewards)]  # dropped groups' NaN/inf rewards are left out
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=all_rewards.device)
        metrics: dict[str, Any] = {
            "reward/mean": finite.mean() if finite.numel() else nan,
            "reward/std": finite.std(unbiased=False) if finite.numel() else nan,
        }
        for name, values in per_reward.items():
            metrics[f"reward/{name}/mean"] = self.all_gather(values.detach()).double().nanmean()
        dropped = int(self.all_gather(torch.tensor(dropped_groups, device=self.device)).sum())
        metrics["train/dropped_groups"] = dropped
        if dropped and not skipped and self.trainer.is_global_zero:
            log.warning(
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
        means = self.all_gather(torch.stack([local[n].detach().double() for n in names])).reshape(
            -1, len(names)
        )
        metrics.update(zip(names, means.mean(dim=0)))
        metrics.update(
            {
                "train/num_optimizer_steps": len(losses["grad_norm"]),
                "train/iteration": iteration,
                "train/lr": self.optimizers().param_groups[0]["lr"],
                "train/skipped_update": float(skipped),
                "train/num_skipped_updates": self.num_skipped_updates,
            }
        )
        write_scalars(self.trainer, metrics, iteration)
        self.log(
            "reward",
            metrics["reward/mean"].float(),
            prog_bar=True,
            logger=False,
            on_step=True,
            on_epoch=False,
            batch_size=rewards.numel(),
        )
        return metrics

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # After every callback has written this iteration's scalars: flush, so a killed run keeps its events.
        flush_loggers(self.trainer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Frozen base weights are re-loaded from the pretrained model; keep only what training changed.
        checkpoint["state_dict"] = {
            key: value for key, value in checkpoint["state_dict"].items() if self._is_trainable_key(key)
        }
        checkpoint["guardrl"] = {
            "num_iterations": self.num_iterations,
            "stream_position": self.stream_position,
            "num_skipped_updates": self.num_skipped_updates,
            "consecutive_skipped_updates": self.consecutive_skipped_updates,
            "num_optimizer_steps": int(self.trainer.global_step) if self._trainer is not None else 0,
            "rng": capture_rng_states_of_all_ranks(),
        }

    def _is_trainable_key(self, key: str) -> bool:
        prefix = "policy."
        return key.startswith(prefix) and self.policy.is_trainable_state_key(key[len(prefix) :])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "guardrl" not in checkpoint:
            raise ValueError(
                "ckpt_path: this checkpoint was not written by guardrl's GRPOModule (no 'guardrl' entry with "
                "counters and RNG states); resume from a checkpoint of a guardrl run"
            )
        if (
            "state_dict" in checkpoint
        ):  # a sharded checkpoint's weights were checked and loaded by FSDP2Strategy
            self._check_checkpoint_state(checkpoint["state_dict"])
        state = checkpoint["guardrl"]
        self.num_iterations = state["num_iterations"]
        self.stream_position = state["stream_position"]
        self.num_skipped_updates = state.get("num_skipped_updates", 0)
        self.consecutive_skipped_updates = state.get("consecutive_skipped_updates", 0)
        self._rng_to_restore = state.get("rng")
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "start_position"):
            datamodule.start_position = self.stream_position

    def _check_checkpoint_state(self, saved: dict[str, torch.Tensor]) -> None:
        """Loading is not strict (frozen weights are not saved), so check the trainable part ourselves: a
        checkpoint of another LoRA rank, target list or backbone would otherwise load partly and silently."""
        expected = {
            key: value.shape for key, value in self.state_dict().items() if self._is_trainable_key(key)
        }
        missing = sorted(set(expected) - set(saved))
        unexpected = sorted(set(saved) - set(expected))
        mismatched = sorted(
            k for k in set(expected) & set(saved) if tuple(saved[k].shape) != tuple(expected[k])
        )
        if missing or unexpected or mismatched:

            def show(keys):
                return f"{len(keys)} (e.g. {keys[:2]})" if keys else "0"

            detail = ""
            if mismatched:
                key = mismatched[0]
                detail = f"; {key}: checkpoint {tuple(saved[key].shape)} vs model {tuple(expected[key])}"
            raise ValueError(
                "ckpt_path: the checkpoint's trainable weights do not fit this model: missing "
                f"{show(missing)}, unexpected {show(unexpected)}, shape-mismatched {show(mismatched)}{detail}. "
                "Resume with the model.backbone and model.lora (rank, target_modules) the run was trained with."
            )

    def on_fit_start(self) -> None:
        # Lightning has moved every child module to the device; frozen modules the backbone offloads
        # (model.backbone.offload_text_encoders / offload_vae) go back to CPU memory until they are used.
        self.backbone.offload()

    def on_train_start(self) -> None:
        if self.max_iterations is not None and self.num_iterations >= self.max_iterations:
            # A finished run resumed with the same budget (a requeue wrapper that always passes --ckpt_path
            # last): no iteration runs and no checkpoint is rewritten; RunSummaryCallback says how to extend it.
            self.trainer.should_stop = True
            if self.trainer.is_global_zero:
                log.warning(
                    "guardrl: the checkpoint is at iteration %d and model.max_iterations=%d: the run is complete, "
                    "nothing to do (raise --model.max_iterations to train further)",
                    self.num_iterations,
                    self.max_iterations,
                )
        perf = self.performance
        if perf.timing:
            dtype = compute_dtype(self.trainer.precision, self.backbone.model_dtype)
            peak = peak_flops_of(self.device, dtype, perf.peak_flops)
            self._meter = PhaseMeter(self.device, peak, perf.throughput_window)
        # RNG states go back last, after everything the restore itself may have drawn.
        if self._rng_to_restore is None:
            return
        restored = restore_rng_state_of_rank(self._rng_to_restore, self.global_rank, self.trainer.world_size)
        if not restored and self.trainer.is_global_zero:
            log.warning(
                "guardrl: the checkpoint holds RNG states of %d ranks but this run has %d; the global RNGs are not "
                "restored (rollout noise does not depend on them; LoRA dropout does)",
                len(self._rng_to_restore),
                self.trainer.world_size,
            )
        self._rng_to_restore = None
