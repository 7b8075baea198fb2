"""The toy over-optimization benchmark: every ratio variant plus a null control, same seeds, same budget.

    python -m guardrl.toy.benchmark --out runs/toy_benchmark                   # the full benchmark
    python -m guardrl.toy.benchmark --out /tmp/toy_quick --quick               # a few minutes, for the tests
    python -m guardrl.toy.benchmark --out runs/toy_benchmark --report-only     # tables and plots again

Runs (`guardrl fit` on configs/toy/<variant>.yaml, the shipped toy model, LoRA, the learned proxy reward):

    flow_grpo, temp_reweight, mean_revised, ratio_norm, grpo_guard    the five ratio/reweight variants
    null_control                                                       flow_grpo's update on advantages
                                                                       shuffled within each group (no signal)

each for every seed and both clip-range modes:

    published   the published clip ranges carried to the toy's size in the resolution-independent unit
                (`per_sqrt_element`: FlowGRPO's 1e-4 for the raw-ratio variants, GRPO-Guard's 2e-6 for the
                normalised ones, both per-element-mean values at SD3.5-M 512 px, D = 65,536), as in
                the configs
    matched     a clip range per variant that clips the same share of samples as flow_grpo clips at its
                published value. Calibrated once per seed: a short pilot run of every variant without
                clipping records its log-ratios; the share flow_grpo's published c clips there is the target
                (or --match-share), and each variant gets the c whose band leaves that share outside. The
                shares the real runs then clip are reported next to the results.

Every `eval_every` iterations (and before the first) the policy samples fixed evaluation sets (per kind
`per_kind` prompts, train and held-out splits, ODE and SDE, fixed seeds) scored by the proxy and the gold
metrics (guardrl/toy/gold.py). Every iteration, per denoising step: log-ratio mean/std (clipped quantity and
plain log r) and clip fractions by advantage sign. All of it lands under OUT/:

    runs/<run>/evaluations.csv, ratios.csv, done.json, TensorBoard events, checkpoints (resumable)
    calibration.json           matched clip ranges and the pilot shares
    results.csv, ratios.csv    every run's rows with their variant, clip mode and seed
    table.md                   the paper-shaped table: proxy, each gold metric, Average(gold) (1.00 = the
                               shipped model), clip share, at fixed iterations, mean +- std over seeds
    proxy_gold.png, log_ratio_by_step.png, clip_fractions.png

A run that finished (done.json) is skipped when the command is repeated; one that was killed resumes from its
last checkpoint. `--jobs N` runs N runs at once, each in its own process with one thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

import torch

from guardrl.toy.benchmark_calibration import calibrate
from guardrl.toy.benchmark_report import write_report
from guardrl.toy.benchmark_runs import CLIP_MODES, FULL, QUICK, VARIANTS, Budget, RunSpec, _run_many, run_one


def run_benchmark(
    out: str,
    variants: Sequence[str] = VARIANTS,
    seeds: Sequence[int] = (0, 1, 2),
    clip_modes: Sequence[str] = CLIP_MODES,
    budget: Budget = FULL,
    configs: str = "configs/toy",
    jobs: int = 1,
    match_share: Optional[float] = None,
    published_seeds: Optional[Sequence[int]] = None,
) -> dict[str, Any]:
    for name, values, allowed in (
        ("--variants", variants, VARIANTS),
        ("--clip-modes", clip_modes, CLIP_MODES),
    ):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise ValueError(
                f"{name}={','.join(map(str, values))}: {bad or 'empty'} not allowed; choose from "
                f"{', '.join(allowed)}"
            )
    if match_share is not None and not 0 <= match_share < 1:
        raise ValueError(f"--match-share={match_share} must be in [0, 1) (a share of samples), or unset")
    missing = [v for v in variants if not os.path.isfile(os.path.join(configs, f"{v}.yaml"))]
    if missing:
        raise FileNotFoundError(f"--configs={configs!r} has no {', '.join(m + '.yaml' for m in missing)}")
    os.makedirs(out, exist_ok=True)
    start = time.monotonic()
    specs = []
    calibration = None
    if "matched" in clip_modes:
        from guardrl.toy.backbone import ToyBackbone

        backbone = ToyBackbone()
        backbone.load()
        calibration = calibrate(
            variants, seeds, budget, configs, out, jobs, backbone.latent_numel(), match_share
        )
        specs += [
            RunSpec(v, s, "matched", calibration["clip_range"][f"{v}-s{s}"]) for s in seeds for v in variants
        ]
    if "published" in clip_modes:
        # After the matched runs (the main comparison), and by default for fewer seeds (--published-seeds).
        seeds_published = seeds if published_seeds is None else published_seeds
        specs += [RunSpec(v, s, "published") for s in seeds_published for v in variants]
    summaries = _run_many(specs, budget, configs, out, jobs)
    report = write_report(out, budget)
    report.update(wall_s=round(time.monotonic() - start, 1), runs=summaries, calibration=calibration)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    return report


def _number_list(text: str, kind: type = int) -> list:
    """`--seeds 0,1,2` (kind int) or `--lr 3e-4,1e-3` (kind float), for argparse."""
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_run"]:  # one run in a worker process (--jobs > 1)
        payload = json.loads(argv[1])
        torch.set_num_threads(1)
        spec, budget = RunSpec(**payload["spec"]), Budget(**payload["budget"])
        result = run_one(spec, budget, payload["configs"], payload["out"], payload["pilot"])
        path = os.path.join(payload["out"], "logs", f"{'pilot-' if payload['pilot'] else ''}{spec.name}.json")
        with open(path, "w") as f:
            json.dump(result, f)
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output directory (a repeated command continues there)")
    parser.add_argument("--quick", action="store_true", help="tiny budget: minutes, for the tests")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", type=_number_list, default=[0, 1, 2])
    parser.add_argument("--clip-modes", default=",".join(CLIP_MODES))
    parser.add_argument(
        "--published-seeds",
        type=_number_list,
        default=[0],
        help="seeds of the published-clip mode (default 0; the matched mode runs every --seeds)",
    )
    parser.add_argument("--iterations", type=int, default=None, help="GRPO iterations per run")
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--per-kind", type=int, default=None, help="evaluation prompts per kind and split")
    parser.add_argument("--configs", default="configs/toy")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
    parser.add_argument(
        "--match-share",
        type=float,
        default=None,
        help="matched mode's target clip share (default: what flow_grpo clips at its published c)",
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite the tables and plots from OUT")
    args = parser.parse_args(argv)
    if args.report_only:
        print(json.dumps(write_report(args.out), indent=1))
        return
    budget = dataclasses.replace(QUICK if args.quick else FULL)
    for field, value in (
        ("iterations", args.iterations),
        ("eval_every", args.eval_every),
        ("per_kind", args.per_kind),
    ):
        if value is not None:
            if value < 1:
                parser.error(f"--{field.replace('_', '-')} must be >= 1, got {value}")
            setattr(budget, field, value)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    torch.set_num_threads(1)
    report = run_benchmark(
        args.out,
        args.variants.split(","),
        args.seeds,
        args.clip_modes.split(","),
        budget,
        args.configs,
        args.jobs,
        args.match_share,
        args.published_seeds,
    )
    print(open(report["table"]).read())
    print(f"results: {report['results']}\nplots: {', '.join(report['plots'])}\nwall: {report['wall_s']} s")


if __name__ == "__main__":
    main()
