"""RunSummaryCallback: what this run is at its start, and how it went at its end.

At the start, in the run's loggers and on the console:
    config (text: TensorBoard's Text tab, a W&B table, an MLflow or CSV file; at step = the iteration the
        run starts from)
        markdown tables of the model's resolved hyperparameters (pl_module.hparams, nested options as
        dotted keys), the objects hparams leaves out (backbone, rewards, optimizer), the data settings
        and the trainer's devices and precision
    console: a few lines (variant, clip range, sampler, batch, lr, where the logs go)

At the end (finished, stopped by a signal, interrupted or failed), on the console: how it stopped, the
iterations done, reward/mean over the run's first and last `window` iterations (mean +- std of the
per-iteration means), optimizer steps and skipped updates, the last checkpoint, and the commands to resume or
extend, export the LoRA and look at the curves. The per-iteration rewards are kept in the checkpoint
(this callback's state), so a resumed run's summary still starts at iteration 0.

Rank zero only. `guardrl fit` also writes the complete config.yaml beside the events; this is the
at-a-glance view next to the curves.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback
from tqdm import tqdm

from guardrl.logger_media import log_text

log = logging.getLogger(__name__)

# PromptDataModule does not save hyperparameters; these are its settings.
DATA_SETTINGS = (
    "train_prompts",
    "group_size",
    "prompts_per_batch",
    "batch_size",
    "prompt_field",
    "image_field",
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


def _window_stats(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, spread


def end_summary_lines(
    history: Sequence[tuple[int, float, float]],
    *,
    status: str,
    num_iterations: int,
    max_iterations: Optional[int],
    session_iterations: int,
    session_seconds: float,
    optimizer_steps: int,
    skipped_updates: int,
    last_checkpoint: Optional[str],
    log_dir: Optional[str],
    window: int,
    evaluations: Sequence[tuple[int, Mapping[str, float], int, Mapping[str, float]]] = (),
) -> list[str]:
    """The end-of-run summary. `history`: (iteration, reward mean, reward std) of every iteration of the run
    (all sessions); `status`: how it stopped, in words; `evaluations`: each held-out evaluation's first and
    last (iteration, scalars) of the run."""
    lines = [
        f"guardrl: {status} at iteration {num_iterations}"
        + (f" of {max_iterations}" if max_iterations is not None else "")
        + f" ({session_iterations} this session, {session_seconds:.0f} s)"
    ]
    if max_iterations is not None and num_iterations >= max_iterations and session_iterations == 0:
        lines.append(
            f"  the checkpoint already holds model.max_iterations={max_iterations} iterations; to train "
            "further, resume with a larger --model.max_iterations (command below)"
        )
    rewards = [mean for _, mean, _ in sorted(history)]
    if rewards:
        w = min(window, max(1, len(rewards) // 2))
        first, last = _window_stats(rewards[:w]), _window_stats(rewards[-w:])
        lines.append(
            f"  reward/mean: {first[0]:.4g} ± {first[1]:.2g} over the first {w} iteration(s) -> "
            f"{last[0]:.4g} ± {last[1]:.2g} over the last {w} (change {last[0] - first[0]:+.4g})"
        )
    for first_at, first_values, last_at, last_values in evaluations:
        # overall values only (tags with one '/'); per-group ones are in the logs
        changes = [
            f"{tag} {first_values[tag]:.4g} -> {value:.4g}"
            for tag, value in last_values.items()
            if tag.count("/") == 1 and tag in first_values
        ]
        if changes and last_at > first_at:
            lines.append(f"  held-out, iteration {first_at} -> {last_at}: " + ", ".join(changes))
    lines.append(
        f"  updates: {optimizer_steps} optimizer step(s); {skipped_updates} iteration(s) skipped their "
        "update (non-finite values, docs/reliability.md)"
    )
    if num_iterations > 0 and optimizer_steps == 0:
        lines.append(
            "  WARNING: no optimizer step was taken: the policy is unchanged from the pretrained model"
        )
    if last_checkpoint:
        config = os.path.join(log_dir, "config.yaml") if log_dir else "<config.yaml>"
        more = (max_iterations or num_iterations) * 2 or 10
        lines += [
            f"  last checkpoint: {last_checkpoint}",
            f"  resume / extend: guardrl fit --config {config} --ckpt_path {last_checkpoint} "
            f"--model.max_iterations {more}",
            f"  export the LoRA: python -m guardrl.export --config {config} --ckpt {last_checkpoint} "
            f"--out {os.path.join(log_dir or '.', 'lora')}",
        ]
    else:
        lines.append("  no checkpoint was written (checkpointing is off, or no iteration finished)")
    if log_dir:
        lines.append(f"  curves: tensorboard --logdir {os.path.dirname(log_dir.rstrip(os.sep)) or log_dir}")
    return lines


class RunSummaryCallback(Callback):
    def __init__(self, console: bool = True, window: int = 5) -> None:
        """
        Args:
            console: print the summary lines at the start and at the end of training.
            window: iterations averaged for the reward at the start and at the end of the end-of-run summary.
        """
        if not (isinstance(window, int) and not isinstance(window, bool) and window >= 1):
            raise ValueError(f"run_summary.window must be an integer >= 1, got {window!r}")
        self.console = console
        self.window = window
        self.history: list[
            tuple[int, float, float]
        ] = []  # (iteration, reward/mean, reward/std), all sessions
        self._session_start: tuple[int, float] = (0, time.monotonic())
        self._log_dir: Optional[str] = None
        self._summarized = False

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(row) for row in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(i), float(m), float(s)) for i, m, s in state_dict.get("history", [])]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Trainer.log_dir broadcasts from rank zero: every rank must ask, or rank zero waits forever for the
        # others (they have gone on to the first iteration's collectives).
        log_dir = trainer.log_dir
        self._log_dir = log_dir
        start = getattr(pl_module, "num_iterations", 0)
        self._session_start = (start, time.monotonic())
        self._summarized = False
        # A resumed run keeps the history up to its checkpoint (iterations after it are redone).
        self.history = [row for row in self.history if row[0] < start]
        if not trainer.is_global_zero:
            return
        text = summary_markdown(trainer, pl_module, log_dir)
        log_text(trainer, "config", text, start)  # every logger that takes text (guardrl/logger_media.py)
        if self.console:
            # tqdm.write clears any progress bar, prints above it and redraws it (a plain print would
            # break the bar's line); with no bar it is a plain print to stdout.
            tqdm.write("\n".join(summary_lines(trainer, pl_module, log_dir)))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        if isinstance(outputs, Mapping) and "reward_mean" in outputs:
            iteration = getattr(pl_module, "num_iterations", 1) - 1
            self.history.append((iteration, float(outputs["reward_mean"]), float(outputs["reward_std"])))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After training has ended and the progress bar is closed (on_train_end would print above its last
        # redraw); the final checkpoint was saved at the end of the last epoch, before this.
        self._summarize(trainer, pl_module, None)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # `guardrl validate` has no run to summarize: its error speaks for itself
        if trainer.state.fn == "fit":
            self._summarize(trainer, pl_module, exception)

    def _summarize(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: Optional[BaseException]
    ) -> None:
        if self._summarized or not trainer.is_global_zero:
            return
        self._summarized = True
        done = getattr(pl_module, "num_iterations", 0)
        maximum = getattr(pl_module, "max_iterations", None)
        session = done - self._session_start[0]
        status = _status(trainer, exception, done, maximum, session)
        from guardrl.checkpointing import find_iteration_checkpoint

        checkpoint = find_iteration_checkpoint(trainer)
        last = None
        if checkpoint is not None:
            # last_model_path is empty when this session saved nothing (a finished run resumed): what is on
            # disk.
            candidate = checkpoint.last_model_path or os.path.join(checkpoint.dirpath or "", "last.ckpt")
            last = candidate if os.path.exists(candidate) else None
        lines = end_summary_lines(
            self.history,
            status=status,
            num_iterations=done,
            max_iterations=maximum,
            session_iterations=session,
            session_seconds=time.monotonic() - self._session_start[1],
            optimizer_steps=int(trainer.global_step),
            skipped_updates=int(getattr(pl_module, "num_skipped_updates", 0)),
            last_checkpoint=last,
            log_dir=self._log_dir,
            window=self.window,
            evaluations=[
                (*c.first_scalars, *c.last_scalars)
                for c in trainer.callbacks
                if getattr(c, "first_scalars", None) and getattr(c, "last_scalars", None)
            ],
        )
        if done > 0 and trainer.global_step == 0:
            log.warning(
                "guardrl: %d iteration(s) ran but no optimizer step was taken; the policy did not change",
                done,
            )
        if self.console:
            print("\n".join(lines), flush=True)


def _status(
    trainer: L.Trainer, exception: Optional[BaseException], done: int, maximum: Optional[int], session: int
) -> str:
    if exception is not None:
        if isinstance(exception, KeyboardInterrupt):
            return "interrupted (KeyboardInterrupt)"
        return f"failed ({type(exception).__name__})"
    signal_name = next(
        (getattr(c, "requested", None) for c in trainer.callbacks if getattr(c, "requested", None)), None
    )
    if signal_name:
        return f"stopped by {signal_name}"
    if maximum is not None and done >= maximum:
        return "run already complete, nothing trained" if session == 0 else "finished"
    return "stopped"
