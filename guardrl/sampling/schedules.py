"""Sigma schedules for rectified-flow samplers, and the per-step SDE noise scale sigma_k.

t = sigma in [0, 1], 1 = pure noise. The schedule itself is diffusers' `FlowMatchEulerDiscreteScheduler`
(SD3: a static `shift`; Flux: `use_dynamic_shifting` with mu from the image's token count), so that the
sigmas guardrl samples on are exactly the ones a stock diffusers pipeline uses.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# From its defining module rather than `from diffusers import ...`: the same class at runtime, but a type
# checker resolves diffusers' lazy top-level name to the torch-less placeholder class in
# diffusers.utils.dummy_pt_objects, which has no `config` or `from_config`.
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

from guardrl.sampling.sde import SDE_TYPES


def _dynamic_shift_mu(image_seq_len: int, config) -> float:
    # The linear interpolation FluxPipeline uses (diffusers `calculate_shift`), in the scheduler's own units.
    base_len, max_len = config.base_image_seq_len, config.max_image_seq_len
    base_shift, max_shift = config.base_shift, config.max_shift
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)


def flow_match_sigmas(
    scheduler: FlowMatchEulerDiscreteScheduler, num_inference_steps: int, image_seq_len: int | None = None
) -> torch.Tensor:
    """The S + 1 sigmas (last = 0) a diffusers pipeline would sample on, as float64 on the CPU.

    Args:
        scheduler: the backbone's scheduler; it is copied, never mutated.
        num_inference_steps: S.
        image_seq_len: number of image tokens; required when the scheduler uses dynamic shifting (Flux).
    """
    if num_inference_steps < 1:
        raise ValueError(
            f"num_inference_steps (sampling.num_inference_steps) must be >= 1, got {num_inference_steps!r}"
        )
    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    if sched.config.use_dynamic_shifting:
        if image_seq_len is None:
            raise ValueError(
                "image_seq_len (image tokens) is required for a dynamically shifted (Flux-style) schedule, "
                "got None: pass the backbone's image_seq_len()"
            )
        # FluxPipeline passes these sigmas and lets the scheduler shift them by mu.
        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        sched.set_timesteps(sigmas=sigmas, mu=_dynamic_shift_mu(image_seq_len, sched.config))
    else:
        sched.set_timesteps(num_inference_steps)
    return sched.sigmas.to(torch.float64).cpu()


def noise_scales(
    sigmas_S1: torch.Tensor, noise_level: float, sde_type: str, sde_steps: list[int] | range
) -> torch.Tensor:
    """The per-step noise scale `sde.step_mean_and_std` takes, for every sampler step k (0 on ODE steps), in
    float64.

    FlowGRPO (Liu et al. 2025, arXiv 2505.05470): sigma_k = eta * sqrt(t / (1 - t)); at t = 1 the
    denominator uses the next sigma t_1 instead, as the reference implementation does, to stay finite.
    DanceGRPO (Xue et al. 2025, arXiv 2505.07818): sigma_k = eta, constant.
    For both, the step's standard deviation is then s_k = sigma_k * sqrt(|dt_k|).
    CPS (Wang & Yu 2025, arXiv 2509.05952): the std's eta factor c = sin(eta pi / 2), the same on every SDE
    step; s_k = t_{k+1} * c (0 on the last step, where t_{k+1} = 0). eta must be in [0, 1]: c rises to 1 there
    (s = t_next, the whole noise estimate replaced); beyond, eta and 2 - eta would give the same sampler and
    eta > 2 a negative std.
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type (sampling.sde_type) must be one of {SDE_TYPES}, got {sde_type!r}")
    if not (noise_level >= 0 and math.isfinite(noise_level)):
        raise ValueError(
            f"noise_level (sampling.noise_level, eta) must be a finite number >= 0, got {noise_level!r}"
        )
    if sde_type == "cps" and noise_level > 1:
        raise ValueError(
            f"noise_level (sampling.noise_level, eta) must be in [0, 1] with sde_type 'cps' "
            f"(std = t_next * sin(eta pi / 2)), got {noise_level!r}"
        )
    num_steps = len(sigmas_S1) - 1
    scales = torch.zeros(num_steps, dtype=torch.float64)
    for k in sde_steps:
        if not 0 <= k < num_steps:
            raise ValueError(
                f"sde_steps (set by sampling.sde_window): step index {k} is outside the sampler's "
                f"steps [0, {num_steps})"
            )
        t = float(sigmas_S1[k])
        if sde_type == "flow_grpo":
            denominator = 1.0 - (float(sigmas_S1[1]) if t >= 1.0 else t)
            scales[k] = noise_level * math.sqrt(t / denominator)
        elif sde_type == "cps":
            scales[k] = math.sin(noise_level * math.pi / 2.0)
        else:
            scales[k] = noise_level
    return scales
