"""Pretrain the toy text-to-image model (guardrl/toy/model.py) with rectified flow, on renders of the TRAINING
prompts only (the held-out prompts of guardrl.toy.grammar are never drawn).

    python -m guardrl.toy.pretrain --steps 3000 --seed 0 --out runs/toy_pretrain

Recipe: x_t = (1 - t) x0 + t eps with logit-normal t (sigmoid of a standard normal), the transformer predicts
v = eps - x0 (diffusers' flow-matching convention, the one guardrl samples with), MSE loss; the prompt is
replaced by the null prompt "" for `--cond-dropout` of the samples (classifier-free guidance); AdamW with
linear warm-up then cosine decay to `--min-lr-ratio` x lr, gradient-norm clipping, and an EMA of the weights
(the EMA is what gets saved). Data are rendered on the fly: each step draws kinds (weights `--kind-weights`),
training prompts uniformly within a kind, and render seeds, all from numpy.random.default_rng([seed, step]);
the noise and t come from a torch generator seeded from (seed, step). The text encoder trains with the
transformer.

Determinism: a run is a function of (--seed, --steps and the other flags), step by step: `--stop-step K` stops
a `--steps N` run after K steps with exactly the weights the full run had at step K. `--minutes M` only caps
the wall clock; where it stops depends on the machine's speed, so the written config records `steps_done`, and
`--steps N --stop-step steps_done` reproduces those weights. Bitwise equality also needs the same torch
build, CPU type and thread count (`--threads`, default 1).

Every `--save-every` seconds (and at the end) OUT/ gets the EMA weights (toy_model.safetensors, float16) and
toy_model.json (model config, settings, progress, loss curve); OUT/log.jsonl has the loss every `--log-every`
steps. A partial model therefore exists at any time.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from collections.abc import Sequence

import numpy as np
import torch

from guardrl.toy.grammar import split_prompts
from guardrl.toy.model import build_toy_model, count_parameters, save_toy_model
from guardrl.toy.render import render_batch
from guardrl.toy.world import DEFAULT_IMAGE_SIZE, KINDS

DEFAULTS = dict(
    batch_size=64,
    lr=1e-3,
    min_lr_ratio=0.05,
    warmup_steps=100,
    weight_decay=0.01,
    betas=(0.9, 0.99),
    grad_clip=1.0,
    ema_decay=0.995,
    cond_dropout=0.1,
    logit_normal_mean=0.0,
    logit_normal_std=1.0,
    kind_weights=(0.2, 0.2, 0.3, 0.3),
)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _seed_of(*key: int) -> int:
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


class TrainingData:
    """Batches of (prompt, render) from the training split, a pure function of (seed, step)."""

    def __init__(
        self, seed: int, image_size: int = DEFAULT_IMAGE_SIZE, kind_weights=DEFAULTS["kind_weights"]
    ):
        self.seed = seed
        self.image_size = image_size
        self.prompts = {kind: split_prompts("train", [kind]) for kind in KINDS}
        weights = np.asarray(kind_weights, dtype=np.float64)
        self.kind_weights = weights / weights.sum()

    def batch(self, step: int, batch_size: int, cond_dropout: float) -> tuple[list[str], torch.Tensor]:
        """(prompts with "" for dropped conditions, images (B, 3, H, W) in [-1, 1])."""
        rng = np.random.default_rng([self.seed, step])
        kinds = rng.choice(len(KINDS), size=batch_size, p=self.kind_weights)
        prompts = [self.prompts[KINDS[k]][int(rng.integers(len(self.prompts[KINDS[k]])))] for k in kinds]
        seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=batch_size)]
        images = render_batch(prompts, seeds, self.image_size) * 2.0 - 1.0
        dropped = rng.random(batch_size) < cond_dropout
        return ["" if d else p for p, d in zip(prompts, dropped)], images


def flow_matching_loss(transformer, text_encoder, prompts, x0, generator, mean=0.0, std=1.0) -> torch.Tensor:
    """Rectified-flow MSE at logit-normal t; the transformer is called exactly as guardrl's SD3 path calls
    it."""
    batch = x0.shape[0]
    t = torch.sigmoid(mean + std * torch.randn(batch, generator=generator))
    eps = torch.randn(x0.shape, generator=generator)
    t4 = t.view(-1, 1, 1, 1)
    x_t = (1.0 - t4) * x0 + t4 * eps
    embeds, pooled = text_encoder.encode(prompts)
    v = transformer(
        hidden_states=x_t,
        timestep=t * 1000.0,
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
        return_dict=False,
    )[0]
    return torch.nn.functional.mse_loss(v, eps - x0)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def pretrain(
    out: str | None,
    steps: int,
    seed: int = 0,
    stop_step: int | None = None,
    minutes: float | None = None,
    save_every: float = 180.0,
    log_every: int = 25,
    threads: int | None = 1,
    transformer_config: dict | None = None,
    verbose: bool = True,
    **overrides,
) -> dict:
    """Run pretraining; returns the summary (also written into OUT/toy_model.json when `out` is given) plus
    "modules": the EMA (transformer, text encoder) in float32.

    `overrides` replace entries of DEFAULTS (batch_size, lr, ...).
    """
    settings = {**DEFAULTS, **overrides}
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown pretraining settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    stop_step = steps if stop_step is None else min(stop_step, steps)
    if threads:
        torch.set_num_threads(threads)
    transformer, text_encoder = build_toy_model(transformer_config, seed=seed)
    transformer.train()
    text_encoder.train()
    ema_transformer, ema_text = copy.deepcopy(transformer).eval(), copy.deepcopy(text_encoder).eval()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(
        params, lr=settings["lr"], betas=tuple(settings["betas"]), weight_decay=settings["weight_decay"]
    )
    data = TrainingData(seed, transformer.config.sample_size, settings["kind_weights"])
    summary = {
        "seed": seed,
        "steps": steps,
        "stop_step": stop_step,
        "settings": settings,
        "parameters": {
            "transformer": count_parameters(transformer),
            "text_encoder": count_parameters(text_encoder),
        },
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    log_path = None
    if out:
        os.makedirs(out, exist_ok=True)
        log_path = os.path.join(out, "log.jsonl")
        open(log_path, "w").close()
    curve: list[dict] = []
    window: list[float] = []
    start = last_save = time.monotonic()
    step = 0

    def save(final: bool) -> None:
        elapsed = time.monotonic() - start
        summary.update(
            steps_done=step,
            wall_s=round(elapsed, 1),
            steps_per_minute=round(60 * step / max(elapsed, 1e-9), 2),
            finished=final,
            loss_curve=curve,
        )
        if out:
            save_toy_model(out, ema_transformer, ema_text, pretraining=summary)

    while step < stop_step:
        if minutes is not None and time.monotonic() - start > 60 * minutes:
            break
        factor = lr_factor(step, steps, settings["warmup_steps"], settings["min_lr_ratio"])
        for group in optimizer.param_groups:
            group["lr"] = settings["lr"] * factor
        prompts, x0 = data.batch(step, settings["batch_size"], settings["cond_dropout"])
        generator = torch.Generator().manual_seed(_seed_of(seed, step, 1))
        loss = flow_matching_loss(
            transformer,
            text_encoder,
            prompts,
            x0,
            generator,
            settings["logit_normal_mean"],
            settings["logit_normal_std"],
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, settings["grad_clip"])
        optimizer.step()
        decay = min(settings["ema_decay"], (1 + step) / (10 + step))
        ema_update(ema_transformer, transformer, decay)
        ema_update(ema_text, text_encoder, decay)
        step += 1
        window.append(loss.item())
        if step % log_every == 0 or step == stop_step:
            record = {
                "step": step,
                "loss": round(sum(window) / len(window), 5),
                "grad_norm": round(float(grad_norm), 4),
                "lr": settings["lr"] * factor,
                "wall_s": round(time.monotonic() - start, 1),
            }
            window = []
            curve.append(record)
            if log_path:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if verbose:
                print(json.dumps(record), flush=True)
        if out and time.monotonic() - last_save > save_every:
            save(final=False)
            last_save = time.monotonic()
    save(final=step == stop_step)
    return {**summary, "modules": (ema_transformer, ema_text)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps (the LR schedule's length)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output directory (weights, config, log)")
    parser.add_argument(
        "--stop-step", type=int, default=None, help="stop after this many steps (same schedule)"
    )
    parser.add_argument(
        "--minutes", type=float, default=None, help="wall-clock cap (not reproducible; see above)"
    )
    parser.add_argument("--save-every", type=float, default=180.0, help="seconds between weight saves")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--warmup-steps", type=int, default=DEFAULTS["warmup_steps"])
    parser.add_argument("--ema-decay", type=float, default=DEFAULTS["ema_decay"])
    parser.add_argument("--cond-dropout", type=float, default=DEFAULTS["cond_dropout"])
    args = parser.parse_args(argv)
    summary = pretrain(
        args.out,
        args.steps,
        args.seed,
        stop_step=args.stop_step,
        minutes=args.minutes,
        save_every=args.save_every,
        log_every=args.log_every,
        threads=args.threads,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        ema_decay=args.ema_decay,
        cond_dropout=args.cond_dropout,
    )
    print(
        f"done: {summary['steps_done']} steps in {summary['wall_s']} s "
        f"({summary['steps_per_minute']} steps/min); "
        f"weights in {args.out}"
    )


if __name__ == "__main__":
    main()
