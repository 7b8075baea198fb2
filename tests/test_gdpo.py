"""GDPO (grpo.reward_aggregation: gdpo): each reward normalised within its group before the weighted sum, the
sum then divided by its std over the batch (guardrl/algorithm/advantages.py, `gdpo_advantages`)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from guardrl.run_advantages import iteration_advantages

from guardrl.algorithm import REWARD_AGGREGATIONS, gdpo_advantages, group_advantages
from guardrl.cli import main
from guardrl.options import GRPOOptions
from tests.conftest import tiny_fit_args

F64 = torch.float64


def _t(*values):
    return torch.tensor(values, dtype=F64)


# The hand example: K = 2 rewards, N = 2 groups of G = 3, eps = 1e-4 (as group_advantages), no clip.
#   reward a (weight 1):   group 0 [1, 2, 3]        group 1 [0, 0, 3]
#   reward b (weight 2):   group 0 [300, 100, 200]  group 1 [500, 500, 500]   (100x a's scale)
# Step 1, each reward in its own group, (r - mean) / (population std + eps):
#   a, group 0: mean 2, std sqrt(2/3) = 0.816496580927726 -> [-x, 0, x],
#       x = 1/(sqrt(2/3) + 1e-4) = 1.2245948897605123
#   a, group 1: mean 1, deviations [-1, -1, 2], std sqrt(6/3) = sqrt(2) -> [-y, -y, 2y],
#       y = 1/(sqrt(2) + 1e-4) = 0.7070567847218314
#   b, group 0: mean 200, deviations [100, -100, 0], std sqrt(20000/3) = 81.64965809277261 -> [z, -z, 0],
#       z = 100/(81.64965809277261 + 1e-4) = 1.224743371393426
#   b, group 1: constant -> exactly [0, 0, 0]
# Step 2, S = 1 * a + 2 * b:
#   group 0 [-x + 2z, -2z, x] = [1.2248918530263395, -2.449486742786852, 1.2245948897605123]
#   group 1 [-y, -y, 2y]      = [-0.7070567847218314, -0.7070567847218314, 1.4141135694436628]
# Step 3, S's mean over the batch is 0 (every group's normalised rewards sum to 0); its population std is
#   sqrt(sum S^2 / 6) = 1.4141872683425774 (about sqrt((1.5 + 6 + 1.5 + 0.5 + 0.5 + 2) / 6) = sqrt(2)), and
#   A = S / (1.4141872683425774 + 1e-4):
#   group 0 [0.8660841969268429, -1.7319584200580684, 0.8658742231312256]  ~[sqrt(3)/2, -sqrt(3), sqrt(3)/2]
#   group 1 [-0.49993859136584107, -0.49993859136584107, 0.9998771827316821]  ~[-1/2, -1/2, 1]
HAND_A = _t(1.0, 2.0, 3.0, 0.0, 0.0, 3.0)
HAND_B = _t(300.0, 100.0, 200.0, 500.0, 500.0, 500.0)
HAND_GDPO = _t(
    0.8660841969268429,
    -1.7319584200580684,
    0.8658742231312256,
    -0.49993859136584107,
    -0.49993859136584107,
    0.9998771827316821,
)


def test_gdpo_hand_example():
    x = 1.0 / (math.sqrt(2.0 / 3.0) + 1e-4)
    y = 1.0 / (math.sqrt(2.0) + 1e-4)
    z = 100.0 / (math.sqrt(20000.0 / 3.0) + 1e-4)
    assert (x, y, z) == pytest.approx((1.2245948897605123, 0.7070567847218314, 1.224743371393426), abs=1e-15)
    std = math.sqrt(((2 * z - x) ** 2 + (2 * z) ** 2 + x**2 + 6 * y**2) / 6)
    assert std == pytest.approx(1.4141872683425774, abs=1e-15)
    adv = gdpo_advantages(torch.stack([HAND_A, HAND_B]), [1.0, 2.0], group_size=3, clip=None)
    torch.testing.assert_close(adv, HAND_GDPO, rtol=1e-14, atol=1e-16)
    # The default clip of 5 leaves these values alone; a clip of 1 cuts only -1.73.
    assert torch.equal(gdpo_advantages(torch.stack([HAND_A, HAND_B]), [1.0, 2.0], group_size=3), adv)
    clipped = gdpo_advantages(torch.stack([HAND_A, HAND_B]), [1.0, 2.0], group_size=3, clip=1.0)
    assert clipped[1].item() == -1.0 and torch.equal(clipped[[0, 2, 3, 4, 5]], adv[[0, 2, 3, 4, 5]])


def test_weighted_sum_is_group_advantages_of_the_total_as_before():
    # The default aggregation is today's: the weighted sum of the raw rewards, normalised in its group. On the
    # hand example the total a + 2b is [601, 202, 403 | 1000, 1000, 1003]: b decides group 0, where sample 2
    # (a's best) gets about 0 (0.006139010426468747); GDPO gives it 0.866, as much as sample 0.
    assert GRPOOptions().reward_aggregation == "weighted_sum" and REWARD_AGGREGATIONS == (
        "weighted_sum",
        "gdpo",
    )
    total = HAND_A + 2.0 * HAND_B
    adv = group_advantages(total, group_size=3, clip=None)
    assert adv[2].item() == pytest.approx(0.006139010426468747, abs=1e-15)
    assert HAND_GDPO[2].item() > 0.86


def test_a_reward_constant_in_a_group_contributes_zero_not_nan():
    # Reward b is constant in group 1: group 1's advantages are a's alone, scaled by the batch step.
    adv = gdpo_advantages(torch.stack([HAND_A, HAND_B]), [1.0, 2.0], group_size=3, clip=None)
    assert torch.isfinite(adv).all()
    ratio = adv[3:] / _t(-1.0, -1.0, 2.0)
    assert torch.allclose(ratio, ratio[0].expand(3), rtol=1e-14, atol=0)
    # A group constant in every reward, of inexact values (three 0.1's do not average to 0.1): exactly 0,
    # in float64 and float32, whatever std_scope.
    a = _t(0.1, 0.1, 0.1, 0.3, 0.5, 0.7)
    b = _t(7.0, 7.0, 7.0, 2.0, 1.0, 0.0)
    for dtype in (F64, torch.float32):
        for scope in ("group", "global"):
            adv = gdpo_advantages(torch.stack([a, b]).to(dtype), [1.0, 1.0], 3, scope)
            assert torch.equal(adv[:3], torch.zeros(3, dtype=dtype)) and torch.isfinite(adv).all()
    # Every group constant: all zeros (0 / (0 + eps)), not NaN.
    flat = torch.stack([_t(1.0, 1.0, 2.0, 2.0), _t(5.0, 5.0, 3.0, 3.0)])
    assert torch.equal(gdpo_advantages(flat, [1.0, 1.0], 2), torch.zeros(4, dtype=F64))


def test_gdpo_differs_from_weighted_sum_when_the_rewards_scales_differ():
    # One group of 4, equal weights. Reward a (0 or 1) singles out sample 1; reward b (in the thousands) rises
    # from sample 0 to sample 3. The weighted sum a + b = [0, 1001, 2000, 3000] has b's order: a's preference
    # is lost in b's spread. GDPO normalises each first:
    #   a: mean 1/4, std sqrt(3)/4 -> about [-0.577, 1.732, -0.577, -0.577]
    #   b: mean 1500, std 500 sqrt(5) -> about [-1.342, -0.447, 0.447, 1.342]
    #   sum about [-1.919, 1.285, -0.130, 0.765], std about 1.218 -> about [-1.575, 1.055, -0.107, 0.628]
    # and sample 1, first for a and second for b, ranks first.
    a = _t(0.0, 1.0, 0.0, 0.0)
    b = _t(0.0, 1000.0, 2000.0, 3000.0)
    summed = group_advantages(a + b, group_size=4, clip=None)
    assert summed.argsort().tolist() == [0, 1, 2, 3]
    gdpo = gdpo_advantages(torch.stack([a, b]), [1.0, 1.0], group_size=4, clip=None)
    assert gdpo.argsort().tolist() == [0, 2, 3, 1]
    torch.testing.assert_close(gdpo, _t(-1.575, 1.055, -0.107, 0.628), rtol=0, atol=1e-3)
    # Rescaling one reward changes the weighted sum's advantages but (up to eps) not GDPO's.
    rescaled = gdpo_advantages(torch.stack([a * 1000.0, b / 1000.0]), [1.0, 1.0], group_size=4, clip=None)
    torch.testing.assert_close(rescaled, gdpo, rtol=0, atol=1e-3)
    assert group_advantages(a * 1000.0 + b / 1000.0, 4, clip=None).argsort().tolist() == [0, 2, 3, 1]
    # Only the weights' ratio matters: weights [3, 3] give [1, 1]'s advantages (the batch step rescales).
    torch.testing.assert_close(
        gdpo_advantages(torch.stack([a, b]), [3.0, 3.0], 4, clip=None), gdpo, rtol=0, atol=1e-3
    )


def test_global_std_scope_divides_each_reward_by_its_batch_std():
    # std_scope "global": step 1 divides by each reward's std over all 6 samples (group_advantages' "global"),
    # still centred on the group mean; steps 2 and 3 as before.
    adv = gdpo_advantages(torch.stack([HAND_A, HAND_B]), [1.0, 2.0], 3, "global", clip=None)
    a = group_advantages(HAND_A, 3, "global", clip=None)
    b = group_advantages(HAND_B, 3, "global", clip=None)
    s = a + 2.0 * b
    torch.testing.assert_close(adv, s / (s.std(unbiased=False) + 1e-4), rtol=1e-14, atol=0)
    assert not torch.allclose(adv, HAND_GDPO, atol=1e-3)


def test_dropped_groups_get_zero_and_enter_no_statistic():
    # Group 1 of 3 is dropped (a NaN reward): exactly 0 there, and groups 0 and 2 get exactly what they get
    # without it, in both scopes (its NaN or zeroed scores shift no std).
    a = _t(1.0, 2.0, 3.0, float("nan"), 0.0, 0.0, 0.0, 0.0, 3.0)
    b = _t(300.0, 100.0, 200.0, 1.0, 2.0, 3.0, 500.0, 500.0, 500.0)
    dropped = torch.tensor([False, True, False])
    for scope in ("group", "global"):
        adv = gdpo_advantages(torch.stack([a, b]), [1.0, 2.0], 3, scope, dropped_N=dropped)
        assert torch.equal(adv[3:6], torch.zeros(3, dtype=F64))
        kept = torch.stack([torch.cat([a[:3], a[6:]]), torch.cat([b[:3], b[6:]])])
        alone = gdpo_advantages(kept, [1.0, 2.0], 3, scope)
        assert torch.equal(torch.cat([adv[:3], adv[6:]]), alone)
    # Every group dropped: all zeros.
    assert torch.equal(
        gdpo_advantages(torch.stack([a, b]), [1.0, 2.0], 3, dropped_N=torch.ones(3).bool()),
        torch.zeros(9, dtype=F64),
    )


def test_gdpo_bad_arguments():
    with pytest.raises(ValueError, match=r"shape \(K, B\).*K = 3"):
        gdpo_advantages(torch.zeros(2, 4), [1.0, 1.0, 1.0], 2)
    with pytest.raises(ValueError, match="group_size"):
        gdpo_advantages(torch.zeros(2, 5), [1.0, 1.0], 2)
    with pytest.raises(ValueError, match="std_scope"):
        gdpo_advantages(torch.zeros(2, 4), [1.0, 1.0], 2, "batch")
    with pytest.raises(ValueError, match="dropped_N"):
        gdpo_advantages(torch.zeros(2, 4), [1.0, 1.0], 2, dropped_N=torch.zeros(3).bool())


class _Rank:
    """What run_advantages.iteration_advantages reads of the module, as rank `rank` of len(scores) ranks
    whose per-reward scores are `scores[r]`: `all_gather` returns every rank's tensor of the same call,
    stacked (as Lightning's does)."""

    def __init__(self, rank, scores, dropped, rewards, aggregation="gdpo", std_scope="group"):
        self.grpo = GRPOOptions(reward_aggregation=aggregation, std_scope=std_scope, adv_clip_max=5.0)
        self.trainer = SimpleNamespace(world_size=len(scores))
        self.global_rank, self.group_size, self.rewards = rank, 3, rewards
        per_rank = [[torch.stack(s), d.to(F64)] for s, d in zip(scores, dropped)]
        self._calls = iter(zip(*per_rank))

    def all_gather(self, tensor):
        everyone = next(self._calls)
        torch.testing.assert_close(everyone[self.global_rank], tensor, rtol=0, atol=0, equal_nan=True)
        return torch.stack(everyone)


@pytest.mark.parametrize("std_scope", ["group", "global"])
def test_module_gathers_every_rank_and_keeps_its_own_slice(std_scope):
    # Two ranks of two groups each: each rank's advantages are its slice of GDPO over all four groups, in rank
    # order; rank 1's first group is dropped.
    rewards = [SimpleNamespace(name="a", weight=1.0), SimpleNamespace(name="b", weight=2.0)]
    a = [HAND_A, _t(float("nan"), 1.0, 1.0, 4.0, 5.0, 9.0)]
    b = [HAND_B, _t(1.0, 2.0, 3.0, 10.0, 20.0, 20.0)]
    dropped = [torch.tensor([False, False]), torch.tensor([True, False])]
    everything = gdpo_advantages(
        torch.stack([torch.cat(a), torch.cat(b)]), [1.0, 2.0], 3, std_scope, dropped_N=torch.cat(dropped)
    )
    for rank in (0, 1):
        module = _Rank(rank, [[a[r], b[r]] for r in (0, 1)], dropped, rewards, std_scope=std_scope)
        total = torch.nan_to_num(a[rank] + 2.0 * b[rank])
        adv = iteration_advantages(module, total, {"a": a[rank], "b": b[rank]}, dropped[rank])
        assert torch.equal(adv, everything[6 * rank : 6 * (rank + 1)])
    assert torch.equal(everything[6:9], torch.zeros(3, dtype=F64))


def test_module_single_rank_weighted_sum_is_unchanged():
    rewards = [SimpleNamespace(name="a", weight=1.0), SimpleNamespace(name="b", weight=2.0)]
    module = _Rank(0, [[HAND_A, HAND_B]], [torch.zeros(2).bool()], rewards, aggregation="weighted_sum")
    total = HAND_A + 2.0 * HAND_B
    adv = iteration_advantages(module, total, {"a": HAND_A, "b": HAND_B}, torch.zeros(2).bool())
    assert torch.equal(adv, group_advantages(total, 3, "group", clip=5.0))
    module = _Rank(0, [[HAND_A, HAND_B]], [torch.zeros(2).bool()], rewards)
    adv = iteration_advantages(module, total, {"a": HAND_A, "b": HAND_B}, torch.zeros(2).bool())
    assert torch.equal(adv, gdpo_advantages(torch.stack([HAND_A, HAND_B]), [1.0, 2.0], 3))


class _RecordAdvantages(L.Callback):
    def __init__(self, module):
        self.scores, self.advantages = [], []
        score = module.score

        def recording_score(images, prompts, group_size=None):
            total, per_reward = score(images, prompts, group_size)
            self.scores.append(per_reward)
            return total, per_reward

        module.score = recording_score  # the instance attribute the iteration calls (rollout_and_score)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.advantages.append(outputs["advantages"])


@pytest.mark.slow  # a guardrl fit: the inner loop leaves it to CI
def test_fit_with_two_rewards_and_gdpo(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    rewards = (
        '[{"class_path": "guardrl.rewards.JpegCompressibility", "init_args": {"name": "jpeg95"}},'
        ' {"class_path": "guardrl.rewards.JpegCompressibility",'
        ' "init_args": {"quality": 20, "weight": 0.5, "name": "jpeg20"}}]'
    )
    args = tiny_fit_args(
        str(prompts),
        str(tmp_path / "runs"),
        **{"--model.rewards": rewards, "--model.grpo.reward_aggregation": "gdpo"},
    )
    cli = main(args, run=False)
    assert cli.model.grpo.reward_aggregation == "gdpo"
    record = _RecordAdvantages(cli.model)
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.model.num_iterations == 2 and len(record.advantages) == 2
    for per_reward, advantages in zip(record.scores, record.advantages):
        assert list(per_reward) == ["jpeg95", "jpeg20"]
        expected = gdpo_advantages(torch.stack(list(per_reward.values())), [1.0, 0.5], group_size=2)
        assert torch.equal(advantages, expected) and bool(advantages.abs().sum() > 0)
    assert cli.trainer.callback_metrics["reward/jpeg20/mean"] < 0
