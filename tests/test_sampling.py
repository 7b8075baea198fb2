"""Unit tests of the pure sampling math: Gaussian log-probabilities, the SDE/ODE step, the sigma schedules,
the per-step noise scales and the rollout loop (SPEC.md section 1).

Every expected number below is worked by hand (in the comment above its assert) or is a closed form;
float64 is used wherever a closed form is compared.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from guardrl.sampling import (
    flow_match_sigmas,
    gaussian_log_prob,
    noise_scales,
    ode_step,
    sample_rollouts,
    sde_mean,
    sde_step,
    step_mean_and_std,
)

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)  # 0.91893853320467...


# --------------------------------------------------------------------------------------------------------
# 1. gaussian_log_prob
# --------------------------------------------------------------------------------------------------------


def test_gaussian_log_prob_matches_torch_normal_with_per_sample_std():
    g = torch.Generator().manual_seed(0)
    B, C, L = 3, 2, 5  # D = 10 elements per sample
    x = torch.randn(B, C, L, generator=g, dtype=torch.float64)
    mean = torch.randn(B, C, L, generator=g, dtype=torch.float64)
    std = torch.tensor([0.5, 1.3, 2.0], dtype=torch.float64)  # a different s for every sample
    elementwise = torch.distributions.Normal(mean, std.view(B, 1, 1)).log_prob(x)

    # "sum": log N(x; mu, s^2 I) = sum over the D = 10 elements of the per-element log-density
    got_sum = gaussian_log_prob(x, mean, std, "sum")
    assert got_sum.shape == (B,)
    torch.testing.assert_close(got_sum, elementwise.sum(dim=(1, 2)), rtol=1e-12, atol=1e-12)
    # "mean": the same divided by D = 10
    got_mean = gaussian_log_prob(x, mean, std, "mean")
    torch.testing.assert_close(got_mean, elementwise.mean(dim=(1, 2)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_mean * 10.0, got_sum, rtol=1e-12, atol=1e-12)

    # If the per-sample std were broadcast on the wrong axis (or collapsed to one value) sample 0 and 2
    # would change: sanity-check that the samples' stds really matter here.
    wrong = torch.distributions.Normal(mean, torch.full((B, 1, 1), 1.3, dtype=torch.float64)).log_prob(x)
    assert not torch.allclose(got_sum, wrong.sum(dim=(1, 2)))


def test_gaussian_log_prob_hand_example():
    # one element per sample: x = 1.7, mu = 1.0, s = 0.35 -> z = 0.7 / 0.35 = 2
    # log p = -z^2/2 - log s - log(2 pi)/2 = -2 + 1.0498221244986778 - 0.9189385332046727
    #       = -1.8691164087059949
    x = torch.tensor([[1.7]], dtype=torch.float64)
    mean = torch.tensor([[1.0]], dtype=torch.float64)
    got = gaussian_log_prob(x, mean, torch.tensor([0.35], dtype=torch.float64), "sum")
    assert got.item() == pytest.approx(-2.0 - math.log(0.35) - HALF_LOG_2PI, abs=1e-12)
    assert got.item() == pytest.approx(-1.8691164087059949, abs=1e-12)


def test_gaussian_log_prob_rejects_unknown_reduction():
    x = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="log_prob_reduction"):
        gaussian_log_prob(x, x, 1.0, "max")


# --------------------------------------------------------------------------------------------------------
# 2. eta = 0 is the Euler (ODE) step
# --------------------------------------------------------------------------------------------------------


def test_sde_step_with_zero_noise_scale_is_the_euler_step():
    # hand example: x = 1, v = 0.5, t = 0.5 -> t_next = 0.25, dt = -0.25: x + v dt = 1 - 0.125 = 0.875
    x = torch.tensor([[1.0]], dtype=torch.float64)
    v = torch.tensor([[0.5]], dtype=torch.float64)
    out = sde_step(v, x, 0.5, 0.25, 0.0, "sum")
    assert out.log_prob is None
    assert out.next_latents.item() == 0.875
    assert torch.equal(out.std, torch.zeros(1, dtype=torch.float64))

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    v = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    out = sde_step(v, x, 0.75, 0.5, 0.0, "mean", generator=g)
    # dt = 0.5 - 0.75 = -0.25 (exact in binary): next = x + v * (-0.25), bit for bit, and no density
    assert out.log_prob is None
    assert torch.equal(out.next_latents, x + v * -0.25)
    assert torch.equal(out.mean, x + v * -0.25)
    # an explicit noise tensor is ignored when s = 0
    out_noise = sde_step(v, x, 0.75, 0.5, 0.0, "mean", noise=torch.ones_like(x))
    assert torch.equal(out_noise.next_latents, x + v * -0.25)


def test_noise_scales_with_zero_eta_are_all_zero():
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    for sde_type in ("flow_grpo", "dance_grpo"):
        # eta = 0 -> sigma_k = 0 * anything = 0 on every step, SDE steps included
        scales = noise_scales(sigmas, 0.0, sde_type, range(4))
        assert scales.dtype == torch.float64
        assert torch.equal(scales, torch.zeros(4, dtype=torch.float64))


def test_sde_mean_with_zero_noise_scale_equals_ode_step():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    v = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    # sigma_k = 0 kills the score term: mu = x + v dt exactly (scalar and per-sample t, dt)
    assert torch.equal(sde_mean(v, x, 0.6, -0.2, 0.0), ode_step(v, x, -0.2))
    t_B = torch.tensor([0.9, 0.5, 0.3], dtype=torch.float64)
    dt_B = torch.tensor([-0.1, -0.25, -0.3], dtype=torch.float64)
    assert torch.equal(sde_mean(v, x, t_B, dt_B, torch.zeros(3, dtype=torch.float64)), ode_step(v, x, dt_B))
    # and ode_step is x + v dt with the per-sample dt on the batch axis
    assert torch.equal(ode_step(v, x, dt_B), x + v * dt_B.view(3, 1, 1))


# --------------------------------------------------------------------------------------------------------
# 3. the SDE step with a given noise
# --------------------------------------------------------------------------------------------------------


def test_sde_step_hand_example_with_given_noise():
    # x = 1, v = 0.5, t = 0.5, t_next = 0.25 (dt = -0.25), sigma_k = 0.7, eps = 2
    # score term: sk^2/(2t) * (x + (1-t) v) = 0.49/1.0 * (1 + 0.25) = 0.6125
    # mu = x + (v + 0.6125) dt = 1 + 1.1125 * (-0.25) = 1 - 0.278125 = 0.721875
    # s = sk sqrt(|dt|) = 0.7 * 0.5 = 0.35;  x_next = mu + s eps = 0.721875 + 0.7 = 1.421875
    # log p (sum, D = 1) = -eps^2/2 - log s - log(2pi)/2 = -2 - log(0.35) - 0.918938... = -1.869116408705995
    x = torch.tensor([[1.0]], dtype=torch.float64)
    v = torch.tensor([[0.5]], dtype=torch.float64)
    eps = torch.tensor([[2.0]], dtype=torch.float64)
    out = sde_step(v, x, 0.5, 0.25, 0.7, "sum", noise=eps)
    assert out.mean.item() == pytest.approx(0.721875, abs=1e-14)
    assert out.std.item() == pytest.approx(0.35, abs=1e-15)
    assert out.next_latents.item() == pytest.approx(1.421875, abs=1e-14)
    assert out.log_prob.item() == pytest.approx(-1.8691164087059949, abs=1e-12)


def test_sde_step_next_latents_is_mean_plus_std_times_noise_batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    t, t_next, sk = 0.8, 0.6, 0.9
    out = sde_step(v, x, t, t_next, sk, "mean", noise=eps)
    # the hand formula, term by term: dt = -0.2, mu = x + (v + sk^2/(2t) (x + (1-t) v)) dt
    dt = t_next - t
    mu = x + (v + sk**2 / (2 * t) * (x + (1 - t) * v)) * dt
    # s = 0.9 * sqrt(0.2) = 0.40249223594996214
    s = sk * math.sqrt(abs(dt))
    assert s == pytest.approx(0.40249223594996214, abs=1e-15)
    torch.testing.assert_close(out.mean, mu, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out.std, torch.full((2,), s, dtype=torch.float64), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(out.next_latents, mu + s * eps, rtol=1e-13, atol=1e-13)
    # "mean" log-prob: per element -eps^2/2 - log s - log(2pi)/2, averaged over the 12 elements
    expected_lp = (-(eps**2) / 2).mean(dim=(1, 2)) - math.log(s) - HALF_LOG_2PI
    torch.testing.assert_close(out.log_prob, expected_lp, rtol=1e-12, atol=1e-12)


def test_step_mean_and_std_with_per_sample_noise_scale():
    # two samples at the same step with sigma_k = [0.7, 0.0]: s = [0.7 * 0.5, 0] = [0.35, 0]
    # sample 0 keeps the score-corrected mean 0.721875 (worked above); sample 1 (sk = 0) is Euler: 0.875
    x = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    v = torch.tensor([[0.5], [0.5]], dtype=torch.float64)
    mean, std = step_mean_and_std(v, x, 0.5, 0.25, torch.tensor([0.7, 0.0], dtype=torch.float64))
    torch.testing.assert_close(
        mean, torch.tensor([[0.721875], [0.875]], dtype=torch.float64), rtol=0, atol=1e-14
    )
    torch.testing.assert_close(std, torch.tensor([0.35, 0.0], dtype=torch.float64), rtol=0, atol=1e-15)


# --------------------------------------------------------------------------------------------------------
# 4. noise_scales
# --------------------------------------------------------------------------------------------------------


def test_noise_scales_flow_grpo_form():
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.0], dtype=torch.float64)
    eta = 0.5
    scales = noise_scales(sigmas, eta, "flow_grpo", [0, 1, 2])
    # step 0: t = 1 uses t_1 = 0.75 in the denominator: eta sqrt(1 / (1 - 0.75)) = 2 eta = 1.0
    # step 1: eta sqrt(0.75 / 0.25) = 0.5 sqrt(3) = 0.8660254037844386
    # step 2: eta sqrt(0.5 / 0.5) = 0.5
    expected = torch.tensor([1.0, 0.5 * math.sqrt(3.0), 0.5], dtype=torch.float64)
    assert scales.dtype == torch.float64
    torch.testing.assert_close(scales, expected, rtol=1e-15, atol=1e-15)
    assert scales[1].item() == pytest.approx(0.8660254037844386, abs=1e-15)


def test_noise_scales_zero_on_non_sde_steps():
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.0], dtype=torch.float64)
    # only step 1 is SDE: [0, 0.5 sqrt(3), 0]
    scales = noise_scales(sigmas, 0.5, "flow_grpo", [1])
    torch.testing.assert_close(scales, torch.tensor([0.0, 0.5 * math.sqrt(3.0), 0.0], dtype=torch.float64))
    assert scales[0].item() == 0.0 and scales[2].item() == 0.0
    # no SDE step at all -> all zeros
    assert torch.equal(noise_scales(sigmas, 0.5, "flow_grpo", []), torch.zeros(3, dtype=torch.float64))


def test_noise_scales_dance_grpo_form_is_constant_eta():
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    # sigma_k = eta = 0.3 on SDE steps 0 and 2, whatever t; 0 on steps 1 and 3
    scales = noise_scales(sigmas, 0.3, "dance_grpo", [0, 2])
    assert torch.equal(scales, torch.tensor([0.3, 0.0, 0.3, 0.0], dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(noise_level=-0.1, sde_type="flow_grpo", sde_steps=[0]), "noise_level"),
        (dict(noise_level=float("nan"), sde_type="flow_grpo", sde_steps=[0]), "noise_level"),
        (dict(noise_level=0.5, sde_type="ddim", sde_steps=[0]), "sde_type"),
        (dict(noise_level=0.5, sde_type="flow_grpo", sde_steps=[3]), "sde_steps"),
        (dict(noise_level=0.5, sde_type="dance_grpo", sde_steps=[-1]), "sde_steps"),
    ],
)
def test_noise_scales_bad_inputs_raise_naming_the_option(kwargs, option):
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.0], dtype=torch.float64)  # 3 sampler steps: valid k in [0, 3)
    with pytest.raises(ValueError, match=option):
        noise_scales(sigmas, **kwargs)


# --------------------------------------------------------------------------------------------------------
# 5. flow_match_sigmas
# --------------------------------------------------------------------------------------------------------


def test_flow_match_sigmas_sd3_shift3_ten_steps_and_no_mutation():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sigmas_before = scheduler.sigmas.clone()
    timesteps_before = scheduler.timesteps.clone()
    config_before = dict(scheduler.config)

    sigmas = flow_match_sigmas(scheduler, 10)
    # SD3: the training sigmas are already shifted, so sigma_min = shift(0.001) = 0.003 / 1.002 = 0.0029940;
    # t_i = linspace(1, 0.0029940, 10), each shifted by 3 t / (1 + 2 t), then 0 appended; e.g. the last inner
    # one is shift(0.0029940) = 0.0089820 / 1.0059880 = 0.0089286. The stock values (4 decimals):
    expected = torch.tensor(
        [1.0, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.2780, 0.0089, 0.0],
        dtype=torch.float64,
    )
    assert sigmas.dtype == torch.float64 and sigmas.shape == (11,)
    torch.testing.assert_close(sigmas, expected, rtol=0, atol=1e-4)
    assert sigmas[-1].item() == 0.0
    # step 1 closed form: t = 1 - (1 - 0.0029940)/9 = 0.8892229 -> 3t/(1+2t) = 2.6676687/2.7784458 = 0.9601293
    sigma_min = 0.003 / 1.002
    t1 = 1.0 - (1.0 - sigma_min) / 9
    assert sigmas[1].item() == pytest.approx(3 * t1 / (1 + 2 * t1), abs=1e-6)
    assert sigmas[1].item() == pytest.approx(0.9601293, abs=1e-6)
    assert sigmas[9].item() == pytest.approx(3 * sigma_min / (1 + 2 * sigma_min), abs=1e-6)

    # the scheduler passed in is untouched
    assert torch.equal(scheduler.sigmas, sigmas_before)
    assert torch.equal(scheduler.timesteps, timesteps_before)
    assert getattr(scheduler, "num_inference_steps", None) is None
    assert dict(scheduler.config) == config_before


def _flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def test_flow_match_sigmas_flux_requires_image_seq_len():
    with pytest.raises(ValueError, match="image_seq_len"):
        flow_match_sigmas(_flux_scheduler(), 28)


# FluxPipeline's schedule, worked by hand (no diffusers call): t_i = linspace(1, 1/N, N)_i = 1 - i/N, then the
# exponential time shift sigma_i = e^mu / (e^mu + 1/t_i - 1) with 1/t_i - 1 = i/(N - i), then 0 appended;
# mu = 0.5 + (L - 256) * (1.15 - 0.5) / (4096 - 256) for L image tokens. Values to 7 decimals.
#   L = 256, N = 4:   mu = 0.5,  e^mu = 1.6487213; i/(N - i) = 0, 1/3, 1, 3
#                     -> 1.6487213 / (1.6487213 + [0, 0.3333333, 1, 3]) = [1, 0.8318243, 0.6224593, 0.3546612]
#   L = 4096, N = 10: mu = 1.15, e^mu = 3.1581929; i = 1: 3.1581929 / (3.1581929 + 1/9) = 0.9660138,
#                     i = 5: 3.1581929 / 4.1581929 = 0.7595109, i = 9: 3.1581929 / 12.1581929 = 0.2597584
#   L = 1024, N = 28: mu = 0.5 + 768 * 0.65 / 3840 = 0.63, e^mu = 1.8776106; i = 14: 1.8776106 / 2.8776106 =
#                     0.6524895, i = 27: 1.8776106 / 28.8776106 = 0.0650196 (pinned at i = 1, 7, 14, 21, 27)
FLUX_SIGMAS = {
    (256, 4): {i: v for i, v in enumerate([1.0, 0.8318243, 0.6224593, 0.3546612, 0.0])},
    (4096, 10): {
        i: v
        for i, v in enumerate(
            [1.0, 0.9660138, 0.9266473, 0.8805131, 0.8257017, 0.7595109]
            + [0.6779867, 0.5751029, 0.4411997, 0.2597584, 0.0]
        )
    },
    (1024, 28): {0: 1.0, 1: 0.9806560, 7: 0.8492348, 14: 0.6524895, 21: 0.3849447, 27: 0.0650196, 28: 0.0},
}


@pytest.mark.parametrize("image_seq_len, num_steps", sorted(FLUX_SIGMAS))
def test_flow_match_sigmas_flux_are_the_hand_worked_shifted_schedule(image_seq_len, num_steps):
    scheduler = _flux_scheduler()
    sigmas_before = scheduler.sigmas.clone()
    got = flow_match_sigmas(scheduler, num_steps, image_seq_len=image_seq_len)
    assert got.dtype == torch.float64 and got.shape == (num_steps + 1,)
    # 2e-7: the 7-decimal rounding of the constants plus diffusers' float32 sigmas (ulp 6e-8 at 1)
    for i, expected in FLUX_SIGMAS[(image_seq_len, num_steps)].items():
        assert got[i].item() == pytest.approx(expected, abs=2e-7), i
    assert got[0].item() == 1.0 and got[-1].item() == 0.0
    # the shift is the pipeline's dynamic one: the unshifted t_1 = 1 - 1/N is far from sigma_1
    assert abs(got[1].item() - (1 - 1 / num_steps)) > 0.01
    assert torch.equal(scheduler.sigmas, sigmas_before)  # the scheduler passed in is untouched


def test_flow_match_sigmas_rejects_zero_steps():
    with pytest.raises(ValueError, match="num_inference_steps"):
        flow_match_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), 0)


# --------------------------------------------------------------------------------------------------------
# 6. sample_rollouts
# --------------------------------------------------------------------------------------------------------

SIGMAS = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)  # every dt = -0.25 exactly
B, C, H, W = 4, 2, 3, 3


class MinusX:
    """v = -x, recording the (t, k) it is called with."""

    def __init__(self):
        self.calls: list[tuple[float, int]] = []

    def __call__(self, latents, t, k):
        self.calls.append((t, k))
        return -latents


def _rollout(noise_scales_S, seed=0, reduction="mean", x0=None):
    if x0 is None:
        x0 = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(100))
    fn = MinusX()
    traj = sample_rollouts(
        fn,
        x0,
        SIGMAS,
        torch.tensor(noise_scales_S, dtype=torch.float64),
        reduction,
        generator=torch.Generator().manual_seed(seed),
    )
    return traj, fn, x0


def test_rollout_stores_exactly_the_sde_steps_with_shapes():
    traj, fn, x0 = _rollout([0.0, 0.5, 0.6, 0.8])
    # the velocity is asked once per sampler step, at t_k, with k
    assert fn.calls == [(1.0, 0), (0.75, 1), (0.5, 2), (0.25, 3)]
    # noise_scale > 0 on steps 1, 2, 3 -> those three are stored, step 0 (ODE) is not
    assert traj.step_indices == [1, 2, 3]
    assert traj.num_stored_steps == 3
    T = 3
    for name in ("latents_BTCHW", "next_latents_BTCHW", "mean_old_BTCHW"):
        assert getattr(traj, name).shape == (B, T, C, H, W), name
    assert traj.log_prob_old_BT.shape == (B, T)
    for name in ("sigma_T", "sigma_next_T", "noise_scale_T"):
        assert getattr(traj, name).shape == (T,), name
    assert traj.final_latents.shape == (B, C, H, W)
    # t, t_next of steps 1..3 and dt = -0.25 each
    assert torch.equal(traj.sigma_T, torch.tensor([0.75, 0.5, 0.25]))
    assert torch.equal(traj.sigma_next_T, torch.tensor([0.5, 0.25, 0.0]))
    assert torch.equal(traj.dt_T, torch.full((3,), -0.25))
    assert torch.equal(traj.noise_scale_T, torch.tensor([0.5, 0.6, 0.8]))
    # s = sigma_k sqrt(0.25) = sigma_k / 2 = [0.25, 0.3, 0.4], from what the trajectory stores
    stds = [
        step_mean_and_std(x, x, traj.sigma_T[j], traj.sigma_next_T[j], traj.noise_scale_T[j])[1][0]
        for j, x in enumerate(traj.latents_BTCHW.unbind(1))
    ]
    torch.testing.assert_close(torch.stack(stds), torch.tensor([0.25, 0.3, 0.4]), rtol=0, atol=1e-7)


def test_rollout_chain_is_consistent_and_noise_comes_from_the_generator():
    traj, _, x0 = _rollout([0.0, 0.5, 0.6, 0.8], seed=7)
    # step 0 is Euler with v = -x, dt = -0.25: x_1 = x0 + (-x0)(-0.25)
    assert torch.equal(traj.latents_BTCHW[:, 0], ode_step(-x0, x0, torch.tensor(-0.25)))
    # consecutive stored steps chain: x_next of step j is x_t of step j + 1
    for j in range(2):
        assert torch.equal(traj.next_latents_BTCHW[:, j], traj.latents_BTCHW[:, j + 1])
    # the last sampler step is SDE: the final latents are its x_next
    assert torch.equal(traj.final_latents, traj.next_latents_BTCHW[:, -1])

    eps_gen = torch.Generator().manual_seed(7)  # the ODE step draws nothing; each SDE step one randn
    for j in range(3):
        x = traj.latents_BTCHW[:, j]
        # mu_old is the step's mean recomputed from the stored x_t, t, t_next, sigma_k
        mu, std = step_mean_and_std(-x, x, traj.sigma_T[j], traj.sigma_next_T[j], traj.noise_scale_T[j])
        assert torch.equal(traj.mean_old_BTCHW[:, j], mu)
        # x_next = mu_old + s * eps with eps the generator's next draw
        eps = torch.randn(B, C, H, W, generator=eps_gen)
        assert torch.equal(traj.next_latents_BTCHW[:, j], mu + std.view(B, 1, 1, 1) * eps)
        # log p_old recomputed from the stored tensors
        recomputed = gaussian_log_prob(traj.next_latents_BTCHW[:, j], traj.mean_old_BTCHW[:, j], std, "mean")
        assert torch.equal(traj.log_prob_old_BT[:, j], recomputed)
        # and it is the closed form: mean over elements of -eps^2/2 - log s - log(2pi)/2
        closed = (-(eps.double() ** 2) / 2).mean(dim=(1, 2, 3)) - math.log(float(std[0])) - HALF_LOG_2PI
        torch.testing.assert_close(traj.log_prob_old_BT[:, j].double(), closed, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rollout_stored_in_half_precision_holds_exactly_what_was_sampled(dtype):
    x0 = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(100))
    traj = sample_rollouts(
        MinusX(),
        x0,
        SIGMAS,
        torch.tensor([0.0, 0.5, 0.6, 0.8], dtype=torch.float64),
        "mean",
        generator=torch.Generator().manual_seed(7),
        storage_dtype=dtype,
    )
    assert traj.latents_BTCHW.dtype == traj.next_latents_BTCHW.dtype == dtype
    assert traj.mean_old_BTCHW.dtype == traj.log_prob_old_BT.dtype == torch.float32
    assert traj.latents_BTCHW.element_size() == 2  # half of float32's memory for x_t and x_next
    # the chain is carried at that precision: step 0 (Euler) starts from x0 rounded, and its result is rounded
    x0_r = x0.to(dtype).float()
    assert torch.equal(
        traj.latents_BTCHW[:, 0].float(), ode_step(-x0_r, x0_r, torch.tensor(-0.25)).to(dtype).float()
    )
    eps_gen = torch.Generator().manual_seed(7)
    for j in range(3):
        x = traj.latents_BTCHW[:, j].float()
        mu, std = step_mean_and_std(-x, x, traj.sigma_T[j], traj.sigma_next_T[j], traj.noise_scale_T[j])
        # the update recomputes the same mean from the stored x_t: dmu = 0 on-policy
        assert torch.equal(traj.mean_old_BTCHW[:, j], mu)
        eps = torch.randn(B, C, H, W, generator=eps_gen)
        # the stored x_next is the sample rounded, and the chain continues from exactly it
        assert torch.equal(traj.next_latents_BTCHW[:, j], (mu + std.view(B, 1, 1, 1) * eps).to(dtype))
        if j < 2:
            assert torch.equal(traj.next_latents_BTCHW[:, j], traj.latents_BTCHW[:, j + 1])
        # log p_old is of the rounded sample: recomputed from the stored tensors it is bitwise the same
        recomputed = gaussian_log_prob(
            traj.next_latents_BTCHW[:, j].float(), traj.mean_old_BTCHW[:, j], std, "mean"
        )
        assert torch.equal(traj.log_prob_old_BT[:, j], recomputed)


def test_rollout_final_latents_after_a_trailing_ode_step_and_sum_reduction():
    traj, _, _ = _rollout([0.5, 0.0, 0.7, 0.0], reduction="sum")
    assert traj.step_indices == [0, 2]
    # steps 0 and 2 are not consecutive: step 1 (Euler) lies between them
    x_next0 = traj.next_latents_BTCHW[:, 0]
    assert torch.equal(traj.latents_BTCHW[:, 1], ode_step(-x_next0, x_next0, torch.tensor(-0.25)))
    # step 3 is Euler: final = x_next(step 2) + (-x)(0 - 0.25)
    x_last = traj.next_latents_BTCHW[:, -1]
    assert torch.equal(traj.final_latents, ode_step(-x_last, x_last, torch.tensor(-0.25)))
    # step 0 at t = 1 starts from the initial noise itself
    x0 = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(100))
    assert torch.equal(traj.latents_BTCHW[:, 0], x0)
    for j in range(2):
        x = traj.latents_BTCHW[:, j]
        _, std = step_mean_and_std(-x, x, traj.sigma_T[j], traj.sigma_next_T[j], traj.noise_scale_T[j])
        lp = gaussian_log_prob(traj.next_latents_BTCHW[:, j], traj.mean_old_BTCHW[:, j], std, "sum")
        assert torch.equal(traj.log_prob_old_BT[:, j], lp)


def test_rollout_same_seed_is_bitwise_identical():
    a, _, _ = _rollout([0.0, 0.5, 0.6, 0.8], seed=123)
    b, _, _ = _rollout([0.0, 0.5, 0.6, 0.8], seed=123)
    c, _, _ = _rollout([0.0, 0.5, 0.6, 0.8], seed=124)
    fields = (
        "latents_BTCHW",
        "next_latents_BTCHW",
        "mean_old_BTCHW",
        "log_prob_old_BT",
        "sigma_T",
        "sigma_next_T",
        "noise_scale_T",
        "final_latents",
    )
    for name in fields:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.step_indices == b.step_indices
    # a different seed draws different noise (so the equality above is not vacuous)
    assert not torch.equal(a.next_latents_BTCHW, c.next_latents_BTCHW)
    assert not torch.equal(a.final_latents, c.final_latents)


def test_rollout_all_ode_equals_hand_written_euler_loop():
    # dyadic x0 so every product is exact in float32: x * 1.25^4 = x * 625/256 = x * 2.44140625
    x0 = torch.tensor([1.0, -2.0, 0.5, 3.0]).view(B, 1, 1, 1).expand(B, C, H, W).contiguous()
    traj, _, _ = _rollout([0.0, 0.0, 0.0, 0.0], x0=x0)
    # v = -x, dt = -0.25 every step: x_{k+1} = x_k (1 + 0.25) -> x0 * 1.25^4
    assert torch.equal(traj.final_latents, x0 * 2.44140625)
    assert traj.final_latents[3, 0, 0, 0].item() == 7.32421875  # 3 * 625 / 256

    # random x0 against a hand-written Euler loop with the rollout's float32 arithmetic
    x0 = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(5))
    traj, _, _ = _rollout([0.0, 0.0, 0.0, 0.0], x0=x0)
    x = x0.clone()
    for k in range(4):
        dt = torch.tensor(float(SIGMAS[k + 1])) - torch.tensor(float(SIGMAS[k]))
        x = x + (-x) * dt
    assert torch.equal(traj.final_latents, x)
    torch.testing.assert_close(traj.final_latents.double(), x0.double() * 1.25**4, rtol=1e-6, atol=0)

    # nothing stored: T = 0 with the right trailing shapes
    assert traj.step_indices == []
    assert traj.latents_BTCHW.shape == (B, 0, C, H, W)
    assert traj.next_latents_BTCHW.shape == (B, 0, C, H, W)
    assert traj.mean_old_BTCHW.shape == (B, 0, C, H, W)
    assert traj.log_prob_old_BT.shape == (B, 0)
    assert traj.sigma_T.shape == (0,) and traj.noise_scale_T.shape == (0,)


def test_rollout_all_ode_with_constant_velocity_and_uneven_sigmas():
    # Euler with a constant v: x_S = x0 + v * sum(dt) = x0 + v * (0 - 1) = x0 - v
    sigmas = torch.tensor([1.0, 0.9, 0.7, 0.3, 0.1, 0.0], dtype=torch.float64)
    x0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(9))
    v = torch.tensor([[0.5, -1.0, 2.0], [0.25, 0.0, -3.0]])
    traj = sample_rollouts(lambda x, t, k: v, x0, sigmas, torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(traj.final_latents, x0 - v, rtol=0, atol=1e-6)
    x = x0.clone()
    for k in range(5):
        x = x + v * (torch.tensor(float(sigmas[k + 1])) - torch.tensor(float(sigmas[k])))
    assert torch.equal(traj.final_latents, x)


def test_rollout_rejects_wrong_number_of_noise_scales():
    with pytest.raises(ValueError, match="noise_scales_S"):
        sample_rollouts(lambda x, t, k: -x, torch.zeros(1, 2), SIGMAS, torch.zeros(3, dtype=torch.float64))
