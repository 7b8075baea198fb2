"""Ratio diagnosis of GRPO-Guard (arXiv 2510.22319, section 4) on the tiny SD3 model, from our own logs.

What it measures. For each ratio variant and each (learning rate, inner epochs) cell it trains the tiny
config with the real CLI (`python -m guardrl.cli fit`), then reads the run's TensorBoard scalars and
histograms and reports, per trained sampler step k:

    s          the step's noise std s_k = sigma_k sqrt(|dt_k|) (computed with guardrl's own sampling code)
    raw        mean over iterations of ratio/raw_log_ratio_mean_t{k}  (plain log r, whatever the variant)
    raw<0      share of iterations whose raw mean is < 0
    raw z      mean over iterations of mean/std of raw log r (from the ratio/raw_log_ratio_t{k} histogram):
               the bias-to-noise ratio, about -||dmu|| / (2 s) when the policy mean moved by dmu
    used       mean over iterations of ratio/log_ratio_mean_t{k}  (the log-ratio that is clipped)
    used z     mean over iterations of mean/std of that log-ratio (ratio/log_ratio_t{k} histogram)
    ratio-1    mean over iterations of ratio/mean_t{k} - 1
    r<1        share of iterations with ratio/mean_t{k} < 1
    pos_up     mean over iterations of clip/frac_pos_upper_t{k}
    neg_lo     mean over iterations of clip/frac_neg_lower_t{k}

plus a per-cell summary line and a final table across cells. Every statistic is a mean (or a share) over
the GRPO iterations of the run; within one iteration the logged values pool all its minibatch updates
(including the first one, taken before any optimizer step, where log r is exactly 0).

The paper's claim it tests: with `flow_grpo` and per-element-mean log-probs, E[log r] = -||dmu||^2/(2 s^2 D)
< 0, so the ratio sits below 1, more so at small s, and as the policy moves further per rollout the
positive-advantage upper clip stops firing while the negative-advantage lower clip keeps firing; with
`grpo_guard` the clipped log-ratio -(dmu . eps)/D is centred at 0.

Run (18 runs, 7-8.5 minutes on 2 CPU cores with the defaults, two runs at a time):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/ratio_diagnosis.py
    python scripts/ratio_diagnosis.py --no-run          # re-read the logs of a previous sweep
    python scripts/ratio_diagnosis.py --variants flow_grpo --lrs 1e-2 --inner-epochs 4 --iterations 12
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs" / "tiny"


@dataclass(frozen=True)
class Cell:
    variant: str
    lr: float
    inner_epochs: int

    @property
    def name(self) -> str:
        return f"{self.variant}_lr{self.lr:g}_ep{self.inner_epochs}"


# ----------------------------------------------------------------------------------------- arguments
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["flow_grpo", "grpo_guard"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[3e-3, 1e-2, 3e-2])
    parser.add_argument("--inner-epochs", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--iterations", type=int, default=6, help="GRPO iterations per run")
    parser.add_argument("--out-dir", type=Path, default=REPO / "runs" / "ratio_diagnosis", help="run logs")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one CPU thread each)")
    parser.add_argument("--no-run", action="store_true", help="only aggregate existing logs in --out-dir")
    return parser.parse_args()


def base_config(variant: str) -> Path:
    """configs/tiny/<variant>.yaml, or the one whose clip-range unit matches the variant's log-ratio."""
    own = CONFIG_DIR / f"{variant}.yaml"
    if own.exists():
        return own
    from guardrl.algorithm.ratios import VARIANCE_NORMALIZED_VARIANTS

    return CONFIG_DIR / ("grpo_guard.yaml" if variant in VARIANCE_NORMALIZED_VARIANTS else "flow_grpo.yaml")


# ----------------------------------------------------------------------------------------- running
def repo_relative(path: Path) -> Path:
    """The path relative to the repository (where the runs start) when it lies inside it, else absolute."""
    path = path.resolve()
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def cell_command(cell: Cell, iterations: int, out_dir: Path) -> list[str]:
    overrides = {
        "--config": str(base_config(cell.variant).relative_to(REPO)),
        "--model.grpo.ratio_variant": cell.variant,
        "--model.optimizer.init_args.lr": f"{cell.lr:g}",
        "--model.grpo.num_inner_epochs": str(cell.inner_epochs),
        "--model.max_iterations": str(iterations),
        "--trainer.logger.init_args.save_dir": str(repo_relative(out_dir)),
        "--trainer.logger.init_args.name": cell.name,
        "--trainer.logger.init_args.version": "0",
        "--trainer.enable_checkpointing": "false",
    }
    return [sys.executable, "-m", "guardrl.cli", "fit", *itertools.chain.from_iterable(overrides.items())]


def run_cell(cell: Cell, command: list[str], out_dir: Path) -> float:
    """Train one cell from scratch (its old logs removed); returns its wall time in seconds."""
    run_dir = out_dir / cell.name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    start = time.time()
    with open(run_dir / "cli.log", "w") as log:
        result = subprocess.run(command, check=False, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = (run_dir / "cli.log").read_text()[-3000:]
        raise RuntimeError(f"{cell.name} failed with exit code {result.returncode}:\n{tail}")
    return time.time() - start


# ----------------------------------------------------------------------------------------- step std
def step_stds(config_path: Path) -> tuple[np.ndarray, int]:
    """s_k for every sampler step and the latent size D, with the config's backbone and sampling options."""
    import torch

    from guardrl.policy import TinySD3Backbone
    from guardrl.sampling import noise_scales, step_mean_and_std

    config = yaml.safe_load(config_path.read_text())["model"]
    sampling = config["sampling"]
    backbone = TinySD3Backbone(**config["backbone"].get("init_args", {}))
    backbone.load()
    sigmas = backbone.sigmas(sampling["num_inference_steps"])
    steps = range(len(sigmas) - 1)
    scales = noise_scales(sigmas, sampling["noise_level"], sampling["sde_type"], steps)
    zeros = torch.zeros(1, 1, dtype=torch.float64)
    stds = [float(step_mean_and_std(zeros, zeros, sigmas[k], sigmas[k + 1], scales[k])[1][0]) for k in steps]
    return np.array(stds), backbone.latent_numel()


# ----------------------------------------------------------------------------------------- reading logs
def load_run(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def scalar(acc, tag: str) -> np.ndarray:
    """One value per logged step (= GRPO iteration), ordered by step."""
    events = sorted(acc.Scalars(tag), key=lambda e: e.step)
    return np.array([e.value for e in events], dtype=np.float64)


def histogram_z(acc, tag: str) -> np.ndarray:
    """mean / std of the logged values, per iteration, from a histogram's num, sum and sum of squares."""
    values = []
    for event in sorted(acc.Histograms(tag), key=lambda e: e.step):
        h = event.histogram_value
        mean = h.sum / h.num
        var = max(h.sum_squares / h.num - mean**2, 0.0)
        values.append(mean / math.sqrt(var) if var > 0 else float("nan"))
    return np.array(values)


def trained_steps(acc) -> list[int]:
    prefix = "ratio/mean_t"
    return sorted(int(tag[len(prefix) :]) for tag in acc.Tags()["scalars"] if tag.startswith(prefix))


def step_rows(acc, stds: np.ndarray) -> list[dict]:
    rows = []
    for k in trained_steps(acc):
        raw = scalar(acc, f"ratio/raw_log_ratio_mean_t{k}")
        ratio = scalar(acc, f"ratio/mean_t{k}")
        rows.append(
            {
                "k": k,
                "s": stds[k],
                "raw": raw.mean(),
                "raw_neg": (raw < 0).mean(),
                "raw_z": np.nanmean(histogram_z(acc, f"ratio/raw_log_ratio_t{k}")),
                "used": scalar(acc, f"ratio/log_ratio_mean_t{k}").mean(),
                "used_z": np.nanmean(histogram_z(acc, f"ratio/log_ratio_t{k}")),
                "ratio_m1": (ratio - 1.0).mean(),
                "ratio_lt1": (ratio < 1.0).mean(),
                "pos_up": scalar(acc, f"clip/frac_pos_upper_t{k}").mean(),
                "neg_lo": scalar(acc, f"clip/frac_neg_lower_t{k}").mean(),
            }
        )
    return rows


def cell_summary(rows: list[dict], acc) -> dict:
    """Means over all (iteration, step) pairs (every step has the same number of iterations)."""
    reward = scalar(acc, "reward/mean")
    return {
        "ratio_lt1": np.mean([r["ratio_lt1"] for r in rows]),
        "raw_neg": np.mean([r["raw_neg"] for r in rows]),
        "pos_up": np.mean([r["pos_up"] for r in rows]),
        "neg_lo": np.mean([r["neg_lo"] for r in rows]),
        "raw_z_last": rows[-1]["raw_z"],
        "pos_up_last": rows[-1]["pos_up"],
        "neg_lo_last": rows[-1]["neg_lo"],
        "pos_neg_last": rows[-1]["pos_up"] / rows[-1]["neg_lo"] if rows[-1]["neg_lo"] > 0 else float("nan"),
        "kl": scalar(acc, "train/kl").mean(),
        "reward_first": reward[0],
        "reward_last": reward[-1],
    }


# ----------------------------------------------------------------------------------------- printing
STEP_COLUMNS = [  # (header, key, format)
    ("k", "k", "{:>2d}"),
    ("s", "s", "{:.4f}"),
    ("raw", "raw", "{:+.2e}"),
    ("raw<0", "raw_neg", "{:.2f}"),
    ("raw z", "raw_z", "{:+.3f}"),
    ("used", "used", "{:+.2e}"),
    ("used z", "used_z", "{:+.3f}"),
    ("ratio-1", "ratio_m1", "{:+.2e}"),
    ("r<1", "ratio_lt1", "{:.2f}"),
    ("pos_up", "pos_up", "{:.3f}"),
    ("neg_lo", "neg_lo", "{:.3f}"),
]
SUMMARY_COLUMNS = [
    ("variant", "variant", "{}"),
    ("lr", "lr", "{:g}"),
    ("ep", "ep", "{}"),
    ("r<1", "ratio_lt1", "{:.2f}"),
    ("raw<0", "raw_neg", "{:.2f}"),
    ("pos_up", "pos_up", "{:.3f}"),
    ("neg_lo", "neg_lo", "{:.3f}"),
    ("raw z@last", "raw_z_last", "{:+.3f}"),
    ("pos_up@last", "pos_up_last", "{:.3f}"),
    ("neg_lo@last", "neg_lo_last", "{:.3f}"),
    ("pos/neg@last", "pos_neg_last", "{:.2f}"),
    ("kl", "kl", "{:.2e}"),
    ("reward 1st", "reward_first", "{:.3f}"),
    ("reward last", "reward_last", "{:.3f}"),
]


def print_table(rows: list[dict], columns) -> None:
    cells = [[fmt.format(row[key]) for _, key, fmt in columns] for row in rows]
    widths = [max(len(header), *(len(c[i]) for c in cells)) for i, (header, _, _) in enumerate(columns)]
    print("  ".join(header.rjust(w) for (header, _, _), w in zip(columns, widths)))
    for c in cells:
        print("  ".join(value.rjust(w) for value, w in zip(c, widths)))


def command_line(command: list[str]) -> str:
    shown = ["python" if part == sys.executable else part for part in command]
    return "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 " + shlex.join(shown)


def print_header(stds: np.ndarray, num_elements: int, variants: list[str]) -> None:
    from guardrl.algorithm import effective_clip_range

    print(f"latent elements D = {num_elements}")
    print("step noise std s_k: " + "  ".join(f"k{k}={s:.4f}" for k, s in enumerate(stds)))
    for variant in variants:
        model = yaml.safe_load(base_config(variant).read_text())["model"]
        grpo, reduction = model["grpo"], model["sampling"]["log_prob_reduction"]
        c = effective_clip_range(grpo["clip_range"], grpo["clip_range_unit"], reduction, num_elements)
        print(
            f"{variant}: clip_range {grpo['clip_range']:g} {grpo['clip_range_unit']} -> c = {c:.3g} "
            f"in the clipped log-ratio's units ({reduction} reduction)"
        )
    print()


# ----------------------------------------------------------------------------------------- main
def main() -> None:
    args = parse_args()
    cells = [Cell(v, lr, ep) for v, lr, ep in itertools.product(args.variants, args.lrs, args.inner_epochs)]
    commands = {cell: cell_command(cell, args.iterations, args.out_dir) for cell in cells}
    for cell in cells:
        print(f"[{cell.name}] {command_line(commands[cell])}")
    print()

    if not args.no_run:
        start = time.time()
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            durations = dict(zip(cells, pool.map(lambda c: run_cell(c, commands[c], args.out_dir), cells)))
        for cell in cells:
            print(f"[{cell.name}] trained in {durations[cell]:.0f} s")
        print(f"sweep wall time: {time.time() - start:.0f} s ({len(cells)} runs, {args.jobs} in parallel)\n")

    stds, num_elements = step_stds(base_config(args.variants[0]))
    print_header(stds, num_elements, args.variants)
    summaries = []
    for cell in cells:
        acc = load_run(args.out_dir / cell.name / "version_0")
        rows = step_rows(acc, stds)
        print(f"== {cell.name}  (means over {len(scalar(acc, 'reward/mean'))} iterations)")
        print_table(rows, STEP_COLUMNS)
        summary = cell_summary(rows, acc)
        print(
            f"   share of (iteration, step) pairs with ratio/mean < 1: {summary['ratio_lt1']:.2f}; "
            f"mean frac_pos_upper {summary['pos_up']:.3f}; mean frac_neg_lower {summary['neg_lo']:.3f}\n"
        )
        summaries.append(dict(summary, variant=cell.variant, lr=cell.lr, ep=cell.inner_epochs))
    print("== summary (means over iterations and trained steps; @last = last trained step only)")
    print_table(summaries, SUMMARY_COLUMNS)


if __name__ == "__main__":
    main()
