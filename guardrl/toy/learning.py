"""Does it train? Reward curves of every ratio variant against a null control, on the toy model.

    python -m guardrl.toy.learning --out runs/learning --jobs 2          # the benchmark (docs/learning.md)
    python -m guardrl.toy.learning --out runs/learning --report-only     # table and plot again
    python -m guardrl.toy.learning --out runs/learning_pilot --variants flow_grpo,null_control \
        --seeds 0 --lr 3e-4,1e-3,3e-3 --iterations 24 --jobs 2              # the learning-rate pilot

Each run is `guardrl fit` on configs/toy/<variant>.yaml (the shipped toy model, LoRA), with one reward the toy
model can move and the same budget for every variant (`Settings`; nothing is tuned per variant):

    jpeg          JPEG compressibility, DDPO's first task (guardrl.rewards.JpegCompressibility)
    color_share   share of pixels in the prompt's colours, an exact rule (guardrl.toy.rewards.ToyColorShare)
    proxy         the toy world's learned proxy (guardrl.toy.proxy_reward.ToyProxyReward)

The null control is flow_grpo's update on advantages shuffled within each group: the same update size,
clipping and noise, no reward signal. Whatever it gains is drift; a variant learns when it gains clearly more.

The gain of a run is measured on a fixed evaluation set, not on the training batches: the training reward of
an iteration depends mostly on which 4 prompts the stream drew (a learned-proxy batch mean moves by +-4
between iterations for that reason alone, as much for the null control as for flow_grpo), so at iterations 0,
`eval_every`, ... and the last, the policy samples `eval_prompts` training prompts (each from its own fixed
seed, with the training SDE sampler and fixed SDE noise; the set depends on the run's seed only, so every
variant of a seed is scored on the same prompts and noise) and the gain is the evaluation reward at the end
minus that at iteration 0 (the shipped model, identical for every variant of a seed). Per reward, the report
gives every variant's gain (mean +- std over seeds), its ratio to the null control's |gain|, its distance from
the null gain in null seed standard deviations, and whether it passes:

    pass = mean gain >= 3 x |null mean gain|  and  every seed's gain > every null seed's gain

with the run's mean clip share and gradient norm next to it, so that a variant that does not learn shows why.
The training reward (`reward/mean`, the first and last `window` iterations) is reported beside it. Outputs
under OUT/: runs/<reward>-<variant>-lr<lr>-s<seed>/ (TensorBoard events, checkpoints, curve.csv,
evaluations.csv, done.json), table.md, gains.csv, curves.png, summary.json. A repeated command skips finished
runs and resumes a killed one from its last checkpoint; `--jobs N` runs N worker processes of one thread
each.
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
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from guardrl.toy.benchmark import _number_list
from guardrl.toy.benchmark_csv import _append_csv, _read_csv, _truncate_csv
from guardrl.toy.benchmark_runs import VARIANTS, require_finished
from guardrl.toy.files import write_json_atomic

NULL = "null_control"
# The rewards, as `--model.rewards` values. Each is something the toy model can move within a CPU run.
REWARDS: dict[str, dict[str, Any]] = {
    "jpeg": {"class_path": "guardrl.rewards.JpegCompressibility"},
    "color_share": {"class_path": "guardrl.toy.rewards.ToyColorShare"},
    "proxy": {"class_path": "guardrl.toy.proxy_reward.ToyProxyReward"},
    "proxy_prob": {
        "class_path": "guardrl.toy.proxy_reward.ToyProxyReward",
        "init_args": {"form": "mean_prob"},
    },
}
# What a plain command runs (proxy_prob is the over-optimization pilot's, docs/toy_benchmark.md).
DEFAULT_REWARDS = ("jpeg", "color_share", "proxy")
# What each run logs and the report reads (TensorBoard tags, guardrl.analysis).
CURVE_TAGS = ("reward/mean", "reward/std", "grad/norm", "train/skipped_update", "time/iteration_s")
CURVE_COLUMNS = ("iteration", "reward_mean", "reward_std", "grad_norm", "clip_share", "skipped", "seconds")


@dataclasses.dataclass
class Settings:
    """The budget every run gets, whatever its variant (chosen by the pilot in docs/learning.md)."""

    iterations: int = 32
    prompts_per_batch: int = 4
    group_size: int = 8
    minibatch_size: int = 16  # 32 samples / 16 = 2 optimizer steps per iteration
    num_train_timesteps: int = 4  # of the 9 SDE steps, the same random subset for every variant (model.seed)
    num_inference_steps: int = 10
    window: int = 5  # iterations averaged at the start and at the end of a run for its training-reward gain
    eval_every: int = 16  # evaluation at iterations 0, eval_every, ... and the last
    eval_prompts: int = 128  # training prompts (32 per kind), one image each, fixed seeds

    def overrides(self) -> list[str]:
        return [
            "--data.prompts_per_batch",
            str(self.prompts_per_batch),
            "--data.group_size",
            str(self.group_size),
            "--model.grpo.minibatch_size",
            str(self.minibatch_size),
            "--model.grpo.num_train_timesteps",
            str(self.num_train_timesteps),
            "--model.grpo.log_step_grad_norms",
            "false",
            "--model.sampling.num_inference_steps",
            str(self.num_inference_steps),
            "--model.sampling.sde_window",
            f"[0, {self.num_inference_steps - 1}]",
        ]


QUICK = Settings(
    iterations=3,
    prompts_per_batch=2,
    group_size=4,
    minibatch_size=8,
    num_train_timesteps=2,
    num_inference_steps=4,
    window=1,
    eval_every=3,
    eval_prompts=4,
)


@dataclasses.dataclass(frozen=True)
class Run:
    reward: str
    variant: str
    seed: int
    lr: float

    @property
    def name(self) -> str:
        return f"{self.reward}-{self.variant}-lr{self.lr:g}-s{self.seed}"


# ---------------------------------------------------------------------------------------------- running
def fit_args(run: Run, settings: Settings, configs: str, runs_dir: str) -> list[str]:
    return [
        "--config",
        os.path.join(configs, f"{run.variant}.yaml"),
        "--seed_everything",
        str(run.seed),
        "--model.seed",
        str(run.seed),
        "--data.seed",
        str(run.seed),
        "--model.rewards",
        json.dumps([REWARDS[run.reward]]),
        "--model.optimizer.init_args.lr",
        repr(run.lr),
        "--model.max_iterations",
        str(settings.iterations),
        "--trainer.logger.init_args.save_dir",
        runs_dir,
        "--trainer.logger.init_args.name",
        run.name,
        "--trainer.logger.init_args.version",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        *settings.overrides(),
    ]


EVAL_COLUMNS = ("iteration", "reward_mean", "reward_std", "images")


class LearningEvaluator(Callback):
    """Scores the current policy on a fixed set of training prompts (evaluations.csv in `directory`):
    `eval_prompts` prompts (a quarter per prompt kind), image i from its own seed, the run's SDE sampler with
    SDE noise from `seed`; at iteration 0, every `every` iterations and when training stops. Resumable: rows
    past the resumed iteration are dropped, a missing evaluation is redone."""

    def __init__(self, directory: str, every: int, eval_prompts: int, seed: int) -> None:
        from guardrl.toy.evaluate import evaluation_set
        from guardrl.toy.world import KINDS

        if every < 1 or eval_prompts < len(KINDS):
            raise ValueError(
                f"eval_every must be >= 1 and eval_prompts >= {len(KINDS)}, got {every}, {eval_prompts}"
            )
        items = evaluation_set("train", eval_prompts // len(KINDS), seed)
        self.prompts, self.seeds = [p for p, _ in items], [s for _, s in items]
        self.every, self.seed = every, seed
        self.path = os.path.join(directory, "evaluations.csv")
        os.makedirs(directory, exist_ok=True)

    def on_train_start(self, trainer, pl_module) -> None:
        iteration = pl_module.num_iterations
        _truncate_csv(self.path, EVAL_COLUMNS, lambda row: int(row["iteration"]) <= iteration)
        if iteration % self.every == 0 and iteration not in {
            int(r["iteration"]) for r in _read_csv(self.path)
        }:
            self.evaluate(pl_module, iteration)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.num_iterations % self.every == 0 or trainer.should_stop:
            self.evaluate(pl_module, pl_module.num_iterations)

    @torch.no_grad()
    def evaluate(self, module, iteration: int) -> None:
        from guardrl.toy.evaluate import generate

        with module.policy.use_weights("policy") as transformer:
            images = generate(
                module.backbone,
                self.prompts,
                self.seeds,
                module.sampling.num_inference_steps,
                module.sampling.guidance_scale,
                sde=True,
                sde_seed=self.seed,
                transformer=transformer,
                scales=module.noise_scales.cpu(),
                sde_type=module.sampling.sde_type,
            )
        rewards, _ = module.score(images.to(module.device), self.prompts)
        rewards = rewards.double()
        _append_csv(
            self.path,
            EVAL_COLUMNS,
            [
                {
                    "iteration": iteration,
                    "reward_mean": float(rewards.mean()),
                    "reward_std": float(rewards.std(unbiased=False)),
                    "images": rewards.numel(),
                }
            ],
        )


def run_one(run: Run, settings: Settings, configs: str, out: str) -> dict[str, Any]:
    """One `guardrl fit` in this process; resumes from the run's last checkpoint; writes curve.csv and
    done.json. A finished run (done.json) is not run again."""
    from guardrl.cli import main

    runs_dir = os.path.join(out, "runs")
    directory = os.path.join(runs_dir, run.name)
    done_path = os.path.join(directory, "done.json")
    if os.path.exists(done_path):
        with open(done_path) as f:
            return json.load(f)
    cli = main(fit_args(run, settings, configs, runs_dir), run=False)
    cli.trainer.callbacks.append(
        LearningEvaluator(directory, settings.eval_every, settings.eval_prompts, run.seed)
    )
    last = os.path.join(directory, "version_0", "checkpoints", "last.ckpt")
    start = time.monotonic()
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=last if os.path.exists(last) else None)
    require_finished(run.name, cli.model.num_iterations, settings.iterations)
    rows = curve_of(directory)
    _write_csv(os.path.join(directory, "curve.csv"), CURVE_COLUMNS, rows)
    summary = {
        **dataclasses.asdict(run),
        "run": run.name,
        "iterations": cli.model.num_iterations,
        "settings": dataclasses.asdict(settings),
        "wall_s": round(time.monotonic() - start, 1),
    }
    write_json_atomic(done_path, summary)
    return summary


def curve_of(directory: str) -> list[dict[str, float]]:
    """Per iteration: reward mean/std, gradient norm, clip share (mean over trained steps of the shares of
    positive-advantage samples above 1 + c and negative-advantage ones below 1 - c), skipped, seconds."""
    from guardrl.analysis.events import load_scalars

    frame = load_scalars(directory)
    wide = frame.pivot(index="step", columns="tag", values="value")
    clip_tags = [t for t in wide.columns if t.startswith("clip/frac_")]
    rows = []
    for step, row in wide.iterrows():
        clip = [row[t] for t in clip_tags if not math.isnan(row[t])]
        rows.append(
            {
                "iteration": int(step),
                "reward_mean": row.get("reward/mean"),
                "reward_std": row.get("reward/std"),
                "grad_norm": row.get("grad/norm", float("nan")),
                "clip_share": float(np.mean(clip)) if clip else float("nan"),
                "skipped": row.get("train/skipped_update", 0.0),
                "seconds": row.get("time/iteration_s", float("nan")),
            }
        )
    return rows


def _worker(payload: dict) -> None:
    torch.set_num_threads(1)
    sys.argv = sys.argv[
        :1
    ]  # LightningCLI gets its arguments from fit_args, not from this process's command line
    settings = Settings(**payload["settings"])
    for spec in payload["runs"]:
        run = Run(**spec)
        print(f"[learning] {run.name}", flush=True)
        run_one(run, settings, payload["configs"], payload["out"])


def run_all(
    out: str, runs: Sequence[Run], settings: Settings, configs: str = "configs/toy", jobs: int = 1
) -> None:
    """Every run, `jobs` worker processes at once (round-robin shards, one thread each, logs in OUT/logs/)."""
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    shards = [list(runs[k::jobs]) for k in range(jobs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = []
    for k, shard in enumerate(s for s in shards if s):
        payload = json.dumps(
            {
                "runs": [dataclasses.asdict(r) for r in shard],
                "settings": dataclasses.asdict(settings),
                "configs": configs,
                "out": out,
            }
        )
        log = open(os.path.join(out, "logs", f"worker-{k}.log"), "a")
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, "-m", "guardrl.toy.learning", "_worker", payload],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                ),
                log,
                k,
            )
        )
    failed = []
    for proc, log, k in procs:
        if proc.wait():
            failed.append(f"worker {k} (exit {proc.returncode}; see {log.name})")
        log.close()
    if failed:
        raise RuntimeError("learning benchmark: " + ", ".join(failed) + "; run the command again to resume")


# ---------------------------------------------------------------------------------------------- report
def _write_csv(path: str, columns: Sequence[str], rows: list[dict]) -> None:
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)


def collect(out: str) -> list[dict[str, Any]]:
    """Every finished run: its Run fields, settings and curve (list of CURVE_COLUMNS rows)."""
    found = []
    for done in sorted(glob.glob(os.path.join(out, "runs", "*", "done.json"))):
        with open(done) as f:
            meta = json.load(f)
        with open(os.path.join(os.path.dirname(done), "curve.csv"), newline="") as f:
            meta["curve"] = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
        evaluations = _read_csv(os.path.join(os.path.dirname(done), "evaluations.csv"))
        meta["evaluations"] = sorted(
            ({k: float(v) for k, v in row.items()} for row in evaluations), key=lambda r: r["iteration"]
        )
        found.append(meta)
    return found


def eval_gain(evaluations: list[dict[str, float]]) -> float:
    """Evaluation reward at the last evaluation minus that at iteration 0."""
    if len(evaluations) < 2 or evaluations[0]["iteration"] != 0:
        raise ValueError(f"a gain needs the evaluation at iteration 0 and a later one, got {evaluations}")
    return float(evaluations[-1]["reward_mean"] - evaluations[0]["reward_mean"])


def gain(curve: list[dict[str, float]], window: int) -> float:
    """Training reward: mean of the last `window` iterations minus that of the first `window`."""
    values = [row["reward_mean"] for row in sorted(curve, key=lambda r: r["iteration"])]
    if len(values) < 2 * window:
        raise ValueError(f"a curve of {len(values)} iterations has no two disjoint windows of {window}")
    return float(np.mean(values[-window:]) - np.mean(values[:window]))


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def gains_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (reward, lr, variant): gains over seeds and the comparison with the null control."""
    rows = []
    for reward, lr in sorted(
        {(r["reward"], r["lr"]) for r in runs}, key=lambda k: (list(REWARDS).index(k[0]), k[1])
    ):
        group = [r for r in runs if r["reward"] == reward and r["lr"] == lr]
        by_variant = {}
        for r in group:
            window = r["settings"]["window"]
            by_variant.setdefault(r["variant"], []).append(
                (
                    r["seed"],
                    eval_gain(r["evaluations"]),
                    r["curve"],
                    gain(r["curve"], window),
                    r["evaluations"],
                )
            )
        null = [entry[1] for entry in by_variant.get(NULL, [])]
        null_by_seed = {entry[0]: entry[1] for entry in by_variant.get(NULL, [])}
        null_mean, null_std = (float(np.mean(null)), _std(null)) if null else (float("nan"), float("nan"))
        for variant in [v for v in VARIANTS if v in by_variant]:
            entries = sorted(by_variant[variant], key=lambda e: e[0])
            gains = [e[1] for e in entries]
            curves = [e[2] for e in entries]
            train_gains = [e[3] for e in entries]
            mean = float(np.mean(gains))
            paired = [
                g - null_by_seed[e[0]] for g, e in zip(gains, entries, strict=True) if e[0] in null_by_seed
            ]
            row = {
                "reward": reward,
                "lr": lr,
                "variant": variant,
                "seeds": len(gains),
                "gain_mean": mean,
                "gain_std": _std(gains),
                "gains": gains,
                "start": float(np.mean([e[4][0]["reward_mean"] for e in entries])),
                "eval_images": int(entries[0][4][0]["images"]),
                "paired_mean": float(np.mean(paired)) if paired else float("nan"),
                "paired_std": _std(paired) if paired else float("nan"),
                "train_gain_mean": float(np.mean(train_gains)),
                "train_gain_std": _std(train_gains),
                "clip_share": float(np.nanmean([c["clip_share"] for cur in curves for c in cur])),
                "grad_norm": float(np.nanmean([c["grad_norm"] for cur in curves for c in cur])),
                "skipped": int(sum(c["skipped"] for cur in curves for c in cur)),
                "seconds_per_iteration": float(np.nanmedian([c["seconds"] for cur in curves for c in cur])),
            }
            if variant != NULL and null:
                row["times_null"] = mean / abs(null_mean) if null_mean else float("inf")
                row["null_sds"] = (
                    (mean - null_mean) / null_std if null_std and null_std == null_std else float("nan")
                )
                row["above_every_null_seed"] = min(gains) > max(null)
                row["passes"] = bool(mean >= 3 * abs(null_mean) and row["above_every_null_seed"])
            rows.append(row)
    return rows


def _fmt(x: float) -> str:
    if x != x:
        return "n/a"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def table_markdown(rows: list[dict[str, Any]]) -> str:
    lines = []
    for reward, lr in dict.fromkeys((r["reward"], r["lr"]) for r in rows):
        mine = [r for r in rows if r["reward"] == reward and r["lr"] == lr]
        lines += [
            f"### {reward}, lr {lr:g} (evaluation: {mine[0]['eval_images']} images)",
            "",
            "| variant | start | gain (mean ± std, seeds) | per seed | x \\|null gain\\| | null SDs | "
            "> every null seed | passes | gain − null, same seed | training-reward gain | clip share "
            "| grad norm |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mine:
            is_null = r["variant"] == NULL
            lines.append(
                "| "
                + " | ".join(
                    [
                        f"**{r['variant']}**" if is_null else r["variant"],
                        _fmt(r["start"]),
                        f"{_fmt(r['gain_mean'])} ± {_fmt(r['gain_std'])} ({r['seeds']})",
                        ", ".join(_fmt(g) for g in r["gains"]),
                        "–" if is_null else _fmt(r.get("times_null", float("nan"))),
                        "–" if is_null else _fmt(r.get("null_sds", float("nan"))),
                        "–" if is_null else ("yes" if r.get("above_every_null_seed") else "no"),
                        "–" if is_null else ("**yes**" if r.get("passes") else "**no**"),
                        "–" if is_null else f"{_fmt(r['paired_mean'])} ± {_fmt(r['paired_std'])}",
                        f"{_fmt(r['train_gain_mean'])} ± {_fmt(r['train_gain_std'])}",
                        f"{r['clip_share']:.3f}",
                        f"{r['grad_norm']:.3g}",
                    ]
                )
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def smooth(values: Sequence[float], width: int) -> np.ndarray:
    """Trailing moving average over `width` iterations (shorter at the start)."""
    values = np.asarray(values, dtype=float)
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), width)
    return (cumulative[1:] - cumulative[np.arange(1, len(values) + 1) - counts]) / counts


def plot_curves(runs: list[dict[str, Any]], path: str) -> str:
    """Per (reward, lr): top, the evaluation reward against iteration; bottom, the training reward (a moving
    average over `window` iterations). Mean and +-1 std across seeds per variant; the null control dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(
        dict.fromkeys(
            (r["reward"], r["lr"])
            for r in sorted(runs, key=lambda r: (list(REWARDS).index(r["reward"]), r["lr"]))
        )
    )
    fig, axes = plt.subplots(2, len(panels), figsize=(5.2 * len(panels), 8.0), squeeze=False)
    colors = {v: plt.get_cmap("tab10")(i) for i, v in enumerate(VARIANTS)}
    window = max(1, runs[0]["settings"]["window"])
    for column, (reward, lr) in enumerate(panels):
        for variant in VARIANTS:
            mine = [r for r in runs if (r["reward"], r["lr"], r["variant"]) == (reward, lr, variant)]
            if not mine:
                continue
            style = "--" if variant == NULL else "-"
            label = f"{variant} ({len(mine)} seeds)"
            for row, series in (
                (0, [[e["reward_mean"] for e in r["evaluations"]] for r in mine]),
                (1, [smooth([c["reward_mean"] for c in r["curve"]], window) for r in mine]),
            ):
                length = min(len(x) for x in series)
                values = np.stack([np.asarray(x[:length], dtype=float) for x in series])
                its = (
                    [e["iteration"] for e in mine[0]["evaluations"]][:length]
                    if row == 0
                    else np.arange(length)
                )
                mean = values.mean(0)
                std = values.std(0, ddof=1) if len(values) > 1 else np.zeros(length)
                axis = axes[row][column]
                axis.plot(
                    its, mean, style, marker="o" if row == 0 else None, color=colors[variant], label=label
                )
                axis.fill_between(its, mean - std, mean + std, color=colors[variant], alpha=0.15)
        images = int(runs[0]["settings"]["eval_prompts"])
        axes[0][column].set_title(f"{reward}, lr {lr:g}: evaluation, {images} fixed prompts")
        axes[1][column].set_title(f"{reward}: training batches, {window}-iteration mean")
        for row in (0, 1):
            axes[row][column].set_xlabel("GRPO iteration")
            axes[row][column].set_ylabel("reward mean")
            axes[row][column].grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("reward mean ± std across seeds")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=80)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path


def write_report(out: str) -> dict[str, Any]:
    runs = collect(out)
    if not runs:
        raise FileNotFoundError(f"--out={out!r} holds no finished learning run (runs/*/done.json)")
    rows = gains_table(runs)
    columns = [
        "reward",
        "lr",
        "variant",
        "seeds",
        "start",
        "gain_mean",
        "gain_std",
        "gains",
        "times_null",
        "null_sds",
        "above_every_null_seed",
        "passes",
        "paired_mean",
        "paired_std",
        "train_gain_mean",
        "train_gain_std",
        "eval_images",
        "clip_share",
        "grad_norm",
        "skipped",
        "seconds_per_iteration",
    ]
    _write_csv(os.path.join(out, "gains.csv"), columns, rows)
    table = table_markdown(rows)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    plot = plot_curves(runs, os.path.join(out, "curves.png"))
    report = {
        "table": os.path.join(out, "table.md"),
        "gains": os.path.join(out, "gains.csv"),
        "plot": plot,
        "runs": len(runs),
        "settings": runs[0]["settings"],
        "failing": [f"{r['reward']}/{r['variant']}" for r in rows if r.get("passes") is False],
    }
    write_json_atomic(os.path.join(out, "summary.json"), report)
    return report


# ---------------------------------------------------------------------------------------------- command
def _choices(text: str, allowed: Sequence[str], option: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise argparse.ArgumentTypeError(
            f"{option}={text!r}: {bad or 'empty'} not allowed; choose from {', '.join(allowed)}"
        )
    return values


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:
        _worker(json.loads(argv[1]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output directory (a repeated command continues there)")
    parser.add_argument(
        "--rewards", default=",".join(DEFAULT_REWARDS), type=lambda t: _choices(t, REWARDS, "--rewards")
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), type=lambda t: _choices(t, VARIANTS, "--variants")
    )
    parser.add_argument("--seeds", default="0,1,2", type=_number_list)
    parser.add_argument(
        "--lr",
        default="3e-3",
        type=lambda t: _number_list(t, float),
        help="learning rate(s), comma-separated",
    )
    parser.add_argument(
        "--iterations", type=int, default=None, help=f"GRPO iterations per run ({Settings.iterations})"
    )
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help=f"iterations averaged at start and end of the training-reward gain ({Settings.window})",
    )
    parser.add_argument(
        "--eval-every", type=int, default=None, help=f"evaluation cadence ({Settings.eval_every})"
    )
    parser.add_argument(
        "--eval-prompts",
        type=int,
        default=None,
        help=f"evaluation images, one per fixed training prompt ({Settings.eval_prompts})",
    )
    parser.add_argument(
        "--prompts-per-batch",
        type=int,
        default=None,
        help=f"prompts per iteration ({Settings.prompts_per_batch})",
    )
    parser.add_argument(
        "--group-size", type=int, default=None, help=f"samples per prompt ({Settings.group_size})"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny budget, for the tests")
    parser.add_argument("--configs", default="configs/toy")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table and plot from OUT")
    args = parser.parse_args(argv)
    if not args.report_only:
        settings = dataclasses.replace(QUICK if args.quick else Settings())
        for field in (
            "iterations",
            "window",
            "eval_every",
            "eval_prompts",
            "prompts_per_batch",
            "group_size",
        ):
            value = getattr(args, field)
            if value is not None:
                if value < 1:
                    parser.error(f"--{field.replace('_', '-')} must be >= 1, got {value}")
                setattr(settings, field, value)
        if args.prompts_per_batch is not None or args.group_size is not None:
            # Two optimizer steps per iteration whatever the batch (the update count stays the same).
            settings.minibatch_size = max(1, settings.prompts_per_batch * settings.group_size // 2)
        if settings.iterations < 2 * settings.window:
            parser.error(
                f"--iterations={settings.iterations} must be at least twice --window={settings.window}"
            )
        if args.jobs < 1:
            parser.error(f"--jobs must be >= 1, got {args.jobs}")
        if any(lr <= 0 for lr in args.lr):
            parser.error(f"--lr must be positive, got {args.lr}")
        # Seed-major order: an interrupted benchmark has whole seeds (every reward and variant) done first.
        runs = [
            Run(reward, variant, seed, lr)
            for seed in args.seeds
            for lr in args.lr
            for reward in args.rewards
            for variant in args.variants
        ]
        start = time.monotonic()
        run_all(args.out, runs, settings, args.configs, args.jobs)
        print(f"[learning] {len(runs)} runs in {time.monotonic() - start:.0f} s", flush=True)
    report = write_report(args.out)
    print(open(report["table"]).read())
    print(f"plot: {report['plot']}\ngains: {report['gains']}")
    if report["failing"]:
        print(f"below the target (3 x |null gain| and above every null seed): {', '.join(report['failing'])}")


if __name__ == "__main__":
    main()
