"""Training the toy proxy: the loss of every head (`proxy_loss`), a seeded initialisation (`build_net`) and
the training loop (`train`: AdamW, warm-up then cosine LR, batches a pure function of (seed, step)), which
writes the weights and their record (`python -m guardrl.toy.proxy train`)."""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from guardrl.toy.grammar import split_prompts
from guardrl.toy.pretrain import lr_factor
from guardrl.toy.proxy_data import IGNORE, training_batch
from guardrl.toy.proxy_evaluation import evaluate
from guardrl.toy.proxy_net import ProxyConfig, ProxyNet, save_proxy
from guardrl.toy.world import KINDS

DEFAULTS = dict(batch_size=32, lr=3e-3, min_lr_ratio=0.05, warmup_steps=20, weight_decay=1e-4, grad_clip=1.0)


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
