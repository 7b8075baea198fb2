"""Grouped options of a GRPO run. Field docstrings become `guardrl fit --help`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from guardrl.algorithm.advantages import REWARD_AGGREGATIONS, STD_SCOPES
from guardrl.algorithm.loss import CLIP_RANGE_UNITS
from guardrl.algorithm.ratios import RATIO_VARIANTS, VARIANCE_NORMALIZED_VARIANTS
from guardrl.algorithm.timesteps import TIMESTEP_SELECTIONS
from guardrl.sampling.sde import LOG_PROB_REDUCTIONS, SDE_TYPES
from guardrl.sampling.windows import WINDOW_STRATEGIES, sde_window_at

# The options' choices, derived from the registries that implement them: a new ratio variant (a function in
# RATIO_VARIANTS) or SDE type is a choice of the parser, of `guardrl fit --help` and of guardrl.preflight with
# no list to update here. (typing.Literal of a runtime tuple: what jsonargparse reads; mypy does not check
# this file.)
RatioVariant = Literal[tuple(RATIO_VARIANTS)]  # type: ignore[valid-type]
SdeType = Literal[tuple(SDE_TYPES)]  # type: ignore[valid-type]
WindowStrategy = Literal[tuple(WINDOW_STRATEGIES)]  # type: ignore[valid-type]
LogProbReduction = Literal[tuple(LOG_PROB_REDUCTIONS)]  # type: ignore[valid-type]
ClipRangeUnit = Literal[tuple(CLIP_RANGE_UNITS)]  # type: ignore[valid-type]
StdScope = Literal[tuple(STD_SCOPES)]  # type: ignore[valid-type]
RewardAggregation = Literal[tuple(REWARD_AGGREGATIONS)]  # type: ignore[valid-type]
TimestepSelection = Literal[tuple(TIMESTEP_SELECTIONS)]  # type: ignore[valid-type]


# The Literal types below are checked by the CLI's parser, but not when the options are built in Python, and
# the parser takes YAML's .nan and .inf as floats: these checks hold for both ways in. Messages name the
# option as a config writes it, say what is allowed and show the value.
def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_int(option: str, value, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        null = " or null" if allow_none else ""
        raise ValueError(f"{option} must be an integer >= {minimum}{null}, got {value!r}")


# Other modules' options (guardrl/evaluation.py, the Evaluation callback) are checked with the same words.
require_int = _require_int


def _require_number(
    option: str, value, minimum: float, strict: bool = False, allow_none: bool = False, note: str = ""
) -> None:
    if value is None and allow_none:
        return
    if not (_is_number(value) and math.isfinite(value) and (value > minimum if strict else value >= minimum)):
        bound = f"{'>' if strict else '>='} {minimum:g}"
        null = " or null" if allow_none else ""
        raise ValueError(f"{option} must be a finite number {bound}{null}{note}, got {value!r}")


require_number = _require_number


def _require_choice(option: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(map(repr, choices))}; got {value!r}")


@dataclass
class SamplingOptions:
    """How rollouts are sampled (diffusers names where diffusers has one)."""

    num_inference_steps: int = 10
    """Sampler steps S of a training rollout."""
    guidance_scale: float = 1.0
    """Classifier-free guidance in rollout and training (SD3: two forwards in one batch; Flux-dev: the
    distilled guidance embedding). 1.0 disables true CFG."""
    noise_level: float = 0.7
    """eta of the SDE (FlowGRPO: 0.7 for SD3.5, 0.9 for Flux; DanceGRPO: 0.3; CPS: 0.8, at most 1). Must be
    > 0 to train."""
    sde_type: SdeType = "flow_grpo"
    """Noise scale sigma_k: "flow_grpo" eta*sqrt(t/(1-t)); "dance_grpo" eta. Same score-corrected mean.
    "cps": coefficient-preserving sampling (FlowCPS), std t_next*sin(eta*pi/2), eta in [0, 1], a window that
    ends before the last step (docs/math.md, "CPS step")."""
    sde_window: Optional[tuple[int, int]] = None
    """Half-open range [start, end) of sampler step indices that use the SDE (and can be trained); the other
    steps are deterministic Euler steps. None: every step but the last, whose noise would land unaltered in
    the final image. With a moving window strategy: the range the window moves in."""
    sde_window_strategy: WindowStrategy = "fixed"
    """"fixed": the whole sde_window every iteration. "random": sde_window_size steps at a random position
    in sde_window each iteration, the same on every rank (Flow-GRPO-Fast). "sliding": sde_window_size steps
    that move by sde_window_stride every sde_window_slide_every iterations (MixGRPO). With
    same_noise_per_group the steps before the window run once per group (docs/math.md, "SDE windows")."""
    sde_window_size: Optional[int] = None
    """Steps per moving window (random / sliding); null with "fixed"."""
    sde_window_slide_every: int = 1
    """sliding: iterations between two moves of the window (MixGRPO: 25)."""
    sde_window_stride: Optional[int] = None
    """sliding: steps the window moves by; null: its size (windows that do not overlap, as MixGRPO)."""
    sde_window_wrap: bool = False
    """sliding: after the last position start over at the first (MixGRPO's roll_back); false: stay there."""
    log_prob_reduction: LogProbReduction = "mean"
    """"mean": log-probs averaged over latent elements (the public FlowGRPO/DanceGRPO form; clip ranges like
    1e-4 are in this unit). "sum": the exact Gaussian log-density of the step."""
    same_noise_per_group: bool = False
    """Start all samples of a group from the same initial noise (DanceGRPO's init_same_noise)."""

    def __post_init__(self) -> None:
        _require_int("sampling.num_inference_steps", self.num_inference_steps, minimum=2)
        _require_number(
            "sampling.guidance_scale", self.guidance_scale, minimum=1.0, note=" (1.0 = no guidance)"
        )
        _require_number("sampling.noise_level", self.noise_level, minimum=0.0, note=" (eta; e.g. 0.7)")
        _require_choice("sampling.sde_type", self.sde_type, SDE_TYPES)
        if self.sde_type == "cps" and self.noise_level > 1:
            # std = t_next sin(eta pi/2) peaks at eta = 1; past it eta and 2 - eta are the same sampler.
            raise ValueError(
                "sampling.noise_level with sampling.sde_type='cps' must be a number in [0, 1] (CPS's std is "
                f"t_next * sin(noise_level * pi / 2), largest at 1; FlowGRPO's CPS configs use 0.8), got "
                f"{self.noise_level!r}"
            )
        _require_choice("sampling.log_prob_reduction", self.log_prob_reduction, LOG_PROB_REDUCTIONS)
        if self.sde_window is not None:
            window = self.sde_window
            if (
                not isinstance(window, (list, tuple))
                or len(window) != 2
                or not all(isinstance(k, int) and not isinstance(k, bool) for k in window)
            ):
                raise ValueError(
                    f"sampling.sde_window must be two integers [start, end) or null, got {window!r}"
                )
        start, end = self.sde_steps_range()
        if not 0 <= start < end <= self.num_inference_steps:
            raise ValueError(
                f"sampling.sde_window={list(self.sde_window)} must satisfy 0 <= start < end <= "
                f"sampling.num_inference_steps ({self.num_inference_steps})"
            )
        last = self.num_inference_steps - 1
        if self.sde_type == "cps" and end > last:
            # CPS's last step lands on t_next = 0, where its std is 0: it cannot be an SDE step, and a window
            # of it alone would store no step to train.
            raise ValueError(
                f"sampling.sde_window={[start, end]} with sampling.sde_type='cps' must leave out the last "
                f"step {last}: 0 <= start < end <= {last} (sampling.num_inference_steps - 1), since CPS's "
                "std t_next * sin(noise_level * pi / 2) is 0 on the last step (t_next = 0)"
            )

        self._check_window_strategy(start, end)

    def _check_window_strategy(self, start: int, end: int) -> None:
        _require_choice("sampling.sde_window_strategy", self.sde_window_strategy, WINDOW_STRATEGIES)
        moving = self.sde_window_strategy != "fixed"
        if not moving and self.sde_window_size is not None:
            raise ValueError(
                f"sampling.sde_window_size={self.sde_window_size!r} is only used by a moving window: set "
                "sampling.sde_window_strategy to 'random' or 'sliding', or sde_window_size to null"
            )
        if moving:
            size = self.sde_window_size
            if not (isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= end - start):
                raise ValueError(
                    f"sampling.sde_window_size must be an integer in [1, {end - start}] (the steps of "
                    f"sampling.sde_window={[start, end]}) with sampling.sde_window_strategy="
                    f"{self.sde_window_strategy!r}, got {size!r}"
                )
        _require_int("sampling.sde_window_slide_every", self.sde_window_slide_every, minimum=1)
        _require_int("sampling.sde_window_stride", self.sde_window_stride, minimum=1, allow_none=True)
        if not isinstance(self.sde_window_wrap, bool):
            raise ValueError(f"sampling.sde_window_wrap must be true or false, got {self.sde_window_wrap!r}")

    def sde_steps_range(self) -> tuple[int, int]:
        """The range of steps that may be SDE steps (a moving window moves inside it)."""
        if self.sde_window is None:
            return 0, self.num_inference_steps - 1
        return tuple(self.sde_window)

    def sde_steps_per_iteration(self) -> int:
        """How many SDE (trainable) steps one rollout has: the window's size, or the whole range."""
        start, end = self.sde_steps_range()
        return end - start if self.sde_window_strategy == "fixed" else self.sde_window_size

    def window_at(self, iteration: int, random_seed: int) -> tuple[int, int]:
        """This iteration's SDE window [start, end) (guardrl/sampling/windows.py)."""
        return sde_window_at(
            self.sde_window_strategy,
            self.sde_steps_range(),
            self.sde_window_size,
            iteration,
            random_seed,
            self.sde_window_slide_every,
            self.sde_window_stride,
            self.sde_window_wrap,
        )


@dataclass
class GRPOOptions:
    """The GRPO update (GRPO names for GRPO concepts)."""

    ratio_variant: RatioVariant = "grpo_guard"
    """Which log-ratio is clipped and how each step's loss is weighted (SPEC.md; docs/math.md):
    flow_grpo (log r, 1), temp_reweight (log r, s), mean_revised (log r + ||dmu||^2/2s^2, 1),
    ratio_norm (-dmu.eps, 1), grpo_guard (-dmu.eps, 1/|dt|)."""
    clip_range: float = 2e-6
    """PPO clip c: the ratio is clipped to [1 - c, 1 + c], in `clip_range_unit`."""
    clip_range_unit: ClipRangeUnit = "log_prob"
    """"log_prob": c is in the units of the computed log-ratio (per element with "mean" reduction, as in the
    reference configs). "per_sqrt_element": c is rescaled by sqrt(D) so it means the same at every
    resolution."""
    adv_clip_max: Optional[float] = 5.0
    """Advantages are clipped to [-adv_clip_max, adv_clip_max]; None: no clip."""
    std_scope: StdScope = "group"
    """Divide advantages by each group's reward std ("group") or the std over all ranks' samples
    ("global"). With reward_aggregation "gdpo": each reward's std, in the group or over all ranks' samples."""
    reward_aggregation: RewardAggregation = "weighted_sum"
    """How several rewards make one advantage. "weighted_sum": the rewards' weighted sum, normalised in its
    group. "gdpo": each reward normalised in its group first, then their weighted sum divided by its std over
    all ranks' samples (GDPO; Flow-Factory's advantage_aggregation: gdpo; docs/math.md). Needs at least two
    rewards with a non-zero weight."""
    null_control: bool = False
    """Shuffle each group's advantages among its samples before the update: same update size and noise, no
    reward signal. The control run of an over-optimization study (what drift alone does to the gold
    metrics)."""
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
    timestep_selection: TimestepSelection = "random"
    """Which SDE steps when num_train_timesteps is set: a seeded random subset per iteration (DanceGRPO) or
    the first ones (FlowGRPO's timestep_fraction)."""
    old_policy_sync_every: int = 1
    """Copy the policy into the old-policy snapshot every this many iterations (1: fully on-policy
    rollouts)."""
    ema_decay: Optional[float] = None
    """Keep an EMA of the trained weights with this decay, updated after every optimizer step; None: no
    EMA."""
    log_step_grad_norms: Optional[bool] = None
    """Log grad/norm_t{k}, the gradient norm each denoising step contributes (costs one gradient copy). null:
    on, except under DDP with several processes, where each step's rank-averaged gradient would need an
    all-reduce in every backward instead of one per optimizer step (true logs it there too, at that cost)."""

    def __post_init__(self) -> None:
        _require_choice("grpo.ratio_variant", self.ratio_variant, tuple(RATIO_VARIANTS))
        _require_number("grpo.clip_range", self.clip_range, minimum=0.0, strict=True)
        _require_choice("grpo.clip_range_unit", self.clip_range_unit, CLIP_RANGE_UNITS)
        if self.clip_range_unit == "log_prob" and self.clip_range >= 1:
            # The band [1 - c, 1 + c] would start at or below 0, where no ratio can go: negative-advantage
            # samples would never be clipped. A value this large is almost always a unit mistake.
            raise ValueError(
                f"grpo.clip_range={self.clip_range!r} with grpo.clip_range_unit='log_prob' must be < 1: the "
                "clip band [1 - c, 1 + c] would have a lower end <= 0 (published values: 1e-4 FlowGRPO, "
                "2e-6 GRPO-Guard)"
            )
        _require_number(
            "grpo.adv_clip_max",
            self.adv_clip_max,
            minimum=0.0,
            strict=True,
            allow_none=True,
            note=" (null: no clip)",
        )
        _require_choice("grpo.std_scope", self.std_scope, STD_SCOPES)
        _require_choice("grpo.reward_aggregation", self.reward_aggregation, REWARD_AGGREGATIONS)
        _require_number("grpo.kl_beta", self.kl_beta, minimum=0.0, note=" (0 = no KL penalty)")
        for name in ("num_inner_epochs", "gradient_accumulation_steps", "old_policy_sync_every"):
            _require_int(f"grpo.{name}", getattr(self, name), minimum=1)
        _require_int("grpo.minibatch_size", self.minibatch_size, minimum=1, allow_none=True)
        _require_int("grpo.num_train_timesteps", self.num_train_timesteps, minimum=1, allow_none=True)
        _require_choice("grpo.timestep_selection", self.timestep_selection, TIMESTEP_SELECTIONS)
        _require_number(
            "grpo.max_grad_norm",
            self.max_grad_norm,
            minimum=0.0,
            strict=True,
            allow_none=True,
            note=" (null: no clipping)",
        )
        if self.ema_decay is not None and not (_is_number(self.ema_decay) and 0.0 < self.ema_decay < 1.0):
            raise ValueError(f"grpo.ema_decay must be a number in (0, 1) or null, got {self.ema_decay!r}")

    @property
    def needs_reference(self) -> bool:
        return self.kl_beta > 0 or self.track_kl


def check_compatible(sampling: SamplingOptions, grpo: GRPOOptions) -> None:
    """Refuse combinations that are individually valid but meaningless together."""
    if sampling.noise_level == 0:
        if grpo.ratio_variant in VARIANCE_NORMALIZED_VARIANTS:
            raise ValueError(
                f"grpo.ratio_variant={grpo.ratio_variant!r} (RatioNorm) needs a Gaussian step with a "
                "variance term, but sampling.noise_level=0 makes every step a deterministic ODE step: set "
                "sampling.noise_level > 0 (e.g. 0.7)"
            )
        raise ValueError(
            "sampling.noise_level=0 makes every step deterministic: a policy gradient needs stochastic "
            "(SDE) steps; set sampling.noise_level > 0 (e.g. 0.7)"
        )
    start, end = sampling.sde_steps_range()
    steps = sampling.sde_steps_per_iteration()
    if grpo.num_train_timesteps is not None and grpo.num_train_timesteps > steps:
        where = (
            f"sampling.sde_window={[start, end]}"
            if sampling.sde_window_strategy == "fixed"
            else f"sampling.sde_window_size={steps}, the moving window's"
        )
        raise ValueError(
            f"grpo.num_train_timesteps={grpo.num_train_timesteps} must be <= {steps} (the SDE steps of "
            f"{where}) or null (all of them)"
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
                "faults.max_consecutive_nonfinite must be an integer >= 1, got "
                f"{self.max_consecutive_nonfinite!r}"
            )
        if not isinstance(self.reward_max_attempts, int) or self.reward_max_attempts < 1:
            raise ValueError(
                f"faults.reward_max_attempts must be an integer >= 1, got {self.reward_max_attempts!r}"
            )
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
