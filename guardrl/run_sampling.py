"""How a run samples images with its policy: the old policy's rollout of one iteration (its noise stream, its
SDE window, a group's shared prefix) and `GRPOModule.sample` for callbacks and benchmarks. The sampler itself
is `rollouts.sample_trajectory`; this module only decides, for a run, which noise, weights, window and
sigmas it gets.

Functions take the module for its options, policy, seed and device (as update.py does), so that module.py
stays the iteration's orchestration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from guardrl.rollouts import sample_trajectory
from guardrl.sampling import noise_scales
from guardrl.types import Trajectory

if TYPE_CHECKING:
    from guardrl.module import GRPOModule


def iteration_noise_scales(module: GRPOModule, iteration: int) -> torch.Tensor:
    """The noise scales of `iteration`'s rollout: zero outside its SDE window (sampling.sde_window_strategy;
    the same window on every rank, a function of the run's seed and the iteration alone)."""
    sampling = module.sampling
    if sampling.sde_window_strategy == "fixed":
        return module.noise_scales
    start, end = sampling.window_at(iteration, module.iteration_seed(iteration, 0x5DE))
    return noise_scales(module.sigmas, sampling.noise_level, sampling.sde_type, range(start, end))


@torch.no_grad()
def old_policy_rollout(module: GRPOModule, cond, batch_size: int, chunk: int) -> Trajectory:
    """Roll out one chunk of this iteration's batch with the old policy (rollouts.rollout_and_score calls it
    once per chunk)."""
    # Noise stream (iteration, rank) unchunked, (iteration, rank, chunk) chunked: per rank; the update's
    # step choices are not.
    chunked = module.performance.rollout_chunks > 1
    key = (module.num_iterations, module.global_rank, *((chunk,) if chunked else ()))
    generator = torch.Generator(device=module.device).manual_seed(module.iteration_seed(*key))
    group_size, backbone = module.group_size, module.backbone
    shared_noise = module.sampling.same_noise_per_group
    if shared_noise:
        noise = backbone.initial_noise(batch_size // group_size, generator, module.device)
        noise = noise.repeat_interleave(group_size, dim=0)
    else:
        noise = backbone.initial_noise(batch_size, generator, module.device)
    # The old policy samples; when its snapshot equals the policy bitwise, running the policy adapter is the
    # same computation without the adapter switch.
    weights = "policy" if module.policy.old_equals_policy() else "old"
    with module.policy.use_weights(weights) as transformer:
        return run_trajectory(
            module,
            transformer,
            cond,
            noise,
            iteration_noise_scales(module, module.num_iterations),
            generator,
            module.performance.trajectory_torch_dtype,
            # a group that starts from one noise runs the steps before the SDE window once
            shared_prefix_group_size=group_size if shared_noise else 1,
        )


@torch.no_grad()
def sample_images(
    module: GRPOModule,
    prompts: list[str],
    noise: torch.Tensor,
    sampler: str = "sde",
    generator: Optional[torch.Generator] = None,
    weights: str = "policy",
    images: Optional[list[torch.Tensor]] = None,
    num_inference_steps: Optional[int] = None,
    guidance_scale: Optional[float] = None,
) -> torch.Tensor:
    """`GRPOModule.sample`: images (B, 3, H, W) in [0, 1] with the run's sigmas and guidance, "sde" (the
    training SDE over the whole window range, its noise from `generator`) or "ode" (Euler on every step).

    An evaluation samples with its own `num_inference_steps` and `guidance_scale` (None: the run's), and at
    its own image size when called inside `backbone.at_image_size` (the sigmas follow the size: the dynamic
    shift counts image tokens)."""
    if sampler not in ("sde", "ode"):
        raise ValueError(f"sampler must be 'sde' or 'ode', got {sampler!r}")
    backbone, options = module.backbone, module.sampling
    guidance = options.guidance_scale if guidance_scale is None else guidance_scale
    use_cfg = backbone.uses_true_cfg and guidance > 1.0
    cond = backbone.encode_prompts(prompts, with_negative=use_cfg, images=images)
    # the image size is the trained one unless called inside backbone.at_image_size (the noise tells)
    trained_size = noise[0].numel() == module.num_latent_elements
    if trained_size and num_inference_steps in (None, options.num_inference_steps):
        sigmas, scales = module.sigmas, module.noise_scales
    else:
        steps = options.num_inference_steps if num_inference_steps is None else num_inference_steps
        sigmas = backbone.sigmas(steps)
        # the SDE on every step but the last (a step count of its own has no training window)
        scales = noise_scales(sigmas, options.noise_level, options.sde_type, range(0, steps - 1))
    if sampler == "ode":
        scales = torch.zeros_like(scales)
    with module.policy.use_weights(weights) as transformer:
        trajectory = run_trajectory(
            module, transformer, cond, noise, scales, generator, sigmas=sigmas, guidance_scale=guidance
        )
    return backbone.decode(trajectory.final_latents)


def run_trajectory(
    module: GRPOModule,
    transformer,
    cond,
    noise: torch.Tensor,
    scales: torch.Tensor,
    generator: Optional[torch.Generator],
    storage_dtype: torch.dtype = torch.float32,
    shared_prefix_group_size: int = 1,
    sigmas: Optional[torch.Tensor] = None,
    guidance_scale: Optional[float] = None,
) -> Trajectory:
    """`rollouts.sample_trajectory` with the run's sigmas, guidance (unless given), log-prob reduction and SDE
    type."""
    sampling = module.sampling
    return sample_trajectory(
        module.backbone,
        transformer,
        cond,
        noise,
        module.sigmas if sigmas is None else sigmas,
        scales,
        sampling.guidance_scale if guidance_scale is None else guidance_scale,
        sampling.log_prob_reduction,
        generator,
        storage_dtype,
        sde_type=sampling.sde_type,
        shared_prefix_group_size=shared_prefix_group_size,
    )
