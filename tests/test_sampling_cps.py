"""The CPS sampler (`sampling.sde_type: cps`, coefficient-preserving sampling, FlowCPS / flow_grpo).

    s  = t_next * c,   c = sin(eta pi / 2)
    mu = x0_hat (1 - t_next) + eps_hat sqrt(t_next^2 - s^2),   x0_hat = x - t v,   eps_hat = x + (1 - t) v

as a Gaussian step with its true log-density (docs/math.md, "CPS step"). Expected numbers are worked by hand
in the comment above each assert, or are closed forms; float64 wherever a closed form is compared.
"""

from __future__ import annotations

import math
import os
import re
import typing

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from guardrl.algorithm import RATIO_VARIANTS
from guardrl.algorithm.ratios import compute_ratio_terms
from guardrl.options import GRPOOptions, SamplingOptions, check_compatible
from guardrl.sampling import (
    SDE_TYPES,
    cps_mean,
    flow_match_sigmas,
    gaussian_log_prob,
    noise_scales,
    ode_step,
    sample_rollouts,
    sde_step,
    step_mean_and_std,
)

# --------------------------------------------------------------------------------------------------------
# 1. one CPS step by hand
# --------------------------------------------------------------------------------------------------------


def test_cps_step_hand_example():
    # x = [1, -2], v = [2, 4], t = 0.75 -> t_next = 0.5, c = 0.6 (so sqrt(1 - c^2) = 0.8), eps = [1, -2]
    # s = t_next c = 0.5 * 0.6 = 0.3;  sqrt(t_next^2 - s^2) = sqrt(0.25 - 0.09) = sqrt(0.16) = 0.4
    # x0_hat = x - 0.75 v = [1 - 1.5, -2 - 3] = [-0.5, -5];  eps_hat = x + 0.25 v = [1.5, -1]
    # mu = x0_hat * 0.5 + eps_hat * 0.4 = [-0.25 + 0.6, -2.5 - 0.4] = [0.35, -2.9]
    # (the same as the Euler step x + v dt = [0.5, -3] minus delta * eps_hat, delta = 0.5 - 0.4 = 0.1)
    # x_next = mu + s eps = [0.35 + 0.3, -2.9 - 0.6] = [0.65, -3.5]
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    v = torch.tensor([[2.0, 4.0]], dtype=torch.float64)
    eps = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    out = sde_step(v, x, 0.75, 0.5, 0.6, "sum", noise=eps, sde_type="cps")
    expected_mean = torch.tensor([[0.35, -2.9]], dtype=torch.float64)
    torch.testing.assert_close(out.mean, expected_mean, rtol=0, atol=1e-15)
    assert out.std.shape == (1,)
    assert out.std.item() == pytest.approx(0.3, abs=1e-16)
    torch.testing.assert_close(
        out.next_latents, torch.tensor([[0.65, -3.5]], dtype=torch.float64), rtol=0, atol=1e-15
    )
    # log p (sum over D = 2) = -||eps||^2 / 2 - D log s - D/2 log(2 pi)
    #                        = -(1 + 4)/2 - 2 log(0.3) - log(2 pi)
    #                        = -2.5 + 2.4079456086518722 - 1.8378770664093453 = -1.929931457757473
    assert out.log_prob.item() == pytest.approx(-1.929931457757473, abs=1e-13)
    # "mean": the same divided by D = 2
    out_mean = sde_step(v, x, 0.75, 0.5, 0.6, "mean", noise=eps, sde_type="cps")
    assert out_mean.log_prob.item() == pytest.approx(-0.9649657288787366, abs=1e-13)


def test_cps_per_sample_t_and_noise_scale():
    # sample 0: the step above, mean [0.35, -2.9], s = 0.3
    # sample 1: t = 0.5 -> t_next = 0.25, c = 0.6: s = 0.15, sqrt(0.0625 - 0.0225) = 0.2
    #   x0_hat = x - 0.5 v = [0, -4];  eps_hat = x + 0.5 v = [2, 0]
    #   mu = [0, -4] * 0.75 + [2, 0] * 0.2 = [0.4, -3]
    # sample 2: c = 0 at t = 0.5 -> 0.25: the Euler step x + v (-0.25) = [0.5, -3], s = 0
    x = torch.tensor([[1.0, -2.0]] * 3, dtype=torch.float64)
    v = torch.tensor([[2.0, 4.0]] * 3, dtype=torch.float64)
    t = torch.tensor([0.75, 0.5, 0.5], dtype=torch.float64)
    t_next = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    c = torch.tensor([0.6, 0.6, 0.0], dtype=torch.float64)
    mean, std = step_mean_and_std(v, x, t, t_next, c, sde_type="cps")
    expected = torch.tensor([[0.35, -2.9], [0.4, -3.0], [0.5, -3.0]], dtype=torch.float64)
    torch.testing.assert_close(mean, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(std, torch.tensor([0.3, 0.15, 0.0], dtype=torch.float64), rtol=0, atol=1e-16)
    # a scalar t and noise scale give a (B,) std as well
    _, std_scalar = step_mean_and_std(v, x, 0.75, 0.5, 0.6, sde_type="cps")
    assert std_scalar.shape == (3,)


def test_cps_mean_is_flow_grpos_formula():
    # guardrl writes the mean as Euler minus delta * eps_hat; flow_grpo's CPS branch writes
    # x0_hat (1 - t_next) + eps_hat sqrt(t_next^2 - s^2): the same value, to float64 rounding, for c in [0, 1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    v = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    t, t_next = 0.8125, 0.6
    for c in (0.0, 0.3, 0.6, math.sin(0.8 * math.pi / 2), 1.0):
        s = t_next * c
        x0_hat, eps_hat = x - t * v, x + (1 - t) * v
        reference = x0_hat * (1 - t_next) + eps_hat * math.sqrt(t_next**2 - s**2)
        torch.testing.assert_close(cps_mean(v, x, t, t_next, c), reference, rtol=1e-13, atol=1e-13)
    # c = 1 (eta = 1): the whole noise estimate is replaced, mu = x0_hat (1 - t_next), s = t_next
    mean, std = step_mean_and_std(v, x, t, t_next, 1.0, sde_type="cps")
    torch.testing.assert_close(mean, (x - t * v) * (1 - t_next), rtol=1e-14, atol=1e-14)
    assert torch.equal(std, torch.full((3,), t_next, dtype=torch.float64))


def test_cps_log_prob_is_torch_normal():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    v = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.7, 0.5, 0.3], dtype=torch.float64)
    t_next = torch.tensor([0.8, 0.55, 0.35, 0.1], dtype=torch.float64)
    c = math.sin(0.8 * math.pi / 2)
    for reduction in ("sum", "mean"):
        out = sde_step(v, x, t, t_next, c, reduction, generator=g, sde_type="cps")
        # s = t_next * c per sample
        torch.testing.assert_close(out.std, t_next * c, rtol=1e-15, atol=0)
        normal = torch.distributions.Normal(out.mean, out.std.view(4, 1, 1, 1))
        elementwise = normal.log_prob(out.next_latents)
        expected = elementwise.sum(dim=(1, 2, 3)) if reduction == "sum" else elementwise.mean(dim=(1, 2, 3))
        torch.testing.assert_close(out.log_prob, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------
# 2. eta = 0 is the Euler step (exactly: torch.equal, i.e. bit for bit up to the sign of a zero)
# --------------------------------------------------------------------------------------------------------


def _shifted_sigmas(steps: int) -> torch.Tensor:
    # SD3's shift 3: sigmas that are not dyadic, so the float64 -> float32 roundings are exercised
    return flow_match_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), steps)


def test_cps_with_zero_eta_is_exactly_the_euler_step():
    sigmas = _shifted_sigmas(6)
    # c = sin(0 * pi / 2) = 0 on every step, the SDE steps included
    scales = noise_scales(sigmas, 0.0, "cps", range(5))
    assert torch.equal(scales, torch.zeros(6, dtype=torch.float64))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 2, 2, generator=g)
    v = torch.randn(3, 4, 2, 2, generator=g)
    for k in range(6):
        t, t_next = float(sigmas[k]), float(sigmas[k + 1])
        out = sde_step(v, x, t, t_next, 0.0, "mean", noise=torch.ones_like(x), sde_type="cps")
        # no noise, no density, and the mean is ode_step's x + v dt, with dt formed in x's dtype as the step
        # forms it; it equals the FlowGRPO form at sigma_k = 0 too
        assert out.log_prob is None
        assert torch.equal(out.std, torch.zeros(3))
        dt = torch.tensor(t_next, dtype=torch.float32) - torch.tensor(t, dtype=torch.float32)
        assert torch.equal(out.mean, ode_step(v, x, dt))
        assert torch.equal(out.next_latents, out.mean)
        assert torch.equal(out.mean, sde_step(v, x, t, t_next, 0.0, "mean").mean)


def test_cps_rollout_with_zero_eta_is_the_ode_sampler():
    sigmas = _shifted_sigmas(5)
    x0 = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(3))

    def velocity(latents, t, k):
        return torch.tanh(latents) * (1.0 + t)

    cps = sample_rollouts(velocity, x0, sigmas, noise_scales(sigmas, 0.0, "cps", range(4)), sde_type="cps")
    ode = sample_rollouts(velocity, x0, sigmas, torch.zeros(5, dtype=torch.float64))
    assert cps.num_stored_steps == 0
    assert torch.equal(cps.final_latents, ode.final_latents)


def test_cps_last_step_is_deterministic():
    # t_next = 0: s = 0 * c = 0 and delta = 0 * c^2 / (...) = 0, so the step is x + v dt, not stored
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    v = torch.tensor([[2.0, 4.0]], dtype=torch.float64)
    out = sde_step(v, x, 0.25, 0.0, 1.0, "sum", sde_type="cps")
    assert out.log_prob is None
    # x + v (-0.25) = [1 - 0.5, -2 - 1] = [0.5, -3]
    assert torch.equal(out.next_latents, torch.tensor([[0.5, -3.0]], dtype=torch.float64))


# --------------------------------------------------------------------------------------------------------
# 3. noise_scales for cps
# --------------------------------------------------------------------------------------------------------


def test_noise_scales_cps_is_sin_of_eta_pi_half_on_sde_steps():
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    # eta = 1: sin(pi / 2) = 1 (exact in float64) on steps 1 and 2, 0 on the ODE steps 0 and 3
    assert torch.equal(noise_scales(sigmas, 1.0, "cps", [1, 2]), torch.tensor([0.0, 1.0, 1.0, 0.0]).double())
    # eta = 1/3: sin(pi / 6) = 1/2
    half = noise_scales(sigmas, 1.0 / 3.0, "cps", range(3))
    expected = torch.tensor([0.5, 0.5, 0.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(half, expected, rtol=0, atol=1e-15)
    # eta = 0.8 (flow_grpo's CPS configs): sin(0.4 pi) = 0.9510565162951535, independent of t
    scales = noise_scales(sigmas, 0.8, "cps", range(4))
    assert torch.equal(scales, torch.full((4,), 0.9510565162951535, dtype=torch.float64))


def test_noise_scales_cps_refuses_eta_above_one():
    sigmas = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError) as raised:
        noise_scales(sigmas, 1.5, "cps", [0])
    message = str(raised.value)
    assert "sampling.noise_level" in message and "1.5" in message and "[0, 1]" in message


def test_step_refuses_an_unknown_sde_type():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"sampling\.sde_type.*'flow_grpo', 'dance_grpo', 'cps'.*'ddim'"):
        step_mean_and_std(x, x, 0.5, 0.25, 0.1, sde_type="ddim")


# --------------------------------------------------------------------------------------------------------
# 4. rollout -> update round trip: the update recomputes mu_old exactly, the ratio is exactly 1
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cps_rollout_round_trip_gives_ratio_exactly_one(storage_dtype, reduction):
    steps = 6
    sigmas = _shifted_sigmas(steps)
    x0 = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(4))

    def velocity(latents, t, k):
        # a nonlinear function of x_t that differs per step k (a function of t would see the rollout's float64
        # t and the trajectory's float32 one: the backbone, not the sampler, owns that conversion)
        return torch.sin(latents) * (1.0 + 0.125 * k) - 0.25 * latents

    # every step is an SDE step, the last included: CPS makes that one deterministic (t_next = 0)
    scales = noise_scales(sigmas, 0.8, "cps", range(steps))
    traj = sample_rollouts(
        velocity,
        x0,
        sigmas,
        scales,
        reduction,
        generator=torch.Generator().manual_seed(5),
        storage_dtype=storage_dtype,
        sde_type="cps",
    )
    assert traj.step_indices == list(range(steps - 1))
    # the stored noise scale is c = sin(0.4 pi) in float32, and s = t_next * c
    assert torch.equal(traj.noise_scale_T, torch.full((steps - 1,), 0.9510565162951535, dtype=torch.float32))
    batch = traj.final_latents.shape[0]
    for j in range(traj.num_stored_steps):
        # what the update does (guardrl/update.py): the stored x_t upcast, the stored t, t_next, noise scale
        x, k = traj.latents_BTCHW[:, j].float(), traj.step_indices[j]
        mean, std = step_mean_and_std(
            velocity(x, traj.sigma_T[j], k),
            x,
            traj.sigma_T[j],
            traj.sigma_next_T[j],
            traj.noise_scale_T[j],
            sde_type="cps",
        )
        assert torch.equal(mean, traj.mean_old_BTCHW[:, j])
        assert torch.equal(std, (traj.sigma_next_T[j] * traj.noise_scale_T[j]).expand(batch))  # s = t_next c
        next_latents = traj.next_latents_BTCHW[:, j].float()
        assert torch.equal(gaussian_log_prob(next_latents, mean, std, reduction), traj.log_prob_old_BT[:, j])
        terms = compute_ratio_terms(
            next_latents, traj.mean_old_BTCHW[:, j], mean, std, traj.dt_T[j].expand(batch), reduction
        )
        for name, variant in RATIO_VARIANTS.items():
            assert torch.equal(variant(terms).log_ratio, torch.zeros(batch)), name
        # the SDE type is not in the trajectory: recomputed with the FlowGRPO form the mean is another one
        other, _ = step_mean_and_std(
            velocity(x, traj.sigma_T[j], k), x, traj.sigma_T[j], traj.sigma_next_T[j], traj.noise_scale_T[j]
        )
        assert not torch.equal(other, traj.mean_old_BTCHW[:, j])


# --------------------------------------------------------------------------------------------------------
# 5. the options: `sampling.sde_type: cps` and what it refuses
# --------------------------------------------------------------------------------------------------------


def test_cps_is_a_choice_of_the_options_and_the_parser():
    assert "cps" in SDE_TYPES
    # the Literal the CLI parser reads is built from SDE_TYPES
    assert "cps" in typing.get_args(typing.get_type_hints(SamplingOptions)["sde_type"])
    options = SamplingOptions(sde_type="cps", noise_level=0.8)
    assert options.sde_type == "cps" and options.sde_steps_range() == (0, 9)
    SamplingOptions(sde_type="cps", noise_level=1.0, sde_window=(2, 9))  # eta = 1 and a window up to step 8
    # every ratio variant works with a CPS step: it is Gaussian with s > 0 on every stored step
    for variant in RATIO_VARIANTS:
        check_compatible(options, GRPOOptions(ratio_variant=variant))


def test_preflight_accepts_cps_in_a_config(tmp_path):
    from guardrl.preflight import check, known_options

    assert "cps" in known_options()["model"].children["sampling"].children["sde_type"].choices
    path = tmp_path / "cps.yaml"
    path.write_text("model:\n  sampling:\n    sde_type: cps\n    noise_level: 0.8\n")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    quickstart = os.path.join(repo_root, "configs", "quickstart.yaml")
    check(["fit", "--config", quickstart, "--config", str(path)])


@pytest.mark.parametrize(
    "kwargs, option, value, allowed",
    [
        (
            dict(sde_type="cps", noise_level=1.5),
            r"sampling\.noise_level with sampling\.sde_type='cps'",
            r"got 1\.5$",
            r"must be a number in \[0, 1\]",
        ),
        (
            dict(sde_type="cps", noise_level=2.0),
            r"sampling\.noise_level with sampling\.sde_type='cps'",
            r"got 2\.0$",
            r"must be a number in \[0, 1\]",
        ),
        (
            dict(sde_type="cps", sde_window=(5, 10)),
            r"sampling\.sde_window=\[5, 10\] with sampling\.sde_type='cps'",
            r"\[5, 10\]",
            r"0 <= start < end <= 9 \(sampling\.num_inference_steps - 1\)",
        ),
        (
            dict(sde_type="cps", num_inference_steps=4, sde_window=(3, 4)),
            r"sampling\.sde_window=\[3, 4\] with sampling\.sde_type='cps'",
            r"\[3, 4\]",
            r"must leave out the last step 3: 0 <= start < end <= 3",
        ),
    ],
)
def test_sampling_options_refuse_what_cps_cannot_do(kwargs, option, value, allowed):
    with pytest.raises(ValueError) as raised:
        SamplingOptions(**kwargs)
    message = str(raised.value)
    for pattern in (option, value, allowed):
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"


def test_other_sde_types_keep_their_range_and_window():
    # the CPS limits are CPS's own: FlowGRPO and DanceGRPO take eta > 1 and a window with the last step
    SamplingOptions(sde_type="flow_grpo", noise_level=1.5, sde_window=(5, 10))
    SamplingOptions(sde_type="dance_grpo", noise_level=1.5, sde_window=(5, 10))


def test_cps_without_noise_is_refused_for_training():
    # valid alone (the ODE sampler), refused with training by the message every SDE type gets
    options = SamplingOptions(sde_type="cps", noise_level=0.0)
    with pytest.raises(ValueError, match=r"sampling\.noise_level=0 makes every step deterministic"):
        check_compatible(options, GRPOOptions(ratio_variant="flow_grpo"))
    with pytest.raises(ValueError, match=r"ratio_variant='grpo_guard' \(RatioNorm\).*noise_level=0"):
        check_compatible(options, GRPOOptions(ratio_variant="grpo_guard"))
