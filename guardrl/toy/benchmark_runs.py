"""Building and launching the toy benchmark's runs: the variants and clip modes, the `Budget` every run gets
(FULL, QUICK), `RunSpec`, the `guardrl fit` arguments of a run, one run with its recorder (resumed from its
last checkpoint, skipped once done.json is written), and many runs in worker processes (`--jobs`)."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import torch

from guardrl.algorithm.ratios import RATIO_VARIANTS
from guardrl.toy.benchmark_recorder import BenchmarkRecorder
from guardrl.toy.files import write_json_atomic

# The repository's toy configs (the commands' --configs default, run from the repository root).
TOY_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs", "toy")


def _benchmarked(variants) -> tuple[str, ...]:
    # A registered variant joins the benchmark with its configs/toy/<name>.yaml (CONTRIBUTING.md, "add a
    # ratio variant"); without the repository's configs at hand, every registered one.
    if not os.path.isdir(TOY_CONFIGS):
        return tuple(variants)
    return tuple(v for v in variants if os.path.isfile(os.path.join(TOY_CONFIGS, f"{v}.yaml")))


# The registered ratio variants with a toy config, and the null control; each runs configs/toy/<name>.yaml.
VARIANTS = (*_benchmarked(RATIO_VARIANTS), "null_control")
CLIP_MODES = ("published", "matched")


# The proxy the benchmark optimizes. The learned proxy (guardrl.toy.proxy_reward) does not move within a CPU
# budget: three pilots (docs/toy_benchmark.md) at lr 3e-3 and 1e-3, in its log-probability and
# mean-probability forms, left flow_grpo at or below its start while the null control's drift lowered it. The
# colour share (the share of pixels within the verifier's tolerance of the prompt's colours) rises fast
# (docs/learning.md) and is hackable the way a proxy should be for this question: painting more of the frame
# in the prompt's colours raises it while the counts, shapes, positions and realism the gold metrics measure
# are free to fall.
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
