"""The `guardrl` command: LightningCLI over GRPOModule and PromptDataModule.

    guardrl fit --config configs/tiny/grpo_guard.yaml [--model.grpo.clip_range 1e-5] [--ckpt_path ...]
    guardrl fit --config configs/tiny/grpo_guard.yaml --print_config
    guardrl fit --config configs/tiny/grpo_guard.yaml --ckpt_path last      # resume the newest run in place
    guardrl validate --config runs/guardrl/version_0/config.yaml --ckpt_path last   # its Evaluation callbacks

Every run gets these callbacks whatever the config says (their options are top-level groups):
`ratio_stats` (RatioStatsCallback), `checkpoint` (IterationCheckpoint, atomic writes),
`graceful_shutdown` (checkpoint and exit on SIGTERM/SIGUSR1), `image_grid` (sample grids per prompt group),
`run_summary` (the config as text at the start) and `progress_bar` (iteration, reward, clip fraction).
See docs/reliability.md for resuming and docs/analysis.md for reading the logs.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import lightning.pytorch as pl
from jsonargparse import ActionConfigFile, set_parsing_settings
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO

from guardrl.callbacks import (
    Evaluation,
    GracefulShutdown,
    GRPOProgressBar,
    ImageGridCallback,
    RatioStatsCallback,
    RunSummaryCallback,
)
from guardrl.compat import check_lightning_cli_hooks
from guardrl.checkpointing import AtomicCheckpointIO, IterationCheckpoint
from guardrl.data import PromptDataModule
from guardrl.module import GRPOModule
from guardrl.runs import describe_run, refuse_taken_run_folder, resolve_checkpoint_to_evaluate, resolve_resume
from guardrl.runs import find_last_checkpoint as _find_last_checkpoint  # noqa: F401 - re-exported, below
from guardrl.suggestions import did_you_mean

# The run-folder logic lives in guardrl/runs.py (shared with guardrl/export.py, which never imports this
# module). _find_last_checkpoint stays importable from here under its old name: tests/test_sharding_atomic.py.


class _Parser(LightningArgumentParser):
    """Lightning's parser, with the closest known keys suggested for a misspelt one."""

    def error(self, message, ex=None):
        parser = getattr(ex, "subcommand_parser", None) or self
        super().error(did_you_mean(message, [action.dest for action in parser._actions]), ex)

    def print_usage(self, file=None) -> None:
        # The full usage lists every option (120 lines) above a one-line mistake; `--help` has them all.
        self._print_message(f"usage: {self.prog} [options]\n", file)


class GuardRLCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # `fit`, and `validate` (the run's Evaluation callbacks on a checkpoint); no test/predict: GRPOModule
        # has no such step, and offering them would let a user run one and fail deep inside Lightning.
        return {name: LightningCLI.subcommands()[name] for name in ("fit", "validate")}

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        kwargs.setdefault("dump_header", [f"lightning.pytorch=={pl.__version__}"])
        parser = _Parser(**kwargs)
        parser.add_argument(
            "-c",
            "--config",
            action=ActionConfigFile,
            help="Path to a configuration file in json or yaml format.",
        )
        return parser

    def add_arguments_to_parser(self, parser) -> None:
        # The group size is set once, on the data, and copied to the model.
        parser.link_arguments("data.group_size", "model.group_size")
        # The ratio statistics are part of every run (their tags are documented in the README).
        parser.add_lightning_class_args(RatioStatsCallback, "ratio_stats")
        parser.add_lightning_class_args(IterationCheckpoint, "checkpoint")
        parser.add_lightning_class_args(GracefulShutdown, "graceful_shutdown")
        # After the ones above: callbacks run in this order, and the bar shows this iteration's clip
        # fractions.
        parser.add_lightning_class_args(ImageGridCallback, "image_grid")
        parser.add_lightning_class_args(RunSummaryCallback, "run_summary")
        parser.add_lightning_class_args(GRPOProgressBar, "progress_bar")
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "guardrl"},
                },
                "trainer.log_every_n_steps": 1,
                "trainer.max_epochs": -1,
            }
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would overwrite the model's options with the hyperparameters stored in the checkpoint,
        # silently undoing what the command line says (a raised model.max_iterations, a changed lr). Here the
        # config and command line are the truth; a checkpoint whose trainable weights do not fit the model
        # is refused by GRPOModule.on_load_checkpoint.
        return

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit":
            refuse_taken_run_folder(self.config["fit"])
            resolve_resume(self.config["fit"])
        if self.subcommand == "validate":
            resolve_checkpoint_to_evaluate(self.config["validate"])

    def validate(self, model, ckpt_path=None, weights_only=None, **_unused) -> None:
        """`guardrl validate`: every Evaluation callback of the config (Evaluation, OverOptimizationWatch)
        once, on the checkpoint's weights (EMA by default when the run keeps one), into a new log version; the
        results are printed and written to <log dir>/evaluation.json."""
        if not any(isinstance(c, Evaluation) for c in self.trainer.callbacks):
            raise ValueError(
                "guardrl validate: the config has no evaluation; add guardrl.callbacks.Evaluation (its "
                "prompts and metrics) or guardrl.callbacks.OverOptimizationWatch to trainer.callbacks "
                "(docs/evaluation.md)"
            )
        # one item per rank only starts the validation loop; the callbacks sample their own prompts
        # (the datamodule and `verbose` LightningCLI passes are not used: the callbacks print their table)
        with warnings.catch_warnings():
            # the run's checkpoint callback wrote its state into the checkpoint; an evaluation needs none
            warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used")
            self.trainer.validate(
                model, dataloaders=[[0]], ckpt_path=ckpt_path, verbose=False, weights_only=weights_only
            )

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        if self.subcommand == "validate":
            # an evaluation writes no checkpoint (the forced IterationCheckpoint is dropped below)
            config["enable_checkpointing"] = False
        if config.get("enable_checkpointing") is False:
            # Lightning refuses a ModelCheckpoint when checkpointing is off; the forced one goes quietly.
            callbacks = [c for c in callbacks if not isinstance(c, IterationCheckpoint)]
        user = config.get("callbacks") or []
        user = user if isinstance(user, list) else [user]
        # A user-listed callback of a forced type replaces the forced one (no double images, no two bars).
        forced = (GRPOProgressBar, ImageGridCallback, RunSummaryCallback)
        callbacks = [
            c for c in callbacks if not (isinstance(c, forced) and any(type(u) is type(c) for u in user))
        ]
        if config.get("enable_progress_bar") is False or any(isinstance(u, ProgressBar) for u in user):
            # Lightning refuses a progress bar with enable_progress_bar=False, and a second bar.
            callbacks = [c for c in callbacks if not isinstance(c, GRPOProgressBar)]
        plugins = config.get("plugins")
        plugins = (
            [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        )
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        config["plugins"] = plugins
        return super()._instantiate_trainer(config, callbacks)


class RunConfigSaver(SaveConfigCallback):
    """Writes `<log dir>/config.yaml` as a description of the run, not as a binding to it.

    `--ckpt_path last` fills in the checkpoint, the logger's version and TensorBoard's purge_step; a config
    saved with them would make the next `guardrl fit --config <that file> --model.optimizer.init_args.lr 1e-2`
    silently resume the old run in its own folder (and rewrite its files). They are left out here
    (runs.describe_run): a fit from a saved config starts a new version, and resuming is asked for on the
    command line. When a resumed run's options differ from the saved ones, the previous file is kept as
    `config.<k>.yaml` (nothing is lost)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        self.config = describe_run(self.config)
        # Trainer.log_dir broadcasts from rank zero: every rank must ask, or rank zero waits forever.
        log_dir = trainer.log_dir if self.save_to_log_dir else None
        if log_dir is not None and trainer.is_global_zero:
            path = os.path.join(log_dir, self.config_filename)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    previous = f.read()
                if previous != self.parser.dump(self.config, skip_none=False):
                    stem, ext = os.path.splitext(path)
                    k = 1
                    while os.path.exists(f"{stem}.{k}{ext}"):
                        k += 1
                    os.replace(path, f"{stem}.{k}{ext}")
        super().setup(trainer, pl_module, stage)


# Third-party warnings that every guardrl run triggers on purpose and that say nothing to act on; silenced
# here, at their one source, instead of teaching users to ignore warnings.
EXPECTED_WARNINGS = (
    # The frozen base model, text encoders, VAE and rewards run in eval mode by design (GRPOModule keeps the
    # policy in eval mode so that the update recomputes the rollout's mean exactly).
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # Lightning 2.6's own use of a torch.utils._pytree name deprecated in torch 2.13; nothing a user can
    # change.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # guardrl's own programmatic callers (the benchmarks, the toy learning runs) pass `args` on purpose while
    # their process has its own command line; Lightning's warning would dump the whole 4 KB config.
    r"LightningCLI's args parameter is intended to run from within Python",
    # GRPOModule.validation_step exists for `guardrl validate` only; fit has no validation loop by design.
    r"You defined a `validation_step` but have no `val_dataloader`",
)


def _drop_log_message(logger_name: str, prefix: str) -> None:
    """Lightning's advertisement for its cloud logger at every start (rank_zero_info) says nothing about the
    run."""
    logger = logging.getLogger(logger_name)
    if not any(getattr(f, "guardrl_prefix", None) == prefix for f in logger.filters):

        def keep(record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith(prefix)

        keep.guardrl_prefix = prefix  # type: ignore[attr-defined]
        logger.addFilter(keep)


def main(args: list[str] | dict | None = None, run: bool = True) -> GuardRLCLI:
    import warnings

    check_lightning_cli_hooks()  # the private hooks GuardRLCLI overrides still exist (guardrl/compat.py)
    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    _drop_log_message("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging")
    # Field docstrings of the option dataclasses become --help text.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    return GuardRLCLI(
        GRPOModule,
        PromptDataModule,
        args=args,
        run=run,
        auto_configure_optimizers=False,
        # Resuming into the run's own directory rewrites config.yaml (keeping a differing previous one)
        # instead of refusing to start; a new run into a taken folder is refused earlier
        # (refuse_taken_run_folder).
        save_config_callback=RunConfigSaver,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":  # pragma: no cover - `python -m guardrl.cli` works like the console script
    from guardrl.console import console_main

    console_main()
