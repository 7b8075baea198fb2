"""Run folders and saved run configs: what `guardrl fit` (guardrl/cli.py) and `python -m guardrl.export`
(guardrl/export.py) both need to know about a run, without either importing the other.

- `describe_run`: a config without what binds it to one run folder (what config.yaml holds).
- `refuse_taken_run_folder`: a new run never writes into another run's version folder.
- `resolve_resume`: `--ckpt_path last` and resuming into the run's own version folder.
- `build_model`: a run's GRPOModule rebuilt from its saved config.yaml (its weights then come from a
  checkpoint).

A run folder is `<save_dir>/<name>/version_N/` of its TensorBoardLogger, with `config.yaml` and
`checkpoints/last.ckpt` in it (docs/reliability.md).
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

import torch
from jsonargparse import Namespace

from guardrl.sharding import DISTRIBUTED_METADATA, is_checkpoint

if TYPE_CHECKING:  # pragma: no cover
    from guardrl.module import GRPOModule

log = logging.getLogger(__name__)


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
            f"trainer.logger.init_args.version={version!r}: {folder} holds another run ({', '.join(taken)}); "
            "a new run there would overwrite it. Leave the version unset (a new run gets the next free "
            "version_N), or resume that run with --ckpt_path last"
        )


def resolve_resume(config: Namespace) -> None:
    """`--ckpt_path last` and resuming into the run's own directory.

    Lightning resolves "last" in the checkpoint directory of the *new* logger version, where there is none,
    and starts over. Here "last" means the newest `last.ckpt` of this run name (or of checkpoint.dirpath), and
    the logger reuses the version folder the checkpoint lives in, with TensorBoard told to drop the events the
    interrupted run wrote after its checkpoint (purge_step), so every curve has one value per iteration.
    """
    ckpt_path: Optional[str] = config.get("ckpt_path")
    if ckpt_path is None:
        return
    logger = _tensorboard_logger_args(config)
    if ckpt_path == "last":
        ckpt_path = find_last_checkpoint(config, logger)
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


def resolve_checkpoint_to_evaluate(config: Namespace) -> None:
    """`guardrl validate --ckpt_path`: a guardrl checkpoint file, or 'last' (the newest last.ckpt of this run,
    as for fit), or none (the base model). The evaluation logs to a new version folder, not the run's."""
    ckpt_path: Optional[str] = config.get("ckpt_path")
    if ckpt_path is None:
        return
    if ckpt_path == "last":
        found, where = _last_checkpoint(config, _tensorboard_logger_args(config))
        if found is None:
            raise ValueError(
                f"ckpt_path='last': this run has no checkpoint yet (none at {where}); pass a .ckpt file, or "
                "leave ckpt_path unset to evaluate the base model"
            )
        config["ckpt_path"] = ckpt_path = found
        log.warning("guardrl: --ckpt_path last resolved to %s", ckpt_path)
    elif not is_checkpoint(ckpt_path):
        raise ValueError(
            f"ckpt_path={ckpt_path!r}: no such file; pass a .ckpt file written by guardrl (a directory with "
            f"{DISTRIBUTED_METADATA} under FSDP2), or 'last' for the newest last.ckpt of this run"
        )
    _iterations_in(ckpt_path)  # refuses a file that is not a readable guardrl checkpoint


def find_last_checkpoint(config: Namespace, logger: Optional[Namespace]) -> Optional[str]:
    """The newest complete `last.ckpt` in checkpoint.dirpath, else in the logger's version folders; None (with
    a warning) when there is none. A ValueError when the config says neither where to look."""
    found, where = _last_checkpoint(config, logger)
    if found is None:
        log.warning("guardrl: --ckpt_path last: no checkpoint at %s; starting a fresh run", where)
    return found


def _last_checkpoint(config: Namespace, logger: Optional[Namespace]) -> tuple[Optional[str], str]:
    """(the newest complete last.ckpt or None, where it looked)."""
    dirpath = config.get("checkpoint.dirpath")
    if dirpath:
        candidates = [os.path.join(dirpath, "last.ckpt")]
        where = dirpath
    elif logger is not None:
        pattern = os.path.join(_run_dir(logger), "version_*", "checkpoints", "last.ckpt")
        # Every version's checkpoint folder, not only those holding a last.ckpt: a sharded one whose
        # replacement was killed between its two renames is missing until is_checkpoint below restores it.
        folders = glob.glob(os.path.dirname(pattern))
        candidates = sorted(
            (os.path.join(folder, "last.ckpt") for folder in folders),
            key=lambda p: _version_number(p) or -1,
            reverse=True,
        )
        where = pattern
    else:
        raise ValueError(
            "ckpt_path='last' needs checkpoint.dirpath or a TensorBoardLogger (trainer.logger) to know where "
            "the run's checkpoints are"
        )
    return next((p for p in candidates if is_checkpoint(p)), None), where


def build_model(settings: Mapping[str, Any]) -> GRPOModule:
    """The GRPOModule a run's saved config describes (`settings`: its config.yaml as loaded by yaml), with
    freshly initialised trainable weights: call `configure_model()`, then load a checkpoint's state.

    Parsed like `guardrl fit` parses it (guardrl/cli.py): the `model` options against GRPOModule's signature,
    with `model.group_size` taken from `data.group_size` (the CLI links the two, so a saved config holds only
    the latter). Nothing else is built: no trainer, logger, data or callbacks, and no run folder is touched.
    A ValueError when the options do not make a model.
    """
    from jsonargparse import ArgumentError
    from lightning.pytorch.cli import LightningArgumentParser

    from guardrl.module import GRPOModule

    model = settings.get("model")
    if not isinstance(model, Mapping):
        raise ValueError(
            f"the run's config has no `model` options (got {type(model).__name__}); use the config.yaml that "
            "guardrl fit wrote in the run's version folder"
        )
    model = dict(model)
    data = settings.get("data")
    if isinstance(data, Mapping) and isinstance(data.get("init_args"), Mapping):
        data = data["init_args"]  # a hand-written `data: {class_path: ..., init_args: ...}`
    if isinstance(data, Mapping) and data.get("group_size") is not None:
        model["group_size"] = data["group_size"]
    # What LightningCLI does with the model class it is given (subclass_mode_model=False).
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(GRPOModule, "model")
    try:
        config = parser.parse_object({"model": model})
    except ArgumentError as error:
        raise ValueError(f"the run's model options do not build a GRPOModule: {error}") from None
    # As `guardrl` does before it builds anything (guardrl.cli.main).
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    return parser.instantiate_classes(config).model


def _tensorboard_logger_args(config: Namespace) -> Optional[Namespace]:
    logger = config.get("trainer.logger")
    if isinstance(logger, Namespace) and str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
        return logger.init_args
    return None


def _run_dir(logger: Namespace) -> str:
    return os.path.join(logger.get("save_dir") or "runs", logger.get("name") or "")


_VERSION_DIR = re.compile(r"^version_(\d+)$")


def _version_number(ckpt_path: str) -> Optional[int]:
    version_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path)))
    match = _VERSION_DIR.match(os.path.basename(version_dir))
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
            f"ckpt_path={ckpt_path!r} is not a readable guardrl checkpoint "
            f"({type(error).__name__}: {reason}); it may be truncated or another program's file. "
            "Pass a .ckpt written by guardrl fit, or 'last' for the newest complete last.ckpt of this run"
        ) from None
    if not isinstance(checkpoint, dict) or "guardrl" not in checkpoint:
        raise ValueError(
            f"ckpt_path={ckpt_path!r} is not a guardrl checkpoint (no 'guardrl' entry with counters and RNG "
            "states); pass a .ckpt written by guardrl fit, or 'last' for the newest last.ckpt of this run"
        )
    return int(checkpoint["guardrl"].get("num_iterations", 0))
