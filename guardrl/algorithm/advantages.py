"""Group-relative advantages (GRPO): each sample's reward against the other samples of its prompt.

Shape legend: B samples, G group size, N = B / G groups. Groups are contiguous: samples [g*G, (g+1)*G).
"""

from __future__ import annotations

import torch

STD_SCOPES = ("group", "global")


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
    if group_size < 2 or rewards_B.numel() % group_size != 0:
        raise ValueError(
            f"group_size={group_size} (data.group_size) must be >= 2 and divide the number of samples "
            f"({rewards_B.numel()}): every prompt contributes exactly group_size samples, and a "
            "group-relative advantage needs at least two of them"
        )
    if std_scope not in STD_SCOPES:
        raise ValueError(f"std_scope (grpo.std_scope) must be one of {STD_SCOPES}, got {std_scope!r}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip (grpo.adv_clip_max) must be > 0 or None (no clip), got {clip!r}")
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
