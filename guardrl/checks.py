"""Checks that span several objects, so no single constructor can make them (docs/errors.md lists them all).

Each raises a ValueError that names the option as a config writes it, the value, and what is allowed.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy

from guardrl.options import GRPOOptions

# Lightning's sharded strategies: FSDP (FSDP1) and ModelParallelStrategy (FSDP2 / tensor parallel).
SHARDED_STRATEGIES = (FSDPStrategy, ModelParallelStrategy)


def check_group_size(group_size: int, option: str = "model.group_size (linked from data.group_size)") -> None:
    """A group-relative advantage compares each sample with the others of its prompt: it needs two or more."""
    if not (isinstance(group_size, int) and not isinstance(group_size, bool) and group_size >= 2):
        raise ValueError(
            f"{option} must be an integer >= 2: a group-relative advantage compares each sample with the "
            f"other samples of its prompt, so a group needs at least two; got {group_size!r}"
        )


def check_rewards(rewards: Sequence) -> None:
    """At least one reward, and distinct names: scores are kept and logged (`reward/<name>/mean`) by name, so
    two rewards with one name would overwrite each other's score and curve."""
    if not rewards:
        raise ValueError(
            f"model.rewards must list at least one reward (e.g. guardrl.rewards.JpegCompressibility), "
            f"got {list(rewards)!r}"
        )
    first_of: dict[str, int] = {}
    for index, reward in enumerate(rewards):
        name = reward.name
        if name in first_of:
            other = first_of[name]
            raise ValueError(
                f"model.rewards[{other}] ({type(rewards[other]).__name__}) and model.rewards[{index}] "
                f"({type(reward).__name__}) are both named {name!r}: reward names must be distinct, since "
                f"scores and logs (reward/<name>/mean) are kept by name; set init_args.name on one of them "
                f"(e.g. name: {name}_{index})"
            )
        first_of[name] = index
    weights = [getattr(reward, "weight", 1.0) for reward in rewards]
    if all(weight == 0 for weight in weights):
        raise ValueError(
            f"model.rewards: every reward has weight 0 ({', '.join(r.name for r in rewards)}): the total "
            "reward is 0 for every sample and nothing would be learned; give at least one reward a non-zero "
            "weight"
        )
    for reward, weight in zip(rewards, weights):
        if weight == 0:
            warnings.warn(
                f"model.rewards: {reward.name!r} has weight 0: it is scored and logged "
                f"(reward/{reward.name}/mean) but does not enter the total reward the policy is trained on",
                stacklevel=2,
            )


def check_reward_aggregation(aggregation: str, rewards: Sequence) -> None:
    """grpo.reward_aggregation "gdpo" normalises each reward on its own before their weighted sum: with fewer
    than two rewards that count (a non-zero weight) there is nothing to aggregate, and the run would silently
    train GRPO on one reward with an extra batch normalisation."""
    if aggregation != "gdpo":
        return
    counted = [reward.name for reward in rewards if getattr(reward, "weight", 1.0) != 0]
    if len(counted) < 2:
        raise ValueError(
            f"grpo.reward_aggregation='gdpo' needs at least two rewards with a non-zero weight in "
            f"model.rewards, got {len(counted)} ({', '.join(counted) or 'none'}): GDPO normalises each "
            "reward on its own before their weighted sum. Allowed: add a reward, or use "
            "grpo.reward_aggregation='weighted_sum' (the default) for one reward"
        )


def check_batch_sizes(
    grpo: GRPOOptions, prompts_per_batch: int, group_size: int, rollout_chunks: int = 1
) -> None:
    """The rank's batch must split into whole minibatches, and those into whole optimizer steps; its prompt
    groups into whole rollout chunks."""
    if prompts_per_batch % rollout_chunks:
        divisors = [d for d in range(1, prompts_per_batch + 1) if prompts_per_batch % d == 0]
        raise ValueError(
            f"performance.rollout_chunks={rollout_chunks} must divide "
            f"data.prompts_per_batch={prompts_per_batch} (a chunk holds whole prompt groups): "
            f"allowed {divisors}"
        )
    batch = prompts_per_batch * group_size
    minibatch = grpo.minibatch_size or batch
    if batch % minibatch:
        divisors = [d for d in range(1, batch + 1) if batch % d == 0]
        raise ValueError(
            f"grpo.minibatch_size={minibatch} must divide the rank's batch of {batch} samples "
            f"(data.prompts_per_batch={prompts_per_batch} * data.group_size={group_size}): "
            f"allowed {divisors} or null (the whole batch)"
        )
    updates = grpo.num_inner_epochs * (batch // minibatch)
    if updates % grpo.gradient_accumulation_steps:
        divisors = [d for d in range(1, updates + 1) if updates % d == 0]
        raise ValueError(
            f"grpo.gradient_accumulation_steps={grpo.gradient_accumulation_steps} must divide the {updates} "
            f"minibatch updates of an iteration (grpo.num_inner_epochs={grpo.num_inner_epochs} * "
            f"{batch} samples / grpo.minibatch_size={minibatch}): allowed {divisors}"
        )


def check_optimizer_for_strategy(optimizer, strategy: Strategy) -> None:
    """Refuse bitsandbytes (8-bit) optimizers under FSDP / FSDP2.

    bitsandbytes keeps each parameter's quantized state as plain tensors and runs its kernels on plain
    tensors; sharded strategies hand the optimizer DTensor (FSDP2) or flattened (FSDP) shards, and their
    sharded checkpoints do not cover that state. guardrl does not shard 8-bit optimizer state (yet), so the
    combination is refused before the first step rather than failing inside a kernel or a checkpoint.
    """
    if isinstance(optimizer, LightningOptimizer):
        optimizer = optimizer.optimizer
    optimizer_class = type(optimizer)
    module = optimizer_class.__module__ or ""
    if (module == "bitsandbytes" or module.startswith("bitsandbytes.")) and isinstance(
        strategy, SHARDED_STRATEGIES
    ):
        raise ValueError(
            f"model.optimizer={module}.{optimizer_class.__qualname__} cannot be used with trainer.strategy="
            f"{type(strategy).__name__}: guardrl does not shard 8-bit (bitsandbytes) optimizer state. "
            "Allowed: a torch.optim optimizer such as torch.optim.AdamW, or the 8-bit one with "
            "trainer.strategy=ddp or a single device"
        )
