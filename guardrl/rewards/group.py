"""Rewards that score a prompt's images together: groupwise (`GroupReward`) and pairwise (`PairwiseReward`).

GRPO samples G images per prompt and only compares them with each other (the advantage is group-relative), so
a reward may as well see the whole group: the rank of each image's score within its group (`GroupRank`), or a
preference model that says which of two images is better, the group reward being each image's win rate over
the others (`PairwiseReward`, as in Pref-GRPO and UnifiedReward-Think's pairwise mode).

Groups are **runs of consecutive equal prompts**: a training batch holds each prompt's group_size samples next
to each other, and the over-optimisation watch its samples_per_prompt images per prompt, so the same class
scores both. Rollout chunks (performance.rollout_chunks) hold whole groups (checks.check_batch_sizes), so a
group is never split across two scoring calls. Two adjacent groups with the same prompt text (a prompt file
listing a prompt twice in a row, a file with fewer prompts than data.prompts_per_batch, or an editing dataset
with one instruction for several source images) are one run, and are scored as one group of 2G.

Every group reward is a `Reward`: it is called, retried and timed out like any other (rewards/calling.py), its
scores are weighted and summed with the others, and its parameters (a wrapped reward's, a judge's) move with
it to the training device.
"""

from __future__ import annotations

import torch

from guardrl.rewards.base import Reward, build_component


class GroupReward(Reward):
    """A reward that scores each prompt's images together. Subclasses implement `score_group`.

    `score(images, prompts, group_size)` splits the batch into its groups and calls `score_group` on each: the
    run passes its group size (training: data.group_size; an evaluation: samples_per_prompt), so two adjacent
    groups with one prompt text stay two groups; called without one (a user's own code), the groups are the
    runs of consecutive equal prompts. A group smaller than `min_group_size` (class attribute, default 2: a
    rank or a win rate within a group of one means nothing) is refused with an error; a subclass that can
    score a lone image sets `min_group_size = 1`.
    """

    min_group_size: int = 2
    scores_groups = True  # Reward.forward passes the batch's group size

    def score_group(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        """images: (G, 3, H, W) float in [0, 1], all for `prompt`; returns (G,) rewards."""
        raise NotImplementedError

    def groups(self, prompts: list[str], group_size: int | None = None) -> list[slice]:
        """The groups: consecutive slices of `group_size` (each of one prompt), or without it the runs of
        consecutive equal prompts; each at least `min_group_size` long."""
        runs = prompt_runs(prompts) if group_size is None else self._fixed_groups(prompts, group_size)
        for run in runs:
            size = run.stop - run.start
            if size < self.min_group_size:
                raise ValueError(
                    f"reward {self.name!r} ({type(self).__name__}) scores each image against the other "
                    f"images of its prompt and needs at least {self.min_group_size} consecutive images per "
                    f"prompt, got {size} for prompt {prompts[run.start]!r} (images {run.start}.."
                    f"{run.stop - 1} of {len(prompts)}); groups are runs of consecutive equal prompts. In "
                    "training each group has data.group_size images; an evaluation callback must sample "
                    "several images per prompt (e.g. OverOptimizationWatch: "
                    "trainer.callbacks[...].init_args.samples_per_prompt >= 2)"
                )
        return runs

    def _fixed_groups(self, prompts: list[str], group_size: int) -> list[slice]:
        if len(prompts) % group_size:
            raise ValueError(
                f"reward {self.name!r}: {len(prompts)} images are not whole groups of {group_size} (the "
                "batch must hold each prompt's images next to each other)"
            )
        runs = [slice(i, i + group_size) for i in range(0, len(prompts), group_size)]
        for run in runs:
            if len(set(prompts[run])) != 1:
                raise ValueError(
                    f"reward {self.name!r}: images {run.start}..{run.stop - 1} should be one group of "
                    f"{group_size} with one prompt but have {len(set(prompts[run]))} different prompts"
                )
        return runs

    def score(self, images: torch.Tensor, prompts: list[str], group_size: int | None = None) -> torch.Tensor:
        parts = []
        for run in self.groups(prompts, group_size):
            parts.append(self._checked_group(self.score_group(images[run], prompts[run.start]), run, prompts))
        return torch.cat(parts)

    def _checked_group(self, rewards, run: slice, prompts: list[str]) -> torch.Tensor:
        size = run.stop - run.start
        if not isinstance(rewards, torch.Tensor) or rewards.shape != (size,):
            got = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
            raise ValueError(
                f"reward {self.name!r}: score_group returned {got} for the {size} images of prompt "
                f"{prompts[run.start]!r}, expected a tensor of shape ({size},)"
            )
        return rewards.float()


def prompt_runs(prompts: list[str]) -> list[slice]:
    """Slices of the runs of consecutive equal prompts, in order: ["a", "a", "b", "a"] -> [0:2, 2:3, 3:4]."""
    runs, start = [], 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[start]:
            runs.append(slice(start, i))
            start = i
    return runs


def within_group_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Normalised ranks of a group's scores (G,), G >= 2, in [0, 1]: rank_i = (#{j: s_j < s_i} + 0.5 *
    #{j != i: s_j == s_i}) / (G - 1), i.e. image i's win rate against the others with ties counted half.
    The lowest distinct score gets 0, the highest 1, tied scores share their average rank, and the ranks of a
    group sum to G / 2. A group with a non-finite score gets NaN ranks (the run then drops that group, as for
    any reward that returns NaN)."""
    size = scores.shape[0]
    if not bool(torch.isfinite(scores).all()):
        return torch.full((size,), float("nan"), dtype=torch.float32, device=scores.device)
    s = scores.double()
    wins = (s[:, None] > s[None, :]).double().sum(dim=1)
    ties = (s[:, None] == s[None, :]).double().sum(dim=1) - 1.0  # minus the image itself
    return ((wins + 0.5 * ties) / (size - 1)).float()


def _build_reward(spec, option: str) -> Reward:
    """A wrapped per-image reward from a Reward or a {"class_path", "init_args"} dict."""
    reward = spec
    if isinstance(spec, dict) and isinstance(spec.get("class_path"), str):
        reward = build_component(spec, lambda path: path, option, "Reward")
    if not isinstance(reward, Reward):
        raise ValueError(
            f"{option} must be a guardrl.rewards.Reward or a {{class_path, init_args}} dict of one (e.g. "
            f"{{class_path: guardrl.rewards.PickScore}}), got {type(reward).__name__}"
        )
    if isinstance(reward, GroupReward):
        raise ValueError(
            f"{option} must be a per-image reward, got the group reward {type(reward).__name__}: wrap the "
            "reward it wraps instead"
        )
    if reward.weight != 1.0:
        raise ValueError(
            f"{option}.init_args.weight={reward.weight!r} is not used: a wrapped reward's scores are only "
            "compared within a group; set the weight on the wrapping reward (its init_args.weight) and leave "
            "this one at 1.0"
        )
    return reward


class GroupRank(GroupReward):
    """Each image's normalised rank within its group, in [0, 1], of a wrapped per-image reward's score
    (`within_group_ranks`: lowest 0, highest 1, ties share their average rank). Only the order of the base
    reward's scores matters, not their scale or spread.

    Args:
        base: the per-image reward ranked: a `Reward` or a {"class_path", "init_args"} dict of one. Scored
            once per batch; its own weight is not used (must stay 1.0).
        higher_is_better: False ranks the lowest base score highest.
        weight: multiplier of the ranks in the total reward.
        name: log tag; defaults to `<base name>_rank`.
    """

    def __init__(
        self,
        base: Reward | dict,
        higher_is_better: bool = True,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        option = "model.rewards[...].init_args.base"
        built = _build_reward(base, option)
        super().__init__(weight=weight, name=name or f"{built.name}_rank")
        if not isinstance(higher_is_better, bool):
            raise ValueError(
                f"reward {self.name!r}: higher_is_better (model.rewards[...].init_args.higher_is_better) "
                f"must be true or false, got {higher_is_better!r}"
            )
        self.base = built
        self.higher_is_better = higher_is_better

    def score(self, images: torch.Tensor, prompts: list[str], group_size: int | None = None) -> torch.Tensor:
        runs = self.groups(prompts, group_size)  # refuse a lone image before running the base reward
        scores = self.base(images, prompts)  # one call for the whole batch
        return torch.cat([self._ranks(scores[run]) for run in runs])

    def score_group(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        return self._ranks(self.base(images, [prompt] * images.shape[0]))

    def _ranks(self, scores: torch.Tensor) -> torch.Tensor:
        return within_group_ranks(scores if self.higher_is_better else -scores)


class PairwiseReward(GroupReward):
    """A preference model: subclasses implement `prefer(images_a, images_b, prompts)`, the probability that
    each image of `images_a` beats the one of `images_b` at the same index for its prompt.

    The reward of image i of a group of G is its win rate, the mean over the G - 1 others j of w_ij =
    (p(i beats j) + 1 - p(j beats i)) / 2: every ordered pair is judged, both orders averaged (which cancels
    a judge's bias for the first or second position), G (G - 1) comparisons in one `prefer` call per group.
    A subclass whose judge is antisymmetric (p(b beats a) = 1 - p(a beats b) exactly) sets `symmetric =
    True`: then only the G (G - 1) / 2 unordered pairs i < j are judged, a = image i, b = image j, and
    w_ji = 1 - w_ij. Either way w_ij + w_ji = 1, so a group's win rates average exactly 0.5.

    `prefer` must return a tensor (N,) of finite probabilities in [0, 1]; anything else fails the call with an
    error naming the reward (then retried, like any failing reward: faults.reward_max_attempts).
    """

    symmetric: bool = False

    def prefer(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """images_a, images_b: (N, 3, H, W) float in [0, 1]; prompts: N prompts. Returns (N,) p(a beats b)."""
        raise NotImplementedError

    def pairs(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Index tensors (a, b) of the pairs judged in a group of `size`, in row-major order of (a, b)."""
        if self.symmetric:
            a, b = torch.triu_indices(size, size, offset=1)
        else:
            grid = torch.arange(size)
            a, b = grid.repeat_interleave(size), grid.repeat(size)
            keep = a != b
            a, b = a[keep], b[keep]
        return a, b

    def score_group(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        size = images.shape[0]
        a, b = self.pairs(size)
        index_a, index_b = a.to(images.device), b.to(images.device)
        p = self.prefer(images[index_a], images[index_b], [prompt] * a.numel())
        p = self._checked_preferences(p, a, b, prompt)
        win = torch.zeros(size, size, dtype=torch.float64)  # win[i, j]: p(i beats j) as judged
        win[a, b] = p.detach().double().cpu()
        if self.symmetric:
            win[b, a] = 1.0 - win[a, b]
        else:
            win = (win + 1.0 - win.T) / 2.0
        win.fill_diagonal_(0.0)
        return (win.sum(dim=1) / (size - 1)).to(device=images.device, dtype=torch.float32)

    def _checked_preferences(self, p, a: torch.Tensor, b: torch.Tensor, prompt: str) -> torch.Tensor:
        n = a.numel()
        if not isinstance(p, torch.Tensor) or p.shape != (n,):
            got = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(
                f"reward {self.name!r}: prefer() returned {got} for {n} pairs of prompt {prompt!r}, expected "
                f"a tensor of shape ({n},)"
            )
        bad = ~(torch.isfinite(p) & (p >= 0) & (p <= 1))
        if bool(bad.any()):
            k = int(torch.nonzero(bad)[0])
            raise ValueError(
                f"reward {self.name!r}: prefer() returned {float(p[k]):.6g} for the pair (a={int(a[k])}, "
                f"b={int(b[k])}) of prompt {prompt!r} ({int(bad.sum())} of {n} pairs bad); a preference must "
                "be a finite probability in [0, 1] that image a beats image b"
            )
        return p


class PairwiseFromScores(PairwiseReward):
    """Bradley-Terry on a per-image reward: p(a beats b) = sigmoid((s_a - s_b) / temperature). The reference
    pairwise reward (it needs no judge model): with it a group's win rates are a smooth rank of the base
    scores. It scores every image once per pair it is in, so it costs G - 1 base calls per image; for a real
    per-image model prefer `GroupRank` or the reward itself.

    Args:
        base: the per-image reward compared: a `Reward` or a {"class_path", "init_args"} dict of one.
        temperature: > 0, in the base reward's units: a score gap of one temperature gives p = 0.73.
        weight: multiplier of the win rates in the total reward.
        name: log tag; defaults to `<base name>_pairwise`.
    """

    symmetric = True  # sigmoid(-x) = 1 - sigmoid(x)

    def __init__(
        self, base: Reward | dict, temperature: float = 1.0, weight: float = 1.0, name: str | None = None
    ) -> None:
        built = _build_reward(base, "model.rewards[...].init_args.base")
        super().__init__(weight=weight, name=name or f"{built.name}_pairwise")
        if not (
            isinstance(temperature, (int, float))
            and not isinstance(temperature, bool)
            and temperature > 0
            and temperature != float("inf")
        ):
            raise ValueError(
                f"reward {self.name!r}: temperature (model.rewards[...].init_args.temperature) must be a "
                f"finite number > 0, got {temperature!r}"
            )
        self.base = built
        self.temperature = float(temperature)

    def prefer(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scores = self.base(torch.cat([images_a, images_b]), prompts + prompts).double()
        n = images_a.shape[0]
        return torch.sigmoid((scores[:n] - scores[n:]) / self.temperature).float()
