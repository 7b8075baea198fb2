"""The PPO-clipped policy loss over one denoising step, the KL to the reference policy, and clip-range units.

Per sample i at a trained step k (SPEC.md section 1):

    L_ik = delta_ik * max(-A_i r_ik, -A_i clip(r_ik, 1 - c, 1 + c)),   r = exp(log_ratio)

The module averages L over samples and trained steps. Shape legend: B samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from guardrl.sampling.sde import LOG_PROB_REDUCTIONS, reduce_elements

# "log_prob": clip_range is a band on the log-ratio exactly as computed, i.e. in the units of
#     log_prob_reduction (per element for "mean", the whole latent for "sum"). The reference configs'
#     numbers (1e-4 for FlowGRPO, 2e-6 for GRPO-Guard) are in this unit with "mean".
# "per_sqrt_element": clip_range is scaled by sqrt(D) (mean) or 1/sqrt(D) (sum) before use. For RatioNorm
#     the normalized log-ratio -(dmu . eps)/sqrt(D) has standard deviation RMS(dmu) over the noise, whatever
#     the resolution, so the same clip_range clips the same share of samples at 256 px and at 1024 px for the
#     same per-element policy change. (The "mean" unit shrinks that spread by 1/sqrt(D), "sum" grows it.)
CLIP_RANGE_UNITS = ("log_prob", "per_sqrt_element")


def effective_clip_range(clip_range: float, unit: str, reduction: str, num_elements: int) -> float:
    """The clip range in the units of the computed log-ratio.

    Example: SD3.5-M at 512 px has D = 16 * 64 * 64 = 65,536 latent elements, so the official GRPO-Guard
    clip of 2e-6 in the "log_prob" unit with "mean" reduction is 2e-6 * 256 = 5.12e-4 "per_sqrt_element".
    """
    if not (clip_range > 0 and math.isfinite(clip_range)):
        raise ValueError(f"clip_range (grpo.clip_range) must be a finite number > 0, got {clip_range!r}")
    if unit not in CLIP_RANGE_UNITS:
        raise ValueError(
            f"clip_range_unit (grpo.clip_range_unit) must be one of {CLIP_RANGE_UNITS}, got {unit!r}"
        )
    if reduction not in LOG_PROB_REDUCTIONS:
        raise ValueError(
            "log_prob_reduction (sampling.log_prob_reduction) must be one of "
            f"{LOG_PROB_REDUCTIONS}, got {reduction!r}"
        )
    if not num_elements >= 1:
        raise ValueError(f"num_elements (latent elements per sample) must be >= 1, got {num_elements!r}")
    if unit == "log_prob":
        effective = clip_range
    elif reduction == "mean":
        effective = clip_range / math.sqrt(num_elements)
    else:
        effective = clip_range * math.sqrt(num_elements)
    if effective >= 1:
        # The band [1 - c, 1 + c] would start at or below 0, where no ratio can go: negative-advantage
        # samples would never be clipped. Only the combination of the four settings shows this.
        raise ValueError(
            f"grpo.clip_range={clip_range!r} with grpo.clip_range_unit={unit!r}, sampling.log_prob_reduction="
            f"{reduction!r} and D={num_elements} latent elements gives a clip range of {effective:g}: it "
            "must be < 1, or the clip band [1 - c, 1 + c] has a lower end <= 0"
        )
    return effective


@dataclass
class LossStats:
    """Detached per-sample diagnostics of one loss evaluation (B,)."""

    ratio: torch.Tensor
    clipped_upper: torch.Tensor  # bool: ratio > 1 + c
    clipped_lower: torch.Tensor  # bool: ratio < 1 - c
    approx_kl: torch.Tensor  # (r - 1) - log r >= 0, an estimator of KL(old || new) (Schulman 2020)


def clipped_policy_loss(
    log_ratio_B: torch.Tensor,
    advantages_B: torch.Tensor,
    weight_B: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, LossStats]:
    """Mean over samples of delta * max(-A r, -A clip(r, 1 - c, 1 + c)); returns (loss, detached stats).

    Args:
        log_ratio_B: (B,) the variant's log-ratio (carries the gradient).
        advantages_B: (B,) group advantages (no gradient).
        weight_B: (B,) the variant's loss weight delta (no gradient).
        clip_range: c, in the units of log_ratio_B (see `effective_clip_range`).
    """
    if not (clip_range > 0 and math.isfinite(clip_range)):
        raise ValueError(
            f"clip_range (the effective grpo.clip_range) must be a finite number > 0, got {clip_range!r}"
        )
    if not (log_ratio_B.shape == advantages_B.shape == weight_B.shape) or log_ratio_B.ndim != 1:
        raise ValueError(
            "log_ratio, advantages and weight must all have the same shape (B,), got "
            f"{tuple(log_ratio_B.shape)}, {tuple(advantages_B.shape)} and {tuple(weight_B.shape)}"
        )
    ratio = torch.exp(log_ratio_B)
    advantages = advantages_B.to(ratio.dtype)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = (weight_B.to(ratio.dtype) * torch.maximum(unclipped, clipped)).mean()
    with torch.no_grad():
        stats = LossStats(
            ratio=ratio.detach(),
            clipped_upper=ratio.detach() > 1.0 + clip_range,
            clipped_lower=ratio.detach() < 1.0 - clip_range,
            approx_kl=(ratio - 1.0 - log_ratio_B).detach(),
        )
    return loss, stats


def clip_shares(
    clipped_upper_B: torch.Tensor, clipped_lower_B: torch.Tensor, advantages_B: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The clip statistics every report uses (callbacks, benchmarks), from `LossStats`' flags, so that the
    loss and its reports cannot disagree about which samples were clipped. Float64 scalars:

        pos_upper     share of positive-advantage samples with r > 1 + c (the loss is flat there: no gradient)
        neg_lower     share of negative-advantage samples with r < 1 - c (likewise)
        outside_band  share of all samples with r outside [1 - c, 1 + c], whatever their advantage's sign

    A share of an empty set (no positive advantages, say) is 0: nothing was there to clip.
    """
    upper, lower = clipped_upper_B.bool(), clipped_lower_B.bool()
    positive, negative = advantages_B > 0, advantages_B < 0

    def share(selected: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
        return selected.sum().double() / among.sum().clamp(min=1).double()

    return {
        "pos_upper": share(upper & positive, positive),
        "neg_lower": share(lower & negative, negative),
        "outside_band": share(upper | lower, torch.ones_like(upper)),
    }


def kl_to_reference(
    mean_theta: torch.Tensor, mean_ref: torch.Tensor, std_B: torch.Tensor, reduction: str
) -> torch.Tensor:
    """KL(p_theta(. | x_t) || p_ref(. | x_t)) of one Gaussian step, per sample: (B,).

    Both steps share the covariance s^2 I, so the KL is exactly ||mu_theta - mu_ref||^2 / (2 s^2) nats
    ("sum"), or that divided by the D latent elements (nats per element, "mean"). Unlike FlowGRPO's
    implementation it keeps dt inside s (its beta is therefore on a different scale, see docs/math.md).
    """
    s = std_B.to(mean_theta.dtype).reshape(-1, *([1] * (mean_theta.ndim - 1)))
    return reduce_elements((mean_theta - mean_ref) ** 2 / (2.0 * s**2), reduction)
