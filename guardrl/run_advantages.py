"""The advantages of one iteration (SPEC.md section 2, step 3), from the rewards GRPOModule.training_step
scored: group-normalised weighted sum, or GDPO (each reward normalised first); local to the rank, or over
every rank's samples where the statistic needs them; then the null control's permutation.

Functions take the module for its options, rewards, rank and `all_gather` (as update.py does), so that
module.py stays the iteration's orchestration. The math is guardrl/algorithm/advantages.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from guardrl.algorithm import gdpo_advantages, group_advantages, shuffle_within_groups

if TYPE_CHECKING:
    from guardrl.module import GRPOModule


def iteration_advantages(
    module: GRPOModule, rewards: torch.Tensor, per_reward: dict[str, torch.Tensor], dropped_N: torch.Tensor
) -> torch.Tensor:
    """This rank's advantages (B,) of the weighted reward sum `rewards` (dropped groups already zeroed) or,
    with grpo.reward_aggregation gdpo, of the per-reward scores."""
    grpo, group_size = module.grpo, module.group_size
    this_rank = slice(module.global_rank * rewards.numel(), (module.global_rank + 1) * rewards.numel())
    if grpo.reward_aggregation == "gdpo":
        # One row per reward, in model.rewards' order (the weights' order). GDPO's last step divides by the
        # std over every rank's samples, so with several ranks it needs them all, whatever std_scope says;
        # gathered rank after rank, the groups stay whole and rank r's samples are the r-th slice.
        scores_KB = torch.stack([per_reward[reward.name] for reward in module.rewards])
        if module.trainer.world_size > 1:
            scores_KB = module.all_gather(scores_KB).permute(1, 0, 2).reshape(scores_KB.shape[0], -1)
            dropped_N = module.all_gather(dropped_N.to(scores_KB.dtype)).reshape(-1) > 0
        weights_K = [reward.weight for reward in module.rewards]
        advantages = gdpo_advantages(
            scores_KB, weights_K, group_size, grpo.std_scope, clip=grpo.adv_clip_max, dropped_N=dropped_N
        )
        return advantages[this_rank]
    # Groups never span ranks, so group statistics are local; the global std needs every rank's rewards.
    if grpo.std_scope == "global" and module.trainer.world_size > 1:
        gathered = module.all_gather(rewards).reshape(-1)
        return group_advantages(gathered, group_size, "global", clip=grpo.adv_clip_max)[this_rank]
    return group_advantages(rewards, group_size, grpo.std_scope, clip=grpo.adv_clip_max)


def null_control(module: GRPOModule, advantages: torch.Tensor) -> torch.Tensor:
    """grpo.null_control: advantages permuted within each group (keyed by iteration and rank, so a resumed run
    draws the same permutation); without it, the advantages unchanged."""
    if not module.grpo.null_control:
        return advantages
    seed = module.iteration_seed(module.num_iterations, module.global_rank, 0xC0)
    return shuffle_within_groups(advantages, module.group_size, torch.Generator().manual_seed(seed))
