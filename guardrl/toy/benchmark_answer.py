"""The toy benchmark's answer: per variant, the change of the proxy and of every gold metric from the shipped
model (iteration 0) to the end of the run, with errors, and whether it differs from the null control's.

    change         final - iteration 0 of one run (the same evaluation set, images from the same seeds)
    ± se           over seeds: std / sqrt(n); `run se` is the typical within-run standard error of a change
                   (the evaluation set's sampling error: binomial for rates, per-image for the proxy and
                   the off-palette fraction, bootstrap for the realism distance; iteration 0 and final
                   combined as if independent, which overstates it: both use the same prompts and seeds)
    vs null        the paired difference change(variant) - change(null_control) of the same seed (same
                   prompts, same iteration-0 model, same evaluation sets), its mean, 95% t-interval over
                   seeds and the two-sided p-value of the paired t-test (n = number of seeds; df = n - 1)

Over-optimization shows as a proxy gain with a gold change that is worse than the null control's (which moves
by drift alone); a variant curbs it when its gold change is closer to the null control's at a similar proxy
gain. `python -m guardrl.toy.benchmark --report-only --out OUT` writes OUT/answer.md with this.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

NULL = "null_control"
# Which way is better, for the arrows in the table (proxy: up is what the reward wants).
BETTER = {
    "proxy": "higher",
    "learned_proxy": "higher",
    "pass_rate": "higher",
    "pass_rate_quantized": "higher",
    "off_palette_fraction": "lower",
    "realism_distance": "lower",
    "check_colors": "higher",
    "check_counts": "higher",
    "check_shapes": "higher",
    "check_position": "higher",
}


def run_changes(evaluations: Sequence[dict], metric: str, clip_mode: str, split: str, sampler: str) -> dict:
    """{(variant, seed): (change, within-run se)} from each run's iteration 0 to its last evaluation."""
    out = {}
    runs = {
        (e["variant"], e["seed"])
        for e in evaluations
        if e["clip_mode"] == clip_mode and e["split"] == split and e["sampler"] == sampler
    }
    for variant, seed in runs:
        rows = sorted(
            (
                e
                for e in evaluations
                if (e["variant"], e["seed"], e["clip_mode"], e["split"], e["sampler"])
                == (variant, seed, clip_mode, split, sampler)
            ),
            key=lambda e: e["iteration"],
        )
        first, last = rows[0], rows[-1]
        if first["iteration"] != 0 or last["iteration"] == 0 or metric not in first:
            continue
        change = float(last[metric]) - float(first[metric])
        first_se, last_se = (
            float(first.get(f"{metric}_se", math.nan)),
            float(last.get(f"{metric}_se", math.nan)),
        )
        se = math.hypot(first_se, last_se)
        out[(variant, seed)] = (change, se)
    return out


def paired_test(differences: Sequence[float]) -> tuple[float, float, float, float]:
    """(mean, low, high, p) of the paired differences: 95% t-interval and two-sided one-sample t-test p-value;
    NaN interval and p with fewer than two finite differences."""
    from scipy import stats

    d = np.asarray([x for x in differences if math.isfinite(x)], dtype=np.float64)
    if len(d) == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = float(d.mean())
    if len(d) < 2:
        return mean, math.nan, math.nan, math.nan
    se = float(d.std(ddof=1) / math.sqrt(len(d)))
    t = float(stats.t.ppf(0.975, len(d) - 1))
    p = float(stats.ttest_1samp(d, 0.0).pvalue) if se > 0 else (0.0 if mean != 0 else 1.0)
    return mean, mean - t * se, mean + t * se, p


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{x:+.3f}" if abs(x) >= 0.01 or x == 0 else f"{x:+.1e}"


def metric_table(
    evaluations: Sequence[dict], metric: str, clip_mode: str, split: str, sampler: str
) -> list[str]:
    """One metric's table; rows in the order the variants first appear in `evaluations`."""
    changes = run_changes(evaluations, metric, clip_mode, split, sampler)
    if not changes:
        return []
    order = list(dict.fromkeys(e["variant"] for e in evaluations))
    variants = [v for v in order if any(k[0] == v for k in changes)]
    arrow = "↑" if BETTER.get(metric) == "higher" else "↓"
    lines = [
        f"### {metric} ({arrow} better): {split} prompts, {sampler.upper()}",
        "",
        "| variant | change ± se (seeds) | run se | seeds | vs null: mean [95% CI] | p |",
        "|---|---|---|---|---|---|",
    ]
    for variant in variants:
        mine = {seed: c for (v, seed), c in changes.items() if v == variant}
        values = [c for c, _ in mine.values()]
        se_seeds = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
        run_se = float(np.nanmean([s for _, s in mine.values()]))
        cells = [
            variant,
            f"{_fmt(float(np.mean(values)))} ± {_fmt(se_seeds).lstrip('+')}",
            _fmt(run_se).lstrip("+"),
            str(len(values)),
        ]
        if variant == NULL:
            cells += ["–", "–"]
        else:
            null = {seed: c for (v, seed), (c, _) in changes.items() if v == NULL}
            paired = [mine[s][0] - null[s] for s in sorted(mine) if s in null]
            mean, low, high, p = paired_test(paired)
            cells += [
                f"{_fmt(mean)} [{_fmt(low)}, {_fmt(high)}]",
                "n/a" if not math.isfinite(p) else f"{p:.3f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def answer_markdown(evaluations: Sequence[dict], metrics: Sequence[str]) -> str:
    lines = ["# Toy benchmark: the answer", "", (__doc__ or "").split("\n\n")[1], ""]
    for clip_mode in ("matched", "published"):
        if not any(e["clip_mode"] == clip_mode for e in evaluations):
            continue
        lines += [f"## clip {clip_mode}", ""]
        lines += metric_table(evaluations, "proxy", clip_mode, "train", "sde")
        for sampler in ("sde", "ode"):
            for metric in metrics:
                lines += metric_table(evaluations, metric, clip_mode, "heldout", sampler)
    return "\n".join(lines)
