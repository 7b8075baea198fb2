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
import csv
import dataclasses
import glob
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from guardrl.algorithm import clip_shares
from guardrl.algorithm.ratios import RATIO_VARIANTS
from guardrl.toy.files import write_json_atomic
from guardrl.toy.gold import CHECKS, GOLD_DIRECTIONS, average_gold, gold_metrics_with_errors
from guardrl.toy.render import render_batch

# Every registered ratio variant and the null control; each runs configs/toy/<name>.yaml.
VARIANTS = (*RATIO_VARIANTS, "null_control")
CLIP_MODES = ("published", "matched")
GOLD_NAMES = tuple(GOLD_DIRECTIONS)
CHECK_NAMES = tuple(f"check_{check}" for check in CHECKS)
# Every value with its standard error (`<name>_se`, guardrl.toy.gold.gold_metrics_with_errors). `proxy` is the
# run's reward; `learned_proxy` the learned proxy's log-probability form, recorded whatever the reward.
MEASURED = ("proxy", "learned_proxy", *GOLD_NAMES, *CHECK_NAMES)
EVAL_COLUMNS = ("iteration", "split", "sampler", *(c for n in MEASURED for c in (n, f"{n}_se")), "images")
RATIO_COLUMNS = (
    "iteration",
    "step",
    "log_ratio_mean",
    "log_ratio_std",
    "raw_log_ratio_mean",
    "raw_log_ratio_std",
    "clip_frac_pos_upper",
    "clip_frac_neg_lower",
    "clip_frac",
    "samples",
)
# Practically no clipping for the calibration pilots: toy log-ratios are of order 1e-3 and smaller.
NO_CLIP = 0.5


# The proxy the benchmark optimizes. The learned proxy (guardrl.toy.proxy) does not move within a CPU budget:
# three pilots (docs/toy_benchmark.md) at lr 3e-3 and 1e-3, in its log-probability and mean-probability forms,
# left flow_grpo at or below its start while the null control's drift lowered it. The colour share (the share
# of pixels within the verifier's tolerance of the prompt's colours) rises fast (docs/learning.md) and is
# hackable the way a proxy should be for this question: painting more of the frame in the prompt's colours
# raises it while the counts, shapes, positions and realism the gold metrics measure are free to fall.
PROXY_REWARD = '[{"class_path": "guardrl.toy.rewards.ToyColorShare"}]'


@dataclasses.dataclass
class Budget:
    """What every run gets; the same for all variants (nothing is tuned per variant)."""

    iterations: int = 64
    eval_every: int = 16
    per_kind: int = 32  # evaluation prompts per kind per split: 128 images per (split, sampler)
    calibration_iterations: int = 4
    samplers: tuple = ("sde", "ode")
    overrides: dict = dataclasses.field(default_factory=dict)  # extra `guardrl fit` options, e.g. batch size


# The learning benchmark's budget (docs/learning.md), which moves the colour share 3-10x the null control's
# drift in 32 iterations: lr 3e-3, 4 prompts x 8 samples, 2 optimizer steps per iteration on 4 of the 9 SDE
# steps (the same random subset for every variant of a seed).
FULL = Budget(
    overrides={
        "--model.rewards": PROXY_REWARD,
        "--model.optimizer.init_args.lr": "3e-3",
        "--data.prompts_per_batch": "4",
        "--data.group_size": "8",
        "--model.grpo.minibatch_size": "16",
        "--model.grpo.num_train_timesteps": "4",
    }
)
# Seconds to minutes on a CPU: a smaller batch and sampler, same code paths.
QUICK = Budget(
    iterations=2,
    eval_every=1,
    per_kind=1,
    calibration_iterations=1,
    overrides={
        "--model.rewards": PROXY_REWARD,
        "--data.prompts_per_batch": "2",
        "--data.group_size": "4",
        "--model.grpo.minibatch_size": "4",
        "--model.sampling.num_inference_steps": "4",
        "--model.sampling.sde_window": "[0, 3]",
    },
)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    variant: str
    seed: int
    clip_mode: str
    clip_range: Optional[float] = None  # in the log-ratio's own units ("log_prob"); None: the config's value

    @property
    def name(self) -> str:
        return f"{self.variant}-{self.clip_mode}-s{self.seed}"


# ---------------------------------------------------------------------------------------------- recording
class BenchmarkRecorder(Callback):
    """Writes evaluations.csv (proxy and gold on fixed sets) and ratios.csv (per-step ratio statistics) into
    `directory`; resumable (rows past the resumed iteration are dropped, a missing evaluation is redone)."""

    def __init__(
        self,
        directory: str,
        eval_every: int,
        per_kind: int,
        splits: Sequence[str] = ("heldout", "train"),
        samplers: Sequence[str] = ("ode", "sde"),
        eval_seed: int = 0,
        keep_log_ratios: bool = False,
    ) -> None:
        if eval_every < 1 or per_kind < 1:
            raise ValueError(f"eval_every and per_kind must be >= 1, got {eval_every} and {per_kind}")
        self.directory = directory
        self.eval_every = eval_every
        self.per_kind = per_kind
        self.splits = tuple(splits)
        self.samplers = tuple(samplers)
        self.eval_seed = eval_seed
        self.keep_log_ratios = keep_log_ratios
        self.log_ratios: list[torch.Tensor] = []  # per sample, every step and update (calibration pilots)
        self._real: dict[str, torch.Tensor] = {}
        self._learned = None
        os.makedirs(directory, exist_ok=True)
        self.eval_path = os.path.join(directory, "evaluations.csv")
        self.ratio_path = os.path.join(directory, "ratios.csv")

    def on_train_start(self, trainer, pl_module) -> None:
        iteration = pl_module.num_iterations
        _truncate_csv(self.eval_path, EVAL_COLUMNS, lambda row: int(row["iteration"]) <= iteration)
        _truncate_csv(self.ratio_path, RATIO_COLUMNS, lambda row: int(row["iteration"]) < iteration)
        done = {int(row["iteration"]) for row in _read_csv(self.eval_path)}
        if iteration % self.eval_every == 0 and iteration not in done:
            self._evaluate(pl_module, iteration)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        iteration = pl_module.num_iterations - 1  # the iteration that just ran
        self._record_ratios(iteration, outputs)
        if pl_module.num_iterations % self.eval_every == 0 or trainer.should_stop:
            self._evaluate(pl_module, pl_module.num_iterations)

    def _record_ratios(self, iteration: int, outputs: dict[str, Any]) -> None:
        rows = []
        for stats in outputs["step_stats"]:
            log_ratio = stats.cat("log_ratio").double()
            raw = stats.cat("raw_log_ratio").double()
            if log_ratio.numel() == 0:
                continue
            if self.keep_log_ratios:
                self.log_ratios.append(log_ratio.clone())
            # the loss's own clip flags, counted as RatioStatsCallback counts them
            shares = clip_shares(
                stats.cat("clipped_upper"), stats.cat("clipped_lower"), stats.cat("advantages")
            )
            rows.append(
                {
                    "iteration": iteration,
                    "step": stats.step_index,
                    "log_ratio_mean": float(log_ratio.mean()),
                    "log_ratio_std": float(log_ratio.std(unbiased=False)),
                    "raw_log_ratio_mean": float(raw.mean()),
                    "raw_log_ratio_std": float(raw.std(unbiased=False)),
                    # as clip/frac_pos_upper_t{k}: the share of positive-advantage samples above 1 + c
                    "clip_frac_pos_upper": float(shares["pos_upper"]),
                    "clip_frac_neg_lower": float(shares["neg_lower"]),
                    "clip_frac": float(shares["outside_band"]),
                    "samples": log_ratio.numel(),
                }
            )
        _append_csv(self.ratio_path, RATIO_COLUMNS, rows)

    def _learned_proxy(self):
        if self._learned is None:
            from guardrl.toy.proxy import ToyProxyReward

            self._learned = ToyProxyReward()
        return self._learned

    def _real_images(self, split: str, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        if split not in self._real:  # reference renders for the realism distance, other seeds than the noise
            self._real[split] = render_batch(prompts, [s + 1_000_000 for s in seeds])
        return self._real[split]

    @torch.no_grad()
    def _evaluate(self, module, iteration: int) -> None:
        from guardrl.toy.evaluate import evaluation_set, generate

        rows = []
        for split in self.splits:
            items = evaluation_set(split, self.per_kind, self.eval_seed)
            prompts, seeds = [p for p, _ in items], [s for _, s in items]
            for sampler in self.samplers:
                with module.policy.use_weights("policy") as transformer:
                    images = generate(
                        module.backbone,
                        prompts,
                        seeds,
                        module.sampling.num_inference_steps,
                        module.sampling.guidance_scale,
                        sde=sampler == "sde",
                        sde_seed=self.eval_seed,
                        transformer=transformer,
                        scales=module.noise_scales.cpu(),
                    )
                proxy, _ = module.score(images.to(module.device), prompts)
                learned = self._learned_proxy()(images, prompts)
                row = {"iteration": iteration, "split": split, "sampler": sampler, "images": len(prompts)}
                for name, values in (("proxy", proxy), ("learned_proxy", learned)):
                    values = values.double()
                    row[name] = float(values.mean())
                    row[f"{name}_se"] = float(values.std() / len(values) ** 0.5)
                row.update(
                    gold_metrics_with_errors(
                        images, prompts, self._real_images(split, prompts, seeds), seed=iteration
                    )
                )
                rows.append(row)
        _append_csv(self.eval_path, EVAL_COLUMNS, rows)


def _read_csv(path: str) -> list[dict[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: str, columns: Sequence[str], rows: list[dict]) -> None:
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)


def _append_csv(path: str, columns: Sequence[str], rows: list[dict]) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def _truncate_csv(path: str, columns: Sequence[str], keep) -> None:
    if os.path.exists(path):
        _write_csv(path, columns, [row for row in _read_csv(path) if keep(row)])


# ---------------------------------------------------------------------------------------------- running
def fit_args(spec: RunSpec, budget: Budget, configs: str, runs_dir: str, iterations: int) -> list[str]:
    args = [
        "--config",
        os.path.join(configs, f"{spec.variant}.yaml"),
        "--seed_everything",
        str(spec.seed),
        "--model.seed",
        str(spec.seed),
        "--data.seed",
        str(spec.seed),
        "--model.max_iterations",
        str(iterations),
        "--trainer.logger.init_args.save_dir",
        runs_dir,
        "--trainer.logger.init_args.name",
        spec.name,
        "--trainer.logger.init_args.version",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
    ]
    for key, value in budget.overrides.items():
        args += [key, value]
    if spec.clip_range is not None:
        args += ["--model.grpo.clip_range", repr(spec.clip_range), "--model.grpo.clip_range_unit", "log_prob"]
    return args


def run_one(spec: RunSpec, budget: Budget, configs: str, out: str, pilot: bool = False) -> dict[str, Any]:
    """One `guardrl fit` with the recorder, in this process. A pilot (calibration) run records log-ratios
    without clipping and without evaluations, and returns them."""
    from guardrl.cli import main

    runs_dir = os.path.join(out, "pilots" if pilot else "runs")
    directory = os.path.join(runs_dir, spec.name)
    done_path = os.path.join(directory, "done.json")
    if os.path.exists(done_path) and not pilot:
        with open(done_path) as f:
            return json.load(f)
    iterations = budget.calibration_iterations if pilot else budget.iterations
    cli = main(fit_args(spec, budget, configs, runs_dir, iterations), run=False)
    recorder = BenchmarkRecorder(
        directory,
        eval_every=iterations + 1 if pilot else budget.eval_every,
        per_kind=budget.per_kind,
        splits=() if pilot else ("heldout", "train"),
        samplers=budget.samplers,
        keep_log_ratios=pilot,
    )
    cli.trainer.callbacks.append(recorder)
    last = sorted(glob.glob(os.path.join(directory, "**", "last.ckpt"), recursive=True))
    start = time.monotonic()
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=last[0] if last and not pilot else None)
    require_finished(spec.name, cli.model.num_iterations, iterations)
    summary = {
        "run": spec.name,
        **dataclasses.asdict(spec),
        "iterations": cli.model.num_iterations,
        "clip_range_used": float(cli.model.clip_range),
        "wall_s": round(time.monotonic() - start, 1),
    }
    if pilot:
        summary["log_ratios"] = torch.cat(recorder.log_ratios).tolist() if recorder.log_ratios else []
    else:
        write_json_atomic(done_path, summary)
    return summary


def require_finished(name: str, done: int, wanted: int) -> None:
    """After `trainer.fit`: a run stopped by a signal (GracefulShutdown saved last.ckpt) is not finished.
    Raising stops the whole command before done.json is written, so the next command resumes the run
    instead of skipping it (the toy benchmark and the learning benchmark)."""
    if done < wanted:
        raise RuntimeError(
            f"{name}: stopped after {done} of {wanted} iterations; run the same command again to resume it"
        )


def _run_in_subprocess(spec: RunSpec, budget: Budget, configs: str, out: str, pilot: bool) -> dict[str, Any]:
    payload = json.dumps(
        {
            "spec": dataclasses.asdict(spec),
            "budget": dataclasses.asdict(budget),
            "configs": configs,
            "out": out,
            "pilot": pilot,
        }
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log_path = os.path.join(out, "logs", f"{'pilot-' if pilot else ''}{spec.name}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "guardrl.toy.benchmark", "_run", payload],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    if proc.returncode:
        raise RuntimeError(f"benchmark run {spec.name} failed (exit {proc.returncode}); see {log_path}")
    result_path = os.path.join(out, "logs", f"{'pilot-' if pilot else ''}{spec.name}.json")
    with open(result_path) as f:
        return json.load(f)


def _run_many(specs: list[RunSpec], budget: Budget, configs: str, out: str, jobs: int, pilot: bool = False):
    if jobs <= 1:
        results = []
        for spec in specs:
            print(f"[benchmark] {'pilot ' if pilot else ''}{spec.name}", flush=True)
            results.append(run_one(spec, budget, configs, out, pilot))
        return results
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda s: _run_in_subprocess(s, budget, configs, out, pilot), specs))


def clipped_share(log_ratios: np.ndarray, clip: float) -> float:
    """Share of samples outside the clip band [1 - c, 1 + c] (on the ratio, as the loss clips it)."""
    return float(np.mean((log_ratios > math.log1p(clip)) | (log_ratios < math.log1p(-clip))))


def clip_for_share(log_ratios: np.ndarray, share: float) -> float:
    """The clip range whose band leaves `share` of the samples outside (bisection on a log scale)."""
    low, high = 1e-12, 0.99
    if clipped_share(log_ratios, high) >= share:
        return high
    for _ in range(200):
        mid = math.sqrt(low * high)
        if clipped_share(log_ratios, mid) > share:
            low = mid
        else:
            high = mid
    return high


def calibrate(
    variants: Sequence[str],
    seeds: Sequence[int],
    budget: Budget,
    configs: str,
    out: str,
    jobs: int,
    num_elements: int,
    match_share: Optional[float] = None,
) -> dict[str, Any]:
    """Matched clip ranges per (variant, seed): pilots without clipping; the target share is `match_share`, or
    by default the share flow_grpo's published clip range clips in its pilot."""
    from guardrl.algorithm import effective_clip_range

    path = os.path.join(out, "calibration.json")
    if os.path.exists(path):
        with open(path) as f:
            calibration = json.load(f)
        if calibration.get("match_share") == match_share and all(
            f"{v}-s{s}" in calibration["clip_range"] for v in variants for s in seeds
        ):
            return calibration
    published = effective_clip_range(
        _config_clip(configs, "flow_grpo"), "per_sqrt_element", "mean", num_elements
    )
    needed = sorted(set(variants) | {"flow_grpo"}, key=VARIANTS.index)
    specs = [RunSpec(v, s, "pilot", NO_CLIP) for s in seeds for v in needed]
    pilots = {
        (r["variant"], r["seed"]): np.asarray(r["log_ratios"])
        for r in _run_many(specs, budget, configs, out, jobs, pilot=True)
    }
    calibration = {
        "target": {},
        "clip_range": {},
        "pilot_share": {},
        "flow_grpo_published_clip": published,
        "flow_grpo_published_share": {},
        "match_share": match_share,
    }
    for seed in seeds:
        published_share = clipped_share(pilots[("flow_grpo", seed)], published)
        calibration["flow_grpo_published_share"][str(seed)] = published_share
        target = published_share if match_share is None else match_share
        calibration["target"][str(seed)] = target
        for variant in variants:
            clip = clip_for_share(pilots[(variant, seed)], target)
            calibration["clip_range"][f"{variant}-s{seed}"] = clip
            calibration["pilot_share"][f"{variant}-s{seed}"] = clipped_share(pilots[(variant, seed)], clip)
    write_json_atomic(path, calibration)
    return calibration


def _config_clip(configs: str, variant: str) -> float:
    import yaml

    with open(os.path.join(configs, f"{variant}.yaml")) as f:
        grpo = yaml.safe_load(f)["model"]["grpo"]
    if grpo.get("clip_range_unit") != "per_sqrt_element":
        raise ValueError(f"{configs}/{variant}.yaml: the benchmark expects clip_range_unit per_sqrt_element")
    return float(grpo["clip_range"])


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


# ---------------------------------------------------------------------------------------------- report
def collect(out: str) -> tuple[list[dict], list[dict]]:
    """(evaluation rows, ratio rows) of every finished run, with variant / clip_mode / seed and, per
    evaluation row, Average(gold) against that run's iteration-0 evaluation of the same split and sampler (the
    shipped model, so it scores 1.00)."""
    evaluations, ratios = [], []
    for done in sorted(glob.glob(os.path.join(out, "runs", "*", "done.json"))):
        with open(done) as f:
            meta = json.load(f)
        directory = os.path.dirname(done)
        tags = {
            "variant": meta["variant"],
            "clip_mode": meta["clip_mode"],
            "seed": int(meta["seed"]),
            "clip_range_used": meta["clip_range_used"],
        }
        rows = [
            {k: _number(v) for k, v in row.items()}
            for row in _read_csv(os.path.join(directory, "evaluations.csv"))
        ]
        reference = {(r["split"], r["sampler"]): r for r in rows if r["iteration"] == 0}
        for row in rows:
            base = reference[(row["split"], row["sampler"])]
            names = normalizable(base)
            row["average_gold"] = average_gold({k: row[k] for k in names}, {k: base[k] for k in names})
            row["average_gold_of"] = "+".join(names)
            evaluations.append({**tags, **row})
        for row in _read_csv(os.path.join(directory, "ratios.csv")):
            ratios.append({**tags, **{k: _number(v) for k, v in row.items()}})
    return evaluations, ratios


def normalizable(reference: dict) -> list[str]:
    """The gold metrics Average(gold) can be relative to: a higher-is-better metric whose reference is 0 (a
    pass rate of 0 on a small evaluation set) has no ratio and is left out of that average (the row's
    `average_gold_of` names what went in)."""
    return [k for k in GOLD_NAMES if GOLD_DIRECTIONS[k][0] != "higher" or float(reference[k]) > 0]


def _number(value: str):
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number


def report_iterations(evaluated: Sequence[int]) -> list[int]:
    """The fixed iteration counts of the table: 0, about a quarter, half and the end of the budget."""
    evaluated = sorted(set(evaluated))
    last = evaluated[-1]
    wanted = [0, last // 4, last // 2, last]
    return sorted({min(evaluated, key=lambda i: (abs(i - w), i)) for w in wanted})


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    mean = float(np.mean(values))
    spread = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    fmt = (lambda x: f"{x:.3f}") if abs(mean) >= 0.01 or mean == 0 else (lambda x: f"{x:.2e}")
    return f"{fmt(mean)} ± {fmt(spread)}" if len(values) > 1 else fmt(mean)


def table_markdown(evaluations: list[dict], ratios: list[dict]) -> str:
    lines = [
        "# Toy benchmark results",
        "",
        "Mean ± std over seeds (no ± with one seed). Average(gold) = mean of the gold metrics normalised to "
        "the shipped model (1.00 at iteration 0; pass rates higher-is-better, off-palette and realism "
        "distance lower-is-better). clip share = share of samples outside the clip band, averaged over "
        "the run's updates up to that iteration.",
        "",
    ]
    columns = ["variant", "iteration", "proxy", *GOLD_NAMES, "Average(gold)", "clip share", "clip c"]
    for clip_mode in [m for m in CLIP_MODES if any(e["clip_mode"] == m for e in evaluations)]:
        for split, sampler in (("heldout", "ode"), ("heldout", "sde"), ("train", "ode"), ("train", "sde")):
            rows = [
                e
                for e in evaluations
                if e["clip_mode"] == clip_mode and e["split"] == split and e["sampler"] == sampler
            ]
            if not rows:
                continue
            lines += [
                f"## clip {clip_mode}: {split} prompts, {sampler.upper()} sampling",
                "",
                "| " + " | ".join(columns) + " |",
                "|" + "---|" * len(columns),
            ]
            for variant in [v for v in VARIANTS if any(r["variant"] == v for r in rows)]:
                mine = [r for r in rows if r["variant"] == variant]
                for iteration in report_iterations([r["iteration"] for r in mine]):
                    at = [r for r in mine if r["iteration"] == iteration]
                    shares = []
                    for seed in sorted({r["seed"] for r in at}):
                        seen = [
                            q["clip_frac"]
                            for q in ratios
                            if q["variant"] == variant
                            and q["seed"] == seed
                            and q["clip_mode"] == clip_mode
                            and q["iteration"] < iteration
                        ]
                        if seen:
                            shares.append(float(np.mean(seen)))
                    cells = [variant, str(iteration), _mean_std([r["proxy"] for r in at])]
                    cells += [_mean_std([r[g] for r in at]) for g in GOLD_NAMES]
                    cells += [
                        _mean_std([r["average_gold"] for r in at]),
                        _mean_std(shares) if shares else "–",
                        f"{float(np.mean([r['clip_range_used'] for r in at])):.2e}",
                    ]
                    lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def plot_report(evaluations: list[dict], ratios: list[dict], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    modes = [m for m in CLIP_MODES if any(e["clip_mode"] == m for e in evaluations)]
    colors = {v: plt.get_cmap("tab10")(i) for i, v in enumerate(VARIANTS)}

    fig, axes = plt.subplots(len(modes) * 2, 2, figsize=(11, 4.5 * len(modes) * 2), squeeze=False)
    for m, mode in enumerate(modes):
        for s, sampler in enumerate(("ode", "sde")):
            row = axes[2 * m + s]
            for variant in VARIANTS:
                mine = [
                    e
                    for e in evaluations
                    if e["variant"] == variant
                    and e["clip_mode"] == mode
                    and e["split"] == "heldout"
                    and e["sampler"] == sampler
                ]
                if not mine:
                    continue
                for ax, key in zip(row, ("proxy", "average_gold")):
                    its = sorted({e["iteration"] for e in mine})
                    values = [[e[key] for e in mine if e["iteration"] == i] for i in its]
                    mean = [np.mean(v) for v in values]
                    ax.plot(
                        its,
                        mean,
                        label=variant,
                        color=colors[variant],
                        linestyle="--" if variant == "null_control" else "-",
                    )
                    ax.fill_between(
                        its,
                        [np.min(v) for v in values],
                        [np.max(v) for v in values],
                        color=colors[variant],
                        alpha=0.15,
                    )
            row[0].set_title(f"proxy, held-out, {sampler.upper()}, clip {mode}")
            row[1].set_title(f"Average(gold), held-out, {sampler.upper()}, clip {mode}")
            for ax in row:
                ax.set_xlabel("GRPO iteration")
                ax.grid(alpha=0.3)
            row[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, os.path.join(out, "proxy_gold.png")))

    for name, keys, titles in (
        (
            "log_ratio_by_step.png",
            ("raw_log_ratio_mean", "log_ratio_mean", "log_ratio_std"),
            ("mean plain log r", "mean clipped log-ratio", "std of clipped log-ratio"),
        ),
        (
            "clip_fractions.png",
            ("clip_frac_pos_upper", "clip_frac_neg_lower", "clip_frac"),
            (
                "positive advantage, above 1 + c",
                "negative advantage, below 1 - c",
                "all samples, outside band",
            ),
        ),
    ):
        fig, axes = plt.subplots(len(modes), 3, figsize=(15, 4.2 * len(modes)), squeeze=False)
        for m, mode in enumerate(modes):
            for ax, key, title in zip(axes[m], keys, titles):
                for variant in VARIANTS:
                    mine = [q for q in ratios if q["variant"] == variant and q["clip_mode"] == mode]
                    steps = sorted({q["step"] for q in mine})
                    if not steps:
                        continue
                    values = [np.nanmean([q[key] for q in mine if q["step"] == k]) for k in steps]
                    ax.plot(
                        steps,
                        values,
                        marker="o",
                        label=variant,
                        color=colors[variant],
                        linestyle="--" if variant == "null_control" else "-",
                    )
                ax.set_title(f"{title} (clip {mode})")
                ax.set_xlabel("denoising step k (0 = pure noise)")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.grid(alpha=0.3)
                if key.endswith("mean") and "log" in key:
                    ax.set_yscale("symlog", linthresh=1e-6)
            axes[m][0].legend(fontsize=8)
        fig.tight_layout()
        paths.append(_save(fig, os.path.join(out, name)))
    return paths


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path + ".tmp.png", dpi=90)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path


def write_report(out: str, budget: Budget | None = None) -> dict[str, Any]:
    evaluations, ratios = collect(out)
    if not evaluations:
        raise FileNotFoundError(f"--out={out!r} holds no finished benchmark run (runs/*/done.json)")
    columns = [
        "variant",
        "clip_mode",
        "seed",
        "clip_range_used",
        *EVAL_COLUMNS,
        "average_gold",
        "average_gold_of",
    ]
    _write_csv(os.path.join(out, "results.csv"), columns, evaluations)
    _write_csv(
        os.path.join(out, "ratios.csv"),
        ["variant", "clip_mode", "seed", "clip_range_used", *RATIO_COLUMNS],
        ratios,
    )
    table = table_markdown(evaluations, ratios)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    plots = plot_report(evaluations, ratios, out)
    from guardrl.toy.benchmark_answer import answer_markdown

    with open(os.path.join(out, "answer.md"), "w") as f:
        in_order = sorted(evaluations, key=lambda e: VARIANTS.index(e["variant"]))  # rows in VARIANTS order
        f.write(answer_markdown(in_order, [m for m in MEASURED if m != "proxy"] + ["proxy"]) + "\n")
    return {
        "results": os.path.join(out, "results.csv"),
        "table": os.path.join(out, "table.md"),
        "answer": os.path.join(out, "answer.md"),
        "plots": plots,
        "budget": dataclasses.asdict(budget) if budget else None,
    }


# ---------------------------------------------------------------------------------------------- command
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
