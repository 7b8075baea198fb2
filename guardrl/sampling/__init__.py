"""Pure sampling math: schedules, SDE/ODE steps with log-probabilities, the rollout loop. No Lightning."""

from guardrl.sampling.rollout import sample_rollouts
from guardrl.sampling.schedules import flow_match_sigmas, noise_scales
from guardrl.sampling.sde import (
    LOG_PROB_REDUCTIONS,
    SDE_TYPES,
    StepOutput,
    cps_mean,
    gaussian_log_prob,
    ode_step,
    reduce_elements,
    sde_mean,
    sde_step,
    step_mean_and_std,
)
from guardrl.sampling.windows import WINDOW_STRATEGIES, sde_window_at

__all__ = [
    "LOG_PROB_REDUCTIONS",
    "SDE_TYPES",
    "WINDOW_STRATEGIES",
    "StepOutput",
    "cps_mean",
    "flow_match_sigmas",
    "gaussian_log_prob",
    "noise_scales",
    "ode_step",
    "reduce_elements",
    "sample_rollouts",
    "sde_mean",
    "sde_step",
    "sde_window_at",
    "step_mean_and_std",
]
