"""The update phase of one GRPO iteration (SPEC.md section 2, step 4), called by `GRPOModule.training_step`.

For each inner epoch, minibatch and trained denoising step: recompute mu_theta at the stored latents, take the
configured ratio variant, the clipped loss (+ beta KL to the reference), backward; an optimizer step every
`grpo.gradient_accumulation_steps` minibatches, after one agreement across ranks that the losses and the
gradient norm are finite. Under DDP the gradients are all-reduced once per optimizer step, in its last
backward (`gradient_sync`), unless `grpo.log_step_grad_norms: true` asks for every backward's reduced gradient
(its default is off under DDP, on elsewhere).
Per-step statistics (log-ratios, the loss's own clip flags, KL, gradient norms) are collected into `StepStats`
for the callbacks.

It takes the module for what only a LightningModule has (its optimizer and scheduler, `manual_backward`,
`clip_gradients`, the strategy) and for the run's options; the math is in algorithm/ and sampling/.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, ContextManager, Optional

import torch
from lightning.pytorch.strategies import DDPStrategy, ParallelStrategy

from guardrl.algorithm import clipped_policy_loss, compute_ratio_terms, kl_to_reference
from guardrl.algorithm.timesteps import choose_trained_steps
from guardrl.faults import nonfinite_on_any_rank
from guardrl.grad_norms import grad_delta_norm, grad_norm, grad_snapshot
from guardrl.sampling import step_mean_and_std
from guardrl.types import StepStats, Trajectory

if TYPE_CHECKING:
    from guardrl.module import GRPOModule

Losses = dict[str, list]

# Internal, not an option: True restores one gradient all-reduce per backward under DDP (the behaviour before
# issue 20), which tests/test_ddp_sync.py and bench/ddp_sync_bench.py compare against.
_SYNC_EVERY_BACKWARD = False


def gradient_sync(module: GRPOModule, sync: bool) -> ContextManager:
    """The context of one `manual_backward`: under DDP with `sync` False, the backward only accumulates this
    rank's gradient locally, and the next synchronised backward all-reduces the sum. Averaging is linear, so
    the optimizer sees the same gradient (up to float order) for one all-reduce per optimizer step instead of
    one per backward.

    `ParallelStrategy.block_backward_sync` is Lightning's public switch for this (DDP's `no_sync`); Lightning
    calls DDP's `prepare_for_backward` in `manual_backward` only when the sync is on, so wrapping the backward
    alone suffices. It does nothing for a model that is not wrapped in DDP: FSDP2 (ModelParallelStrategy)
    still reduce-scatters in every backward, as before, and a single device has nothing to sync."""
    strategy = module.trainer.strategy
    if sync or _SYNC_EVERY_BACKWARD or not isinstance(strategy, ParallelStrategy):
        return nullcontext()
    return strategy.block_backward_sync()


def step_grad_norms_on(module: GRPOModule) -> bool:
    """grpo.log_step_grad_norms, its null default resolved: on unless DDP syncs gradients between processes
    (there it would cost an all-reduce per backward; FSDP2 reduce-scatters in every backward anyway)."""
    option = module.grpo.log_step_grad_norms
    if option is not None:
        return option
    strategy = module.trainer.strategy
    return not (isinstance(strategy, DDPStrategy) and module.trainer.world_size > 1)


def update_policy(
    module: GRPOModule, trajectory: Trajectory, cond, advantages: torch.Tensor
) -> tuple[list[StepStats], Losses, Optional[str]]:
    """(per trained step statistics, the losses / KLs / gradient norms, the fault that stopped it or None)."""
    grpo = module.grpo
    optimizer = module.optimizers()
    scheduler = module.lr_schedulers()
    params = module.policy.trainable_parameters()
    # Seeded by the iteration alone (not the rank): every rank trains the same steps in the same order.
    choice_gen = torch.Generator().manual_seed(module.iteration_seed(module.num_iterations))
    positions = choose_trained_steps(
        trajectory.num_stored_steps, grpo.num_train_timesteps, grpo.timestep_selection, choice_gen
    )
    size = advantages.numel()
    minibatch = grpo.minibatch_size or size
    accumulation = grpo.gradient_accumulation_steps
    loss_scale = 1.0 / (len(positions) * accumulation)
    step_stats = {j: StepStats(step_index=trajectory.step_indices[j]) for j in positions}
    losses: Losses = {"loss": [], "kl": [], "grad_norm": []}
    num_minibatches = 0
    pending_losses: list[torch.Tensor] = []
    # grad/norm_t{k} is the norm of each step's rank-averaged gradient: only a backward that all-reduces
    # gives it, so logging it keeps the sync on every backward.
    log_step_norms = step_grad_norms_on(module)
    sync_every_backward = log_step_norms
    for _ in range(grpo.num_inner_epochs):
        # Same sample order as the rollout when one minibatch covers the batch: then the first update
        # recomputes the rollout's forward exactly and the ratio is exactly 1.
        order = torch.arange(size) if minibatch == size else torch.randperm(size, generator=choice_gen)
        for start in range(0, size, minibatch):
            index = order[start : start + minibatch].to(module.device)
            steps_after = (num_minibatches + 1) % accumulation == 0  # an optimizer step after this minibatch
            for position, j in enumerate(positions):
                before = grad_snapshot(params) if log_step_norms else None
                loss, kl = step_loss(module, trajectory, j, index, cond, advantages, step_stats[j])
                last = steps_after and position == len(positions) - 1
                with gradient_sync(module, sync_every_backward or last):
                    module.manual_backward(loss * loss_scale)
                losses["loss"].append(loss.detach())
                pending_losses.append(loss.detach())
                losses["kl"].append(kl)
                if before is not None:
                    step_stats[j].grad_norms.append(grad_delta_norm(params, before) / loss_scale)
            num_minibatches += 1
            if num_minibatches % accumulation:
                continue
            norm = grad_norm(params)
            # One collective per optimizer step: a NaN loss or gradient on any rank skips the update
            # everywhere (gradients are already all-reduced, but the loss check must agree too).
            problem = nonfinite_on_any_rank(
                module.trainer.strategy, {"loss": torch.stack(pending_losses), "gradient norm": norm}
            )
            pending_losses = []
            if problem is not None:
                optimizer.zero_grad(set_to_none=True)
                return [step_stats[j] for j in positions], losses, problem
            losses["grad_norm"].append(norm)
            if grpo.max_grad_norm is not None:
                module.clip_gradients(
                    optimizer, gradient_clip_val=grpo.max_grad_norm, gradient_clip_algorithm="norm"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            module.policy.update_ema()
    return [step_stats[j] for j in positions], losses, None


def step_loss(
    module: GRPOModule,
    trajectory: Trajectory,
    j: int,
    index: torch.Tensor,
    cond,
    advantages: torch.Tensor,
    stats: StepStats,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(clipped policy loss + beta KL, the detached KL) of stored step j on the samples `index`; appends the
    step's statistics to `stats`."""
    backbone, sampling, grpo = module.backbone, module.sampling, module.grpo
    latents = trajectory.latents_BTCHW[index, j].float()  # stored in performance.trajectory_dtype
    t, t_next = trajectory.sigma_T[j], trajectory.sigma_next_T[j]
    noise_scale = trajectory.noise_scale_T[j]
    step_cond = cond.select(index)
    velocity = backbone.velocity(latents, t, step_cond, sampling.guidance_scale)
    mean_theta, std = step_mean_and_std(velocity, latents, t, t_next, noise_scale, sde_type=sampling.sde_type)
    reduction = sampling.log_prob_reduction
    terms = compute_ratio_terms(
        trajectory.next_latents_BTCHW[index, j].float(),
        trajectory.mean_old_BTCHW[index, j],
        mean_theta,
        std,
        trajectory.dt_T[j].expand(len(index)),
        reduction,
    )
    policy_ratio = module.ratio_fn(terms)
    loss, loss_stats = clipped_policy_loss(
        policy_ratio.log_ratio, advantages[index], policy_ratio.weight, module.clip_range
    )
    kl = torch.zeros((), device=loss.device)
    if grpo.needs_reference:
        with torch.no_grad(), module.policy.use_weights("reference") as reference:
            velocity_ref = backbone.velocity(latents, t, step_cond, sampling.guidance_scale, reference)
            mean_ref, _ = step_mean_and_std(
                velocity_ref, latents, t, t_next, noise_scale, sde_type=sampling.sde_type
            )
        kl_B = kl_to_reference(mean_theta, mean_ref, std, reduction)
        kl = kl_B.mean()
        if grpo.kl_beta > 0:
            loss = loss + grpo.kl_beta * kl
        kl = kl.detach()
        stats.kl.append(kl_B.detach())
    stats.log_ratio.append(policy_ratio.log_ratio.detach())
    stats.raw_log_ratio.append(terms.raw_log_ratio.detach())
    stats.advantages.append(advantages[index].detach())
    stats.clipped_upper.append(loss_stats.clipped_upper)
    stats.clipped_lower.append(loss_stats.clipped_lower)
    return loss, kl
