"""The toy benchmark's report from a finished OUT/: every run's rows with Average(gold) (results.csv,
ratios.csv), the paper-shaped table (table.md), the answer (answer.md, guardrl.toy.benchmark_answer) and the
plots (proxy_gold.png, log_ratio_by_step.png, clip_fractions.png)."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from guardrl.toy.benchmark_csv import _read_csv, _write_csv
from guardrl.toy.benchmark_recorder import EVAL_COLUMNS, GOLD_NAMES, MEASURED, RATIO_COLUMNS
from guardrl.toy.benchmark_runs import CLIP_MODES, VARIANTS, Budget
from guardrl.toy.gold import GOLD_DIRECTIONS, average_gold


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
