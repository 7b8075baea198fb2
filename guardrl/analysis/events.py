"""A run's logs as pandas frames: TensorBoard events, a CSVLogger's metrics.csv or a W&B run's log file.

Every reader takes a `run_dir`: a folder holding a run's logs, or its parent, in which case the newest run
in it is read (see `resolve_run_dir`). Three formats are read, chosen by what the folder holds:

    TensorBoard   events.out.tfevents.*  read with tensorboard's EventAccumulator keeping *all* scalars and
                  histograms (size_guidance 0; its default keeps a random sample of 10,000 scalars and a
                  single histogram per tag)
    CSV           metrics.csv of lightning's CSVLogger (a `step` column, one column per tag)
    W&B           run-<id>.wandb of a W&B run folder (`wandb/offline-run-*`, or `wandb/run-*` of an online
                  run): wandb's own transaction log (leveldb-log records of wandb.proto Records), parsed with
                  the installed wandb's protobuf classes

The x axis is the GRPO iteration, as guardrl logs it (`step`; for W&B the `trainer/global_step` that
lightning's WandbLogger adds to every row). CSV and W&B carry histograms as guardrl's summary scalars
(`<tag>/num, mean, std, min, max, p05..p95`, guardrl/logger_media.py); `load_ratio_histograms` rebuilds its
rows from them.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

PathLike = str | os.PathLike

EVENT_FILE_PREFIX = "events.out.tfevents."
CSV_METRICS_FILE = "metrics.csv"
HISTOGRAM_TAG = re.compile(r"^ratio/(log_ratio|raw_log_ratio)_t(\d+)$")
# A histogram's summary scalars where the logger has no histogram type: the names of
# guardrl.logger_media.SUMMARY_STATS (not imported: that would import lightning into every analysis).
SUMMARY_STATS = ("num", "mean", "std", "min", "max", "p05", "p25", "p50", "p75", "p95")
SUMMARY_TAG = re.compile(rf"^ratio/(log_ratio|raw_log_ratio)_t(\d+)/({'|'.join(SUMMARY_STATS)})$")
CLIP_TAG = re.compile(r"^clip/frac_(pos_upper|neg_lower)_t(\d+)$")
HISTOGRAM_KINDS = ("log_ratio", "raw_log_ratio")
# Gold metrics (the toy world's, or a real benchmark's) are expected under this prefix: `gold/<name>`.
GOLD_PREFIX = "gold/"
FORMATS = (
    "TensorBoard event files (events.out.tfevents.*), a CSVLogger's metrics.csv, or a W&B run "
    "(wandb/offline-run-*/run-*.wandb)"
)
_VERSION_DIR = re.compile(r"^version_(\d+)$")
_WANDB_RUN_DIR = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-\w+$")
_WANDB_FILE = re.compile(r"^run-.+\.wandb$")
HISTOGRAM_COLUMNS = [
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


# ------------------------------------------------------------------------------------------ run folders
def _format_of(path: Path) -> str | None:
    """'tensorboard', 'csv' or 'wandb' by the files directly in `path` (in that order of preference: a folder
    shared by a TensorBoardLogger and a CSVLogger is read as TensorBoard); None when it holds none of them."""
    if not path.is_dir():
        return None
    names = os.listdir(path)
    if any(name.startswith(EVENT_FILE_PREFIX) for name in names):
        return "tensorboard"
    if CSV_METRICS_FILE in names and (path / CSV_METRICS_FILE).is_file():
        return "csv"
    if any(_WANDB_FILE.match(name) for name in names):
        return "wandb"
    return None


def _has_events(path: Path) -> bool:
    return _format_of(path) is not None


def resolve_run_dir(run_dir: PathLike) -> Path:
    """The folder whose logs are read: `run_dir` itself when it holds a run's logs (any of the three formats),
    else its newest `version_N` child (highest N) that does, else its newest W&B run folder
    (`offline-run-<date>_<time>-<id>` or `run-...`, in `run_dir` or in `run_dir/wandb`; latest date and time).
    Raises FileNotFoundError naming what was looked for."""
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
    if versions:
        return max(versions)[1]
    wandb_runs = []
    for parent in (path, path / "wandb"):
        for child in parent.iterdir() if parent.is_dir() else ():
            match = _WANDB_RUN_DIR.match(child.name)
            if match and _format_of(child) == "wandb":
                wandb_runs.append((match.group(1), child.stat().st_mtime_ns, child.name, child))
    if wandb_runs:
        return max(wandb_runs, key=lambda run: run[:3])[3]
    raise FileNotFoundError(
        f"run_dir={str(run_dir)!r} holds no TensorBoard event files ({EVENT_FILE_PREFIX}*), no CSVLogger "
        f"{CSV_METRICS_FILE} and no W&B run file (run-*.wandb), nor a version_N or W&B run folder "
        f"(wandb/offline-run-*) with one; guardrl.analysis reads {FORMATS}"
    )


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
    pairs: dict[str, PathLike]
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
@dataclass(frozen=True)
class _RunLogs:
    """A run's logs, every event as written (a tag and step logged twice is there twice): `scalars` with the
    columns tag, step, value, wall_time; `histograms` with HISTOGRAM_COLUMNS. Shared by the cache: copy
    before changing."""

    format: str
    scalars: pd.DataFrame
    histograms: pd.DataFrame


def _run_logs(run_dir: PathLike) -> _RunLogs:
    path = resolve_run_dir(run_dir)
    kind = _format_of(path)
    wanted = {
        "tensorboard": lambda name: name.startswith(EVENT_FILE_PREFIX),
        "csv": lambda name: name == CSV_METRICS_FILE,
        "wandb": lambda name: bool(_WANDB_FILE.match(name)),
    }[str(kind)]
    # Key the cache on the files' names, sizes and times: a growing (live) run is read again.
    signature = tuple(
        (entry.name, entry.stat().st_size, entry.stat().st_mtime_ns)
        for entry in sorted(os.scandir(path), key=lambda e: e.name)
        if wanted(entry.name)
    )
    return _load_run_logs(str(path), str(kind), signature)


@functools.lru_cache(maxsize=8)
def _load_run_logs(path: str, kind: str, signature: tuple) -> _RunLogs:
    if kind == "tensorboard":
        return _read_tensorboard(path)
    if kind == "csv":
        scalars = _read_csv(os.path.join(path, CSV_METRICS_FILE))
        return _RunLogs(kind, scalars, _histograms_from_summaries(scalars, {}))
    files = sorted(
        (os.path.join(path, name) for name, _, _ in signature), key=lambda file: os.stat(file).st_mtime_ns
    )
    scalars, buckets = _read_wandb(files)
    return _RunLogs(kind, scalars, _histograms_from_summaries(scalars, buckets))


def _scalar_frame(rows: Iterable[tuple]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows), columns=["tag", "step", "value", "wall_time"])
    return frame.astype({"tag": str, "step": "int64", "value": "float64", "wall_time": "float64"})


def _histogram_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=HISTOGRAM_COLUMNS).astype({"k": "int64", "step": "int64"})


def _read_tensorboard(path: str) -> _RunLogs:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # 0 = keep every event. purge_orphaned_data (the default) drops what a run wrote past the step a resumed
    # run restarted from (guardrl resumes with purge_step), so those points never show up here.
    accumulator = EventAccumulator(path, size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    scalars = _scalar_frame(
        (tag, event.step, event.value, event.wall_time)
        for tag in accumulator.Tags()["scalars"]
        for event in accumulator.Scalars(tag)
    )
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
    return _RunLogs("tensorboard", scalars, _histogram_frame(rows))


def _read_csv(file: str) -> pd.DataFrame:
    """A CSVLogger's metrics.csv, long: one row per filled cell. An empty cell is a tag not logged in that
    row; `nan` is a logged NaN. The file has no times: wall_time is NaN, and the file's row order is the
    order of logging (a step logged twice keeps its last row)."""
    table = pd.read_csv(file, dtype=str, keep_default_na=False)
    if "step" not in table.columns:
        raise ValueError(
            f"{file}: no `step` column (columns: {list(table.columns)[:8]}), so not the metrics.csv of "
            f"lightning's CSVLogger; guardrl.analysis reads {FORMATS}"
        )
    long = table.melt(id_vars="step", var_name="tag", value_name="text")
    long = long[long["text"] != ""]
    values = pd.to_numeric(long["text"], errors="coerce")
    # A cell that is not a number (a string someone logged) is left out, not read as NaN.
    numeric = values.notna() | long["text"].str.strip().str.lower().isin(["nan", "+nan", "-nan"])
    long = long.assign(value=values)[numeric]
    steps = pd.to_numeric(long["step"], errors="coerce")
    long = long.assign(step=steps)[steps.notna()]
    return _scalar_frame(zip(long["tag"], long["step"].astype("int64"), long["value"], [np.nan] * len(long)))


# W&B's transaction log (wandb/sdk/internal/datastore.py of wandb <= 0.19; the format of wandb-core since):
# a 7-byte header (":W&B", magic 0xBEE1, version 0), then leveldb's log format in 32 KiB blocks: records of
# crc32 (of the type byte, then the data), length (uint16), type (FULL, FIRST, MIDDLE, LAST) and data, a
# block's last < 7 bytes zero padding. Each whole record is a serialized wandb.proto Record.
_WANDB_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_WANDB_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(file: str) -> Iterator[bytes]:
    """The records' bytes, in order. A record cut short at the end of the file (a live or killed run) ends
    the scan; a checksum or record type out of place raises ValueError naming the file and offset."""
    with open(file, "rb") as handle:
        data = handle.read()
    if data[: len(_WANDB_HEADER)] != _WANDB_HEADER:
        raise ValueError(
            f"{file}: not a W&B transaction log (it starts {data[:7]!r}, not {_WANDB_HEADER!r}); "
            f"guardrl.analysis reads {FORMATS}"
        )
    crc = {kind: zlib.crc32(bytes([kind])) for kind in (_FULL, _FIRST, _MIDDLE, _LAST)}
    offset, pending = len(_WANDB_HEADER), None
    while True:
        if _WANDB_BLOCK - offset % _WANDB_BLOCK < 7:
            offset += _WANDB_BLOCK - offset % _WANDB_BLOCK  # the block's zero padding
        if offset + 7 > len(data):
            return
        checksum, length, kind = struct.unpack_from("<IHB", data, offset)
        chunk = data[offset + 7 : offset + 7 + length]
        if len(chunk) < length:
            return
        if kind not in crc or zlib.crc32(chunk, crc[kind]) != checksum:
            raise ValueError(f"{file}: damaged W&B record at byte {offset} (type {kind}, bad checksum)")
        offset += 7 + length
        if kind == _FULL and pending is None:
            yield chunk
        elif kind == _FIRST and pending is None:
            pending = chunk
        elif kind in (_MIDDLE, _LAST) and pending is not None:
            pending += chunk
            if kind == _LAST:
                yield pending
                pending = None
        else:
            raise ValueError(f"{file}: W&B record of type {kind} out of place at byte {offset - 7 - length}")


def _read_wandb(files: list[str]) -> tuple[pd.DataFrame, dict]:
    """The history rows of W&B run files: scalars (tag, step, value, wall_time), and the buckets of
    wandb.Histogram values {(tag, step): (right edges, counts, left edge)}. step is the row's
    `trainer/global_step` (lightning's WandbLogger) else W&B's own `_step`; wall_time its `_timestamp`."""
    try:
        from wandb.proto import wandb_internal_pb2
    except ImportError as error:
        raise ImportError(
            f"reading a W&B run ({files[0]}) needs wandb ({error}); install it with: "
            "pip install -e '.[loggers]'"
        ) from error
    rows: list[tuple] = []
    buckets: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, float]] = {}
    for file in files:
        for data in _wandb_records(file):
            record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
            record.ParseFromString(data)
            if record.WhichOneof("record_type") != "history":
                continue
            flat: dict = {}
            nested: dict[str, dict] = {}
            for item in record.history.item:
                keys = list(item.nested_key) or [item.key]
                value = json.loads(item.value_json)
                if len(keys) == 1 and isinstance(value, dict):
                    nested.setdefault(keys[0], {}).update(value)
                elif len(keys) == 1:
                    flat[keys[0]] = value
                else:
                    nested.setdefault(keys[0], {})[keys[1]] = value
            step = int(flat.get("trainer/global_step", flat.get("_step", record.history.step.num)))
            wall_time = float(flat.get("_timestamp", np.nan))
            for tag, value in flat.items():
                if tag.startswith("_") or tag == "trainer/global_step":
                    continue
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    rows.append((tag, step, float(value), wall_time))
            for tag, value in nested.items():
                if value.get("_type") == "histogram" and "bins" in value and "values" in value:
                    edges = np.asarray(value["bins"], dtype=float)
                    buckets[(tag, step)] = (edges[1:], np.asarray(value["values"], dtype=float), edges[0])
    return _scalar_frame(rows), buckets


# The share of the samples between consecutive summary quantiles (min, p05, p25, p50, p75, p95, max).
_QUANTILE_EDGES = ("min", "p05", "p25", "p50", "p75", "p95", "max")
_QUANTILE_MASS = np.array([0.05, 0.20, 0.25, 0.25, 0.20, 0.05])


def _histograms_from_summaries(scalars: pd.DataFrame, buckets: Mapping) -> pd.DataFrame:
    """load_ratio_histograms' rows from the summary scalars `ratio/<kind>_t<k>/<stat>`: num, mean, std, min,
    max as logged; sum and sum_squares from them (num*mean, num*(std^2 + mean^2)). The buckets are those of a
    wandb.Histogram of the same tag and step when there is one, else six quantile buckets: right edges p05,
    p25, p50, p75, p95, max holding num x (5, 20, 25, 25, 20, 5) %."""
    parts = scalars["tag"].str.extract(SUMMARY_TAG)
    frame = scalars.assign(kind=parts[0], k=parts[1], stat=parts[2]).dropna(subset=["stat"])
    frame = _latest_per_step(frame.astype({"k": "int64"}), ["kind", "k", "stat", "step"])
    keys = ["kind", "k", "step"]
    wide = frame.pivot(index=keys, columns="stat", values="value") if not frame.empty else pd.DataFrame()
    times = frame.groupby(keys)["wall_time"].max() if not frame.empty else pd.Series(dtype=float)
    rows = []
    for key, stats in wide.iterrows():
        kind, k, step = key
        get = {name: float(stats.get(name, np.nan)) for name in (*_QUANTILE_EDGES, "num", "mean", "std")}
        num, mean, std = get["num"], get["mean"], get["std"]
        if (f"ratio/{kind}_t{k}", step) in buckets:
            limits, counts, _ = buckets[(f"ratio/{kind}_t{k}", step)]
        else:
            limits = np.array([get[name] for name in _QUANTILE_EDGES[1:]])
            counts = num * _QUANTILE_MASS
        rows.append(
            {
                "kind": kind,
                "k": int(k),
                "step": int(step),
                "num": num,
                "sum": num * mean,
                "sum_squares": num * (std**2 + mean**2),
                "min": get["min"],
                "max": get["max"],
                "mean": mean,
                "std": std,
                "bucket_limits": limits,
                "bucket_counts": counts,
                "wall_time": float(times.get(key, np.nan)),
            }
        )
    return _histogram_frame(rows)


def _latest_per_step(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    # A step logged twice (a resumed run that re-logged it without a purge) keeps its latest value; without
    # times (CSV) the row logged last.
    frame = frame.sort_values("wall_time", kind="stable").drop_duplicates(keys, keep="last")
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)


def _scalar_tags(run_dir: PathLike) -> list[str]:
    return list(dict.fromkeys(_run_logs(run_dir).scalars["tag"]))


def load_scalars(run_dir: PathLike, tags: Iterable[str] | None = None) -> pd.DataFrame:
    """Every scalar of the run: columns tag, step, value, wall_time; one row per (tag, step).

    `tags`: only these (all when None). For a CSV run wall_time is NaN (metrics.csv has no times)."""
    scalars = _run_logs(run_dir).scalars
    if tags is not None:
        scalars = scalars[scalars["tag"].isin(list(tags))]
    return _latest_per_step(scalars, ["tag", "step"])


def scalar_table(run_dir: PathLike, tags: Iterable[str]) -> pd.DataFrame:
    """The given scalar tags side by side: a `step` column and one column per tag present (NaN where a
    tag has no value at that step)."""
    long = load_scalars(run_dir, tags)
    wide = long.pivot(index="step", columns="tag", values="value")
    wide.columns.name = None
    return wide.reset_index()


def rewards(run_dir: PathLike) -> pd.DataFrame:
    """The proxy reward per iteration: `step`, `reward/mean`, `reward/std` and each `reward/<name>/mean`."""
    tags = [tag for tag in _scalar_tags(run_dir) if tag.startswith("reward/")]
    return scalar_table(run_dir, tags)


def gold_metrics(run_dir: PathLike, gold_tags: Iterable[str] | None = None) -> pd.DataFrame:
    """Gold metrics per iteration: `step` and one column per tag (default: every `gold/...` scalar). Empty
    (only `step`) when the run logged none."""
    available = _scalar_tags(run_dir)
    tags = [t for t in available if t.startswith(GOLD_PREFIX)] if gold_tags is None else list(gold_tags)
    return scalar_table(run_dir, tags)


def load_ratio_histograms(run_dir: PathLike) -> pd.DataFrame:
    """The per-step log-ratio histograms (`ratio/log_ratio_t{k}`, `ratio/raw_log_ratio_t{k}`), one row per
    (kind, k, step): kind ('log_ratio' = the log-ratio used for clipping, 'raw_log_ratio' = plain log r),
    k, step, num, sum, sum_squares, min, max, mean, std (population, from num/sum/sum_squares: exact, not
    from the buckets), bucket_limits and bucket_counts (arrays: the right edges and counts), wall_time.

    CSV and W&B runs: from the histograms' summary scalars (see `_histograms_from_summaries`): num, mean,
    std, min and max as logged, the buckets W&B's or six quantile buckets."""
    return _latest_per_step(_run_logs(run_dir).histograms, ["kind", "k", "step"])


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
