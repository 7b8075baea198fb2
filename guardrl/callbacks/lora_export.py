"""LoraExport: write the trained LoRA in diffusers format during and after training (guardrl/export.py)."""

from __future__ import annotations

import os
from typing import Optional

import lightning as L
from lightning.pytorch.callbacks import Callback

from guardrl.export import EXPORTABLE_WEIGHTS, lora_state_dict, write_lora


class LoraExport(Callback):
    def __init__(
        self, dirpath: Optional[str] = None, every_n_iterations: Optional[int] = None, weights: str = "policy"
    ) -> None:
        """
        Args:
            dirpath: where the exports go; None: `<log dir>/lora`. Each export is a folder that
                `pipe.load_lora_weights(folder)` reads: `iteration=<i>/` on the cadence, `final/` at the end.
            every_n_iterations: also export every this many GRPO iterations; None: only at the end.
            weights: "policy" (the trained adapter) or "ema".
        """
        if every_n_iterations is not None and (
            not isinstance(every_n_iterations, int) or every_n_iterations < 1
        ):
            raise ValueError(
                f"LoraExport.every_n_iterations must be an integer >= 1 or null, got {every_n_iterations!r}"
            )
        if weights not in EXPORTABLE_WEIGHTS:
            raise ValueError(f"LoraExport.weights={weights!r}: must be one of {EXPORTABLE_WEIGHTS}")
        self.dirpath = dirpath
        self.every_n_iterations = every_n_iterations
        self.weights = weights

    def _root(self, trainer: L.Trainer) -> str:
        if self.dirpath is not None:
            return self.dirpath
        return os.path.join(trainer.log_dir or trainer.default_root_dir, "lora")

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> None:
        # Every rank asks for the directory: Trainer.log_dir broadcasts from rank zero, and a rank-zero-only
        # call would leave rank zero waiting for ranks that have moved on. Every rank gathers the adapter too
        # (under FSDP2 it is sharded and gathering is a collective); rank zero alone writes.
        root = self._root(trainer)
        state = lora_state_dict(pl_module.policy, self.weights)
        if trainer.is_global_zero:
            write_lora(pl_module.policy, state, os.path.join(root, name))
        trainer.strategy.barrier()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        iteration = pl_module.num_iterations
        if self.every_n_iterations is not None and iteration % self.every_n_iterations == 0:
            self._export(trainer, pl_module, f"iteration={iteration}")

    def on_train_end(self, trainer, pl_module) -> None:
        self._export(trainer, pl_module, "final")
