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
from collections.abc import Sequence

import torch

from guardrl.toy.model import count_parameters
from guardrl.toy.proxy_attack import HACK_AIMS, hack_figures
from guardrl.toy.proxy_evaluation import evaluate
from guardrl.toy.proxy_net import WEIGHTS_DIR, read_record, write_record
from guardrl.toy.proxy_reward import ToyProxyReward
from guardrl.toy.proxy_training import DEFAULTS, train


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
