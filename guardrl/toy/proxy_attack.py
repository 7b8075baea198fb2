"""The attack on the toy proxy: projected gradient ascent on pixels (`hack`), and its before / after figures
on held-out prompts (`hack_figures`, `python -m guardrl.toy.proxy hack`): the proxy rises while the exact
verifier's pass rate does not."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from guardrl.rewards.base import Reward
from guardrl.toy.proxy_data import labelled_renders
from guardrl.toy.proxy_evaluation import evaluation_set
from guardrl.toy.proxy_reward import ToyProxyReward, proxy_accepts, total_reward
from guardrl.toy.world import PromptSpec

HACK_SEED = 4321
HACK_AIMS = ("prompts", "near_miss", "mismatched", "from_black")


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
