"""GracefulShutdown: on SIGTERM, Ctrl-C (SIGINT) or the cluster's requeue signal, finish the current GRPO
iteration, save a checkpoint, say where, and exit cleanly; under SLURM, requeue the job so it resumes with
`--ckpt_path last`. A second Ctrl-C aborts at once, without saving (the last checkpoint on disk stays valid:
writes are atomic).

Why not Lightning's own SLURM handling: it saves an `hpc_ckpt_*.ckpt` mid-iteration from inside the signal
handler (for SIGUSR1 under SLURMEnvironment only) and ignores SIGTERM outside SLURM. Here the handler only
sets a flag; the save happens at the next iteration boundary, on every rank at once, through the same
atomic IterationCheckpoint as any other save, so a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback

from guardrl.checkpointing import find_iteration_checkpoint

log = logging.getLogger(__name__)


class GracefulShutdown(Callback):
    def __init__(self, signals: Optional[list[str]] = None, requeue_on_slurm: bool = True) -> None:
        """
        Args:
            signals: signal names that request a checkpoint-and-exit (default SIGTERM, SIGUSR1 and SIGINT;
                SLURM's `--signal=USR1@120` sends SIGUSR1 ahead of the time limit, schedulers send SIGTERM on
                preemption, Ctrl-C sends SIGINT).
            requeue_on_slurm: after the checkpoint, `scontrol requeue $SLURM_JOB_ID` when running under SLURM.
        """
        names = ["SIGTERM", "SIGUSR1", "SIGINT"] if signals is None else list(signals)
        valid = sorted(s.name for s in signal.Signals)
        for name in names:
            if name not in valid or name in ("SIGKILL", "SIGSTOP"):
                raise ValueError(
                    f"graceful_shutdown.signals: {name!r} is not a signal that can be caught; use names "
                    "such as 'SIGTERM', 'SIGUSR1', 'SIGUSR2', 'SIGINT'"
                )
        self.signals = names
        self.requeue_on_slurm = requeue_on_slurm
        self.requested: Optional[str] = None
        self._previous_handlers: dict[int, Any] = {}

    # ----- handlers: install for the duration of training only
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.requested = None
        if not _is_main_thread():
            return
        for name in self.signals:
            number = signal.Signals[name]
            # Replaces Lightning's SIGTERM/SIGUSR1 handlers as well; they are put back when training ends.
            self._previous_handlers[number] = signal.signal(number, self._on_signal)

    def _on_signal(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if self.requested is not None:
            if name == "SIGINT":
                # A second Ctrl-C: the user wants out now. Lightning handles the KeyboardInterrupt (no save).
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            return
        self.requested = name
        more = " (Ctrl-C again to abort at once, without saving)" if name == "SIGINT" else ""
        sys.stderr.write(
            f"\nguardrl: {name} received; finishing this iteration, then saving a checkpoint and "
            f"stopping{more}\n"
        )
        sys.stderr.flush()

    def _restore_handlers(self) -> None:
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()

    # ----- at each iteration boundary: did any rank get a signal?
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        # Every rank must take part: the signal may reach only some ranks (or reach them at different times).
        requested = trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False)
        if not requested:
            return
        reason = self.requested or "a signal on another rank"
        checkpoint = find_iteration_checkpoint(trainer)
        if checkpoint is not None:
            checkpoint.save_now(trainer)
        trainer.should_stop = True
        if trainer.is_global_zero:
            where = checkpoint.last_model_path if checkpoint is not None else "nowhere (checkpointing is off)"
            log.warning(
                "guardrl: %s received; stopping after iteration %d, checkpoint saved to %s",
                reason,
                getattr(pl_module, "num_iterations", -1),
                where,
            )
        if self.requeue_on_slurm and trainer.is_global_zero and "SLURM_JOB_ID" in os.environ:
            _requeue(os.environ["SLURM_JOB_ID"])


def _requeue(job_id: str) -> None:
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode == 0:
        log.warning("guardrl: requeued SLURM job %s", job_id)
    else:
        log.error(
            "guardrl: `scontrol requeue %s` failed (%s): %s", job_id, result.returncode, result.stderr.strip()
        )


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
