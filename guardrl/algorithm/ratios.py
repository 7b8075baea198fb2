"""The importance ratio of one Gaussian denoising step, in the five forms of the GRPO-Guard ablation.

Paper: Wang et al. 2025, "GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via Regulated
Clipping", arXiv 2510.22319, section 4 and its ablation table. Notation (SPEC.md):

    x_next = mu_old + s * eps,   dmu = mu_old - mu_theta,   s = sigma_k sqrt(|dt|)
    log r  = log p_theta(x_next) - log p_old(x_next) = -||dmu||^2 / (2 s^2) - (dmu . eps) / s

E[log r] = -||dmu||^2 / (2 s^2) < 0: the left shift that keeps positive-advantage samples out of the upper
clip. Every variant is one function `(RatioTerms) -> PolicyRatio`; the config picks it by name from
RATIO_VARIANTS. A new variant is a new function here, never a copy of the training loop.

The correction ||dmu||^2 / (2 s^2) is computed per sample (the paper's identity). The official release
reduces it to one batch-wide scalar through `mean(dim=())`; that is unbiased over the batch but not per
sample.

Reductions: with "sum" the terms are the exact Gaussian quantities; with "mean" (the public implementations'
per-element mean) every term is divided by D, the number of latent elements.

Shape legend: B samples; "elements" = every non-batch dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from guardrl.sampling.sde import reduce_elements


@dataclass
class RatioTerms:
    """The per-sample pieces every variant is built from, all (B,), in the chosen reduction."""

    raw_log_ratio: torch.Tensor  # log r = -||dmu||^2/(2s^2) - (dmu . eps)/s
    mean_shift: torch.Tensor  # ||dmu||^2 / (2 s^2), the correction term (>= 0)
    normalized_log_ratio: torch.Tensor  # s * (log r + mean_shift) = -(dmu . eps)
    std: torch.Tensor  # s
    dt: torch.Tensor  # t_next - t (< 0)


@dataclass
class PolicyRatio:
    log_ratio: torch.Tensor  # (B,) the log-ratio that is exponentiated and clipped
    weight: torch.Tensor  # (B,) delta, the per-sample loss weight


def _per_sample(value_B: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value_B.reshape(value_B.shape[0], *([1] * (like.ndim - 1)))


def compute_ratio_terms(
    next_latents: torch.Tensor,
    mean_old: torch.Tensor,
    mean_theta: torch.Tensor,
    std_B: torch.Tensor,
    dt_B: torch.Tensor,
    reduction: str,
) -> RatioTerms:
    """Build the ratio pieces from the stored sample, the stored old mean and the recomputed mean.

    Written without subtracting two full log-densities: their large constant parts cancel exactly in
    theory, and in float32 the cancellation error would dominate a log-ratio of 1e-6 (the clip ranges the
    reference configs use are 2e-6 to 1e-4). Gradients flow through `mean_theta` only.
    """
    if not bool((std_B > 0).all()):
        raise ValueError(
            "the importance ratio needs a Gaussian step with a variance term (s > 0 on every trained step); "
            f"got s = {std_B.tolist()}: train only SDE steps (sampling.sde_window) with "
            "sampling.noise_level > 0"
        )
    s = _per_sample(std_B.to(mean_theta.dtype), mean_theta)
    noise = (next_latents - mean_old) / s  # eps, exactly as drawn by the rollout (up to rounding)
    delta_mean = mean_old - mean_theta  # dmu
    mean_shift = reduce_elements(delta_mean**2 / (2.0 * s**2), reduction)
    cross = reduce_elements(delta_mean * noise, reduction)  # dmu . eps
    return RatioTerms(
        raw_log_ratio=-mean_shift - cross / std_B.to(cross.dtype),
        mean_shift=mean_shift,
        normalized_log_ratio=-cross,
        std=std_B.to(cross.dtype),
        dt=dt_B.to(cross.dtype),
    )


def flow_grpo_ratio(terms: RatioTerms) -> PolicyRatio:
    """Baseline (FlowGRPO, DanceGRPO): log r as is, unit weight."""
    return PolicyRatio(terms.raw_log_ratio, torch.ones_like(terms.raw_log_ratio))


def temp_reweight_ratio(terms: RatioTerms) -> PolicyRatio:
    """log r as is, loss weight s = sigma_k sqrt(|dt|) (TempFlowGRPO-style noise-aware weight)."""
    return PolicyRatio(terms.raw_log_ratio, terms.std)


def mean_revised_ratio(terms: RatioTerms) -> PolicyRatio:
    """log r + ||dmu||^2 / (2 s^2): the mean shift removed, the step-dependent spread kept."""
    return PolicyRatio(terms.raw_log_ratio + terms.mean_shift, torch.ones_like(terms.raw_log_ratio))


def ratio_norm_ratio(terms: RatioTerms) -> PolicyRatio:
    """RatioNorm: s * (log r + ||dmu||^2 / (2 s^2)) = -(dmu . eps), centred at 0 with an s-free spread."""
    return PolicyRatio(terms.normalized_log_ratio, torch.ones_like(terms.raw_log_ratio))


def grpo_guard_ratio(terms: RatioTerms) -> PolicyRatio:
    """GRPO-Guard: RatioNorm plus the 1/|dt| gradient reweight that levels gradient scale across steps."""
    return PolicyRatio(terms.normalized_log_ratio, 1.0 / terms.dt.abs())


RATIO_VARIANTS: dict[str, Callable[[RatioTerms], PolicyRatio]] = {
    "flow_grpo": flow_grpo_ratio,
    "temp_reweight": temp_reweight_ratio,
    "mean_revised": mean_revised_ratio,
    "ratio_norm": ratio_norm_ratio,
    "grpo_guard": grpo_guard_ratio,
}

# Variants whose log-ratio is rescaled by s: they are only defined for a Gaussian step with a variance term.
VARIANCE_NORMALIZED_VARIANTS = ("ratio_norm", "grpo_guard")
