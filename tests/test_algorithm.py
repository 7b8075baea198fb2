"""Unit tests of the pure GRPO math: the importance ratio and its five variants, group advantages, the clipped
policy loss, the KL to the reference policy and the clip-range units (SPEC.md section 1).

Notation: dmu = mu_old - mu_theta, x_next = mu_old + s eps, log r = -||dmu||^2/(2 s^2) - (dmu . eps)/s.
Every expected number is worked by hand in the comment above its assert, or is a closed form in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from guardrl.algorithm import (
    RATIO_VARIANTS,
    clip_shares,
    clipped_policy_loss,
    compute_ratio_terms,
    effective_clip_range,
    group_advantages,
    kl_to_reference,
    shuffle_within_groups,
)
from guardrl.sampling import gaussian_log_prob

F64 = torch.float64


# A hand example, B = 2 samples of D = 2 elements, all numbers dyadic (exact in binary):
#   sample 0: dmu = [1, 2],      s = 0.5,  eps = [0.5, -1], dt = -0.25
#   sample 1: dmu = [0.5, -0.5], s = 0.25, eps = [1, 2],    dt = -0.125
# mu_theta = 0, so mu_old = dmu and x_next = dmu + s eps = [[1.25, 1.5], [0.75, 0.0]].
#   ||dmu||^2 = [5, 0.5];   mean_shift (sum) = ||dmu||^2/(2 s^2) = [5/0.5, 0.5/0.125] = [10, 4]
#   dmu . eps = [0.5 - 2, 0.5 - 1] = [-1.5, -0.5];   (dmu . eps)/s = [-3, -2]
#   log r (sum) = -mean_shift - (dmu . eps)/s = [-10 + 3, -4 + 2] = [-7, -2]
#   normalized = -(dmu . eps) = [1.5, 0.5]
# With "mean" reduction every term is divided by D = 2.
def _hand_example():
    mean_theta = torch.zeros(2, 2, dtype=F64)
    mean_old = torch.tensor([[1.0, 2.0], [0.5, -0.5]], dtype=F64)
    std = torch.tensor([0.5, 0.25], dtype=F64)
    eps = torch.tensor([[0.5, -1.0], [1.0, 2.0]], dtype=F64)
    next_latents = mean_old + std[:, None] * eps
    dt = torch.tensor([-0.25, -0.125], dtype=F64)
    return next_latents, mean_old, mean_theta, std, dt, eps


def _t(*values):
    return torch.tensor(values, dtype=F64)


# --------------------------------------------------------------------------------------------------------
# 7. Monte Carlo: E[log r] = -||dmu||^2/(2 s^2), and log r is the difference of two log-densities
# --------------------------------------------------------------------------------------------------------


def test_raw_log_ratio_expectation_monte_carlo():
    g = torch.Generator().manual_seed(0)
    D, N = 64, 200_000
    s = 0.3
    dmu = 0.05 * torch.randn(D, generator=g, dtype=F64)
    mean_theta = torch.randn(D, generator=g, dtype=F64)
    mean_old = mean_theta + dmu
    eps = torch.randn(N, D, generator=g, dtype=F64)
    next_latents = mean_old + s * eps
    terms = compute_ratio_terms(
        next_latents,
        mean_old.expand(N, D),
        mean_theta.expand(N, D),
        torch.full((N,), s, dtype=F64),
        torch.full((N,), -0.1, dtype=F64),
        "sum",
    )
    log_r = terms.raw_log_ratio
    expected = -(dmu**2).sum().item() / (2 * s**2)
    # ||dmu||^2 ~ 64 * 0.0025 = 0.16 -> expected ~ -0.16/0.18 ~ -0.9; log r has variance ||dmu||^2/s^2 ~ 1.8
    se = log_r.std().item() / math.sqrt(N)  # ~ sqrt(1.8)/447 ~ 0.003
    assert abs(expected) > 50 * se  # a log-ratio centred at 0 (a dropped shift) would fail by > 50 SE
    assert abs(log_r.mean().item() - expected) < 5 * se
    # the spread: Var[log r] = Var[(dmu . eps)/s] = ||dmu||^2 / s^2 (relative SE of a variance ~ 0.3%)
    assert log_r.var().item() == pytest.approx((dmu**2).sum().item() / s**2, rel=0.02)
    # the mean shift itself is the same per-sample constant ||dmu||^2/(2 s^2) = -expected
    torch.testing.assert_close(terms.mean_shift, torch.full((N,), -expected, dtype=F64), rtol=1e-12, atol=0)


def test_raw_log_ratio_is_difference_of_log_densities_per_sample():
    g = torch.Generator().manual_seed(1)
    B, D = 6, 64
    mean_theta = torch.randn(B, D, generator=g, dtype=F64)
    mean_old = mean_theta + 0.1 * torch.randn(B, D, generator=g, dtype=F64)
    std = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.5, 0.8], dtype=F64)
    next_latents = mean_old + std[:, None] * torch.randn(B, D, generator=g, dtype=F64)
    for reduction in ("sum", "mean"):
        terms = compute_ratio_terms(
            next_latents, mean_old, mean_theta, std, -0.1 * torch.ones(B, dtype=F64), reduction
        )
        # log r = log N(x_next; mu_theta, s) - log N(x_next; mu_old, s), sample by sample
        expected = gaussian_log_prob(next_latents, mean_theta, std, reduction) - gaussian_log_prob(
            next_latents, mean_old, std, reduction
        )
        torch.testing.assert_close(terms.raw_log_ratio, expected, rtol=1e-10, atol=1e-10)
    # on the hand example: log r (sum) = [-7, -2]
    next_latents, mean_old, mean_theta, std, dt, _ = _hand_example()
    terms = compute_ratio_terms(next_latents, mean_old, mean_theta, std, dt, "sum")
    torch.testing.assert_close(terms.raw_log_ratio, _t(-7.0, -2.0), rtol=0, atol=1e-14)
    lp_diff = gaussian_log_prob(next_latents, mean_theta, std, "sum") - gaussian_log_prob(
        next_latents, mean_old, std, "sum"
    )
    torch.testing.assert_close(lp_diff, _t(-7.0, -2.0), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------------
# 8. RatioNorm: the per-sample -(dmu . eps)
# --------------------------------------------------------------------------------------------------------


def test_ratio_norm_hand_example_sum_and_mean():
    next_latents, mean_old, mean_theta, std, dt, _ = _hand_example()
    terms = compute_ratio_terms(next_latents, mean_old, mean_theta, std, dt, "sum")
    # -(dmu . eps) = [1.5, 0.5]
    torch.testing.assert_close(terms.normalized_log_ratio, _t(1.5, 0.5), rtol=0, atol=1e-14)
    # s (log r + mean_shift) = [0.5 (-7 + 10), 0.25 (-2 + 4)] = [1.5, 0.5]
    torch.testing.assert_close(
        std * (terms.raw_log_ratio + terms.mean_shift), _t(1.5, 0.5), rtol=0, atol=1e-14
    )
    torch.testing.assert_close(
        RATIO_VARIANTS["ratio_norm"](terms).log_ratio, _t(1.5, 0.5), rtol=0, atol=1e-14
    )
    # a batch-wide scalar shift mean([10, 4]) = 7 would give [0.5 (-7 + 7), 0.25 (-2 + 7)] = [0, 1.25] instead
    batch_scalar = std * (terms.raw_log_ratio + terms.mean_shift.mean())
    assert not torch.allclose(batch_scalar, _t(1.5, 0.5))

    terms = compute_ratio_terms(next_latents, mean_old, mean_theta, std, dt, "mean")
    # mean reduction, D = 2: -(dmu . eps)/2 = [0.75, 0.25]
    torch.testing.assert_close(terms.normalized_log_ratio, _t(0.75, 0.25), rtol=0, atol=1e-14)
    torch.testing.assert_close(
        std * (terms.raw_log_ratio + terms.mean_shift), _t(0.75, 0.25), rtol=0, atol=1e-14
    )


def test_ratio_norm_per_sample_with_different_dmu_eps_and_std():
    g = torch.Generator().manual_seed(2)
    B, shape = 4, (2, 4, 4)  # D = 32
    D = 32
    mean_theta = torch.randn(B, *shape, generator=g, dtype=F64)
    # a different size of policy change per sample, so the per-sample mean shifts differ
    dmu = torch.randn(B, *shape, generator=g, dtype=F64) * _t(0.01, 0.05, 0.1, 0.3).view(B, 1, 1, 1)
    eps = torch.randn(B, *shape, generator=g, dtype=F64)
    std = _t(0.02, 0.1, 0.4, 0.9)
    mean_old = mean_theta + dmu
    next_latents = mean_old + std.view(B, 1, 1, 1) * eps
    dt = _t(-0.05, -0.1, -0.2, -0.3)
    dot = (dmu * eps).sum(dim=(1, 2, 3))  # dmu . eps per sample

    terms = compute_ratio_terms(next_latents, mean_old, mean_theta, std, dt, "sum")
    # sum: normalized = -(dmu . eps), sample by sample
    torch.testing.assert_close(terms.normalized_log_ratio, -dot, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(RATIO_VARIANTS["ratio_norm"](terms).log_ratio, -dot, rtol=1e-9, atol=1e-12)
    # = s (raw + mean_shift) with the per-sample shift
    torch.testing.assert_close(std * (terms.raw_log_ratio + terms.mean_shift), -dot, rtol=1e-9, atol=1e-12)
    # mean_shift = ||dmu||^2/(2 s^2) per sample
    torch.testing.assert_close(
        terms.mean_shift, (dmu**2).sum(dim=(1, 2, 3)) / (2 * std**2), rtol=1e-12, atol=0
    )
    # the batch-scalar form (mean of the shifts) is measurably different here: the test can tell them apart
    batch_scalar = std * (terms.raw_log_ratio + terms.mean_shift.mean())
    assert (batch_scalar + dot).abs().max().item() > 1e-2

    terms = compute_ratio_terms(next_latents, mean_old, mean_theta, std, dt, "mean")
    # mean: normalized = -(dmu . eps) / D with D = 32
    torch.testing.assert_close(terms.normalized_log_ratio, -dot / D, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(RATIO_VARIANTS["grpo_guard"](terms).log_ratio, -dot / D, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        std * (terms.raw_log_ratio + terms.mean_shift), -dot / D, rtol=1e-9, atol=1e-12
    )


def test_ratio_terms_gradients_flow_through_mean_theta():
    next_latents, mean_old, mean_theta, std, dt, eps = _hand_example()
    mean_theta = mean_theta.clone().requires_grad_(True)
    terms = compute_ratio_terms(next_latents, mean_old, mean_theta, std, dt, "sum")
    # d(-(mu_old - mu_theta) . eps)/d mu_theta = eps
    (grad,) = torch.autograd.grad(terms.normalized_log_ratio.sum(), mean_theta)
    torch.testing.assert_close(grad, eps, rtol=0, atol=1e-14)
    terms = compute_ratio_terms(next_latents, mean_old, mean_theta, std, dt, "sum")
    # d log r / d mu_theta = dmu/s^2 + eps/s:
    #   sample 0 [1,2]/0.25 + [0.5,-1]/0.5 = [4,8] + [1,-2] = [5, 6]
    #   sample 1 [0.5,-0.5]/0.0625 + [1,2]/0.25 = [8,-8] + [4,8] = [12, 0]
    (grad,) = torch.autograd.grad(terms.raw_log_ratio.sum(), mean_theta)
    torch.testing.assert_close(grad, torch.tensor([[5.0, 6.0], [12.0, 0.0]], dtype=F64), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------------
# 9. the five variants
# --------------------------------------------------------------------------------------------------------


def test_the_five_variants_of_the_ablation_are_registered():
    # A subset check: a new variant is one more function in RATIO_VARIANTS, with no list to update here.
    assert {"flow_grpo", "temp_reweight", "mean_revised", "ratio_norm", "grpo_guard"} <= set(RATIO_VARIANTS)


@pytest.mark.parametrize(
    "variant, reduction, log_ratio, weight",
    [
        # log r = [-7, -2], weight 1
        ("flow_grpo", "sum", (-7.0, -2.0), (1.0, 1.0)),
        # log r, weight s = [0.5, 0.25]
        ("temp_reweight", "sum", (-7.0, -2.0), (0.5, 0.25)),
        # log r + ||dmu||^2/(2 s^2) = [-7 + 10, -2 + 4] = [3, 2], weight 1
        ("mean_revised", "sum", (3.0, 2.0), (1.0, 1.0)),
        # -(dmu . eps) = [1.5, 0.5], weight 1
        ("ratio_norm", "sum", (1.5, 0.5), (1.0, 1.0)),
        # -(dmu . eps) = [1.5, 0.5], weight 1/|dt| = [1/0.25, 1/0.125] = [4, 8]
        ("grpo_guard", "sum", (1.5, 0.5), (4.0, 8.0)),
        # mean reduction (D = 2): every log-ratio halves, weights are unchanged
        ("flow_grpo", "mean", (-3.5, -1.0), (1.0, 1.0)),
        ("temp_reweight", "mean", (-3.5, -1.0), (0.5, 0.25)),
        ("mean_revised", "mean", (1.5, 1.0), (1.0, 1.0)),
        ("ratio_norm", "mean", (0.75, 0.25), (1.0, 1.0)),
        ("grpo_guard", "mean", (0.75, 0.25), (4.0, 8.0)),
    ],
)
def test_ratio_variant_hand_example(variant, reduction, log_ratio, weight):
    next_latents, mean_old, mean_theta, std, dt, _ = _hand_example()
    terms = compute_ratio_terms(next_latents, mean_old, mean_theta, std, dt, reduction)
    out = RATIO_VARIANTS[variant](terms)
    assert out.log_ratio.shape == (2,) and out.weight.shape == (2,)
    torch.testing.assert_close(out.log_ratio, _t(*log_ratio), rtol=0, atol=1e-14)
    torch.testing.assert_close(out.weight, _t(*weight), rtol=0, atol=0)


def test_ratio_terms_pieces_on_hand_example():
    next_latents, mean_old, mean_theta, std, dt, _ = _hand_example()
    terms = compute_ratio_terms(next_latents, mean_old, mean_theta, std, dt, "sum")
    # mean_shift = [10, 4]; std and dt are passed through
    torch.testing.assert_close(terms.mean_shift, _t(10.0, 4.0), rtol=0, atol=1e-14)
    assert torch.equal(terms.std, std) and torch.equal(terms.dt, dt)
    terms = compute_ratio_terms(next_latents, mean_old, mean_theta, std, dt, "mean")
    # mean_shift / D = [5, 2]
    torch.testing.assert_close(terms.mean_shift, _t(5.0, 2.0), rtol=0, atol=1e-14)


# --------------------------------------------------------------------------------------------------------
# 10. unchanged policy -> log-ratio exactly 0
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_every_variant_gives_exactly_zero_when_means_are_equal(dtype, reduction):
    g = torch.Generator().manual_seed(3)
    B = 3
    mean = torch.randn(B, 4, 8, 8, generator=g, dtype=dtype)
    std = torch.tensor([0.01, 0.2, 0.7], dtype=dtype)
    next_latents = mean + std.view(B, 1, 1, 1) * torch.randn(B, 4, 8, 8, generator=g, dtype=dtype)
    dt = torch.tensor([-0.02, -0.1, -0.3], dtype=dtype)
    # dmu = 0 exactly -> mean_shift = 0 and dmu . eps = 0 -> every log-ratio is 0, r = e^0 = 1
    terms = compute_ratio_terms(next_latents, mean, mean.clone(), std, dt, reduction)
    for name, variant in RATIO_VARIANTS.items():
        out = variant(terms)
        assert torch.equal(out.log_ratio, torch.zeros(B, dtype=dtype)), name
        assert torch.equal(torch.exp(out.log_ratio), torch.ones(B, dtype=dtype)), name


# --------------------------------------------------------------------------------------------------------
# 11. a zero std is refused
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_std", [(0.5, 0.0), (0.0, 0.0), (0.5, -0.1)])
def test_compute_ratio_terms_rejects_non_positive_std(bad_std):
    next_latents, mean_old, mean_theta, _, dt, _ = _hand_example()
    with pytest.raises(ValueError, match="variance") as info:
        compute_ratio_terms(next_latents, mean_old, mean_theta, _t(*bad_std), dt, "sum")
    assert "noise_level" in str(info.value)


# --------------------------------------------------------------------------------------------------------
# 12. group advantages
# --------------------------------------------------------------------------------------------------------


def test_group_advantages_hand_table_group_std():
    rewards = _t(1.0, 2.0, 3.0, 4.0, 4.0, 4.0)
    adv = group_advantages(rewards, group_size=3, std_scope="group", clip=None)
    # group 0: mean 2, population std sqrt(((-1)^2 + 0 + 1^2)/3) = sqrt(2/3) = 0.816496580927726
    #   A = (r - 2)/(0.816496580927726 + 1e-4) = [-1.2245948897605123, 0, 1.2245948897605123]
    # group 1: constant -> exactly 0
    a = 1.0 / (math.sqrt(2.0 / 3.0) + 1e-4)
    assert a == pytest.approx(1.2245948897605123, abs=1e-15)
    torch.testing.assert_close(adv, _t(-a, 0.0, a, 0.0, 0.0, 0.0), rtol=1e-14, atol=0)
    assert torch.equal(adv[3:], torch.zeros(3, dtype=F64))


def test_group_advantages_constant_group_of_inexact_values_is_exactly_zero():
    rewards = _t(0.1, 0.1, 0.1, 0.3, 0.5, 0.7)
    # the premise: the floating mean of three 0.1's is not 0.1 (0.30000000000000004/3 = 0.10000000000000002)
    assert rewards[:3].mean().item() != 0.1
    adv = group_advantages(rewards, group_size=3, std_scope="group", clip=None)
    # group 0 constant -> exactly 0.0, not (0.1 - 0.10000000000000002)/1e-4 ~ -2.8e-13
    assert torch.equal(adv[:3], torch.zeros(3, dtype=F64))
    # group 1: mean 0.5, std sqrt((0.04 + 0 + 0.04)/3) = 0.16329931618554522
    #   A = [-0.2, 0, 0.2]/(0.16329931618554522 + 1e-4) = [-1.223995330389838, 0, 1.223995330389838]
    torch.testing.assert_close(
        adv[3:], _t(-1.223995330389838, 0.0, 1.223995330389838), rtol=1e-12, atol=1e-15
    )
    # float32 rewards: the same, exactly
    adv32 = group_advantages(rewards.float(), group_size=3, clip=None)
    assert torch.equal(adv32[:3], torch.zeros(3))


def test_group_advantages_global_std():
    rewards = _t(1.0, 2.0, 3.0, 4.0, 4.0, 4.0)
    adv = group_advantages(rewards, group_size=3, std_scope="global", clip=None)
    # global population std of all 6: mean 3, squares 4 + 1 + 0 + 1 + 1 + 1 = 8
    #   -> sqrt(8/6) = 1.1547005383792515
    # group 0 still centred on its own mean 2: A = [-1, 0, 1]/(1.1547005383792515 + 1e-4)
    #   = +-0.8659504102790668
    a = 1.0 / (math.sqrt(8.0 / 6.0) + 1e-4)
    assert a == pytest.approx(0.8659504102790668, abs=1e-15)
    torch.testing.assert_close(adv, _t(-a, 0.0, a, 0.0, 0.0, 0.0), rtol=1e-14, atol=0)


def test_group_advantages_clip():
    rewards = _t(1.0, 2.0, 3.0, 4.0, 4.0, 4.0)
    # +-1.2246 (group std) clamped to +-1.0
    adv = group_advantages(rewards, group_size=3, std_scope="group", clip=1.0)
    assert torch.equal(adv, _t(-1.0, 0.0, 1.0, 0.0, 0.0, 0.0))
    # +-0.866 (global std) is inside the clip and kept
    adv = group_advantages(rewards, group_size=3, std_scope="global", clip=1.0)
    torch.testing.assert_close(adv[:3], _t(-0.8659504102790668, 0.0, 0.8659504102790668), rtol=1e-14, atol=0)
    # the default clip of 5: the group [0]*99 + [1] has mean 0.01, std sqrt(0.01 * 0.99) = 0.0994987,
    # A_max = 0.99/(0.0994987 + 1e-4) = 9.9399 -> clamped to 5
    rewards = torch.zeros(100, dtype=F64)
    rewards[-1] = 1.0
    adv = group_advantages(rewards, group_size=100)
    assert adv[-1].item() == 5.0
    # the others: -0.01/(0.09949874371066199 + 1e-4) = -0.10040...
    assert adv[0].item() == pytest.approx(-0.01 / (math.sqrt(0.0099) + 1e-4), rel=1e-12)


@pytest.mark.parametrize("group_size", [4, 0, 7])
def test_group_advantages_group_size_must_divide(group_size):
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.arange(6, dtype=F64), group_size=group_size)


def test_group_advantages_bad_std_scope_and_shape():
    with pytest.raises(ValueError, match="std_scope"):
        group_advantages(torch.arange(6, dtype=F64), group_size=3, std_scope="batch")
    with pytest.raises(ValueError, match="shape"):
        group_advantages(torch.zeros(2, 3, dtype=F64), group_size=3)


def test_null_control_permutes_within_each_group_only():
    advantages = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0], dtype=F64)
    shuffled = shuffle_within_groups(advantages, 4, torch.Generator().manual_seed(0))
    groups = shuffled.reshape(2, 4)
    assert sorted(groups[0].tolist()) == [1.0, 2.0, 3.0, 4.0] and sorted(groups[1].tolist()) == [
        10.0,
        20.0,
        30.0,
        40.0,
    ]
    # Over seeds, every position sees every value of its group: the values no longer follow the samples.
    seen = {i: set() for i in range(8)}
    for seed in range(64):
        out = shuffle_within_groups(advantages, 4, torch.Generator().manual_seed(seed))
        for i, value in enumerate(out.tolist()):
            seen[i].add(value)
    assert all(seen[i] == {1.0, 2.0, 3.0, 4.0} for i in range(4))
    assert all(seen[i] == {10.0, 20.0, 30.0, 40.0} for i in range(4, 8))
    # Same generator seed, same permutation (a resumed run redraws it).
    again = shuffle_within_groups(advantages, 4, torch.Generator().manual_seed(0))
    assert torch.equal(again, shuffled)
    with pytest.raises(ValueError, match="groups of 3"):
        shuffle_within_groups(advantages, 3, torch.Generator())


# --------------------------------------------------------------------------------------------------------
# 13. clipped policy loss
# --------------------------------------------------------------------------------------------------------

C = 0.2


@pytest.mark.parametrize(
    "adv, log_ratio, loss, grad",
    [
        # (a) A = 2 > 0, r = e > 1.2: -A r = -2e, -A clip = -2 * 1.2 = -2.4; max = -2.4 (clipped), grad 0
        (2.0, 1.0, -2.4, 0.0),
        # (b) A = 1 > 0, r = 0.5 < 0.8: -A r = -0.5 > -A * 0.8 = -0.8 -> unclipped, grad -A r = -0.5
        (1.0, math.log(0.5), -0.5, -0.5),
        # (c) A = -1 < 0, r = 1.5 > 1.2: -A r = 1.5 > -A * 1.2 = 1.2 -> unclipped, grad -A r = 1.5
        (-1.0, math.log(1.5), 1.5, 1.5),
        # (d) A = -2 < 0, r = 0.5 < 0.8: -A r = 1.0 < -A * 0.8 = 1.6 -> clipped 1.6, grad 0
        (-2.0, math.log(0.5), 1.6, 0.0),
        # (e) A = 3, r = 1.1 inside [0.8, 1.2]: both terms -3.3, grad -A r = -3.3
        (3.0, math.log(1.1), -3.3, -3.3),
        # (e') A = -0.5, r = 0.9 inside: both 0.45, grad 0.45
        (-0.5, math.log(0.9), 0.45, 0.45),
    ],
)
def test_clipped_policy_loss_each_branch(adv, log_ratio, loss, grad):
    lr = torch.tensor([log_ratio], dtype=F64, requires_grad=True)
    out, _ = clipped_policy_loss(lr, _t(adv), _t(1.0), C)
    assert out.item() == pytest.approx(loss, abs=1e-12)
    (g,) = torch.autograd.grad(out, lr)
    assert g.item() == pytest.approx(grad, abs=1e-12)


def test_clipped_policy_loss_batch_weights_mean_and_stats():
    # the five branches (a)-(e) above as one batch
    log_ratio = torch.tensor(
        [1.0, math.log(0.5), math.log(1.5), math.log(0.5), math.log(1.1)], dtype=F64, requires_grad=True
    )
    adv = _t(2.0, 1.0, -1.0, -2.0, 3.0)
    # unit weights: per-sample [-2.4, -0.5, 1.5, 1.6, -3.3], sum -3.1, mean -0.62
    loss, stats = clipped_policy_loss(log_ratio, adv, torch.ones(5, dtype=F64), C)
    assert loss.item() == pytest.approx(-0.62, abs=1e-12)
    (g,) = torch.autograd.grad(loss, log_ratio)
    # grad = [0, -0.5, 1.5, 0, -3.3] / 5
    torch.testing.assert_close(g, _t(0.0, -0.1, 0.3, 0.0, -0.66), rtol=0, atol=1e-12)

    # weights [1, 2, 0.5, 3, 4]: per-sample [-2.4, -1.0, 0.75, 4.8, -13.2], sum -11.05, mean -2.21
    weight = _t(1.0, 2.0, 0.5, 3.0, 4.0)
    loss, stats = clipped_policy_loss(log_ratio, adv, weight, C)
    assert loss.item() == pytest.approx(-2.21, abs=1e-12)
    (g,) = torch.autograd.grad(loss, log_ratio)
    # grad = w (-A r) / 5 on unclipped samples = [0, -1.0, 0.75, 0, -13.2] / 5
    torch.testing.assert_close(g, _t(0.0, -0.2, 0.15, 0.0, -2.64), rtol=0, atol=1e-12)

    # stats: r = [e, 0.5, 1.5, 0.5, 1.1]; upper r > 1.2: [T, F, T, F, F]; lower r < 0.8: [F, T, F, T, F]
    torch.testing.assert_close(stats.ratio, _t(math.e, 0.5, 1.5, 0.5, 1.1), rtol=1e-14, atol=0)
    assert stats.clipped_upper.tolist() == [True, False, True, False, False]
    assert stats.clipped_lower.tolist() == [False, True, False, True, False]
    # approx_kl = (r - 1) - log r = [e - 2, -0.5 + log 2, 0.5 - log 1.5, -0.5 + log 2, 0.1 - log 1.1]
    #          = [0.7182818284590451, 0.1931471805599453, 0.0945348918918356, 0.1931471805599453,
    #             0.0046898201956751]
    torch.testing.assert_close(
        stats.approx_kl,
        _t(
            0.7182818284590451,
            0.1931471805599453,
            0.09453489189183562,
            0.1931471805599453,
            0.004689820195675071,
        ),
        rtol=0,
        atol=1e-13,
    )
    assert not stats.ratio.requires_grad and not stats.approx_kl.requires_grad


def test_clip_shares_count_the_loss_flags_by_advantage_sign():
    # the batch above: upper [T, F, T, F, F], lower [F, T, F, T, F], A = [2, 1, -1, -2, 3]
    # positives {0, 1, 4}: above the band only 0 -> 1/3; negatives {2, 3}: below the band only 3 -> 1/2
    # (sample 2 is above the band with A < 0: outside, yet not a clipped negative); outside: 4 of 5
    log_ratio = torch.tensor([1.0, math.log(0.5), math.log(1.5), math.log(0.5), math.log(1.1)], dtype=F64)
    adv = _t(2.0, 1.0, -1.0, -2.0, 3.0)
    _, stats = clipped_policy_loss(log_ratio, adv, torch.ones(5, dtype=F64), C)
    shares = clip_shares(stats.clipped_upper, stats.clipped_lower, adv)
    assert {name: float(value) for name, value in shares.items()} == pytest.approx(
        {"pos_upper": 1 / 3, "neg_lower": 1 / 2, "outside_band": 4 / 5}, abs=1e-15
    )
    # uint8 flags (as gathered across ranks) count the same; no positive advantage at all: 0, not NaN
    upper, lower = stats.clipped_upper.to(torch.uint8), stats.clipped_lower.to(torch.uint8)
    as_bytes = clip_shares(upper, lower, -adv.abs())
    assert float(as_bytes["pos_upper"]) == 0.0 and float(as_bytes["neg_lower"]) == pytest.approx(2 / 5)


@pytest.mark.parametrize("clip_range", [0.0, -0.1, float("nan")])
def test_clipped_policy_loss_rejects_non_positive_clip(clip_range):
    with pytest.raises(ValueError, match="clip_range"):
        clipped_policy_loss(
            torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64), clip_range
        )


def test_clipped_policy_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        clipped_policy_loss(
            torch.zeros(3, dtype=F64), torch.zeros(2, dtype=F64), torch.ones(3, dtype=F64), 0.2
        )


# --------------------------------------------------------------------------------------------------------
# 14. KL to the reference policy
# --------------------------------------------------------------------------------------------------------


def test_kl_to_reference_hand_example():
    mean_theta = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=F64)
    mean_ref = torch.tensor([[0.0, 0.0], [0.5, 0.5]], dtype=F64)
    std = _t(0.5, 0.25)
    # sample 0: ||[1, 2]||^2 / (2 * 0.25) = 5 / 0.5 = 10;  sample 1: 0.5 / (2 * 0.0625) = 4
    torch.testing.assert_close(
        kl_to_reference(mean_theta, mean_ref, std, "sum"), _t(10.0, 4.0), rtol=0, atol=1e-14
    )
    # mean over D = 2 elements: [5, 2]
    torch.testing.assert_close(
        kl_to_reference(mean_theta, mean_ref, std, "mean"), _t(5.0, 2.0), rtol=0, atol=1e-14
    )


def test_kl_to_reference_matches_torch_kl_divergence():
    g = torch.Generator().manual_seed(4)
    B = 3
    mean_theta = torch.randn(B, 2, 4, 4, generator=g, dtype=F64)
    mean_ref = mean_theta + 0.1 * torch.randn(B, 2, 4, 4, generator=g, dtype=F64)
    std = _t(0.05, 0.3, 1.1)
    s = std.view(B, 1, 1, 1).expand_as(mean_theta)
    Normal = torch.distributions.Normal
    expected = torch.distributions.kl_divergence(Normal(mean_theta, s), Normal(mean_ref, s))
    torch.testing.assert_close(
        kl_to_reference(mean_theta, mean_ref, std, "sum"), expected.sum(dim=(1, 2, 3)), rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(
        kl_to_reference(mean_theta, mean_ref, std, "mean"),
        expected.mean(dim=(1, 2, 3)),
        rtol=1e-12,
        atol=1e-14,
    )


# --------------------------------------------------------------------------------------------------------
# 15. clip-range units
# --------------------------------------------------------------------------------------------------------


def test_effective_clip_range_units():
    # "log_prob": c is used as is, whatever the reduction and D
    assert effective_clip_range(1e-4, "log_prob", "mean", 65536) == 1e-4
    assert effective_clip_range(0.2, "log_prob", "sum", 65536) == 0.2
    # "per_sqrt_element", mean: c / sqrt(D) = 5.12e-4 / 256 = 2e-6 (SD3.5-M at 512 px: D = 16 * 64 * 64)
    got = effective_clip_range(5.12e-4, "per_sqrt_element", "mean", 65536)
    assert got == 5.12e-4 / 256
    assert got == pytest.approx(2e-6, rel=1e-12)
    # "per_sqrt_element", sum: c * sqrt(D) = 5.12e-4 * 256 = 0.131072
    got = effective_clip_range(5.12e-4, "per_sqrt_element", "sum", 65536)
    assert got == 5.12e-4 * 256
    assert got == pytest.approx(0.131072, rel=1e-12)
    # D = 4096 (64 x 64): sqrt = 64 -> 0.064 / 64 = 0.001
    assert effective_clip_range(0.064, "per_sqrt_element", "mean", 4096) == pytest.approx(1e-3, rel=1e-12)


@pytest.mark.parametrize("clip_range", [0.0, -1e-4, float("inf"), float("nan")])
def test_effective_clip_range_rejects_bad_clip(clip_range):
    with pytest.raises(ValueError, match="clip_range"):
        effective_clip_range(clip_range, "log_prob", "mean", 16)


def test_effective_clip_range_rejects_unknown_unit():
    with pytest.raises(ValueError, match="clip_range_unit"):
        effective_clip_range(1e-4, "per_element", "mean", 16)
