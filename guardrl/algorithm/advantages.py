"""Group-relative advantages (GRPO): each sample's reward against the other samples of its prompt.

Shape legend: B samples, G group size, N = B / G groups. Groups are contiguous: samples [g*G, (g+1)*G).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

STD_SCOPES = ("group", "global")
# How several rewards become one advantage (grpo.reward_aggregation): "weighted_sum" normalises the weighted
# sum of the raw rewards (group_advantages of the total); "gdpo" normalises each reward on its own first
# (gdpo_advantages).
REWARD_AGGREGATIONS = ("weighted_sum", "gdpo")


def group_advantages(
    rewards_B: torch.Tensor,
    group_size: int,
    std_scope: str = "group",
    eps: float = 1e-4,
    clip: float | None = 5.0,
) -> torch.Tensor:
    """A_i = (r_i - mean_group(r)) / (std + eps), clipped to [-clip, clip].

    Args:
        rewards_B: (B,) rewards; B must be a multiple of group_size.
        std_scope: "group" divides by each group's std (FlowGRPO's per-prompt tracker with
            global_std=False, the GRPO-Guard configs); "global" by the std of all B rewards.
        eps: added to the std, as the reference implementations do (1e-4).
        clip: advantage clip (FlowGRPO: 5); None disables it.

    A group whose rewards are all equal carries no preference and gets exactly zero advantage (computed
    as r - mean, its rounding error divided by eps would otherwise give values of order 1e-13 * 1e4).
    """
    if rewards_B.ndim != 1:
        raise ValueError(f"rewards must have shape (B,), one per sample, got {tuple(rewards_B.shape)}")
    _check_groups(rewards_B.numel(), group_size, std_scope, clip)
    rewards_NG = rewards_B.reshape(-1, group_size)
    centered_NG = rewards_NG - rewards_NG.mean(dim=1, keepdim=True)
    if std_scope == "group":
        std_N1 = rewards_NG.std(dim=1, unbiased=False, keepdim=True)
    else:
        std_N1 = rewards_B.std(unbiased=False).expand(rewards_NG.shape[0], 1)
    advantages_NG = centered_NG / (std_N1 + eps)
    constant_group_N1 = (rewards_NG == rewards_NG[:, :1]).all(dim=1, keepdim=True)
    advantages_NG = advantages_NG.masked_fill(constant_group_N1, 0.0)
    if clip is not None:
        advantages_NG = advantages_NG.clamp(-clip, clip)
    return advantages_NG.reshape(-1)


def _check_groups(num_samples: int, group_size: int, std_scope: str, clip: float | None) -> None:
    if group_size < 2 or num_samples % group_size != 0:
        raise ValueError(
            f"group_size={group_size} (data.group_size) must be >= 2 and divide the number of samples "
            f"({num_samples}): every prompt contributes exactly group_size samples, and a "
            "group-relative advantage needs at least two of them"
        )
    if std_scope not in STD_SCOPES:
        raise ValueError(f"std_scope (grpo.std_scope) must be one of {STD_SCOPES}, got {std_scope!r}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip (grpo.adv_clip_max) must be > 0 or None (no clip), got {clip!r}")


def gdpo_advantages(
    rewards_KB: torch.Tensor,
    weights_K: Sequence[float],
    group_size: int,
    std_scope: str = "group",
    eps: float = 1e-4,
    clip: float | None = 5.0,
    dropped_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """GDPO (group reward-decoupled normalisation): each of K rewards normalised within its group on its own,
    then the weighted sum of those normalised by its std over the batch, then clipped:

        A_ki = group_advantages(r_k)_i        (r_ki - mean_group(r_k)) / (std(r_k) + eps), no clip
        S_i  = sum_k w_k A_ki
        A_i  = S_i / (std_batch(S) + eps), clipped to [-clip, clip]

    Summing raw rewards lets the reward with the widest spread decide every sample's rank; normalising each
    reward first gives every reward the same say, in proportion to its weight. The batch step keeps the
    advantages at unit scale whatever the number of rewards and their weights (only the weights' ratios
    matter). This is Flow-Factory's `advantage_aggregation: gdpo` (X-GenGroup/Flow-Factory,
    src/flow_factory/advantage/advantage_processor.py, `compute_gdpo`, commit a0b2bc5a; its
    `adv_clip_range` clamps in the loss, as `clip` here) with three differences, documented in docs/math.md:
    std + eps where Flow-Factory divides by max(std, 1e-6), as group_advantages; std_scope applies to the
    per-reward step ("group": each group's std of r_k, Flow-Factory's only form; "global": r_k's std over the
    whole batch); and the batch mean is not subtracted: every group's A_k sums to zero, so S's mean is zero
    up to rounding, and subtracting that rounding would turn a constant group's exact 0 into ~1e-17.

    Args:
        rewards_KB: (K, B) scores, one row per reward, B a multiple of group_size; every rank's samples when
            the run has several ranks (the batch statistics span them; groups never do).
        weights_K: the K rewards' weights (Reward.weight).
        std_scope, eps, clip: as group_advantages.
        dropped_N: (N,) bool, groups left out (a non-finite reward): their advantages are exactly 0 and their
            scores (which may be NaN) enter no statistic. None: every group is kept.

    A reward that is constant within a group contributes 0 to that group (not NaN); a group constant in every
    reward gets exactly 0.
    """
    if rewards_KB.ndim != 2 or rewards_KB.shape[0] != len(weights_K) or rewards_KB.shape[0] < 1:
        raise ValueError(
            f"rewards must have shape (K, B), one row per reward and K = {len(weights_K)} (one weight each) "
            f">= 1, got {tuple(rewards_KB.shape)}"
        )
    _check_groups(rewards_KB.shape[1], group_size, std_scope, clip)
    num_rewards, num_groups = rewards_KB.shape[0], rewards_KB.shape[1] // group_size
    rewards_KNG = rewards_KB.reshape(num_rewards, num_groups, group_size)
    if dropped_N is None:
        dropped_N = torch.zeros(num_groups, dtype=torch.bool, device=rewards_KB.device)
    if dropped_N.shape != (num_groups,) or dropped_N.dtype != torch.bool:
        raise ValueError(
            f"dropped_N must be a bool tensor of shape ({num_groups},), one per group, got "
            f"{dropped_N.dtype} {tuple(dropped_N.shape)}"
        )
    advantages_NG = torch.zeros_like(rewards_KNG[0])
    kept_N = ~dropped_N
    if not bool(kept_N.any()):
        return advantages_NG.reshape(-1)
    # Statistics over the kept groups only, so that a dropped group's zeros (or NaNs) shift no std.
    kept_KB = rewards_KNG[:, kept_N].reshape(num_rewards, -1)
    per_reward = [
        group_advantages(kept_KB[k], group_size, std_scope, eps, clip=None) for k in range(num_rewards)
    ]
    combined = sum((w * a for w, a in zip(weights_K, per_reward)), torch.zeros_like(per_reward[0]))
    kept = combined / (combined.std(unbiased=False) + eps)
    if clip is not None:
        kept = kept.clamp(-clip, clip)
    advantages_NG[kept_N] = kept.reshape(-1, group_size)
    return advantages_NG.reshape(-1)


def shuffle_within_groups(
    advantages_B: torch.Tensor, group_size: int, generator: torch.Generator
) -> torch.Tensor:
    """The null control: each group's advantages permuted among its own samples.

    Every group keeps exactly its set of advantage values (same mean, spread and clip statistics, so the
    update has the same size and noise) but they no longer follow the reward, so a run trained on them
    measures what the update noise alone does to the model. A proxy that rises only in the real run, and a
    gold metric that falls in both, separates reward hacking from drift.
    """
    if advantages_B.ndim != 1 or group_size < 1 or advantages_B.numel() % group_size:
        raise ValueError(
            f"advantages of shape {tuple(advantages_B.shape)} cannot be split into groups of {group_size}"
        )
    advantages_NG = advantages_B.reshape(-1, group_size)
    keys_NG = torch.rand(advantages_NG.shape, generator=generator, device=generator.device)
    order_NG = keys_NG.argsort(dim=1).to(advantages_NG.device)
    return advantages_NG.gather(1, order_NG).reshape(-1)
