"""Groupwise and pairwise rewards: hand-worked ranks and win rates, the groups they see, their errors, and one
tiny run whose reward is a GroupRank."""

import math

import pytest
import torch

from guardrl.algorithm import group_advantages
from guardrl.rewards import (
    GroupRank,
    GroupReward,
    PairwiseFromScores,
    PairwiseReward,
    Reward,
    RewardError,
    score_with_retries,
)
from guardrl.rewards.group import prompt_runs, within_group_ranks
from guardrl.rollouts import rollout_and_score
from guardrl.types import Trajectory


class MeanBrightness(Reward):
    """Per-image reward: the mean pixel value (continuous, so a rollout's scores are distinct)."""

    def score(self, images, prompts):
        return images.double().mean(dim=(1, 2, 3))


def images_with_scores(scores):
    """Flat images whose MeanBrightness is each given score (scores in [0, 1])."""
    return torch.stack([torch.full((3, 4, 4), float(s)) for s in scores])


class Given(Reward):
    """Per-image reward that reads its score from the image's first pixel (any real value)."""

    def score(self, images, prompts):
        return images[:, 0, 0, 0].double()


def images_carrying(scores):
    images = torch.zeros(len(scores), 3, 2, 2)
    images[:, 0, 0, 0] = torch.tensor(scores, dtype=torch.float32)
    return images


class RecordingJudge(PairwiseReward):
    """Bradley-Terry on the first pixel, recording every prefer call's (a, b) scores."""

    def __init__(self, symmetric=False, **kwargs):
        super().__init__(**kwargs)
        self.symmetric = symmetric
        self.calls = []

    def prefer(self, images_a, images_b, prompts):
        a, b = images_a[:, 0, 0, 0], images_b[:, 0, 0, 0]
        self.calls.append(([float(x) for x in a], [float(x) for x in b], list(prompts)))
        return torch.sigmoid(a - b)


class ConstantJudge(PairwiseReward):
    def __init__(self, value, **kwargs):
        super().__init__(**kwargs)
        self.value = value

    def prefer(self, images_a, images_b, prompts):
        return torch.full((images_a.shape[0],), self.value)


# ------------------------------------------------------------------ groups


def test_groups_are_runs_of_consecutive_equal_prompts():
    assert prompt_runs(["a", "a", "b", "b", "b", "a", "a"]) == [slice(0, 2), slice(2, 5), slice(5, 7)]
    assert prompt_runs([]) == []


def test_a_group_of_one_is_refused_with_the_reward_name_and_the_fix():
    reward = GroupRank(MeanBrightness())
    with pytest.raises(
        ValueError,
        match=r"reward 'mean_brightness_rank' \(GroupRank\) scores each image against the other images of "
        r"its prompt and needs at least 2 consecutive images per prompt, got 1 for prompt 'b' \(images 2..2 "
        r"of 3\).*samples_per_prompt >= 2",
    ):
        reward(images_with_scores([0.1, 0.2, 0.3]), ["a", "a", "b"])

    class LoneOk(GroupReward):
        min_group_size = 1

        def score_group(self, images, prompt):
            return torch.full((images.shape[0],), float(images.shape[0]))

    # a subclass that allows a lone image gets runs of 1 as they are: [2, 2, 1]
    assert LoneOk()(images_with_scores([0.1, 0.2, 0.3]), ["a", "a", "b"]).tolist() == [2.0, 2.0, 1.0]


def test_score_group_of_the_wrong_shape_is_refused():
    class Wrong(GroupReward):
        def score_group(self, images, prompt):
            return torch.zeros(images.shape[0] + 1)

    with pytest.raises(ValueError, match=r"reward 'wrong': score_group returned \(3,\) for the 2 images of "
                       r"prompt 'a', expected a tensor of shape \(2,\)"):
        Wrong()(images_with_scores([0.1, 0.2]), ["a", "a"])


# ------------------------------------------------------------------ GroupRank


def test_within_group_ranks_formula_with_ties():
    # rank_i = (#{s_j < s_i} + 0.5 #{j != i: s_j == s_i}) / (G - 1): for [3, 1, 2, 2]
    # 3: (3 + 0) / 3 = 1; 1: 0 / 3 = 0; each 2: (1 + 0.5) / 3 = 0.5
    assert within_group_ranks(torch.tensor([3.0, 1.0, 2.0, 2.0])).tolist() == [1.0, 0.0, 0.5, 0.5]
    # all tied: everyone in the middle; distinct: 0, 1/(G-1), ..., 1
    assert within_group_ranks(torch.tensor([7.0, 7.0, 7.0])).tolist() == [0.5, 0.5, 0.5]
    assert within_group_ranks(torch.tensor([0.3, -2.0, 9.0])).tolist() == [0.5, 0.0, 1.0]
    # a non-finite score makes the whole group NaN (the run drops it, as for any NaN reward)
    assert torch.isnan(within_group_ranks(torch.tensor([1.0, float("nan"), 0.0]))).all()


def test_group_rank_ranks_each_prompt_group_of_a_batch_separately():
    base = Given()
    reward = GroupRank(base)
    # two groups of 4: scores [3, 1, 2, 2] for "a", [10, 40, 30, 20] for "b"
    images = images_carrying([3, 1, 2, 2, 10, 40, 30, 20])
    ranks = reward(images, ["a"] * 4 + ["b"] * 4)
    assert ranks.tolist() == pytest.approx([1, 0, 0.5, 0.5, 0, 1, 2 / 3, 1 / 3], abs=1e-7)
    assert ranks.dtype == torch.float32
    # lower is better: the ranks mirrored (1 - r)
    flipped = GroupRank(base, higher_is_better=False)(images, ["a"] * 4 + ["b"] * 4)
    assert flipped.tolist() == pytest.approx([0, 1, 0.5, 0.5, 1, 0, 1 / 3, 2 / 3], abs=1e-7)
    # the same prompt in two runs separated by another prompt: two groups
    split = reward(images_carrying([5, 6, 1, 2, 9, 8]), ["a", "a", "b", "b", "a", "a"])
    assert split.tolist() == [0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    # scale does not matter: base scores x 1000 + 7 rank the same
    assert torch.equal(reward(images_carrying([3007, 1007, 2007, 2007]), ["a"] * 4), ranks[:4])


def test_group_rank_scores_the_base_once_per_batch_and_takes_a_class_path_dict():
    calls = []

    class Counting(Given):
        def score(self, images, prompts):
            calls.append(len(prompts))
            return super().score(images, prompts)

    reward = GroupRank(Counting(name="counted"), name="ranked", weight=0.5)
    reward(images_carrying([1, 2, 3, 4, 5, 6]), ["a", "a", "a", "b", "b", "b"])
    assert calls == [6]
    assert (reward.name, reward.weight) == ("ranked", 0.5)
    assert [n for n, _ in reward.named_children()] == ["base"]  # moved to the device with the reward
    built = GroupRank({"class_path": "guardrl.rewards.JpegCompressibility", "init_args": {"quality": 80}})
    assert (type(built.base).__name__, built.base.quality, built.name) == (
        "JpegCompressibility",
        80,
        "jpeg_compressibility_rank",
    )


def test_group_rank_bad_options_are_refused():
    with pytest.raises(ValueError, match=r"model.rewards\[...\].init_args.base must be a guardrl.rewards."
                       r"Reward or a \{class_path, init_args\} dict of one .*got str"):
        GroupRank("yuvalkirstain/PickScore_v1")
    with pytest.raises(ValueError, match=r"model.rewards\[...\].init_args.base: cannot import class_path "
                       r"'guardrl.rewards.NoSuchReward'"):
        GroupRank({"class_path": "guardrl.rewards.NoSuchReward"})
    with pytest.raises(ValueError, match=r"model.rewards\[...\].init_args.base.init_args.weight=2.0 is not "
                       r"used"):
        GroupRank(Given(weight=2.0))
    with pytest.raises(ValueError, match=r"must be a per-image reward, got the group reward GroupRank"):
        GroupRank(GroupRank(Given()))
    with pytest.raises(ValueError, match=r"reward 'given_rank': higher_is_better \(model.rewards\[...\]."
                       r"init_args.higher_is_better\) must be true or false, got 'no'"):
        GroupRank(Given(), higher_is_better="no")


# ------------------------------------------------------------------ pairwise


def test_pairwise_from_scores_two_images_bradley_terry():
    # p(0 beats log 3) = sigmoid(-log 3) = 1 / (1 + 3) = 0.25
    reward = PairwiseFromScores(Given(), temperature=1.0)
    wins = reward(images_carrying([0.0, math.log(3)]), ["a", "a"])
    assert wins.tolist() == pytest.approx([0.25, 0.75], abs=1e-6)


def test_pairwise_from_scores_three_images_by_hand():
    # scores [0, log 3, log 9]: sigmoid(log 3) = 3/4, sigmoid(log 9) = 9/10, sigmoid(log 3) for 1 vs 2
    # win rates: img0 (1/4 + 1/10) / 2 = 0.175; img1 (3/4 + 1/4) / 2 = 0.5; img2 (9/10 + 3/4) / 2 = 0.825
    reward = PairwiseFromScores(Given())
    wins = reward(images_carrying([0.0, math.log(3), math.log(9)]), ["p"] * 3)
    assert wins.tolist() == pytest.approx([0.175, 0.5, 0.825], abs=1e-6)
    # temperature 2 on scores [0, 2 log 3]: the same as temperature 1 on [0, log 3]
    hot = PairwiseFromScores(Given(), temperature=2.0)(images_carrying([0.0, 2 * math.log(3)]), ["p"] * 2)
    assert hot.tolist() == pytest.approx([0.25, 0.75], abs=1e-6)
    assert reward.name == "given_pairwise"


def test_pairwise_pairs_and_calls_symmetric_and_not():
    scores = [0.0, 1.0, 3.0]
    images, prompts = images_carrying(scores + [5.0, 2.0, 4.0]), ["x"] * 3 + ["y"] * 3
    ordered = RecordingJudge(symmetric=False)
    full = ordered(images, prompts)
    # one prefer call per group, every ordered pair (i != j) in row-major order
    assert len(ordered.calls) == 2
    assert ordered.calls[0] == ([0, 0, 1, 1, 3, 3], [1, 3, 0, 3, 0, 1], ["x"] * 6)
    assert ordered.calls[1] == ([5, 5, 2, 2, 4, 4], [2, 4, 5, 4, 5, 2], ["y"] * 6)
    half = RecordingJudge(symmetric=True)
    symmetric = half(images, prompts)
    # unordered pairs i < j only
    assert len(half.calls) == 2
    assert half.calls[0] == ([0, 0, 1], [1, 3, 3], ["x"] * 3)
    assert half.calls[1] == ([5, 5, 2], [2, 4, 4], ["y"] * 3)
    # sigmoid is antisymmetric, so both ways give the same win rates: mean_j sigmoid(s_i - s_j)
    s = torch.tensor(scores + [5.0, 2.0, 4.0]).reshape(2, 3)
    p = torch.sigmoid(s[:, :, None] - s[:, None, :])
    expected = ((p.sum(dim=2) - 0.5) / 2).reshape(-1)  # minus the diagonal's sigmoid(0)
    assert full.tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert symmetric.tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    # a group's win rates average 0.5
    assert full.reshape(2, 3).mean(dim=1).tolist() == pytest.approx([0.5, 0.5], abs=1e-6)


def test_pairwise_ordered_pairs_cancel_a_position_bias():
    # a judge that always prefers the first image (p = 0.9): both orders averaged, every image wins half
    biased = ConstantJudge(0.9)
    assert biased(images_carrying([1.0, 2.0, 3.0]), ["a"] * 3).tolist() == pytest.approx([0.5] * 3)
    # declared symmetric, the same judge trusts the (i < j) order: img0 beats both at 0.9, img2 loses both
    trusting = ConstantJudge(0.9)
    trusting.symmetric = True
    assert trusting(images_carrying([1.0, 2.0, 3.0]), ["a"] * 3).tolist() == pytest.approx([0.9, 0.5, 0.1])


@pytest.mark.parametrize("value", [1.2, -0.1, float("nan"), float("inf")])
def test_pairwise_probabilities_outside_0_1_are_refused(value):
    with pytest.raises(ValueError) as error:
        ConstantJudge(value, name="judge")(images_carrying([1.0, 2.0]), ["a", "a"])
    assert str(error.value) == (
        f"reward 'judge': prefer() returned {value:.6g} for the pair (a=0, b=1) of prompt 'a' (2 of 2 pairs "
        "bad); a preference must be a finite probability in [0, 1] that image a beats image b"
    )


def test_pairwise_wrong_shape_and_bad_temperature_are_refused():
    class Short(PairwiseReward):
        def prefer(self, images_a, images_b, prompts):
            return torch.full((1,), 0.5)

    with pytest.raises(ValueError, match=r"reward 'short': prefer\(\) returned \(1,\) for 6 pairs of prompt "
                       r"'a', expected a tensor of shape \(6,\)"):
        Short()(images_carrying([1.0, 2.0, 3.0]), ["a"] * 3)
    for bad in (0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match=r"reward 'given_pairwise': temperature \(model.rewards\[...\]."
                           r"init_args.temperature\) must be a finite number > 0, got "):
            PairwiseFromScores(Given(), temperature=bad)


def test_a_bad_preference_goes_through_the_retries_like_any_failing_reward():
    with pytest.raises(RewardError, match=r"reward 'judge' failed 2 time\(s\).*attempt 2: ValueError: reward "
                       r"'judge': prefer\(\) returned 1.2"):
        score_with_retries(ConstantJudge(1.2, name="judge"), images_carrying([1.0, 2.0]), ["a", "a"], 2, 0.0)
    good = score_with_retries(PairwiseFromScores(Given()), images_carrying([0.0, math.log(3)]), ["a", "a"])
    assert good.tolist() == pytest.approx([0.25, 0.75], abs=1e-6)


# ------------------------------------------------------------------ in a run


def test_rollout_chunks_score_whole_groups():
    # 3 prompts x G = 2 in 3 chunks: each scoring call sees one whole group, never a split one
    prompts = ["a", "a", "b", "b", "c", "c"]
    seen = []
    reward = GroupRank(Given())

    def rollout(cond, size, chunk):
        latents = torch.tensor([[5.0], [2.0], [1.0], [1.0], [0.0], [9.0]])[chunk * size:(chunk + 1) * size]
        step = torch.zeros(size, 1, 1, 1, 1)
        return Trajectory(
            step_indices=[0],
            latents_BTCHW=step,
            next_latents_BTCHW=step,
            mean_old_BTCHW=step,
            log_prob_old_BT=torch.zeros(size, 1),
            sigma_T=torch.ones(1),
            sigma_next_T=torch.zeros(1),
            noise_scale_T=torch.ones(1),
            final_latents=latents,
        )

    def score(images, chunk_prompts):
        seen.append(list(chunk_prompts))
        ranks = reward(images, chunk_prompts)
        return ranks, {reward.name: ranks}

    class Cond:
        def select(self, span):
            return self

    _, _, rewards, _ = rollout_and_score(
        prompts, Cond(), 3, False, rollout, lambda z: images_carrying(z[:, 0].tolist()), score
    )
    assert seen == [["a", "a"], ["b", "b"], ["c", "c"]]
    assert rewards.tolist() == [1.0, 0.0, 0.5, 0.5, 0.0, 1.0]


@pytest.mark.slow
def test_a_tiny_run_trains_on_the_within_group_ranks(prompt_file, tmp_path):
    from tests.test_module import CaptureOutputs, _cli, _fit

    group = 4
    capture = CaptureOutputs()
    rewards = (
        '[{"class_path": "guardrl.rewards.GroupRank", "init_args": '
        '{"base": {"class_path": "tests.test_group_rewards.MeanBrightness"}}}]'
    )
    cli = _cli(
        prompt_file,
        tmp_path,
        **{
            "--model.rewards": rewards,
            "--data.group_size": str(group),
            "--model.max_iterations": "1",
            "--model.grpo.std_scope": "group",
        },
    )
    (reward,) = cli.model.rewards
    assert (type(reward).__name__, type(reward.base).__name__) == ("GroupRank", "MeanBrightness")
    _fit(cli, [capture])
    (out,) = capture.outputs
    # the rewards are each group's ranks of the images' mean brightness: a permutation of 0, 1/3, 2/3, 1
    brightness = out["images"].double().mean(dim=(1, 2, 3)).reshape(-1, group)
    assert all(len(set(row.tolist())) == group for row in brightness)  # distinct: no ties
    expected = torch.stack([within_group_ranks(row) for row in brightness])
    ranks = out["rewards"].reshape(-1, group)
    assert torch.equal(ranks, expected)
    assert torch.equal(ranks.sort(dim=1).values, torch.tensor([[0, 1 / 3, 2 / 3, 1]]).expand_as(ranks))
    assert torch.equal(ranks.argsort(dim=1), brightness.argsort(dim=1))
    assert ranks.sum(dim=1).tolist() == [group / 2] * ranks.shape[0]
    # closed-form advantages: ranks k/3 have mean 1/2 and population std sqrt(5)/6 in every group, so
    # A = (r - 1/2) / (sqrt(5)/6 + 1e-4): +-1.34128 for the ends, +-0.44709 for the middle
    std = math.sqrt(5) / 6
    closed_form = (out["rewards"].double() - 0.5) / (std + 1e-4)
    assert out["advantages"].double().tolist() == pytest.approx(closed_form.tolist(), abs=1e-5)
    values = sorted(set(round(a, 5) for a in out["advantages"].tolist()))
    assert values == [-1.34128, -0.44709, 0.44709, 1.34128]
    assert torch.equal(out["advantages"], group_advantages(out["rewards"], group, "group", clip=5.0))
