"""Grouped options of a GRPO run. Field docstrings become `guardrl fit --help`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from guardrl.algorithm.ratios import RATIO_VARIANTS, VARIANCE_NORMALIZED_VARIANTS


@dataclass
class SamplingOptions:
    """How rollouts are sampled (diffusers names where diffusers has one)."""

    num_inference_steps: int = 10
    """Sampler steps S of a training rollout."""
    guidance_scale: float = 1.0
    """Classifier-free guidance in rollout and training (SD3: two forwards in one batch; Flux-dev: the
    distilled guidance embedding). 1.0 disables true CFG."""
    noise_level: float = 0.7
    """eta of the SDE (FlowGRPO: 0.7 for SD3.5, 0.9 for Flux; DanceGRPO: 0.3). Must be > 0 to train."""
    sde_type: Literal["flow_grpo", "dance_grpo"] = "flow_grpo"
    """Noise scale sigma_k: "flow_grpo" eta*sqrt(t/(1-t)); "dance_grpo" eta. Same score-corrected mean."""
    sde_window: Optional[tuple[int, int]] = None
    """Half-open range [start, end) of sampler step indices that use the SDE (and can be trained); the other
    steps are deterministic Euler steps. None: every step but the last, whose noise would land unaltered in
    the final image."""
    log_prob_reduction: Literal["mean", "sum"] = "mean"
    """"mean": log-probs averaged over latent elements (the public FlowGRPO/DanceGRPO form; clip ranges like
    1e-4 are in this unit). "sum": the exact Gaussian log-density of the step."""
    same_noise_per_group: bool = False
    """Start all samples of a group from the same initial noise (DanceGRPO's init_same_noise)."""

    def __post_init__(self) -> None:
        if self.num_inference_steps < 2:
            raise ValueError(f"sampling.num_inference_steps must be >= 2, got {self.num_inference_steps}")
        if self.guidance_scale < 1.0:
            raise ValueError(f"sampling.guidance_scale must be >= 1.0 (1.0 = no guidance), got {self.guidance_scale}")
        if self.noise_level < 0:
            raise ValueError(f"sampling.noise_level must be >= 0, got {self.noise_level}")
        start, end = self.sde_steps_range()
        if not 0 <= start < end <= self.num_inference_steps:
            raise ValueError(
                f"sampling.sde_window={self.sde_window} must satisfy 0 <= start < end <= "
                f"num_inference_steps ({self.num_inference_steps})"
            )

    def sde_steps_range(self) -> tuple[int, int]:
        if self.sde_window is None:
            return 0, self.num_inference_steps - 1
        return tuple(self.sde_window)


@dataclass
class GRPOOptions:
    """The GRPO update (GRPO names for GRPO concepts)."""

    ratio_variant: Literal["flow_grpo", "temp_reweight", "mean_revised", "ratio_norm", "grpo_guard"] = "grpo_guard"
    """Which log-ratio is clipped and how each step's loss is weighted (SPEC.md; docs/math.md):
    flow_grpo (log r, 1), temp_reweight (log r, s), mean_revised (log r + ||dmu||^2/2s^2, 1),
    ratio_norm (-dmu.eps, 1), grpo_guard (-dmu.eps, 1/|dt|)."""
    clip_range: float = 2e-6
    """PPO clip c: the ratio is clipped to [1 - c, 1 + c], in `clip_range_unit`."""
    clip_range_unit: Literal["log_prob", "per_sqrt_element"] = "log_prob"
    """"log_prob": c is in the units of the computed log-ratio (per element with "mean" reduction, as in the
    reference configs). "per_sqrt_element": c is rescaled by sqrt(D) so it means the same at every resolution."""
    adv_clip_max: Optional[float] = 5.0
    """Advantages are clipped to [-adv_clip_max, adv_clip_max]; None: no clip."""
    std_scope: Literal["group", "global"] = "group"
    """Divide advantages by each group's reward std ("group") or the std over all ranks' samples ("global")."""
    kl_beta: float = 0.0
    """Weight of the KL to the reference (base) policy, KL = ||mu_theta - mu_ref||^2 / (2 s^2) in the units of
    log_prob_reduction (nats per element for "mean")."""
    track_kl: bool = True
    """Compute and log train/kl even when kl_beta = 0 (one extra no-grad forward per trained step)."""
    num_inner_epochs: int = 1
    """Passes over the rollout batch per iteration."""
    minibatch_size: Optional[int] = None
    """Samples per rank per update; None: the rank's whole batch. Must divide the rank's batch."""
    gradient_accumulation_steps: int = 1
    """Minibatches accumulated per optimizer step. Optimizer steps per iteration =
    num_inner_epochs * (batch / minibatch_size) / gradient_accumulation_steps; more than one moves the
    ratio away from 1 within an iteration."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the total gradient norm before each optimizer step; None: no clipping."""
    num_train_timesteps: Optional[int] = None
    """How many of the SDE steps to train per iteration; None: all of them."""
    timestep_selection: Literal["random", "first"] = "random"
    """Which SDE steps when num_train_timesteps is set: a seeded random subset per iteration (DanceGRPO) or
    the first ones (FlowGRPO's timestep_fraction)."""
    old_policy_sync_every: int = 1
    """Copy the policy into the old-policy snapshot every this many iterations (1: fully on-policy rollouts)."""
    ema_decay: Optional[float] = None
    """Keep an EMA of the trained weights with this decay, updated after every optimizer step; None: no EMA."""
    log_step_grad_norms: bool = True
    """Log grad/norm_t{k}, the gradient norm each denoising step contributes (costs one gradient copy)."""

    def __post_init__(self) -> None:
        if self.ratio_variant not in RATIO_VARIANTS:
            raise ValueError(f"grpo.ratio_variant must be one of {sorted(RATIO_VARIANTS)}, got {self.ratio_variant!r}")
        if not self.clip_range > 0:
            raise ValueError(f"grpo.clip_range must be > 0, got {self.clip_range}")
        if self.adv_clip_max is not None and not self.adv_clip_max > 0:
            raise ValueError(f"grpo.adv_clip_max must be > 0 or null, got {self.adv_clip_max}")
        if self.kl_beta < 0:
            raise ValueError(f"grpo.kl_beta must be >= 0, got {self.kl_beta}")
        for name in ("num_inner_epochs", "gradient_accumulation_steps", "old_policy_sync_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"grpo.{name} must be >= 1, got {getattr(self, name)}")
        if self.minibatch_size is not None and self.minibatch_size < 1:
            raise ValueError(f"grpo.minibatch_size must be >= 1 or null, got {self.minibatch_size}")
        if self.num_train_timesteps is not None and self.num_train_timesteps < 1:
            raise ValueError(f"grpo.num_train_timesteps must be >= 1 or null, got {self.num_train_timesteps}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"grpo.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"grpo.ema_decay must be in (0, 1) or null, got {self.ema_decay}")

    @property
    def needs_reference(self) -> bool:
        return self.kl_beta > 0 or self.track_kl


def check_compatible(sampling: SamplingOptions, grpo: GRPOOptions) -> None:
    """Refuse combinations that are individually valid but meaningless together."""
    if sampling.noise_level == 0:
        if grpo.ratio_variant in VARIANCE_NORMALIZED_VARIANTS:
            raise ValueError(
                f"grpo.ratio_variant={grpo.ratio_variant!r} (RatioNorm) needs a Gaussian step with a variance "
                "term, but sampling.noise_level=0 makes every step a deterministic ODE step: set "
                "sampling.noise_level > 0 (e.g. 0.7)"
            )
        raise ValueError(
            "sampling.noise_level=0 makes every step deterministic: a policy gradient needs stochastic "
            "(SDE) steps; set sampling.noise_level > 0 (e.g. 0.7)"
        )
    start, end = sampling.sde_steps_range()
    if grpo.num_train_timesteps is not None and grpo.num_train_timesteps > end - start:
        raise ValueError(
            f"grpo.num_train_timesteps={grpo.num_train_timesteps} exceeds the {end - start} SDE steps of "
            f"sampling.sde_window={[start, end]}"
        )


@dataclass
class FaultOptions:
    """What a run does when something goes wrong mid-training (docs/reliability.md)."""

    max_consecutive_nonfinite: int = 3
    """Stop with an error after this many GRPO iterations in a row whose update was skipped because a reward,
    log-prob, loss or gradient norm was NaN or infinite (on any rank). Skipped iterations are counted in
    train/num_skipped_updates."""
    reward_max_attempts: int = 3
    """Calls of a reward before a failure (an exception or a timeout) fails the run. 1: no retry."""
    reward_retry_delay_s: float = 1.0
    """Seconds between reward attempts (doubled after each failure)."""
    reward_timeout_s: Optional[float] = None
    """Seconds one reward call may take before it counts as failed; None: no limit."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_consecutive_nonfinite, int) or self.max_consecutive_nonfinite < 1:
            raise ValueError(
                f"faults.max_consecutive_nonfinite must be an integer >= 1, got {self.max_consecutive_nonfinite!r}"
            )
        if not isinstance(self.reward_max_attempts, int) or self.reward_max_attempts < 1:
            raise ValueError(f"faults.reward_max_attempts must be an integer >= 1, got {self.reward_max_attempts!r}")
        if not (self.reward_retry_delay_s >= 0 and math.isfinite(self.reward_retry_delay_s)):
            raise ValueError(
                f"faults.reward_retry_delay_s must be a finite number >= 0, got {self.reward_retry_delay_s!r}"
            )
        if self.reward_timeout_s is not None and not (
            self.reward_timeout_s > 0 and math.isfinite(self.reward_timeout_s)
        ):
            raise ValueError(
                f"faults.reward_timeout_s must be a finite number > 0 or null, got {self.reward_timeout_s!r}"
            )
