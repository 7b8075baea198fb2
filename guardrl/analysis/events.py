"""A run's TensorBoard events as pandas frames.

Every reader takes a `run_dir`: a `version_N` folder (the one holding `events.out.tfevents.*`), or its parent
`runs/<name>/`, in which case the newest version (the highest N, which is the one Lightning wrote last) is
read. Events are read with tensorboard's EventAccumulator keeping *all* scalars and histograms
(size_guidance 0; its default keeps a random sample of 10,000 scalars and a single histogram per tag).
The x axis is the GRPO iteration, as guardrl logs it (`step`).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

PathLike = str | os.PathLike

EVENT_FILE_PREFIX = "events.out.tfevents."
HISTOGRAM_TAG = re.compile(r"^ratio/(log_ratio|raw_log_ratio)_t(\d+)$")
CLIP_TAG = re.compile(r"^clip/frac_(pos_upper|neg_lower)_t(\d+)$")
HISTOGRAM_KINDS = ("log_ratio", "raw_log_ratio")
# Gold metrics (the toy world's, or a real benchmark's) are expected under this prefix: `gold/<name>`.
GOLD_PREFIX = "gold/"
_VERSION_DIR = re.compile(r"^version_(\d+)$")


# ------------------------------------------------------------------------------------------ run folders
def _has_events(path: Path) -> bool:
    return path.is_dir() and any(name.startswith(EVENT_FILE_PREFIX) for name in os.listdir(path))


def resolve_run_dir(run_dir: PathLike) -> Path:
    """The folder whose event files are read: `run_dir` itself when it holds event files, else its newest
    `version_N` child (highest N) that does. Raises FileNotFoundError naming what was looked for."""
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"run_dir={str(run_dir)!r}: no such folder; pass a run's version_N folder or its parent "
            "(runs/<name>), e.g. after `guardrl fit --config configs/tiny/grpo_guard.yaml`"
        )
    if _has_events(path):
        return path
    versions = []
    for child in path.iterdir():
        match = _VERSION_DIR.match(child.name)
        if match and _has_events(child):
            versions.append((int(match.group(1)), child))
    if not versions:
        raise FileNotFoundError(
            f"run_dir={str(run_dir)!r} holds no TensorBoard event files ({EVENT_FILE_PREFIX}*) and no "
            "version_N folder with some"
        )
    return max(versions)[1]


def run_dir_from_env(variable: str = "GUARDRL_RUN_DIR", default: PathLike = "runs/tiny_grpo_guard") -> Path:
    """The run folder named by an environment variable (else `default`), resolved with `resolve_run_dir`.

    A relative path is tried from the working directory and then from its parent, so that the same default
    works from the repository root and from a notebook in `notebooks/` (Jupyter's working directory)."""
    value = os.environ.get(variable) or str(default)
    return resolve_run_dir(_find_relative(value, variable))


def run_dirs_from_env(
    variable: str = "GUARDRL_RUN_DIRS", default: Mapping[str, PathLike] | None = None
) -> dict[str, Path]:
    """Labelled run folders from an environment variable written `label=path,label=path` (else `default`),
    each resolved with `resolve_run_dir`. Order is kept (it is the plots' legend order)."""
    value = os.environ.get(variable)
    if value:
        pairs = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            label, sep, path = item.partition("=")
            if not sep or not label or not path:
                raise ValueError(f"{variable}={value!r}: every entry must be label=path, got {item!r}")
            pairs[label] = path
    else:
        pairs = dict(default or {"flow_grpo": "runs/tiny_flow_grpo", "grpo_guard": "runs/tiny_grpo_guard"})
    return {label: resolve_run_dir(_find_relative(str(path), variable)) for label, path in pairs.items()}


def _find_relative(value: str, variable: str) -> Path:
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    candidates = [Path.cwd() / path, Path.cwd().parent / path]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"no run folder {value!r} (tried {tried}); set {variable} to a run's folder, or train one first, "
        "e.g. `guardrl fit --config configs/tiny/grpo_guard.yaml`"
    )


# ------------------------------------------------------------------------------------------ reading
def _accumulator(run_dir: PathLike):
    path = resolve_run_dir(run_dir)
    # Key the cache on the event files' names, sizes and times: a growing (live) run is read again.
    signature = tuple(
        (entry.name, entry.stat().st_size, entry.stat().st_mtime_ns)
        for entry in sorted(os.scandir(path), key=lambda e: e.name)
        if entry.name.startswith(EVENT_FILE_PREFIX)
    )
    return _load_accumulator(str(path), signature)


@functools.lru_cache(maxsize=8)
def _load_accumulator(path: str, signature: tuple):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # 0 = keep every event. purge_orphaned_data (the default) drops what a run wrote past the step a resumed
    # run restarted from (guardrl resumes with purge_step), so those points never show up here.
    accumulator = EventAccumulator(path, size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def _latest_per_step(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    # A step logged twice (a resumed run that re-logged it without a purge) keeps its latest value.
    frame = frame.sort_values("wall_time", kind="stable").drop_duplicates(keys, keep="last")
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)


def load_scalars(run_dir: PathLike, tags: Iterable[str] | None = None) -> pd.DataFrame:
    """Every scalar of the run: columns tag, step, value, wall_time; one row per (tag, step).

    `tags`: only these (all when None)."""
    accumulator = _accumulator(run_dir)
    available = accumulator.Tags()["scalars"]
    wanted = available if tags is None else [tag for tag in tags if tag in available]
    rows = [
        (tag, event.step, event.value, event.wall_time)
        for tag in wanted
        for event in accumulator.Scalars(tag)
    ]
    frame = pd.DataFrame(rows, columns=["tag", "step", "value", "wall_time"])
    frame = frame.astype({"tag": str, "step": "int64", "value": "float64", "wall_time": "float64"})
    return _latest_per_step(frame, ["tag", "step"])


def scalar_table(run_dir: PathLike, tags: Iterable[str]) -> pd.DataFrame:
    """The given scalar tags side by side: a `step` column and one column per tag present (NaN where a
    tag has no value at that step)."""
    long = load_scalars(run_dir, tags)
    wide = long.pivot(index="step", columns="tag", values="value")
    wide.columns.name = None
    return wide.reset_index()


def rewards(run_dir: PathLike) -> pd.DataFrame:
    """The proxy reward per iteration: `step`, `reward/mean`, `reward/std` and each `reward/<name>/mean`."""
    tags = [tag for tag in _accumulator(run_dir).Tags()["scalars"] if tag.startswith("reward/")]
    return scalar_table(run_dir, tags)


def gold_metrics(run_dir: PathLike, gold_tags: Iterable[str] | None = None) -> pd.DataFrame:
    """Gold metrics per iteration: `step` and one column per tag (default: every `gold/...` scalar). Empty
    (only `step`) when the run logged none."""
    available = _accumulator(run_dir).Tags()["scalars"]
    tags = [t for t in available if t.startswith(GOLD_PREFIX)] if gold_tags is None else list(gold_tags)
    return scalar_table(run_dir, tags)


def load_ratio_histograms(run_dir: PathLike) -> pd.DataFrame:
    """The per-step log-ratio histograms (`ratio/log_ratio_t{k}`, `ratio/raw_log_ratio_t{k}`), one row per
    (kind, k, step): kind ('log_ratio' = the log-ratio used for clipping, 'raw_log_ratio' = plain log r),
    k, step, num, sum, sum_squares, min, max, mean, std (population, from num/sum/sum_squares: exact, not
    from the buckets), bucket_limits and bucket_counts (arrays: the right edges and counts), wall_time."""
    accumulator = _accumulator(run_dir)
    rows = []
    for tag in accumulator.Tags()["histograms"]:
        match = HISTOGRAM_TAG.match(tag)
        if not match:
            continue
        kind, k = match.group(1), int(match.group(2))
        for event in accumulator.Histograms(tag):
            h = event.histogram_value
            mean = h.sum / h.num if h.num else np.nan
            variance = h.sum_squares / h.num - mean**2 if h.num else np.nan
            rows.append(
                {
                    "kind": kind,
                    "k": k,
                    "step": event.step,
                    "num": h.num,
                    "sum": h.sum,
                    "sum_squares": h.sum_squares,
                    "min": h.min,
                    "max": h.max,
                    "mean": mean,
                    # max(0, .): rounding can make a zero variance slightly negative.
                    "std": float(np.sqrt(max(variance, 0.0))) if h.num else np.nan,
                    "bucket_limits": np.asarray(h.bucket_limit, dtype=float),
                    "bucket_counts": np.asarray(h.bucket, dtype=float),
                    "wall_time": event.wall_time,
                }
            )
    columns = [
        "kind",
        "k",
        "step",
        "num",
        "sum",
        "sum_squares",
        "min",
        "max",
        "mean",
        "std",
        "bucket_limits",
        "bucket_counts",
        "wall_time",
    ]
    frame = pd.DataFrame(rows, columns=columns).astype({"k": "int64", "step": "int64"})
    return _latest_per_step(frame, ["kind", "k", "step"])


def clip_fractions(run_dir: PathLike) -> pd.DataFrame:
    """Clip fractions by advantage sign, tidy: step, k, sign ('pos_upper': share of positive-advantage
    samples with ratio > 1 + c; 'neg_lower': share of negative-advantage samples with ratio < 1 - c),
    value."""
    scalars = load_scalars(run_dir)
    parts = scalars["tag"].str.extract(CLIP_TAG)
    frame = scalars.assign(sign=parts[0], k=parts[1]).dropna(subset=["sign"])
    frame = frame.astype({"k": "int64"})[["step", "k", "sign", "value"]]
    return frame.sort_values(["k", "sign", "step"], kind="stable").reset_index(drop=True)


def trained_steps(run_dir: PathLike) -> list[int]:
    """The denoising steps k that have ratio histograms (the SDE steps that were trained)."""
    return sorted(load_ratio_histograms(run_dir)["k"].unique().tolist())


# ------------------------------------------------------------------------------------------ summaries
def run_summary(run_dir: PathLike) -> pd.DataFrame:
    """One row per trained step k, each a mean over the run's iterations: `log_ratio_mean` and `log_ratio_z`
    (mean/std, the bias-to-noise ratio) of the clipped log-ratio, the same two for the plain log r
    (`raw_...`), `frac_pos_upper`, `frac_neg_lower` and their quotient `pos_over_neg` (1 = symmetric
    clipping; the paper's FlowGRPO diagnosis is < 1 at late steps)."""
    hist = load_ratio_histograms(run_dir)
    hist = hist.assign(z=hist["mean"] / hist["std"].where(hist["std"] > 0))
    table = hist.pivot_table(index="k", columns="kind", values=["mean", "z"], aggfunc="mean")
    summary = pd.DataFrame(index=table.index)
    for kind in HISTOGRAM_KINDS:
        if ("mean", kind) in table:
            summary[f"{kind}_mean"] = table[("mean", kind)]
            summary[f"{kind}_z"] = table[("z", kind)]
    summary["iterations"] = hist[hist["kind"] == "log_ratio"].groupby("k")["step"].nunique()
    clip = clip_fractions(run_dir)
    if not clip.empty:
        means = clip.pivot_table(index="k", columns="sign", values="value", aggfunc="mean")
        for sign in ("pos_upper", "neg_lower"):
            summary[f"frac_{sign}"] = means.get(sign)
        summary["pos_over_neg"] = summary["frac_pos_upper"] / summary["frac_neg_lower"].where(
            summary["frac_neg_lower"] > 0
        )
    return summary.reset_index()


def compare_table(runs: Mapping[str, PathLike]) -> pd.DataFrame:
    """`run_summary` of several labelled runs, stacked with a `run` column (e.g. flow_grpo vs grpo_guard)."""
    frames = [run_summary(path).assign(run=label) for label, path in runs.items()]
    frame = pd.concat(frames, ignore_index=True)
    return frame[["run", *[c for c in frame.columns if c != "run"]]]
