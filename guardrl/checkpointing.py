"""Checkpoints per GRPO iteration, written atomically.

`IterationCheckpoint` is Lightning's ModelCheckpoint counted in GRPO iterations instead of optimizer steps
(one iteration takes several), with a `save_now` for the preemption handler and a final save when training
stops. `AtomicCheckpointIO` writes each file to a temporary name in the same directory, fsyncs it, and
renames it over the target: a kill at any moment leaves either the previous complete file or the new
complete file, never a truncated one that looks valid.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

_log = logging.getLogger("guardrl.module")


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to `<dir>/.<name>.tmp-*`, fsync, os.replace onto the target, fsync the directory."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"AtomicCheckpointIO.save_checkpoint got storage_options={storage_options!r}; it takes none"
            )
        path = os.fspath(path)
        if not isinstance(get_filesystem(path), type(get_filesystem("/"))):
            # Remote filesystems (s3://...) have their own atomic object writes.
            return super().save_checkpoint(checkpoint, path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=directory)
        try:
            # mkstemp makes the file 0600; a checkpoint is readable like every other file the run writes.
            os.chmod(temporary, default_file_mode())
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
        fsync_directory(directory)


def default_file_mode() -> int:
    """The mode a plain open() would give a new file under the process's umask (0644 with umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_directory(directory: str) -> None:
    # Makes the rename itself durable (POSIX); not possible on every platform.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class IterationCheckpoint(ModelCheckpoint):
    def __init__(
        self,
        dirpath: Optional[str] = None,
        filename: str = "{iteration}",
        every_n_iterations: int = 10,
        every_n_minutes: Optional[float] = None,
        save_last: bool = True,
        save_top_k: int = 1,
        monitor: Optional[str] = None,
        mode: str = "min",
        verbose: bool = False,
    ) -> None:
        """
        Args:
            dirpath: where checkpoints go; None: `<log dir>/checkpoints` of the run's logger version.
            filename: name pattern of the periodic checkpoints (`{iteration}` gives `iteration=12.ckpt`).
            every_n_iterations: save after every this many GRPO iterations (and always when training stops).
            every_n_minutes: also save after the first iteration that ends at least this many minutes
                after the last save (rank zero's clock decides for all ranks), so an unplanned kill of a
                large run costs minutes, not `every_n_iterations` iterations; None: iterations only.
            save_last: also keep `last.ckpt`, the newest state (what `--ckpt_path last` resumes from).
            save_top_k: periodic checkpoints kept: -1 all, 1 the newest (with monitor, the best k).
            monitor: a logged scalar to rank checkpoints by (e.g. `reward/mean` with mode max); None: by time.
            mode: "min" or "max" for monitor.
            verbose: print a line per save.
        """
        if not isinstance(every_n_iterations, int) or every_n_iterations < 1:
            raise ValueError(
                f"checkpoint.every_n_iterations must be an integer >= 1, got {every_n_iterations!r}"
            )
        if every_n_minutes is not None and not (
            isinstance(every_n_minutes, (int, float))
            and not isinstance(every_n_minutes, bool)
            and every_n_minutes > 0
        ):
            raise ValueError(
                f"checkpoint.every_n_minutes must be a number > 0 or null, got {every_n_minutes!r}"
            )
        if monitor is None and save_top_k not in (-1, 0, 1):
            raise ValueError(
                f"checkpoint.save_top_k={save_top_k} needs checkpoint.monitor to rank by; without a monitor "
                "use -1 (keep all), 0 (only last.ckpt) or 1 (the newest)"
            )
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            mode=mode,
            save_last=save_last,
            save_top_k=save_top_k,
            every_n_train_steps=0,
            every_n_epochs=0,
            save_on_train_epoch_end=True,
            verbose=verbose,
            # `last.ckpt` is always the newest state, never `last-v1.ckpt`: `--ckpt_path last` relies on it.
            enable_version_counter=False,
        )
        self.every_n_iterations = every_n_iterations
        self.every_n_minutes = every_n_minutes
        self._last_iteration_saved: Optional[int] = None
        self._last_save_time = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # The state training starts from is on disk already (a fresh run's iteration 0 is never saved; a
        # resumed run's is its checkpoint): a run that stops before another iteration finishes must not
        # rewrite it. The restored `last_iteration_saved` cannot say so: it was captured before its own save
        # finished.
        self._last_iteration_saved = getattr(pl_module, "num_iterations", 0)
        self._last_save_time = time.monotonic()

    # Lightning's step-based triggers are off (every_n_train_steps=0, every_n_epochs=0); these replace them.
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        iteration = getattr(pl_module, "num_iterations", 0)
        due = iteration % self.every_n_iterations == 0
        if self.every_n_minutes is not None:
            # One clock for all ranks: a save is a collective under FSDP2, so every rank must agree.
            late = time.monotonic() - self._last_save_time >= 60.0 * self.every_n_minutes
            due = bool(trainer.strategy.broadcast(due or late))
        if due:
            self.save_now(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_now(trainer)  # training stopped (max_iterations, a signal, or the end of a finite stream)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_now(trainer)

    def save_now(self, trainer: L.Trainer) -> None:
        """Save the periodic and the last checkpoint now, once per iteration. Call on every rank."""
        from lightning.pytorch.trainer.states import TrainerFn

        iteration = getattr(trainer.lightning_module, "num_iterations", 0)
        if (
            iteration == 0
            or iteration == self._last_iteration_saved
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or bool(trainer.fast_dev_run)
        ):
            return
        candidates = self._monitor_candidates(trainer)
        # ModelCheckpoint skips a save when no optimizer step happened since the last one; an iteration whose
        # update was skipped still moved the prompt stream and counters, so it is saved.
        self._last_global_step_saved = -1
        self._save_topk_checkpoint(trainer, candidates)
        self._last_global_step_saved = -1
        # After the periodic file, so that last.ckpt records it as the newest (Lightning's order). A kill
        # between the two writes leaves last.ckpt one save older: resuming then repeats those iterations,
        # exactly.
        self._save_last_checkpoint(trainer, candidates)
        self._last_iteration_saved = iteration
        self._last_save_time = time.monotonic()

    def _monitor_candidates(self, trainer: L.Trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        candidates["iteration"] = torch.tensor(getattr(trainer.lightning_module, "num_iterations", 0))
        return candidates

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_iteration_saved": self._last_iteration_saved}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._last_iteration_saved = state_dict.get("last_iteration_saved")


def find_iteration_checkpoint(trainer: L.Trainer) -> Optional[IterationCheckpoint]:
    for callback in trainer.callbacks:
        if isinstance(callback, IterationCheckpoint):
            return callback
    return None


class TrainableStateCheckpointing:
    """The checkpoint format of GRPOModule (a mixin of it; FSDP2Strategy and `guardrl.export` use the public
    methods too).

    A checkpoint keeps only what training changed (the policy's adapters and snapshots, or with full
    fine-tuning the transformer and its old/EMA copies: `FlowPolicy.is_trainable_state_key`); the frozen base
    weights are re-loaded from the pretrained model. Beside the weights, `checkpoint["guardrl"]` holds the
    counters that shape the rest of the run and every rank's RNG states, which is what makes resume exact.
    """

    def is_trainable_key(self, key: str) -> bool:
        """Whether a key of the module's state_dict belongs in a checkpoint."""
        prefix = "policy."
        return key.startswith(prefix) and self.policy.is_trainable_state_key(key[len(prefix) :])

    def check_checkpoint_state(self, saved: dict[str, torch.Tensor]) -> None:
        """Loading is not strict (frozen weights are not saved), so check the trainable part here: a
        checkpoint of another LoRA rank, target list or backbone would otherwise load partly and silently."""
        expected = {
            key: value.shape for key, value in self.state_dict().items() if self.is_trainable_key(key)
        }
        missing = sorted(set(expected) - set(saved))
        unexpected = sorted(set(saved) - set(expected))
        mismatched = sorted(
            k for k in set(expected) & set(saved) if tuple(saved[k].shape) != tuple(expected[k])
        )
        if not (missing or unexpected or mismatched):
            return

        def show(keys):
            return f"{len(keys)} (e.g. {keys[:2]})" if keys else "0"

        detail = ""
        if mismatched:
            key = mismatched[0]
            detail = f"; {key}: checkpoint {tuple(saved[key].shape)} vs model {tuple(expected[key])}"
        raise ValueError(
            "ckpt_path: the checkpoint's trainable weights do not fit this model: missing "
            f"{show(missing)}, unexpected {show(unexpected)}, shape-mismatched {show(mismatched)}{detail}. "
            "Resume with the model.backbone and model.lora (rank, target_modules) the run was trained with."
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from guardrl.rng import capture_rng_states_of_all_ranks

        checkpoint["state_dict"] = {
            key: value for key, value in checkpoint["state_dict"].items() if self.is_trainable_key(key)
        }
        checkpoint["guardrl"] = {
            "num_iterations": self.num_iterations,
            "stream_position": self.stream_position,
            **self.skipped_updates.state_dict(),
            "num_optimizer_steps": int(self.trainer.global_step) if self._trainer is not None else 0,
            "rng": capture_rng_states_of_all_ranks(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "guardrl" not in checkpoint:
            raise ValueError(
                "ckpt_path: this checkpoint was not written by guardrl's GRPOModule (no 'guardrl' entry with "
                "counters and RNG states); resume from a checkpoint of a guardrl run"
            )
        if (
            "state_dict" in checkpoint
        ):  # a sharded checkpoint's weights were checked and loaded by FSDP2Strategy
            self.check_checkpoint_state(checkpoint["state_dict"])
        state = checkpoint["guardrl"]
        self.num_iterations = state["num_iterations"]
        self.stream_position = state["stream_position"]
        self.skipped_updates.load_state_dict(state)
        self._rng_to_restore = state.get("rng")  # restored in on_train_start, after everything that draws
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "start_position"):
            datamodule.start_position = self.stream_position

    def stop_if_finished(self) -> None:
        """At train start: a finished run resumed with the same budget (a requeue wrapper that always passes
        --ckpt_path last) runs no iteration and rewrites no checkpoint; RunSummaryCallback says how to extend
        it."""
        if self.max_iterations is None or self.num_iterations < self.max_iterations:
            return
        self.trainer.should_stop = True
        if self.trainer.is_global_zero:
            _log.warning(
                "guardrl: the checkpoint is at iteration %d and model.max_iterations=%d: the run is "
                "complete, nothing to do (raise --model.max_iterations to train further)",
                self.num_iterations,
                self.max_iterations,
            )

    def restore_rng_states(self) -> None:
        """At train start, after everything else that may draw: this rank's RNG states from the checkpoint."""
        from guardrl.rng import restore_rng_state_of_rank

        if self._rng_to_restore is None:
            return
        restored = restore_rng_state_of_rank(self._rng_to_restore, self.global_rank, self.trainer.world_size)
        if not restored and self.trainer.is_global_zero:
            _log.warning(
                "guardrl: the checkpoint holds RNG states of %d ranks but this run has %d; the global RNGs "
                "are not restored (rollout noise does not depend on them; LoRA dropout does)",
                len(self._rng_to_restore),
                self.trainer.world_size,
            )
        self._rng_to_restore = None
