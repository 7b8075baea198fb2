"""Histograms, images and text for every logger of a run, not only TensorBoard.

Scalars go through `Logger.log_metrics` (guardrl/logs.py `write_scalars`), which every Lightning logger has.
Histograms, images and text have no common Lightning API, so each logger type gets its own native form:

    logger              histogram                      image                         text
    TensorBoardLogger   add_histogram                  add_image                     add_text
    WandbLogger         wandb.Histogram + summary      log_image (a wandb.Image)     log_text (a 1-cell Table)
    MLFlowLogger        summary scalars                log_image: an artifact PNG    log_text: an artifact
    CSVLogger           summary scalars (metrics.csv)  PNG under log_dir/media/      .txt under log_dir/media/
    any other           summary scalars (log_metrics)  not received (one warning)    not received

The summary scalars of a histogram `<tag>` are `<tag>/num, mean, std, min, max, p05, p25, p50, p75, p95`
(`histogram_summary`): MLflow and CSV have no histogram type, and `guardrl.analysis` reads the mean, std,
min and max from them where there are no TensorBoard events. Files written for MLflow and CSV are named
`media/<tag, every character but letters, digits, . _ - replaced by _>/step_<step>.<png|txt>`.

Call the three functions on every rank or on rank zero only: they write on rank zero (global rank 0) and
return on the others. TensorBoard receives exactly what `SummaryWriter.add_*` writes (the same tensors).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

log = logging.getLogger(__name__)

# The quantiles of a histogram's summary: name -> q (numpy's default, linear interpolation).
QUANTILES = {"p05": 0.05, "p25": 0.25, "p50": 0.50, "p75": 0.75, "p95": 0.95}
SUMMARY_STATS = ("num", "mean", "std", "min", "max", *QUANTILES)
# Logger classes already warned about (one warning per class and process).
_warned: set[str] = set()


# ------------------------------------------------------------------------------------------ summaries
def histogram_summary(values: torch.Tensor) -> dict[str, float]:
    """num, mean, std (population), min, max and the p05..p95 quantiles of `values` (any shape, read as
    float64). The one definition of what a logger without a histogram type receives. An empty tensor gives
    num 0 and NaN for the rest; a NaN among the values makes every statistic but num NaN."""
    array = values.detach().reshape(-1).to(torch.float64).cpu().numpy()
    summary = {"num": float(array.size)}
    if array.size == 0:
        return {name: (summary["num"] if name == "num" else float("nan")) for name in SUMMARY_STATS}
    summary.update(mean=float(array.mean()), std=float(array.std()), min=float(array.min()))
    summary["max"] = float(array.max())
    quantiles = np.quantile(array, list(QUANTILES.values()))
    summary.update({name: float(q) for name, q in zip(QUANTILES, quantiles)})
    return summary


def summary_scalars(tag: str, values: torch.Tensor) -> dict[str, float]:
    """`histogram_summary` as scalars named `<tag>/<statistic>`."""
    return {f"{tag}/{name}": value for name, value in histogram_summary(values).items()}


def media_path(tag: str, step: int, suffix: str) -> str:
    """`media/<tag made a file name>/step_<step><suffix>`, relative: where MLflow and CSV get a file."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", tag).lstrip(".") or "_"
    return os.path.join("media", name, f"step_{int(step)}{suffix}")


def to_uint8_hwc(image: torch.Tensor, tag: str = "") -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, rounded to the nearest level (values outside [0, 1]
    are clipped)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"log_image(tag={tag!r}): image must be (3, H, W) float in [0, 1], got shape {tuple(image.shape)}"
        )
    pixels = (image.detach().to(torch.float64).cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).contiguous().numpy()


# ------------------------------------------------------------------------------------------ the three
def log_histogram(trainer: Any, tag: str, values: torch.Tensor, step: int) -> None:
    """The distribution of `values` at x = `step`, to every logger of `trainer` (rank zero only)."""
    if not trainer.is_global_zero:
        return
    values = values.detach().cpu()
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_histogram(tag, values, step)
        elif isinstance(logger, WandbLogger):
            import wandb

            metrics: dict[str, Any] = summary_scalars(tag, values)
            metrics[tag] = wandb.Histogram(values.reshape(-1).to(torch.float64).tolist())
            logger.log_metrics(metrics, step=step)
        else:
            # MLflow and CSV have no histogram type; any other Lightning logger has log_metrics.
            logger.log_metrics(summary_scalars(tag, values), step=step)


def log_image(trainer: Any, tag: str, image: torch.Tensor, step: int, caption: str | None = None) -> None:
    """An RGB image, (3, H, W) float in [0, 1], at x = `step`, to every logger of `trainer` (rank zero
    only). `caption`: shown under the image by W&B; a `.caption.txt` file beside the PNG for MLflow and
    CSV; not written to TensorBoard (log it with `log_text`)."""
    if not trainer.is_global_zero:
        return
    pixels: np.ndarray | None = None  # converted once, for the loggers that take uint8 pixels
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image, step)
            continue
        if not isinstance(logger, (WandbLogger, MLFlowLogger, CSVLogger)):
            _warn_unsupported(logger)
            continue
        pixels = to_uint8_hwc(image, tag) if pixels is None else pixels
        if isinstance(logger, WandbLogger):
            extra = {} if caption is None else {"caption": [caption]}
            logger.log_image(key=tag, images=[pixels], step=step, **extra)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, pixels, artifact_file=media_path(tag, step, ".png"))
            if caption is not None:
                logger.experiment.log_text(logger.run_id, caption, media_path(tag, step, ".caption.txt"))
        else:
            from PIL import Image

            path = _csv_media_file(logger, tag, step, ".png")
            Image.fromarray(pixels).save(path)
            if caption is not None:
                _write_text(_csv_media_file(logger, tag, step, ".caption.txt"), caption)


def log_text(trainer: Any, tag: str, text: str, step: int) -> None:
    """A (markdown) text at x = `step`, to every logger of `trainer` (rank zero only)."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(tag, text, step)
        elif isinstance(logger, WandbLogger):
            logger.log_text(key=tag, columns=["text"], data=[[text]], step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_text(logger.run_id, text, media_path(tag, step, ".txt"))
        elif isinstance(logger, CSVLogger):
            _write_text(_csv_media_file(logger, tag, step, ".txt"), text)
        else:
            _warn_unsupported(logger)


# ------------------------------------------------------------------------------------------ helpers
def _csv_media_file(logger: CSVLogger, tag: str, step: int, suffix: str) -> str:
    # The writer first: CSVLogger's experiment, made on first use, warns about (and deletes the metrics.csv
    # of) a log_dir that is not empty, so the media folder must not be the first thing in it.
    logger.experiment
    path = os.path.join(logger.log_dir, media_path(tag, step, suffix))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)


def _warn_unsupported(logger: Any) -> None:
    name = f"{type(logger).__module__}.{type(logger).__qualname__}"
    if name in _warned:
        return
    _warned.add(name)
    log.warning(
        "guardrl: the logger %s receives scalars and histogram summaries (<tag>/mean, std, min, max, "
        "p05..p95) but not images or text (image grids, captions, the config summary): guardrl writes "
        "those to TensorBoardLogger, WandbLogger, MLFlowLogger and CSVLogger only",
        name,
    )
