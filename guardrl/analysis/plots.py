"""Figures of a run's logs: the per-step ratio distribution over training (the GRPO-Guard paper's
diagnostic), clip fractions by advantage sign, proxy against gold, and run comparisons.

Figures are built with matplotlib's object API and rendered with the Agg canvas: no pyplot, so nothing
global is touched, nothing opens a window and nothing is written to disk (call `fig.savefig(path)` for
that). In Jupyter a returned figure shows as a PNG (`AnalysisFigure._repr_png_`), whatever the backend.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from guardrl.analysis.events import (
    GOLD_PREFIX,
    HISTOGRAM_KINDS,
    PathLike,
    clip_fractions,
    gold_metrics,
    load_ratio_histograms,
    load_scalars,
    resolve_run_dir,
)

KIND_LABELS = {"log_ratio": "clipped log-ratio", "raw_log_ratio": "plain log r"}
SIGN_LABELS = {"pos_upper": "A > 0, r > 1 + c", "neg_lower": "A < 0, r < 1 - c"}
COMPARE_METRICS = ("log_ratio", "raw_log_ratio", "clip", "reward")


class AnalysisFigure(Figure):
    """A matplotlib Figure that Jupyter displays as a PNG without pyplot or an inline backend."""

    def _repr_png_(self) -> bytes:
        return to_png(self)


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes, rendered by the Agg canvas."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _panels(count: int, title: str, ncols: int | None = None, panel_size=(3.4, 2.5)):
    """A figure with `count` panels on a grid; returns (figure, list of axes)."""
    ncols = ncols or min(count, 3)
    nrows = max(1, math.ceil(count / ncols))
    fig = AnalysisFigure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)  # attach the Agg canvas: headless rendering whatever matplotlib's default backend is
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(count)]
    fig.suptitle(title)
    return fig, axes


def _iteration_axis(ax) -> None:
    ax.set_xlabel("GRPO iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole numbers


def _check_kind(kind: str) -> None:
    if kind not in HISTOGRAM_KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {HISTOGRAM_KINDS}")


def _select_steps(available: Sequence[int], steps: Iterable[int] | None, what: str) -> list[int]:
    if not available:
        raise ValueError(f"the run has no {what}: was it trained with --ratio_stats.log_histograms false?")
    if steps is None:
        return sorted(available)
    chosen = sorted(set(steps))
    missing = [k for k in chosen if k not in available]
    if missing:
        raise ValueError(f"steps={missing} have no {what}; the run has k in {sorted(available)}")
    return chosen


def _histograms_of(run_dir: PathLike, kind: str):
    hist = load_ratio_histograms(run_dir)
    return hist[hist["kind"] == kind]


def _run_label(run_dir: PathLike) -> str:
    path = resolve_run_dir(run_dir)
    return f"{path.parent.name}/{path.name}"


# ------------------------------------------------------------------------------------------ one run
def plot_ratio_distribution(
    run_dir: PathLike, kind: str = "log_ratio", steps: Iterable[int] | None = None, ncols: int | None = None
) -> AnalysisFigure:
    """The log-ratio distribution per denoising step over training: one panel per trained step k, x = GRPO
    iteration, the mean (line), mean ± std (dark band) and min..max (light band) of the iteration's
    samples, from the `ratio/{kind}_t{k}` histograms. kind: 'log_ratio' (the one clipped) or
    'raw_log_ratio' (plain log r). A band sitting below 0 at late k is the paper's FlowGRPO bias."""
    _check_kind(kind)
    hist = _histograms_of(run_dir, kind)
    chosen = _select_steps(sorted(hist["k"].unique()), steps, f"ratio/{kind}_t{{k}} histograms")
    fig, axes = _panels(len(chosen), f"{KIND_LABELS[kind]} per denoising step ({_run_label(run_dir)})", ncols)
    for ax, k in zip(axes, chosen):
        rows = hist[hist["k"] == k].sort_values("step")
        x, mean, std = rows["step"].to_numpy(), rows["mean"].to_numpy(), rows["std"].to_numpy()
        ax.fill_between(x, rows["min"], rows["max"], color="C0", alpha=0.12, linewidth=0, label="min..max")
        ax.fill_between(x, mean - std, mean + std, color="C0", alpha=0.3, linewidth=0, label="mean ± std")
        ax.plot(x, mean, color="C0", marker="o", markersize=3, label="mean")
        ax.axhline(0.0, color="black", linewidth=0.6, linestyle=":")
        ax.set_title(f"k = {k}")
        _iteration_axis(ax)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    axes[0].set_ylabel(KIND_LABELS[kind])
    axes[0].legend(fontsize="small")
    return fig


def plot_ratio_histograms(
    run_dir: PathLike,
    kind: str = "log_ratio",
    iteration: int | None = None,
    steps: Iterable[int] | None = None,
    ncols: int | None = None,
) -> AnalysisFigure:
    """The histograms themselves at one GRPO iteration (default: the last): one panel per step k, bars of
    the logged bucket counts (TensorBoard's buckets: finer near 0)."""
    _check_kind(kind)
    hist = _histograms_of(run_dir, kind)
    chosen = _select_steps(sorted(hist["k"].unique()), steps, f"ratio/{kind}_t{{k}} histograms")
    iteration = int(hist["step"].max()) if iteration is None else iteration
    fig, axes = _panels(
        len(chosen), f"{KIND_LABELS[kind]} at iteration {iteration} ({_run_label(run_dir)})", ncols
    )
    for ax, k in zip(axes, chosen):
        rows = hist[(hist["k"] == k) & (hist["step"] == iteration)]
        ax.set_title(f"k = {k}")
        if rows.empty:
            ax.text(
                0.5, 0.5, "not trained at this iteration", ha="center", va="center", transform=ax.transAxes
            )
            continue
        row = rows.iloc[0]
        right, counts = row["bucket_limits"], row["bucket_counts"]
        left = np.concatenate([[min(row["min"], right[0])], right[:-1]])
        keep = counts > 0  # TensorBoard stores hundreds of empty buckets; only the filled ones matter
        left, width, counts = left[keep], (right - left)[keep], counts[keep]
        # Buckets near 0 are ~1e-12 wide (the first, on-policy update's exact zeros land there): widen every
        # bar to at least 1/60 of the range so that each one shows.
        span = max(float((left + width).max() - left.min()), 1e-300)
        ax.bar(left, counts, width=np.maximum(width, span / 60), align="edge", color="C0")
        ax.axvline(0.0, color="black", linewidth=0.6, linestyle=":")
        ax.axvline(row["mean"], color="C3", linewidth=1, label=f"mean {row['mean']:.2e}")
        ax.legend(fontsize="small")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
    axes[0].set_ylabel("samples")
    return fig


def plot_clip_fractions(
    run_dir: PathLike, steps: Iterable[int] | None = None, ncols: int | None = None
) -> AnalysisFigure:
    """Clip fractions by advantage sign, one panel per trained step k, x = GRPO iteration: the share of
    positive-advantage samples clipped above (ratio > 1 + c) and of negative-advantage samples clipped
    below (ratio < 1 - c). The paper's FlowGRPO diagnosis: the first falls towards 0 while the second
    does not; GRPO-Guard keeps them level."""
    clip = clip_fractions(run_dir)
    chosen = _select_steps(sorted(clip["k"].unique()), steps, "clip/frac_*_t{k} scalars")
    fig, axes = _panels(len(chosen), f"clip fractions by advantage sign ({_run_label(run_dir)})", ncols)
    for ax, k in zip(axes, chosen):
        for i, sign in enumerate(SIGN_LABELS):
            rows = clip[(clip["k"] == k) & (clip["sign"] == sign)]
            ax.plot(
                rows["step"], rows["value"], color=f"C{i}", marker="o", markersize=3, label=SIGN_LABELS[sign]
            )
        ax.set_title(f"k = {k}")
        _iteration_axis(ax)
        ax.set_ylim(-0.03, 1.03)
    axes[0].set_ylabel("share clipped")
    axes[0].legend(fontsize="small")
    return fig


def plot_proxy_vs_gold(
    run_dir: PathLike, proxy_tag: str = "reward/mean", gold_tags: Iterable[str] | None = None
) -> AnalysisFigure:
    """The proxy reward (left axis) and gold metrics (right axis) over training: over-optimization shows
    as the proxy rising while gold falls. gold_tags: default every `gold/...` scalar. A run without gold
    metrics (none were logged: nothing evaluates them yet) gets the proxy alone, with a note on the plot
    and a warning; explicitly named gold tags that are missing are an error."""
    scalars = load_scalars(run_dir)
    available = set(scalars["tag"])
    if proxy_tag not in available:
        rewards = sorted(t for t in available if t.startswith("reward/"))
        raise ValueError(f"proxy_tag={proxy_tag!r} was not logged by this run; its reward tags: {rewards}")
    if gold_tags is None:
        gold = sorted(t for t in available if t.startswith(GOLD_PREFIX))
    else:
        gold = list(gold_tags)
        missing = [t for t in gold if t not in available]
        if missing:
            logged = sorted(t for t in available if t.startswith(GOLD_PREFIX))
            raise ValueError(f"gold_tags {missing} were not logged by this run; its gold tags: {logged}")
    fig, (ax,) = _panels(1, f"proxy vs gold ({_run_label(run_dir)})", panel_size=(6.0, 3.2))
    proxy = scalars[scalars["tag"] == proxy_tag]
    ax.plot(proxy["step"], proxy["value"], color="C0", marker="o", markersize=3, label=proxy_tag)
    _iteration_axis(ax)
    ax.set_ylabel(f"proxy: {proxy_tag}")
    if not gold:
        message = f"no gold metrics in this run (no {GOLD_PREFIX}* scalars): showing the proxy alone"
        warnings.warn(message, stacklevel=2)
        ax.set_title(message, fontsize="small", color="C3")
        ax.legend(fontsize="small")
        return fig
    table = gold_metrics(run_dir, gold)
    right = ax.twinx()
    for i, tag in enumerate(gold, start=1):
        right.plot(
            table["step"], table[tag], color=f"C{i}", marker="s", markersize=3, linestyle="--", label=tag
        )
    right.set_ylabel("gold")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize="small")
    return fig


# ------------------------------------------------------------------------------------------ several runs
def compare_runs(
    runs: Mapping[str, PathLike],
    metric: str = "log_ratio",
    steps: Iterable[int] | None = None,
    ncols: int | None = None,
) -> AnalysisFigure:
    """Several labelled runs on the same panels (e.g. {'flow_grpo': ..., 'grpo_guard': ...}).

    metric: 'log_ratio' or 'raw_log_ratio' (one panel per step k: each run's per-iteration mean with a
    mean ± std band), 'clip' (one panel per k: solid = positive-advantage upper clip, dashed =
    negative-advantage lower clip, a colour per run) or 'reward' (one panel: reward/mean)."""
    if metric not in COMPARE_METRICS:
        raise ValueError(f"metric={metric!r}: must be one of {COMPARE_METRICS}")
    if not runs:
        raise ValueError("runs is empty: pass {label: run_dir, ...}")
    labels = list(runs)
    if metric == "reward":
        fig, (ax,) = _panels(1, "reward/mean", panel_size=(6.0, 3.2))
        for i, label in enumerate(labels):
            rows = load_scalars(runs[label], ["reward/mean"])
            ax.plot(rows["step"], rows["value"], color=f"C{i}", marker="o", markersize=3, label=label)
        _iteration_axis(ax)
        ax.legend(fontsize="small")
        return fig
    if metric == "clip":
        frames = {label: clip_fractions(path) for label, path in runs.items()}
        title, what = "clip fractions (solid: A > 0 above 1 + c; dashed: A < 0 below 1 - c)", "clip fractions"
    else:
        frames = {label: _histograms_of(path, metric) for label, path in runs.items()}
        title, what = (
            f"{KIND_LABELS[metric]} per denoising step (mean ± std)",
            f"ratio/{metric}_t{{k}} histograms",
        )
    available = sorted(set().union(*(frame["k"].unique() for frame in frames.values())))
    chosen = _select_steps(available, steps, what)
    fig, axes = _panels(len(chosen), title, ncols)
    for ax, k in zip(axes, chosen):
        for i, label in enumerate(labels):
            rows = frames[label][frames[label]["k"] == k].sort_values("step")
            if metric == "clip":
                for sign, style in (("pos_upper", "-"), ("neg_lower", "--")):
                    part = rows[rows["sign"] == sign]
                    ax.plot(
                        part["step"],
                        part["value"],
                        color=f"C{i}",
                        linestyle=style,
                        marker="o",
                        markersize=3,
                        label=label if sign == "pos_upper" else None,
                    )
            else:
                x, mean, std = rows["step"].to_numpy(), rows["mean"].to_numpy(), rows["std"].to_numpy()
                ax.fill_between(x, mean - std, mean + std, color=f"C{i}", alpha=0.25, linewidth=0)
                ax.plot(x, mean, color=f"C{i}", marker="o", markersize=3, label=label)
        if metric == "clip":
            ax.set_ylim(-0.03, 1.03)
        else:
            ax.axhline(0.0, color="black", linewidth=0.6, linestyle=":")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.set_title(f"k = {k}")
        _iteration_axis(ax)
    axes[0].legend(fontsize="small")
    return fig
