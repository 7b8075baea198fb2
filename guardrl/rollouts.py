"""Sampling and scoring images with a model: the one place that turns a backbone, a set of weights and encoded
prompts into a `velocity_fn` for `guardrl.sampling.sample_rollouts`, and the one weighted reward sum.

    sample_trajectory   noise -> Trajectory, with the given transformer weights (rollout, watch, toy
                        evaluation)
    score_images        images -> (total, per reward): every reward with the run's retries and timeout
    rollout_and_score   a rank's batch in chunks of whole groups, each scored (optionally in a worker thread
                        while the next one samples)

GRPOModule.sample / .score are the public entry points of a run (callbacks and benchmarks use those).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from guardrl.rewards import score_with_retries
from guardrl.sampling import sample_rollouts
from guardrl.types import Trajectory


@torch.no_grad()
def sample_trajectory(
    backbone,
    transformer: Optional[torch.nn.Module],
    cond,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    noise_scales: torch.Tensor,
    guidance_scale: float,
    log_prob_reduction: str,
    generator: Optional[torch.Generator],
    storage_dtype: torch.dtype = torch.float32,
    *,
    sde_type: str = "flow_grpo",
    shared_prefix_group_size: int = 1,
) -> Trajectory:
    """Roll `noise` out with `transformer` (None: the backbone's own) on `cond`: SDE where `noise_scales` > 0,
    Euler elsewhere (all zeros: the deterministic ODE sampler). `sde_type` (sampling.sde_type) says what
    `noise_scales` are (`guardrl.sampling.noise_scales` of the same type) and which step they drive.

    shared_prefix_group_size G > 1: consecutive groups of G samples share their initial noise and prompt
    (sampling.same_noise_per_group), so their deterministic steps before the first SDE step are the same
    computation: they run once per group, on B / G samples, and the group branches at the window
    (Flow-GRPO-Fast's shared ODE prefix)."""

    def velocity_fn_of(step_cond):
        def velocity_fn(latents, t, step_index):
            return backbone.velocity(latents, t, step_cond, guidance_scale, transformer)

        return velocity_fn

    start = 0
    first_sde = int(torch.nonzero(noise_scales > 0)[0]) if bool((noise_scales > 0).any()) else 0
    if shared_prefix_group_size > 1 and first_sde > 0:
        size = shared_prefix_group_size
        firsts = slice(None, None, size)
        if noise.shape[0] % size or not torch.equal(noise, noise[firsts].repeat_interleave(size, dim=0)):
            raise ValueError(
                f"a shared prefix needs groups of {size} samples with the same initial noise "
                "(sampling.same_noise_per_group)"
            )
        prefix = sample_rollouts(
            velocity_fn_of(cond.select(firsts)),
            noise[firsts],
            sigmas[: first_sde + 1],
            torch.zeros(first_sde),
            log_prob_reduction,
            None,
            storage_dtype=storage_dtype,
            sde_type=sde_type,
        )
        noise, start = prefix.final_latents.repeat_interleave(size, dim=0), first_sde
    return sample_rollouts(
        velocity_fn_of(cond),
        noise,
        sigmas,
        noise_scales,
        log_prob_reduction,
        generator,
        storage_dtype=storage_dtype,
        sde_type=sde_type,
        start_step=start,
    )


def score_images(
    rewards: Sequence, images: torch.Tensor, prompts: list[str], faults, group_size: Optional[int] = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, per reward) for images (B, 3, H, W) in [0, 1]: every reward with `faults`' retries and timeout
    (FaultOptions), the total their weighted sum. `group_size`: the batch is consecutive groups of this many
    images of one prompt (groupwise rewards score each group; None: they find runs of equal prompts)."""
    per_reward = {
        reward.name: score_with_retries(
            reward,
            images,
            prompts,
            faults.reward_max_attempts,
            faults.reward_retry_delay_s,
            faults.reward_timeout_s,
            group_size,
        )
        for reward in rewards
    }
    total = sum(reward.weight * per_reward[reward.name] for reward in rewards)
    return total, per_reward


def rollout_and_score(
    prompts: list[str],
    cond,
    chunks: int,
    overlap: bool,
    rollout: Callable[[Any, int, int], Trajectory],
    decode: Callable[[torch.Tensor], torch.Tensor],
    score: Callable[[torch.Tensor, list[str]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    phase: Callable[[str], Any] = lambda name: contextlib.nullcontext(),
) -> tuple[Trajectory, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Rollout, decode and reward of a rank's batch in `chunks` chunks of whole groups (performance.
    rollout_chunks); with `overlap` (performance.overlap_rewards) each chunk is scored in a worker thread
    while the next one samples. `rollout(cond_of_chunk, chunk_size, chunk_index)` samples one chunk. Returns
    the joined trajectory, images, total rewards and per-reward scores, in batch order."""
    size = len(prompts) // chunks
    spans = [slice(c * size, (c + 1) * size) for c in range(chunks)]
    # One worker: chunks are scored in order, and a reward never runs twice at once.
    worker = (
        concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="guardrl-reward")
        if overlap
        else None
    )
    trajectories, images, scored = [], [], []
    try:
        for c, span in enumerate(spans):
            with phase("rollout"):
                trajectories.append(rollout(cond.select(span) if chunks > 1 else cond, size, c))
            with phase("decode"):
                images.append(decode(trajectories[-1].final_latents))
            if worker is not None:
                scored.append(worker.submit(score, images[-1], prompts[span]))
            else:
                with phase("reward"):
                    scored.append(score(images[-1], prompts[span]))
        with phase("reward"):
            # Overlapped: the reward time still exposed after the last chunk; a reward's error re-raises here.
            scored = [s.result() if worker is not None else s for s in scored]
    finally:
        if worker is not None:
            worker.shutdown(wait=True, cancel_futures=True)
    rewards = torch.cat([total for total, _ in scored])
    per_reward = {name: torch.cat([parts[name] for _, parts in scored]) for name in scored[0][1]}
    return Trajectory.cat(trajectories), torch.cat(images), rewards, per_reward
