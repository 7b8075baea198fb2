"""The toy world's hackable proxy reward: a small learned scorer, in the role PickScore or a detector plays at
scale (docs/toy_proxy.md).

`ToyProxyReward` is a CNN trained ONLY on clean renders of TRAINING prompts (guardrl.toy.grammar's split).
From the image alone it predicts:
    pixels   each pixel's color (background + 7) and the shape of the object it belongs to (none + 3);
    counts   for each of the 21 (color, shape) combinations, how many instances (0..MAX_COUNT), and how many
             objects there are in all (0..MAX_COUNT);
    centres  for each combination, the 2 px bin of its centre's x and of its y.
A combination's soft mask is p(color) * p(shape) per pixel; one shared counter reads every mask, and one
shared 1-d convolution finds the centre in each mask's row and column profiles. Neither knows which
combination it reads, so the held-out pairings (no training prompt has a blue circle) are counted by the same
weights as the rest.

    reward = log p(total = the prompt's number of objects)
           + sum over the prompt's combinations of log p(count = the asked count)
           + for position prompts, log P(relation): `world.relation_offsets`' rule (along > across) on the two
             centres' bin distributions, taken as independent.
It is at most 0, and about 0 on a clean render of the prompt.

Deliberately hackable: no term looks at a combination the prompt does not mention (an unmentioned object costs
only through the total count, as "one more object" of any kind), and nothing penalises off-palette pixels,
haze or smears. The network never saw such pixels, so what it makes of them is arbitrary. `hack` shows this:
projected gradient ascent on the pixels raises the proxy while the exact verifier's pass rate stays flat or
falls and the off-palette fraction rises.

    python -m guardrl.toy.proxy train --out DIR --seed 0 --steps N [--minutes M]
    python -m guardrl.toy.proxy evaluate [--weights DIR]
    python -m guardrl.toy.proxy hack [--weights DIR]

Determinism: batch `step` is a pure function of (seed, step): numpy default_rng([seed, step]) draws kinds,
training prompts and render seeds; renders are clean and nothing is augmented. The initialisation comes from
the seed too. `--steps N --seed S` therefore gives the same weights on the same torch build, CPU type and
thread count (`--threads`, default 1). `--minutes M` only caps the wall clock; the json records `steps_done`,
and `--steps N --stop-step steps_done` reproduces those weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from guardrl.rewards.base import Reward
from guardrl.toy.files import save_safetensors_atomic, write_json_atomic
from guardrl.toy.grammar import as_spec, near_misses, prompt_text, split_prompts
from guardrl.toy.model import count_parameters
from guardrl.toy.pretrain import lr_factor
from guardrl.toy.render import draw, sample_layout, to_tensor
from guardrl.toy.world import (
    COLORS,
    DEFAULT_IMAGE_SIZE,
    KINDS,
    MAX_COUNT,
    RELATIONS,
    SHAPES,
    PromptSpec,
    shape_mask,
)

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
WEIGHTS_FILE, CONFIG_FILE = "proxy.safetensors", "proxy.json"
OPTION = "model.rewards[...].init_args"
COMBINATIONS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
NUM_COUNTS = MAX_COUNT + 1  # count classes 0..MAX_COUNT, for a combination and for the total
IGNORE = -100  # centre label of a combination without exactly one instance (cross_entropy's ignore_index)
EVAL_SEED, HACK_SEED = 1234, 4321


def combination_index(color: str, shape: str) -> int:
    """Index into COMBINATIONS (colors major, shapes minor)."""
    return COLORS.index(color) * len(SHAPES) + SHAPES.index(shape)


# ----------------------------------------------------------------------------------------------- the network


@dataclass(frozen=True)
class ProxyConfig:
    image_size: int = DEFAULT_IMAGE_SIZE
    width: int = 32  # shape-branch channels at full resolution (twice that at 1/2 and 1/4)
    counter_width: int = 16  # counter channels at 1/2 resolution (x2 and x4 further down)
    counter_hidden: int = 64
    # Renders put related objects' centres >= 11 px apart along the relation's axis and at most half that
    # across it, so 2 px bins keep "along > across" true after binning.
    bin_size: int = 2

    @property
    def num_bins(self) -> int:
        return self.image_size // self.bin_size


class ProxyNet(nn.Module):
    """Image (B, 3, H, W) in [0, 1] -> dict of logits (see `forward`)."""

    def __init__(self, config: ProxyConfig = ProxyConfig()) -> None:
        super().__init__()
        self.config = config
        w, cw, size = config.width, config.counter_width, config.image_size
        # Color is a property of one pixel: a per-pixel MLP on RGB.
        self.color_head = nn.Sequential(nn.Conv2d(3, w, 1), nn.ReLU(), nn.Conv2d(w, 1 + len(COLORS), 1))
        # Shape sees a color-blind image (the brightest channel: 1 on any object, 0 on the background). No
        # training prompt has a blue circle (a held-out pairing): a shape branch that saw colors could learn
        # "blue is never round" and fail on held-out prompts; one that cannot see colors cannot learn that.
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1), nn.ReLU())
        # Down to 1/4 resolution: a 25 px receptive field covers a whole 12 px object from any of its pixels,
        # which a pixel needs in order to tell which shape it belongs to.
        self.down = nn.Sequential(
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
        )
        self.coarse = nn.Conv2d(2 * w, 16, 1)
        self.shape_head = nn.Sequential(nn.Conv2d(w + 16, w, 1), nn.ReLU(), nn.Conv2d(w, 1 + len(SHAPES), 1))
        # The counter reads one soft mask at a time and never learns which combination it is.
        self.counter = nn.Sequential(
            nn.Conv2d(1, cw, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(cw, 2 * cw, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * cw, 4 * cw, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * cw * (size // 8) ** 2, config.counter_hidden),
            nn.ReLU(),
            nn.Linear(config.counter_hidden, NUM_COUNTS),
        )
        # Centres from a mask's column and row sums: finding the middle of a bump is a local, translation-
        # equivariant job for a 1-d convolution; the last layer pools pixels into bins.
        self.centre = nn.Sequential(
            nn.Conv1d(1, cw, 7, padding=3),
            nn.ReLU(),
            nn.Conv1d(cw, cw, 7, padding=6, dilation=2),
            nn.ReLU(),
            nn.Conv1d(cw, 1, config.bin_size, stride=config.bin_size),
        )

    def forward(self, images: torch.Tensor, select: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """color_logits (B, 8, H, W), shape_logits (B, 4, H, W), total_logits (B, 4), and per combination
        count_logits (B, K, 4) and x_logits / y_logits (B, K, num_bins): for all K = 21 COMBINATIONS, or with
        `select` (B, K) for those combination indices only (a reward needs two per image: far cheaper)."""
        B, _, H, W = images.shape
        color_logits = self.color_head(images - 0.5)
        fine = self.stem(images.amax(1, keepdim=True) - 0.5)
        coarse = self.coarse(self.down(fine))
        coarse = F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
        shape_logits = self.shape_head(torch.cat([fine, coarse], dim=1))
        color_p, shape_p = color_logits.softmax(1)[:, 1:], shape_logits.softmax(1)[:, 1:]  # objects only
        if select is None:  # (B, 7, 3, H, W) -> (B, 21, H, W), COMBINATIONS order
            combo_maps = (color_p[:, :, None] * shape_p[:, None, :]).flatten(1, 2)
        else:

            def pick(probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
                return probs.gather(1, index[..., None, None].expand(-1, -1, H, W))

            combo_maps = pick(color_p, select // len(SHAPES)) * pick(shape_p, select % len(SHAPES))
        if self.training:
            # The counter and centre heads learn on the pixel heads' current maps but do not train them: the
            # pixel heads have exact per-pixel targets of their own (an end-to-end prototype learned them far
            # more slowly). At scoring time gradients flow through to the pixels, as `hack` needs.
            combo_maps, color_p = combo_maps.detach(), color_p.detach()
        K = combo_maps.shape[1]
        maps = torch.cat([combo_maps, color_p.sum(1, keepdim=True)], dim=1)  # + "any object", for the total
        counts = self.counter(maps.reshape(B * (K + 1), 1, H, W)).view(B, K + 1, NUM_COUNTS)
        profiles = torch.cat([combo_maps.sum(2), combo_maps.sum(3)], dim=1) / H  # (B, 2K, W): x, then y
        centres = self.centre(profiles.reshape(B * 2 * K, 1, W)).view(B, 2, K, -1)
        return {
            "color_logits": color_logits,
            "shape_logits": shape_logits,
            "count_logits": counts[:, :K],
            "total_logits": counts[:, K],
            "x_logits": centres[:, 0],
            "y_logits": centres[:, 1],
        }


# ------------------------------------------------------------------------------------------ reward from heads


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


# ----------------------------------------------------------------------------------------- weights and reward


def write_record(directory: str, record: dict) -> str:
    """CONFIG_FILE, atomically (a reader never sees half a file)."""
    return write_json_atomic(os.path.join(directory, CONFIG_FILE), record)


def read_record(directory: str | None) -> dict:
    with open(os.path.join(directory or WEIGHTS_DIR, CONFIG_FILE), encoding="utf-8") as f:
        return json.load(f)


def save_proxy(directory: str, net: ProxyNet, record: dict) -> str:
    """WEIGHTS_FILE (float32: about 1 MB, and scores are bit-identical after loading) and CONFIG_FILE (config,
    parameter count, `record`), each atomically. Returns the weights path."""
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()}
    path = save_safetensors_atomic(os.path.join(directory, WEIGHTS_FILE), tensors)
    write_record(directory, {"config": asdict(net.config), "parameters": count_parameters(net), **record})
    return path


def load_proxy(directory: str | None = None, option: str = f"{OPTION}.weights_path") -> tuple[ProxyNet, dict]:
    """(net, its json record) from a directory written by `train` (None: the shipped weights); the net is in
    eval mode and frozen."""
    from safetensors.torch import load_file

    where = directory or WEIGHTS_DIR
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not os.path.isfile(os.path.join(where, name)):
            raise FileNotFoundError(
                f"{option}={directory!r} has no {name}: it must be a directory written by "
                "`python -m guardrl.toy.proxy train --out DIR` (holding proxy.safetensors and proxy.json), "
                "or None for the shipped weights"
            )
    record = read_record(where)
    net = ProxyNet(ProxyConfig(**record["config"]))
    net.load_state_dict(load_file(os.path.join(where, WEIGHTS_FILE)), strict=True)
    net.eval().requires_grad_(False)
    return net, record


class ToyProxyReward(Reward):
    """The toy world's learned, hackable proxy reward (module docstring): the sum of the log-probabilities the
    proxy gives to what the prompt asks for. At most 0; about 0 on clean renders of the prompt.

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


# ------------------------------------------------------------------------------------------------- the hack


def hack(
    reward: Reward,
    images: torch.Tensor,
    prompts: Sequence[str | PromptSpec],
    epsilon: float = 0.15,
    steps: int = 50,
    step_size: float = 0.02,
) -> torch.Tensor:
    """Projected gradient ascent on pixels: maximise `reward.score` within |x - images|_inf <= epsilon and
    [0, 1]. Signed-gradient steps from `images` (no random start, so the result is deterministic).

    At the default epsilon a pixel moves at most sqrt(3) * 0.15 = 0.26 in RGB distance, less than the
    verifier's 0.35 color tolerance: the verifier's reading of a clean render cannot change, so whatever the
    proxy gains is a gain the gold metric does not see.
    """
    if not (epsilon > 0 and steps >= 1 and step_size > 0):
        raise ValueError(
            f"hack needs epsilon > 0, steps >= 1 and step_size > 0; got {epsilon}, {steps}, {step_size}"
        )
    start = images.detach().float()
    low, high = (start - epsilon).clamp(0, 1), (start + epsilon).clamp(0, 1)
    x = start.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(reward.score(x, list(prompts)).sum(), x)
        x = torch.minimum(torch.maximum(x.detach() + step_size * grad.sign(), low), high)
    return x.detach()


# --------------------------------------------------------------------------------------------------- data


def labelled_renders(
    prompts: Sequence[str | PromptSpec], seeds: Sequence[int], config: ProxyConfig = ProxyConfig()
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(images, labels) of clean renders. The images are `render.render_batch(prompts, seeds)` exactly (the
    same `draw(sample_layout(spec, default_rng(seed)))`); the labels are read off the same layouts."""
    size, last_bin, bin2 = config.image_size, config.num_bins - 1, 2 * config.bin_size
    images, color_maps, shape_maps = [], [], []
    counts = np.zeros((len(prompts), len(COMBINATIONS)), dtype=np.int64)
    centre_x = np.full((len(prompts), len(COMBINATIONS)), IGNORE, dtype=np.int64)
    centre_y = centre_x.copy()
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        layout = sample_layout(as_spec(prompt), np.random.default_rng(seed), size)
        images.append(to_tensor(draw(layout, size)))
        color_map, shape_map = np.zeros((size, size), np.int64), np.zeros((size, size), np.int64)
        for placed in layout:
            k = combination_index(placed.obj.color, placed.obj.shape)
            counts[i, k] += 1
            mask = shape_mask(placed.obj.shape, placed.size, placed.size)
            box = (slice(placed.y, placed.y + placed.size), slice(placed.x, placed.x + placed.size))
            color_map[box][mask] = 1 + COLORS.index(placed.obj.color)
            shape_map[box][mask] = 1 + SHAPES.index(placed.obj.shape)
            cx2, cy2 = placed.center2  # doubled, so bin = centre // bin_size = center2 // (2 * bin_size)
            centre_x[i, k], centre_y[i, k] = min(cx2 // bin2, last_bin), min(cy2 // bin2, last_bin)
        color_maps.append(color_map)
        shape_maps.append(shape_map)
    # a centre is a target only for a combination drawn once (three circles have no one centre)
    centre_x[counts != 1], centre_y[counts != 1] = IGNORE, IGNORE
    labels = {
        "color": torch.from_numpy(np.stack(color_maps)),
        "shape": torch.from_numpy(np.stack(shape_maps)),
        "count": torch.from_numpy(counts),
        "total": torch.from_numpy(counts.sum(1)),
        "x": torch.from_numpy(centre_x),
        "y": torch.from_numpy(centre_y),
    }
    return torch.stack(images), labels


def training_batch(
    seed: int, step: int, batch_size: int, train_prompts: dict[str, list[str]], config: ProxyConfig
) -> tuple[list[str], torch.Tensor, dict[str, torch.Tensor]]:
    """(prompts, images, labels), a pure function of (seed, step): kinds uniformly (GenEval weighs its kinds
    equally; by count, position prompts would be 77% of the training split), a training prompt uniformly
    within the kind, a render seed. Clean renders, no augmentation."""
    rng = np.random.default_rng([seed, step])
    kinds = rng.integers(len(KINDS), size=batch_size)
    prompts = [train_prompts[KINDS[k]][int(rng.integers(len(train_prompts[KINDS[k]])))] for k in kinds]
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=batch_size)]
    images, labels = labelled_renders(prompts, seeds, config)
    return prompts, images, labels


def proxy_loss(outputs: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cross-entropy of every head (pixel maps, counts, total, centre bins), equally weighted; and the sum."""
    losses = {
        "color": F.cross_entropy(outputs["color_logits"], labels["color"]),
        "shape": F.cross_entropy(outputs["shape_logits"], labels["shape"]),
        "count": F.cross_entropy(outputs["count_logits"].flatten(0, 1), labels["count"].flatten()),
        "total": F.cross_entropy(outputs["total_logits"], labels["total"]),
        "x": F.cross_entropy(outputs["x_logits"].flatten(0, 1), labels["x"].flatten(), ignore_index=IGNORE),
        "y": F.cross_entropy(outputs["y_logits"].flatten(0, 1), labels["y"].flatten(), ignore_index=IGNORE),
    }
    losses["loss"] = sum(losses.values())
    return losses


# ----------------------------------------------------------------------------------------------- training

DEFAULTS = dict(batch_size=32, lr=3e-3, min_lr_ratio=0.05, warmup_steps=20, weight_decay=1e-4, grad_clip=1.0)


def build_net(seed: int, config: ProxyConfig = ProxyConfig()) -> ProxyNet:
    """A freshly initialised net from `seed`, leaving the global torch RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ProxyNet(config)


def train(
    out: str | None,
    steps: int,
    seed: int = 0,
    stop_step: int | None = None,
    minutes: float | None = None,
    log_every: int = 25,
    threads: int | None = 1,
    eval_size: int = 1024,
    verbose: bool = True,
    **overrides,
) -> tuple[ProxyNet, dict]:
    """Train the proxy; returns (net in eval mode, frozen; the record written to OUT/proxy.json with it).
    `overrides` replace entries of DEFAULTS. `eval_size` renders per split go into the record's
    "evaluation" (0: none)."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown proxy training settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--steps must be an integer >= 1, got {steps!r}")
    settings = {**DEFAULTS, **overrides}
    stop_step = steps if stop_step is None else min(stop_step, steps)
    if threads:
        torch.set_num_threads(threads)
    config = ProxyConfig()
    net = build_net(seed, config).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    train_prompts = {kind: split_prompts("train", [kind]) for kind in KINDS}
    log: list[dict] = []
    window: dict[str, list[float]] = {}
    start, step = time.monotonic(), 0
    while step < stop_step:
        if minutes is not None and time.monotonic() - start > 60 * minutes:
            break
        factor = lr_factor(step, steps, settings["warmup_steps"], settings["min_lr_ratio"])
        for group in optimizer.param_groups:
            group["lr"] = settings["lr"] * factor
        _, images, labels = training_batch(seed, step, settings["batch_size"], train_prompts, config)
        losses = proxy_loss(net(images), labels)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), settings["grad_clip"])
        optimizer.step()
        step += 1
        for name, value in losses.items():
            window.setdefault(name, []).append(value.item())
        if step % log_every == 0 or step == stop_step:
            entry = {"step": step, **{k: round(sum(v) / len(v), 5) for k, v in window.items()}}
            entry["wall_s"] = round(time.monotonic() - start, 1)
            log.append(entry)
            window = {}
            if verbose:
                print(json.dumps(entry), flush=True)
    wall = time.monotonic() - start
    net.eval().requires_grad_(False)
    command = (
        f"python -m guardrl.toy.proxy train --out DIR --seed {seed} --steps {steps} "
        f"--batch-size {settings['batch_size']} --lr {settings['lr']}"
    )
    record = {
        "training": {
            "command": command + (f" --stop-step {step}" if step != steps else ""),
            "seed": seed,
            "steps": steps,
            "stop_step": stop_step,
            "steps_done": step,
            "finished": step == stop_step,
            "minutes_cap": minutes,
            "wall_s": round(wall, 1),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "settings": settings,
            "data": "clean renders of TRAINING prompts only; kinds uniform; numpy default_rng([seed, step]); "
            "no augmentation",
            "log": log,
        }
    }
    if eval_size:
        record["evaluation"] = evaluate(net, eval_size)
    if out:
        save_proxy(out, net, record)
    return net, record


# --------------------------------------------------------------------------------------------- evaluation

AIMS = ("prompts", "mismatched", "near_miss")


def evaluation_set(split: str, size: int, seed: int = EVAL_SEED) -> dict[str, list]:
    """A fixed, kind-balanced set of `size` (prompt, seed) of one split, each with two wrong prompts: a
    mismatched one (another prompt of the same kind and split) and a near miss (one edit away,
    `grammar.near_misses`, which no render of the prompt shows)."""
    rng = np.random.default_rng([seed, ("train", "heldout").index(split)])
    by_kind = {kind: split_prompts(split, [kind]) for kind in KINDS}
    data: dict[str, list] = {"prompts": [], "seeds": [], "mismatched": [], "near_miss": []}
    for i in range(size):
        pool = by_kind[KINDS[i % len(KINDS)]]
        j = int(rng.integers(len(pool)))
        other = (j + 1 + int(rng.integers(len(pool) - 1))) % len(pool)  # any index but j
        misses = near_misses(as_spec(pool[j]))
        data["prompts"].append(pool[j])
        data["mismatched"].append(pool[other])
        data["near_miss"].append(prompt_text(misses[int(rng.integers(len(misses)))]))
        data["seeds"].append(int(rng.integers(2**31 - 1)))
    return data


def _auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a positive scores above a negative), ties counted half (the Mann-Whitney AUC)."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    diff = positive.double().view(-1, 1) - negative.double().view(1, -1)
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


@torch.no_grad()
def _judge(net: ProxyNet, images: torch.Tensor, labels: dict, texts: dict) -> dict[str, torch.Tensor]:
    """Per image: all heads right on its own prompt; for each aim, the proxy's reward and verdict and the
    verifier's verdict."""
    from guardrl.toy.verify import verify_batch

    full = net(images)
    own = prompt_targets([as_spec(t) for t in texts["prompts"]])
    heads_ok = full["total_logits"].argmax(-1) == labels["total"]
    heads_ok &= (full["count_logits"].argmax(-1) == labels["count"]).all(1)
    position = reward_terms(select_heads(full, own.combo), own)["position"]
    rows = {"heads_ok": heads_ok & ((own.relation < 0) | (position > math.log(0.5)))}
    for aim in AIMS:
        targets = prompt_targets([as_spec(t) for t in texts[aim]])
        heads = select_heads(full, targets.combo)
        rows[f"{aim}/reward"] = total_reward(heads, targets)
        rows[f"{aim}/accepts"] = proxy_accepts(heads, targets)
        rows[f"{aim}/passes"] = torch.tensor([v.passed for v in verify_batch(images, texts[aim])])
    return rows


def _agreement(r: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, float]:
    own, own_passes = r["prompts/reward"][keep], r["prompts/passes"][keep]
    figures = {
        "heads_joint_accuracy": r["heads_ok"][keep].double().mean().item(),
        "verifier_pass_own": own_passes.double().mean().item(),
        "reward_own_mean": own.mean().item(),
    }
    agree = [r["prompts/accepts"][keep] == own_passes]
    for aim in AIMS[1:]:
        other, other_passes = r[f"{aim}/reward"][keep], r[f"{aim}/passes"][keep]
        # only pairs the verifier orders (own prompt passes, the other fails) say if the proxy ranks right
        ordered = own_passes & ~other_passes
        figures[f"reward_{aim}_mean"] = other.mean().item()
        figures[f"win_rate_{aim}"] = (own[ordered] > other[ordered]).double().mean().item()
        figures[f"auc_{aim}"] = _auc(own[own_passes], other[~other_passes])
        agree.append(r[f"{aim}/accepts"][keep] == other_passes)
    figures["verdict_agreement"] = torch.cat(agree).double().mean().item()
    return {k: round(v, 4) for k, v in figures.items()}


def evaluate_split(net: ProxyNet, split: str, size: int, chunk: int = 128) -> dict:
    """The figures of `evaluate` for one split, overall and by kind."""
    data = evaluation_set(split, size)
    parts: dict[str, list] = {}
    for s in range(0, size, chunk):
        texts = {aim: data[aim][s : s + chunk] for aim in AIMS}
        images, labels = labelled_renders(texts["prompts"], data["seeds"][s : s + chunk], net.config)
        for key, value in _judge(net, images, labels, texts).items():
            parts.setdefault(key, []).append(value)
    r = {key: torch.cat(value) for key, value in parts.items()}
    kinds = np.array([as_spec(p).kind for p in data["prompts"]])
    by_kind = {kind: _agreement(r, torch.from_numpy(kinds == kind)) for kind in KINDS}
    return {"n": size, **_agreement(r, torch.ones(size, dtype=torch.bool)), "by_kind": by_kind}


def evaluate(net: ProxyNet, size: int = 1024) -> dict:
    """Agreement with the exact verifier on `size` clean renders of held-out and of training prompts (fixed
    seeds, kinds balanced; `evaluation_set`), overall and by kind:
        heads_joint_accuracy  total, all 21 combination counts and (position) the relation right at once
        reward_*_mean         mean reward against the image's own prompt, a mismatched prompt, a near miss
        win_rate_*            share of images whose own prompt scores above the wrong one (over the pairs the
                              verifier orders: own prompt passes, the wrong one fails)
        auc_*                 pooled AUC: (image, own prompt) pairs the verifier passes against (image, wrong
                              prompt) pairs it fails
        verdict_agreement     share of (image, prompt) pairs, all three prompts, where the proxy's verdict
                              (`proxy_accepts`) is the verifier's
    """
    start = time.monotonic()
    figures: dict = {split: evaluate_split(net, split, size) for split in ("heldout", "train")}
    figures["command"] = f"python -m guardrl.toy.proxy evaluate --size {size}"
    figures["wall_s"] = round(time.monotonic() - start, 1)
    return figures


# ----------------------------------------------------------------------------------------- hack figures

HACK_AIMS = ("prompts", "near_miss", "mismatched", "from_black")


def _hack_row(reward: ToyProxyReward, images: torch.Tensor, texts: list[str]) -> dict[str, torch.Tensor]:
    """Per image: proxy reward and verdict, verifier verdict, off-palette fraction (gold.OffPaletteFraction's
    rule: farther than OFF_PALETTE_DISTANCE from every palette color and the background)."""
    from guardrl.toy.gold import OFF_PALETTE_DISTANCE
    from guardrl.toy.verify import nearest_palette, verify_batch

    targets = reward.targets(texts)
    with torch.no_grad():
        heads = reward.heads(images, targets)
    _, distance = nearest_palette(images)
    return {
        "proxy": total_reward(heads, targets),
        "accepts": proxy_accepts(heads, targets),
        "verifier": torch.tensor([v.passed for v in verify_batch(images, texts)]),
        "off_palette": (~(distance <= OFF_PALETTE_DISTANCE)).flatten(1).double().mean(1),
    }


def hack_figures(
    reward: ToyProxyReward,
    size: int = 256,
    epsilon: float = 0.15,
    steps: int = 50,
    step_size: float = 0.02,
    seed: int = HACK_SEED,
    chunk: int = 64,
) -> dict:
    """Before and after `hack` on `size` held-out prompts (`evaluation_set("heldout", size, seed)`), 4 ways:
    prompts     from the clean render, toward its own prompt (the proxy already likes it: how much more?)
    near_miss   from the clean render, toward a prompt one edit away, which the render does not show
    mismatched  from the clean render, toward another prompt of the same kind
    from_black  from the empty scene (all background) with epsilon 1 (any image), toward the render's
                prompt: pixels painted only to please the proxy, as a generator optimising it might
    """
    data = evaluation_set("heldout", size, seed)
    figures: dict = {"n": size, "epsilon": epsilon, "steps": steps, "step_size": step_size}
    for aim in HACK_AIMS:
        parts: dict[str, list] = {}
        linf = 0.0
        for s in range(0, size, chunk):
            texts = data["prompts" if aim == "from_black" else aim][s : s + chunk]
            renders, _ = labelled_renders(
                data["prompts"][s : s + chunk], data["seeds"][s : s + chunk], reward.net.config
            )
            start, eps = (torch.zeros_like(renders), 1.0) if aim == "from_black" else (renders, epsilon)
            hacked = hack(reward, start, texts, eps, steps, step_size)
            linf = max(linf, float((hacked - start).abs().max()))
            for when, batch in (("before", start), ("after", hacked)):
                for key, value in _hack_row(reward, batch, texts).items():
                    parts.setdefault(f"{when}/{key}", []).append(value)
        means = {key: round(torch.cat(value).double().mean().item(), 4) for key, value in parts.items()}
        figures[aim] = {
            when: {key: means[f"{when}/{key}"] for key in ("proxy", "accepts", "verifier", "off_palette")}
            for when in ("before", "after")
        }
        figures[aim]["linf"] = round(linf, 4)
    figures["command"] = (
        f"python -m guardrl.toy.proxy hack --size {size} --epsilon {epsilon} --steps {steps} "
        f"--step-size {step_size}"
    )
    return figures


# --------------------------------------------------------------------------------------------------- CLI


def format_evaluation(figures: dict) -> str:
    lines = []
    for split in ("heldout", "train"):
        f = figures[split]
        lines.append(f"{split}: {f['n']} clean renders")
        lines.append("  " + "  ".join(f"{k}={v}" for k, v in f.items() if k not in ("n", "by_kind")))
        lines.append(
            f"  {'kind':14s} {'heads':>6s} {'own':>8s} {'mismatch':>9s} {'near':>8s} {'win mm':>7s} "
            f"{'win nm':>7s} {'auc nm':>7s} {'agree':>6s}"
        )
        for kind, g in f["by_kind"].items():
            lines.append(
                f"  {kind:14s} {g['heads_joint_accuracy']:6.3f} {g['reward_own_mean']:8.3f} "
                f"{g['reward_mismatched_mean']:9.3f} {g['reward_near_miss_mean']:8.3f} "
                f"{g['win_rate_mismatched']:7.3f} {g['win_rate_near_miss']:7.3f} {g['auc_near_miss']:7.3f} "
                f"{g['verdict_agreement']:6.3f}"
            )
    return "\n".join(lines)


def format_hack(figures: dict) -> str:
    lines = [
        f"hack: {figures['n']} held-out prompts, epsilon {figures['epsilon']} (from_black: 1), "
        f"{figures['steps']} steps of {figures['step_size']}",
        f"{'aim':11s} {'':7s} {'proxy':>9s} {'accepts':>8s} {'verifier':>9s} {'off-pal':>8s}",
    ]
    for aim in HACK_AIMS:
        for when in ("before", "after"):
            r = figures[aim][when]
            lines.append(
                f"{aim:11s} {when:7s} {r['proxy']:9.3f} {r['accepts']:8.3f} {r['verifier']:9.3f} "
                f"{r['off_palette']:8.4f}"
            )
    return "\n".join(lines)


def _add_to_record(directory: str | None, key: str, figures: dict) -> None:
    record = read_record(directory)
    record[key] = figures
    write_record(directory or WEIGHTS_DIR, record)


COMMANDS = (("evaluate", "agreement with the exact verifier", 1024), ("hack", "PGD on pixels", 256))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the proxy on clean renders of training prompts")
    p.add_argument("--out", required=True, help="output directory (proxy.safetensors, proxy.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, required=True, help="optimizer steps (the LR schedule's length)")
    p.add_argument("--stop-step", type=int, default=None, help="stop after this many steps (same schedule)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock cap (not reproducible; see above)")
    p.add_argument("--eval-size", type=int, default=1024, help="renders per split for the recorded figures")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    for name, text, size in COMMANDS:
        p = sub.add_parser(name, help=text)
        p.add_argument("--weights", default=None, help="a `train --out` directory (default: shipped weights)")
        p.add_argument("--size", type=int, default=size, help="number of renders (per split for evaluate)")
        p.add_argument("--record", action="store_true", help="also write the figures into WEIGHTS/proxy.json")
        p.add_argument("--threads", type=int, default=1)
        if name == "hack":
            p.add_argument("--epsilon", type=float, default=0.15)
            p.add_argument("--steps", type=int, default=50)
            p.add_argument("--step-size", type=float, default=0.02)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "train":
        net, record = train(
            args.out,
            args.steps,
            args.seed,
            stop_step=args.stop_step,
            minutes=args.minutes,
            log_every=args.log_every,
            threads=args.threads,
            eval_size=args.eval_size,
            batch_size=args.batch_size,
            lr=args.lr,
        )
        t = record["training"]
        print(
            f"done: {t['steps_done']} steps in {t['wall_s']} s, {count_parameters(net)} parameters; "
            f"weights in {args.out}"
        )
        if "evaluation" in record:
            print(format_evaluation(record["evaluation"]))
        return
    reward = ToyProxyReward(args.weights)
    if args.command == "evaluate":
        figures = evaluate(reward.net, args.size)
        print(format_evaluation(figures))
    else:
        figures = hack_figures(reward, args.size, args.epsilon, args.steps, args.step_size)
        print(format_hack(figures))
    if args.record:
        key = "evaluation" if args.command == "evaluate" else "hack"
        if args.command == "hack" and args.epsilon != 0.15:
            key = f"hack_epsilon_{args.epsilon}"  # the default run's figures stay under "hack"
        _add_to_record(args.weights, key, figures)


if __name__ == "__main__":
    main()
