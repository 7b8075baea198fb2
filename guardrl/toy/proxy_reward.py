"""The toy proxy's reward: what a prompt asks for as index tensors (`PromptTargets`), the reward's terms from
the network's heads (log-probability and mean-probability forms, the proxy's own verdict `proxy_accepts`), and
`ToyProxyReward`, the `Reward` that scores images with them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from guardrl.rewards.base import Reward
from guardrl.toy.grammar import as_spec
from guardrl.toy.proxy_net import OPTION, WEIGHTS_DIR, combination_index, load_proxy
from guardrl.toy.world import RELATIONS, PromptSpec


@dataclass(frozen=True)
class PromptTargets:
    """What a batch of prompts asks for, as index tensors: one row per prompt, two combinations per row."""

    total: torch.Tensor  # (B,) number of objects in all
    combo: torch.Tensor  # (B, 2) combination indices (a one-object prompt repeats its one)
    count: torch.Tensor  # (B, 2) the asked count of each
    has_second: torch.Tensor  # (B,) bool
    relation: torch.Tensor  # (B,) index into RELATIONS, -1 for none


def prompt_targets(specs: Sequence[PromptSpec], device: torch.device | str = "cpu") -> PromptTargets:
    combos, counts, second, relation, total = [], [], [], [], []
    for spec in specs:
        idx = [combination_index(obj.color, obj.shape) for obj in spec.objects]
        combos.append(idx if len(idx) == 2 else idx * 2)
        counts.append([spec.count] * 2)
        second.append(len(idx) == 2)
        relation.append(-1 if spec.relation is None else RELATIONS.index(spec.relation))
        total.append(len(spec.instances()))

    def tensor(values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return PromptTargets(
        tensor(total), tensor(combos), tensor(counts), tensor(second, torch.bool), tensor(relation)
    )


def _offset_log_distribution(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """log P(bin_b - bin_a = d), d = -(n-1)..(n-1), for independent (B, n) log-distributions: (B, 2n - 1).
    In log space throughout, so a confidently wrong layout gives a large negative number, not log(0)."""
    n, device = log_a.shape[-1], log_a.device
    joint = (log_a.unsqueeze(-1) + log_b.unsqueeze(-2)).flatten(-2)  # (B, n * n), entry i * n + j
    i, j = torch.meshgrid(torch.arange(n, device=device), torch.arange(n, device=device), indexing="ij")
    select = torch.full((2 * n - 1, n * n), -math.inf, device=device)
    select[(j - i + n - 1).flatten(), torch.arange(n * n, device=device)] = 0.0
    return torch.logsumexp(joint.unsqueeze(-2) + select, dim=-1)


def relation_log_prob(
    x_a: torch.Tensor, y_a: torch.Tensor, x_b: torch.Tensor, y_b: torch.Tensor, relation: torch.Tensor
) -> torch.Tensor:
    """(B,) log P("A <relation> B") from (B, n) log-distributions of the two centres' bins: P(along > across)
    with along and across as in `world.relation_offsets` (B minus A, signed by the relation), in bins."""
    dx, dy = _offset_log_distribution(x_a, x_b), _offset_log_distribution(y_a, y_b)
    # (along, across) per relation, in RELATIONS order: left of, right of, above, below
    along = torch.stack([dx, dx.flip(-1), dy, dy.flip(-1)], dim=1)
    across = torch.stack([dy, dy, dx, dx], dim=1)
    rows, rel = torch.arange(relation.shape[0], device=relation.device), relation.clamp(min=0)
    along, across = along[rows, rel], across[rows, rel]
    m = dx.shape[-1] // 2
    offsets = torch.arange(-m, m + 1, device=dx.device)
    holds = torch.where(offsets.view(-1, 1) > offsets.abs().view(1, -1), 0.0, -math.inf)
    return torch.logsumexp((along.unsqueeze(-1) + across.unsqueeze(-2) + holds).flatten(-2), dim=-1)


def select_heads(outputs: dict[str, torch.Tensor], combo: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs for all 21 combinations -> those of `combo` (B, K), as `ProxyNet(images, combo)` gives them."""
    rows = torch.arange(combo.shape[0], device=combo.device).unsqueeze(1)
    return {**outputs, **{key: outputs[key][rows, combo] for key in ("count_logits", "x_logits", "y_logits")}}


def reward_terms(heads: dict[str, torch.Tensor], targets: PromptTargets) -> dict[str, torch.Tensor]:
    """The reward's three terms, each (B,); position is 0 for prompts without a relation. `heads` holds the
    per-combination logits of `targets.combo` (`ProxyNet(images, select=...)` or `select_heads`)."""
    rows = torch.arange(targets.total.shape[0], device=targets.total.device)
    total = heads["total_logits"].log_softmax(-1)[rows, targets.total]
    count_lp = heads["count_logits"].log_softmax(-1).gather(-1, targets.count.unsqueeze(-1)).squeeze(-1)
    combinations = count_lp[:, 0] + torch.where(targets.has_second, count_lp[:, 1], 0.0)
    x_lp, y_lp = heads["x_logits"].log_softmax(-1), heads["y_logits"].log_softmax(-1)
    position = relation_log_prob(x_lp[:, 0], y_lp[:, 0], x_lp[:, 1], y_lp[:, 1], targets.relation)
    position = torch.where(targets.relation >= 0, position, 0.0)
    return {"total": total, "combinations": combinations, "position": position}


def total_reward(heads: dict[str, torch.Tensor], targets: PromptTargets) -> torch.Tensor:
    terms = reward_terms(heads, targets)
    return terms["total"] + terms["combinations"] + terms["position"]


def mean_probability(heads: dict[str, torch.Tensor], targets: PromptTargets) -> torch.Tensor:
    """(B,) in [0, 1]: the mean, over the prompt's own checks (the total count, each named combination's
    count, the relation if any), of the probability the proxy gives it. The same heads as `total_reward`, with
    light tails: a check the image fails completely costs at most 1/n instead of tens of nats, so a group's
    advantages follow the checks a policy can actually move rather than its worst image
    (docs/toy_proxy.md)."""
    rows = torch.arange(targets.total.shape[0], device=targets.total.device)
    total = heads["total_logits"].softmax(-1)[rows, targets.total]
    counts = heads["count_logits"].softmax(-1).gather(-1, targets.count.unsqueeze(-1)).squeeze(-1)
    x_lp, y_lp = heads["x_logits"].log_softmax(-1), heads["y_logits"].log_softmax(-1)
    position = relation_log_prob(x_lp[:, 0], y_lp[:, 0], x_lp[:, 1], y_lp[:, 1], targets.relation).exp()
    has_relation = targets.relation >= 0
    summed = total + counts[:, 0] + torch.where(targets.has_second, counts[:, 1], 0.0)
    summed = summed + torch.where(has_relation, position, 0.0)
    checks = 2 + targets.has_second.long() + has_relation.long()
    return summed / checks


# How `ToyProxyReward` turns the heads into one number per image (`form`).
PROXY_FORMS = {"log_prob": total_reward, "mean_prob": mean_probability}


def proxy_accepts(heads: dict[str, torch.Tensor], targets: PromptTargets) -> torch.Tensor:
    """(B,) bool, the proxy's own verdict, to compare with the verifier's: each asked count is its head's most
    likely value, and the relation (if any) has P > 0.5. `heads` as for `reward_terms`."""
    ok = heads["total_logits"].argmax(-1) == targets.total
    ok &= (heads["count_logits"].argmax(-1) == targets.count).all(dim=1)
    position = reward_terms(heads, targets)["position"]
    return ok & ((targets.relation < 0) | (position > math.log(0.5)))


class ToyProxyReward(Reward):
    """The toy world's learned, hackable proxy reward (the formula: guardrl/toy/proxy.py's docstring,
    docs/toy_proxy.md): the sum of the log-probabilities the proxy gives to what the prompt asks for. At
    most 0; about 0 on clean renders of the prompt.

    Args:
        weights_path: a directory written by `python -m guardrl.toy.proxy train --out DIR`; None loads the
            weights shipped in guardrl/toy/weights/.
        weight: multiplier of this reward in the total.
        name: log tag (`reward/<name>/mean`); defaults to "toy_proxy".
        form: "log_prob" (the sum of the checks' log-probabilities, at most 0) or "mean_prob" (the mean of
            their probabilities, in [0, 1]; light-tailed, see `mean_probability`).
    """

    def __init__(
        self,
        weights_path: str | None = None,
        weight: float = 1.0,
        name: str | None = None,
        form: str = "log_prob",
    ) -> None:
        super().__init__(weight=weight, name=name or "toy_proxy")
        if form not in PROXY_FORMS:
            raise ValueError(f"{OPTION}.form must be one of {', '.join(PROXY_FORMS)}, got {form!r}")
        self.form = form
        self.weights_path = weights_path
        # About 1 MB: loaded eagerly, so a bad path fails when the config is instantiated, not mid-run.
        self.net, self.record = load_proxy(weights_path)
        self.image_size = self.net.config.image_size

    def train(self, mode: bool = True) -> ToyProxyReward:
        """Lightning puts the whole module tree in train mode; a reward model stays in eval mode."""
        super().train(mode)
        self.net.eval()
        return self

    def targets(self, prompts: Sequence[str | PromptSpec]) -> PromptTargets:
        specs = []
        for prompt in prompts:
            try:
                specs.append(as_spec(prompt))
            except ValueError as e:
                raise ValueError(
                    f"reward {self.name!r} scores only prompts of the toy grammar: data.train_prompts "
                    f"must be a toy prompt file (`python -m guardrl.toy.grammar --write DIR`); {e}"
                ) from None
        return prompt_targets(specs, next(self.net.parameters()).device)

    def heads(self, images: torch.Tensor, targets: PromptTargets | None = None) -> dict[str, torch.Tensor]:
        """The net's outputs (on the net's device), for `targets`' combinations only if given."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"reward {self.name!r}: expected images (B, 3, {self.image_size}, {self.image_size}), the "
                f"size the proxy at {self.weights_path or WEIGHTS_DIR!r} was trained at, got "
                f"{tuple(images.shape)}; set model.backbone.init_args.resolution={self.image_size}"
            )
        param = next(self.net.parameters())
        select = None if targets is None else targets.combo
        return self.net(images.to(device=param.device, dtype=param.dtype), select)

    def score(self, images: torch.Tensor, prompts: Sequence[str | PromptSpec]) -> torch.Tensor:
        targets = self.targets(prompts)  # parse first: a bad prompt fails before any compute
        return PROXY_FORMS[self.form](self.heads(images, targets), targets).to(images.device)
