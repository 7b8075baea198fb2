"""RunSummaryCallback: what this run is, at its start, in TensorBoard and on the console.

    config (TensorBoard text, at step = the iteration the run starts from)
        markdown tables of the model's resolved hyperparameters (pl_module.hparams, nested options as
        dotted keys), the objects hparams leaves out (backbone, rewards, optimizer), the data settings
        and the trainer's devices and precision
    console: a few lines (variant, clip range, sampler, batch, lr, where the logs go)

Rank zero only. `guardrl fit` also writes the complete config.yaml beside the events; this is the
at-a-glance view next to the curves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tqdm import tqdm

# PromptDataModule does not save hyperparameters; these are its settings.
DATA_SETTINGS = (
    "train_prompts",
    "group_size",
    "prompts_per_batch",
    "batch_size",
    "prompt_field",
    "shuffle_buffer_size",
    "seed",
)


def flatten(options: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys ({'grpo': {'clip_range': 1e-4}} -> {'grpo.clip_range': 1e-4});
    private keys (`_instantiator`) are dropped."""
    flat: dict[str, Any] = {}
    for key, value in options.items():
        if str(key).startswith("_"):
            continue
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def markdown_table(options: Mapping[str, Any]) -> str:
    rows = ["| option | value |", "|---|---|"]
    rows += [f"| {key} | `{value!r}` |".replace("\n", " ") for key, value in options.items()]
    return "\n".join(rows)


def _objects(pl_module: L.LightningModule, trainer: L.Trainer) -> dict[str, Any]:
    """What GRPOModule keeps out of hparams (objects, not options), named by class."""
    found: dict[str, Any] = {}
    policy = getattr(pl_module, "policy", None)
    backbone = getattr(policy, "backbone", None)
    if backbone is not None:
        found["backbone"] = type(backbone).__name__
    rewards = getattr(pl_module, "rewards", None)
    if rewards is not None:
        found["rewards"] = ", ".join(
            f"{getattr(r, 'name', type(r).__name__)} x {getattr(r, 'weight', 1.0):g}" for r in rewards
        )
    for i, optimizer in enumerate(trainer.optimizers):
        groups = optimizer.param_groups
        found[f"optimizer{i or ''}"] = (
            f"{type(optimizer).__name__} (lr {groups[0].get('lr', float('nan')):g})"
        )
    if getattr(pl_module, "clip_range", None) is not None:
        found["effective clip range"] = float(pl_module.clip_range)  # after clip_range_unit
    return found


def data_settings(datamodule) -> dict[str, Any]:
    if datamodule is None:
        return {}
    if getattr(datamodule, "hparams", None):
        return flatten(dict(datamodule.hparams))
    return {name: getattr(datamodule, name) for name in DATA_SETTINGS if hasattr(datamodule, name)}


def trainer_settings(trainer: L.Trainer, log_dir: str | None) -> dict[str, Any]:
    return {
        "strategy": type(trainer.strategy).__name__,
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "precision": trainer.precision,
        "log_every_n_steps": trainer.log_every_n_steps,
        "log_dir": log_dir,
    }


def summary_markdown(trainer: L.Trainer, pl_module: L.LightningModule, log_dir: str | None) -> str:
    sections = [
        ("Model (hyperparameters)", flatten(dict(pl_module.hparams))),
        ("Model (objects)", _objects(pl_module, trainer)),
        ("Data", data_settings(getattr(trainer, "datamodule", None))),
        ("Trainer", trainer_settings(trainer, log_dir)),
    ]
    return "\n\n".join(f"### {title}\n\n{markdown_table(values)}" for title, values in sections if values)


def summary_lines(trainer: L.Trainer, pl_module: L.LightningModule, log_dir: str | None) -> list[str]:
    hp = flatten(dict(pl_module.hparams))
    data = data_settings(getattr(trainer, "datamodule", None))
    objects = _objects(pl_module, trainer)

    def get(options, key, default="?"):
        return options.get(key, default)

    return [
        f"guardrl run: {get(hp, 'grpo.ratio_variant')}, clip range {get(hp, 'grpo.clip_range')} "
        f"({get(hp, 'grpo.clip_range_unit')}; effective {get(objects, 'effective clip range')}), "
        f"max {get(hp, 'max_iterations')} iterations from iteration "
        f"{getattr(pl_module, 'num_iterations', 0)}",
        f"  model: {get(objects, 'backbone')}, rewards {get(objects, 'rewards')}, "
        f"{get(objects, 'optimizer')}",
        f"  sampler: {get(hp, 'sampling.num_inference_steps')} steps, noise level "
        f"{get(hp, 'sampling.noise_level')} ({get(hp, 'sampling.sde_type')})",
        f"  batch per rank: {get(data, 'prompts_per_batch')} prompts x {get(data, 'group_size')} samples, "
        f"{trainer.world_size} rank(s); prompts {get(data, 'train_prompts')}",
        f"  logs: {log_dir}",
    ]


class RunSummaryCallback(Callback):
    def __init__(self, console: bool = True) -> None:
        """
        Args:
            console: also print a few summary lines at the start of training.
        """
        self.console = console

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Trainer.log_dir broadcasts from rank zero: every rank must ask, or rank zero waits forever for the
        # others (they have gone on to the first iteration's collectives).
        log_dir = trainer.log_dir
        if not trainer.is_global_zero:
            return
        text = summary_markdown(trainer, pl_module, log_dir)
        step = getattr(pl_module, "num_iterations", 0)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("config", text, step)
        if self.console:
            # tqdm.write clears any progress bar, prints above it and redraws it (a plain print would
            # break the bar's line); with no bar it is a plain print to stdout.
            tqdm.write("\n".join(summary_lines(trainer, pl_module, log_dir)))
