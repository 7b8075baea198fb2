"""One denoising step of a rectified flow, as a Gaussian policy, and its log-probability.

Notation (SPEC.md section 1): x_t = (1 - t) x_0 + t * noise, the model predicts v = noise - x_0,
dt = t_next - t < 0. A stochastic step is x_next = mu + s * eps with eps ~ N(0, I), s = sigma_k sqrt(|dt|).

The mean. The reverse-time SDE with diffusion coefficient sigma_k (Song et al. 2021, "Score-Based Generative
Modeling through SDEs", eq. 6) keeps the marginals of the flow ODE when its drift is
v - sigma_k^2 / 2 * score. For rectified flow the score is -(x - (1 - t) x0_hat) / t^2 with
x0_hat = x - t v, i.e. score = -(x + (1 - t) v) / t, so the Euler-Maruyama mean is

    mu = x + [v + sigma_k^2 / (2 t) * (x + (1 - t) v)] * dt.

FlowGRPO writes exactly this. DanceGRPO writes `mu = x + v dt - 0.5 eta^2 score dt` with the same score
(`flux_step` in its `train_grpo_flux.py`), which is the same expression with sigma_k = eta; the two forms
differ only in sigma_k (see `schedules.noise_scales`). With sigma_k = 0 the mean is the Euler (ODE) step.

CPS, coefficient-preserving sampling (Wang & Yu 2025, arXiv 2509.05952; `sde_type="cps"`). Not an
Euler-Maruyama step: it re-mixes the step's estimates x0_hat = x - t v and eps_hat = x + (1 - t) v so that
x_next keeps the coefficients of x_t_next = (1 - t_next) x0 + t_next * noise, with a part of the noise fresh:

    s  = t_next * sin(eta * pi / 2)
    mu = x0_hat (1 - t_next) + eps_hat sqrt(t_next^2 - s^2),   x_next = mu + s * eps.

Read in the `sde_type == 'cps'` branch of `sde_step_with_logprob` in flow_grpo's
flow_grpo/diffusers_patch/sd3_sde_with_logprob.py (github.com/yifan123/flow_grpo, commit 54809b5f) and in
FlowCPS's commit 814c3597 (github.com/IamCreateAI/FlowCPS) of the same file. guardrl writes the same mean as
the Euler step minus a shrink of the noise estimate (`cps_mean`), and its log-probability is the true
Gaussian one with variance s^2 (flow_grpo's CPS branch keeps only -(x_next - mu)^2; docs/math.md, "CPS
step", says what that changes).

All of this runs in float32 or wider: the log-probability's quadratic term divides by s^2, which at the
low-noise steps is ~1e-3, and bf16 inputs would put the rounding error of x_next - mu above the signal.

Shape legend: B samples; "elements" = every non-batch dim (C, H, W or packed Flux tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SDE_TYPES = ("flow_grpo", "dance_grpo", "cps")
LOG_PROB_REDUCTIONS = ("mean", "sum")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or a (B,) tensor against a (B, ...) tensor."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.ndim == 0:
        return value
    return value.reshape(value.shape[0], *([1] * (like.ndim - 1)))


def reduce_elements(values_B: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum or average over every non-batch dim: (B, ...) -> (B,)."""
    if reduction not in LOG_PROB_REDUCTIONS:
        raise ValueError(
            "log_prob_reduction (sampling.log_prob_reduction) must be one of "
            f"{LOG_PROB_REDUCTIONS}, got {reduction!r}"
        )
    dims = tuple(range(1, values_B.ndim))
    if not dims:
        return values_B
    return values_B.sum(dim=dims) if reduction == "sum" else values_B.mean(dim=dims)


def ode_step(velocity: torch.Tensor, x: torch.Tensor, dt: float | torch.Tensor) -> torch.Tensor:
    """The deterministic Euler step x + v dt."""
    return x + _per_sample(dt, x) * velocity


def sde_mean(
    velocity: torch.Tensor,
    x: torch.Tensor,
    t: float | torch.Tensor,
    dt: float | torch.Tensor,
    noise_scale: float | torch.Tensor,
) -> torch.Tensor:
    """mu = x + [v + sigma_k^2 / (2t) (x + (1 - t) v)] dt; equals `ode_step` when sigma_k = 0."""
    t_, dt_, sk = (_per_sample(a, x) for a in (t, dt, noise_scale))
    return x + (velocity + sk**2 / (2.0 * t_) * (x + (1.0 - t_) * velocity)) * dt_


def cps_mean(
    velocity: torch.Tensor,
    x: torch.Tensor,
    t: float | torch.Tensor,
    t_next: float | torch.Tensor,
    noise_scale: float | torch.Tensor,
) -> torch.Tensor:
    """CPS's mean x0_hat (1 - t_next) + eps_hat sqrt(t_next^2 - s^2), with s = t_next * c, c = noise_scale.

    c = sin(eta pi / 2) in [0, 1] (`schedules.noise_scales`). Written, with the same value, as

        mu    = x + v dt - delta * eps_hat
        delta = t_next - sqrt(t_next^2 - s^2) = t_next c^2 / (1 + sqrt(1 - c^2))

    because (1) c = 0 gives delta = 0, so the mean is `ode_step`'s x + v dt exactly; (2) the right-hand form
    of delta has no cancellation at small s and no 0/0 at t_next = 0 (the last step); (3) it shows CPS next
    to the FlowGRPO SDE, whose mean is the Euler step minus s^2 / (2 t) * eps_hat, while
    delta = s^2 / (2 t_next) + O(s^4).
    """
    t_, tn, c = (_per_sample(a, x) for a in (t, t_next, noise_scale))
    shrink = tn * c**2 / (1.0 + torch.sqrt(1.0 - c**2))
    return x + (tn - t_) * velocity - shrink * (x + (1.0 - t_) * velocity)


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor, reduction: str
) -> torch.Tensor:
    """log N(x; mean, std^2 I), element-wise then summed or averaged per sample: (B, ...) -> (B,).

    With reduction="sum" this is the exact log-density of the step; with "mean" it is that divided by the
    number of elements D, the form the public FlowGRPO/DanceGRPO implementations use.
    """
    std_ = _per_sample(std, x)
    elementwise = -((x - mean) ** 2) / (2.0 * std_**2) - torch.log(std_) - _HALF_LOG_2PI
    return reduce_elements(elementwise, reduction)


def step_mean_and_std(
    velocity: torch.Tensor,
    x: torch.Tensor,
    t: float | torch.Tensor,
    t_next: float | torch.Tensor,
    noise_scale: float | torch.Tensor,
    *,
    sde_type: str = "flow_grpo",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian step's mean mu and per-sample std s, in x's dtype: the one place the SDE type is chosen.

    "flow_grpo" and "dance_grpo": `sde_mean`, s = sigma_k sqrt(|dt|) with sigma_k = noise_scale.
    "cps": `cps_mean`, s = t_next * c with c = noise_scale = sin(eta pi / 2).
    The rollout and the update both call this, with the same t, t_next, noise_scale and sde_type, so that a
    policy whose weights did not change reproduces the rollout's mu bit for bit (and the ratio is exactly 1).
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type (sampling.sde_type) must be one of {SDE_TYPES}, got {sde_type!r}")
    velocity = velocity.to(x.dtype)
    t_ = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    t_next_ = torch.as_tensor(t_next, dtype=x.dtype, device=x.device)
    sk = torch.as_tensor(noise_scale, dtype=x.dtype, device=x.device)
    if sde_type == "cps":
        std = t_next_ * sk
        return cps_mean(velocity, x, t_, t_next_, sk), (std if std.ndim else std.expand(x.shape[0]))
    dt = t_next_ - t_
    mean = sde_mean(velocity, x, t_, dt, sk)
    std = (sk * dt.abs().sqrt()).expand(x.shape[0]) if sk.ndim == 0 and dt.ndim == 0 else sk * dt.abs().sqrt()
    return mean, std


@dataclass
class StepOutput:
    next_latents: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor  # (B,) s: sigma_k sqrt(|dt|), or t_next sin(eta pi / 2) for CPS
    log_prob: torch.Tensor | None  # (B,); None for a deterministic step (s = 0 has no density)


def sde_step(
    velocity: torch.Tensor,
    x: torch.Tensor,
    t: float | torch.Tensor,
    t_next: float | torch.Tensor,
    noise_scale: float | torch.Tensor,
    reduction: str = "mean",
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    sample_dtype: torch.dtype | None = None,
    *,
    sde_type: str = "flow_grpo",
) -> StepOutput:
    """One stochastic step x_t -> x_next with its log-probability.

    Args:
        velocity: (B, ...) the model's v at (x, t); upcast to x's dtype (float32 or float64).
        x: (B, ...) x_t.
        t, t_next: sigmas of the step (scalars or (B,)).
        noise_scale: sigma_k (CPS: sin(eta pi / 2)); 0 gives the Euler step and no log-probability, and so
            does a CPS step onto t_next = 0 (its s = t_next * noise_scale is 0).
        noise: eps, if given (tests); otherwise drawn from `generator`.
        sample_dtype: round x_next to this dtype (kept in x's dtype) BEFORE its log-probability, so that a
            trajectory stored in that dtype holds exactly the sample the log-probability is of.
        sde_type: one of SDE_TYPES (sampling.sde_type), passed on to `step_mean_and_std`.
    """
    mean, std = step_mean_and_std(velocity, x, t, t_next, noise_scale, sde_type=sde_type)
    if bool((std == 0).all()):
        next_latents = mean if sample_dtype is None else mean.to(sample_dtype).to(x.dtype)
        return StepOutput(next_latents=next_latents, mean=mean, std=std, log_prob=None)
    if noise is None:
        device = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    next_latents = mean + _per_sample(std, x) * noise
    if sample_dtype is not None:
        next_latents = next_latents.to(sample_dtype).to(x.dtype)
    return StepOutput(
        next_latents=next_latents,
        mean=mean,
        std=std,
        log_prob=gaussian_log_prob(next_latents, mean, std, reduction),
    )
