"""Small records passed between the stages of a GRPO iteration.

Shape legend (used in names across sampling/ and algorithm/):
    B  samples on this rank (= prompts x group_size)
    T  stored (SDE) denoising steps of a trajectory
    C, H, W  latent channels, height, width (Flux keeps packed latents: the trailing dims differ,
             nothing in the math cares; "elements" below means all non-batch dims)
    S  sampler steps (num_inference_steps); sigmas have S + 1 entries, the last one 0
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class PromptBatch:
    """Prompts for one GRPO iteration on one rank, already repeated `group_size` times.

    Sample i belongs to group i // group_size: the members of a group are contiguous and a group never spans
    ranks. `stream_position` is the number of prompts this rank had consumed after this batch, so a
    resumed run can continue the stream where it stopped. `images`: editing models' conditioning images
    (data.image_field), one (3, H, W) float tensor in [0, 1] per sample, repeated like the prompts; None for
    text-to-image.
    """

    prompts: list[str]
    group_size: int
    stream_position: int = 0
    images: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class Trajectory:
    """What a rollout keeps for the update: only the stochastic (SDE) steps, which are the trainable ones.

    For stored step j (sampler step index `step_indices[j]`):
        latents_BTCHW[:, j]       x_t, the input of the step
        next_latents_BTCHW[:, j]  x_next, the sample drawn by the rollout
        mean_old_BTCHW[:, j]      mu_old, the old policy's Gaussian mean (kept so the update needs no extra
                                  old-policy forward: dmu = mu_old - mu_theta)
        log_prob_old_BT[:, j]     log p_old(x_next | x_t), reduced as sampling.log_prob_reduction says
        sigma_T[j], sigma_next_T[j]  t and t_next of the step (dt_T = t_next - t < 0)
        noise_scale_T[j]          the step's noise parameter: sigma_k for the FlowGRPO / DanceGRPO SDEs,
                                  sin(eta pi / 2) for CPS; `sampling.step_mean_and_std` turns it (with
                                  sampling.sde_type) into the step's mean and standard deviation
    """

    step_indices: list[int]
    latents_BTCHW: torch.Tensor
    next_latents_BTCHW: torch.Tensor
    mean_old_BTCHW: torch.Tensor
    log_prob_old_BT: torch.Tensor
    sigma_T: torch.Tensor
    sigma_next_T: torch.Tensor
    noise_scale_T: torch.Tensor
    final_latents: torch.Tensor

    @staticmethod
    def cat(parts: list[Trajectory]) -> Trajectory:
        """Trajectories of chunks of one batch (same steps), joined along the batch dimension in order."""
        first = parts[0]
        if len(parts) == 1:
            return first
        if any(p.step_indices != first.step_indices for p in parts):
            raise ValueError("Trajectory.cat: the chunks stored different steps")

        def join(name):
            return torch.cat([getattr(p, name) for p in parts], dim=0)

        per_sample = (
            "latents_BTCHW",
            "next_latents_BTCHW",
            "mean_old_BTCHW",
            "log_prob_old_BT",
            "final_latents",
        )
        return dataclasses.replace(first, **{name: join(name) for name in per_sample})

    @property
    def dt_T(self) -> torch.Tensor:
        return self.sigma_next_T - self.sigma_T

    @property
    def num_stored_steps(self) -> int:
        return len(self.step_indices)


@dataclass
class StepStats:
    """Detached statistics of one denoising step k, gathered over every update of one GRPO iteration."""

    step_index: int
    log_ratio: list[torch.Tensor] = field(default_factory=list)  # the log-ratio used for clipping, per sample
    raw_log_ratio: list[torch.Tensor] = field(default_factory=list)  # plain log r, whatever the variant
    advantages: list[torch.Tensor] = field(default_factory=list)
    # the loss's own clip flags (algorithm.LossStats), per sample: reports count these, never recompute them
    clipped_upper: list[torch.Tensor] = field(default_factory=list)  # bool: r > 1 + c
    clipped_lower: list[torch.Tensor] = field(default_factory=list)  # bool: r < 1 - c
    grad_norms: list[float] = field(default_factory=list)  # norm of this step's gradient contribution
    kl: list[torch.Tensor] = field(default_factory=list)

    def cat(self, name: str) -> torch.Tensor:
        values = getattr(self, name)
        return torch.cat(values) if values else torch.empty(0)
