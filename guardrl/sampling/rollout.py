"""The rollout loop: walk the sigmas, SDE on the chosen steps and Euler elsewhere, keep what the update needs.

It knows nothing about models: the caller passes `velocity_fn(latents, t, step_index) -> v`, which hides the
backbone, the conditioning, classifier-free guidance and which weights (old policy, EMA, ...) are used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from guardrl.sampling.sde import sde_step
from guardrl.types import Trajectory

VelocityFn = Callable[[torch.Tensor, float, int], torch.Tensor]


@torch.no_grad()
def sample_rollouts(
    velocity_fn: VelocityFn,
    initial_noise: torch.Tensor,
    sigmas_S1: torch.Tensor,
    noise_scales_S: torch.Tensor,
    log_prob_reduction: str = "mean",
    generator: torch.Generator | None = None,
    storage_dtype: torch.dtype = torch.float32,
    *,
    sde_type: str = "flow_grpo",
    start_step: int = 0,
) -> Trajectory:
    """Sample B trajectories and store x_t, x_next, mu_old, log p_old, t, dt and s for every SDE step.

    Args:
        velocity_fn: returns v for (latents, t, step index k); its output is upcast to float32.
        initial_noise: (B, ...) x at t = sigmas[start_step] (the noise itself for start_step 0).
        sigmas_S1: (S + 1,) decreasing sigmas ending at 0.
        noise_scales_S: (S,) the noise scale per step (`schedules.noise_scales` for `sde_type`): sigma_k, or
            CPS's sin(eta pi / 2). Steps whose std is 0 (noise scale 0, or CPS onto t_next = 0) are
            deterministic and not stored.
        generator: source of the SDE noise eps (seed it per iteration for reproducible rollouts).
        storage_dtype: dtype of the stored x_t and x_next (performance.trajectory_dtype). Below float32 the
            chain itself is carried at that precision (each x rounded to it, as diffusers pipelines carry
            latents in the model dtype) and every log-probability is of the rounded sample, so the stored
            trajectory is exactly what was sampled and the on-policy ratio stays exactly 1. The math runs in
            float32; the step means and log-probabilities are stored in float32 (the update's dmu =
            mu_old - mu_theta must be exactly 0 on-policy).
        sde_type: sampling.sde_type (one of `sde.SDE_TYPES`). It is not stored in the trajectory: the update
            must pass the same one to `step_mean_and_std`, with the stored t, t_next and noise scale.
        start_step: continue a rollout whose steps before it ran elsewhere (a prefix shared by a group,
            guardrl/rollouts.py); the steps before it are neither run nor stored.
    """
    num_steps = len(sigmas_S1) - 1
    if len(noise_scales_S) != num_steps:
        raise ValueError(
            f"noise_scales_S has {len(noise_scales_S)} entries but there are {num_steps} sampler steps "
            f"(len(sigmas_S1) - 1): it must have one per step"
        )
    rounding = None if storage_dtype == torch.float32 else storage_dtype
    latents = initial_noise.float() if rounding is None else initial_noise.to(rounding).float()
    stored: dict[str, list] = {k: [] for k in ("idx", "x", "x_next", "mu", "logp", "t", "t_next", "sk")}
    if not 0 <= start_step < num_steps:
        raise ValueError(f"start_step={start_step} must be in [0, {num_steps}) (the sampler's steps)")
    for k in range(start_step, num_steps):
        t, t_next = float(sigmas_S1[k]), float(sigmas_S1[k + 1])
        velocity = velocity_fn(latents, t, k).float()
        out = sde_step(
            velocity,
            latents,
            t,
            t_next,
            float(noise_scales_S[k]),
            log_prob_reduction,
            generator=generator,
            sample_dtype=rounding,
            sde_type=sde_type,
        )
        if out.log_prob is not None:
            for key, value in (
                ("idx", k),
                ("x", latents),
                ("x_next", out.next_latents),
                ("mu", out.mean),
                ("logp", out.log_prob),
                ("t", t),
                ("t_next", t_next),
                ("sk", float(noise_scales_S[k])),
            ):
                stored[key].append(value)
        latents = out.next_latents

    def stack(key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if not stored[key]:
            return latents.new_zeros((latents.shape[0], 0, *latents.shape[1:]), dtype=dtype)
        return torch.stack(stored[key], dim=1).to(dtype)  # exact: the values are representable in dtype

    device = latents.device
    return Trajectory(
        step_indices=stored["idx"],
        latents_BTCHW=stack("x", storage_dtype),
        next_latents_BTCHW=stack("x_next", storage_dtype),
        mean_old_BTCHW=stack("mu"),
        log_prob_old_BT=(
            torch.stack(stored["logp"], dim=1) if stored["logp"] else latents.new_zeros((latents.shape[0], 0))
        ),
        sigma_T=torch.tensor(stored["t"], dtype=torch.float32, device=device),
        sigma_next_T=torch.tensor(stored["t_next"], dtype=torch.float32, device=device),
        noise_scale_T=torch.tensor(stored["sk"], dtype=torch.float32, device=device),
        final_latents=latents,
    )
