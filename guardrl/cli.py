"""The `guardrl` command: LightningCLI over GRPOModule and PromptDataModule.

    guardrl fit --config configs/tiny/grpo_guard.yaml [--model.grpo.clip_range 1e-5] [--ckpt_path ...]
    guardrl fit --config configs/tiny/grpo_guard.yaml --print_config
    guardrl fit --config configs/tiny/grpo_guard.yaml --ckpt_path last      # resume the newest run in place

Every run gets these callbacks whatever the config says (their options are top-level groups):
`ratio_stats` (RatioStatsCallback), `checkpoint` (IterationCheckpoint, atomic writes),
`graceful_shutdown` (checkpoint and exit on SIGTERM/SIGUSR1), `image_grid` (sample grids per prompt group),
`run_summary` (the config as text at the start) and `progress_bar` (iteration, reward, clip fraction).
See docs/reliability.md for resuming and docs/analysis.md for reading the logs.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from jsonargparse import ActionConfigFile, Namespace, set_parsing_settings
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO

from guardrl.callbacks import (
    GracefulShutdown,
    GRPOProgressBar,
    ImageGridCallback,
    RatioStatsCallback,
    RunSummaryCallback,
)
from guardrl.checkpointing import AtomicCheckpointIO, IterationCheckpoint
from guardrl.suggestions import did_you_mean
from guardrl.data import PromptDataModule
from guardrl.module import GRPOModule
from guardrl.sharding import DISTRIBUTED_METADATA, is_checkpoint

log = logging.getLogger(__name__)


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
        # Only `fit`: GRPOModule has no validation/test/predict step, and offering those subcommands would let
        # a user run one and fail deep inside Lightning. (Evaluation of a checkpoint is a planned addition.)
        return {"fit": LightningCLI.subcommands()["fit"]}

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
        # After the ones above: callbacks run in this order, and the bar shows this iteration's clip fractions.
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

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
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
    silently resume the old run in its own folder (and rewrite its files). They are left out here: a fit from a
    saved config starts a new version, and resuming is asked for on the command line. When a resumed run's
    options differ from the saved ones, the previous file is kept as `config.<k>.yaml` (nothing is lost)."""

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


def describe_run(config: Namespace) -> Namespace:
    """The config without what binds it to one run folder: ckpt_path, the logger's version and purge_step."""
    config = config.clone()
    if "ckpt_path" in config:
        config["ckpt_path"] = None
    logger = _tensorboard_logger_args(config)
    if logger is not None:
        for key in ("version", "purge_step"):
            if key in logger:
                logger[key] = None
    return config


def refuse_taken_run_folder(config: Namespace) -> None:
    """A new (not resumed) run must not write into a folder that holds another run: with an explicit logger
    version pointing at an existing run, Lightning would append to its events, rewrite its config.yaml and
    replace its checkpoints."""
    if config.get("ckpt_path") is not None:
        return
    logger = _tensorboard_logger_args(config)
    if logger is None or logger.get("version") is None:
        return
    version = logger.get("version")
    folder = os.path.join(_run_dir(logger), version if isinstance(version, str) else f"version_{version}")
    taken = [name for name in ("config.yaml", "checkpoints") if os.path.exists(os.path.join(folder, name))]
    if taken:
        raise ValueError(
            f"trainer.logger.init_args.version={version!r}: {folder} holds another run ({', '.join(taken)}); a new "
            "run there would overwrite it. Leave the version unset (a new run gets the next free version_N), or "
            "resume that run with --ckpt_path last"
        )


def resolve_resume(config: Namespace) -> None:
    """`--ckpt_path last` and resuming into the run's own directory.

    Lightning resolves "last" in the checkpoint directory of the *new* logger version, where there is none, and
    starts over. Here "last" means the newest `last.ckpt` of this run name (or of checkpoint.dirpath), and the
    logger reuses the version folder the checkpoint lives in, with TensorBoard told to drop the events the
    interrupted run wrote after its checkpoint (purge_step), so every curve has one value per iteration.
    """
    ckpt_path: Optional[str] = config.get("ckpt_path")
    if ckpt_path is None:
        return
    logger = _tensorboard_logger_args(config)
    if ckpt_path == "last":
        ckpt_path = _find_last_checkpoint(config, logger)
        config["ckpt_path"] = ckpt_path
        if ckpt_path is None:
            return
        log.warning("guardrl: --ckpt_path last resolved to %s", ckpt_path)
    elif not is_checkpoint(ckpt_path):
        raise ValueError(
            f"ckpt_path={ckpt_path!r}: no such file; pass a .ckpt file written by guardrl (a directory with "
            f"{DISTRIBUTED_METADATA} under FSDP2), or 'last' for the newest last.ckpt of this run"
        )
    iterations = _iterations_in(ckpt_path)  # also refuses a file that is not a readable guardrl checkpoint
    if logger is None:
        return
    version = _version_of(ckpt_path, logger)
    if version is not None and logger.get("version") is None:
        logger["version"] = version
    if version is not None and logger.get("version") == version:
        logger["purge_step"] = iterations


def _tensorboard_logger_args(config: Namespace) -> Optional[Namespace]:
    logger = config.get("trainer.logger")
    if isinstance(logger, Namespace) and str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
        return logger.init_args
    return None


def _run_dir(logger: Namespace) -> str:
    return os.path.join(logger.get("save_dir") or "runs", logger.get("name") or "")


def _find_last_checkpoint(config: Namespace, logger: Optional[Namespace]) -> Optional[str]:
    dirpath = config.get("checkpoint.dirpath")
    if dirpath:
        candidates = [os.path.join(dirpath, "last.ckpt")]
        where = dirpath
    elif logger is not None:
        pattern = os.path.join(_run_dir(logger), "version_*", "checkpoints", "last.ckpt")
        # Every version's checkpoint folder, not only those holding a last.ckpt: a sharded one whose replacement
        # was killed between its two renames is missing until is_checkpoint below restores it.
        folders = glob.glob(os.path.dirname(pattern))
        candidates = sorted(
            (os.path.join(folder, "last.ckpt") for folder in folders),
            key=lambda p: _version_number(p) or -1,
            reverse=True,
        )
        where = pattern
    else:
        raise ValueError(
            "ckpt_path='last' needs checkpoint.dirpath or a TensorBoardLogger (trainer.logger) to know where the "
            "run's checkpoints are"
        )
    found = next((p for p in candidates if is_checkpoint(p)), None)
    if found is None:
        log.warning("guardrl: --ckpt_path last: no checkpoint at %s; starting a fresh run", where)
    return found


_VERSION_DIR = re.compile(r"^version_(\d+)$")


def _version_number(ckpt_path: str) -> Optional[int]:
    match = _VERSION_DIR.match(os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path)))))
    return int(match.group(1)) if match else None


def _version_of(ckpt_path: str, logger: Namespace) -> Optional[int]:
    """N when the checkpoint is `<save_dir>/<name>/version_N/checkpoints/*.ckpt` of this logger."""
    version_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path)))
    if os.path.dirname(version_dir) != os.path.abspath(_run_dir(logger)):
        return None
    return _version_number(ckpt_path)


def _iterations_in(ckpt_path: str) -> int:
    """The checkpoint's GRPO iteration count; a ValueError naming the file when it is not a readable guardrl
    checkpoint (truncated, another format, another program's): torch's own message would advise
    weights_only=False, which must never be the answer to a damaged file."""
    path = os.path.join(ckpt_path, DISTRIBUTED_METADATA) if os.path.isdir(ckpt_path) else ckpt_path
    try:
        # mmap: reads the small counters without pulling the weights into memory.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any failure to read means the same thing to the user
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"ckpt_path={ckpt_path!r} is not a readable guardrl checkpoint ({type(error).__name__}: {reason}); it "
            "may be truncated or another program's file. Pass a .ckpt written by guardrl fit, or 'last' for the "
            "newest complete last.ckpt of this run"
        ) from None
    if not isinstance(checkpoint, dict) or "guardrl" not in checkpoint:
        raise ValueError(
            f"ckpt_path={ckpt_path!r} is not a guardrl checkpoint (no 'guardrl' entry with counters and RNG "
            "states); pass a .ckpt written by guardrl fit, or 'last' for the newest last.ckpt of this run"
        )
    return int(checkpoint["guardrl"].get("num_iterations", 0))


# Third-party warnings that every guardrl run triggers on purpose and that say nothing to act on; silenced here,
# at their one source, instead of teaching users to ignore warnings.
EXPECTED_WARNINGS = (
    # The frozen base model, text encoders, VAE and rewards run in eval mode by design (GRPOModule keeps the
    # policy in eval mode so that the update recomputes the rollout's mean exactly).
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # Lightning 2.6's own use of a torch.utils._pytree name deprecated in torch 2.13; nothing a user can change.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # guardrl's own programmatic callers (python -m guardrl.export, the benchmarks) pass `args` on purpose while
    # their process has its own command line; Lightning's warning would dump the whole 4 KB config.
    r"LightningCLI's args parameter is intended to run from within Python",
)


def _drop_log_message(logger_name: str, prefix: str) -> None:
    """Lightning's advertisement for its cloud logger at every start (rank_zero_info) says nothing about the run."""
    logger = logging.getLogger(logger_name)
    if not any(getattr(f, "guardrl_prefix", None) == prefix for f in logger.filters):

        def keep(record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith(prefix)

        keep.guardrl_prefix = prefix  # type: ignore[attr-defined]
        logger.addFilter(keep)


def main(args: list[str] | dict | None = None, run: bool = True) -> GuardRLCLI:
    import warnings

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
        # Resuming into the run's own directory rewrites config.yaml (keeping a differing previous one) instead
        # of refusing to start; a new run into a taken folder is refused earlier (refuse_taken_run_folder).
        save_config_callback=RunConfigSaver,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":  # pragma: no cover - `python -m guardrl.cli` works like the console script
    from guardrl.console import console_main

    console_main()
