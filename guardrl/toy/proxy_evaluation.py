"""The toy proxy's agreement with the exact verifier: fixed, kind-balanced evaluation sets with a mismatched
prompt and a near miss per render (`evaluation_set`), and the figures `python -m guardrl.toy.proxy evaluate`
prints and records (`evaluate`)."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from guardrl.toy.grammar import as_spec, near_misses, prompt_text, split_prompts
from guardrl.toy.proxy_data import labelled_renders
from guardrl.toy.proxy_net import ProxyNet
from guardrl.toy.proxy_reward import proxy_accepts, prompt_targets, reward_terms, select_heads, total_reward
from guardrl.toy.world import KINDS

EVAL_SEED = 1234
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
