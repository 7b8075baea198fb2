"""GRPOProgressBar: a tqdm bar counted in GRPO iterations, showing the reward and the clip fractions.

Lightning's bar counts batches of an epoch ("Epoch 0: 7it") and shows v_num; in guardrl one batch is one
GRPO iteration, the prompt stream is endless (one epoch) and the run stops at model.max_iterations, so
the bar shows instead

    GRPO iteration:  60%|██████    | 6/10 [00:41<00:27, reward=-12.9, clip=0.125, clip+=0.0833, clip-=0.167]

reward  reward/mean (the proxy reward) of the last iteration
clip    mean over the iteration's trained steps k and both signs of clip/frac_pos_upper_t{k} and
        clip/frac_neg_lower_t{k}; clip+ and clip- are the two signs on their own (their gap is what the
        GRPO-Guard paper diagnoses)

Values are read from trainer.callback_metrics, where guardrl writes every scalar it logs (guardrl.logs).
"""

from __future__ import annotations

import re
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

_CLIP_TAG = re.compile(r"^clip/frac_(pos_upper|neg_lower)_t(\d+)$")


class GRPOProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False) -> None:
        """
        Args:
            refresh_rate: redraw every this many GRPO iterations.
            process_position: the bar's line, when several processes draw bars.
            leave: keep the finished bar on screen.
        """
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        # The steps k trained in the last iteration: with timestep sub-sampling the other steps' clip
        # fractions in callback_metrics are from an older iteration and must not be averaged in.
        self._trained_steps: set[int] | None = None

    @property
    def train_description(self) -> str:
        return "GRPO iteration"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._count_iterations(pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        self._count_iterations(pl_module)

    def _count_iterations(self, pl_module: L.LightningModule) -> None:
        bar = self.train_progress_bar
        bar.reset()
        # Set, not passed to reset(): reset(total=None) would keep the old total. None: an open "n/?" bar.
        bar.total = getattr(pl_module, "max_iterations", None)
        # A resumed run starts at its checkpoint's iteration, not at 0.
        bar.initial = bar.n = getattr(pl_module, "num_iterations", 0)
        bar.set_description(self.train_description)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx
    ) -> None:
        # Callbacks listed after this one (RatioStatsCallback, when this bar comes from --trainer.callbacks)
        # wrote their metrics after our on_train_batch_end: show them while the next iteration runs.
        self._show_metrics(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        if isinstance(outputs, dict) and outputs.get("step_stats") is not None:
            self._trained_steps = {stats.step_index for stats in outputs["step_stats"]}
        n = getattr(pl_module, "num_iterations", batch_idx + 1)
        if self._should_update(n, self.train_progress_bar.total) and not self.train_progress_bar.disable:
            self.train_progress_bar.n = n
            self._show_metrics(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._show_metrics(trainer, pl_module)
        super().on_train_end(trainer, pl_module)

    def _show_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = self._train_progress_bar
        if bar is not None and not bar.disable:
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """reward, clip, clip+, clip- (those logged so far), then any metric logged with prog_bar=True;
        no v_num."""
        metrics = trainer.callback_metrics
        shown: dict[str, Any] = {}
        if "reward/mean" in metrics:
            shown["reward"] = float(metrics["reward/mean"])
        by_sign: dict[str, list[float]] = {"pos_upper": [], "neg_lower": []}
        for name, value in metrics.items():
            match = _CLIP_TAG.match(name)
            if match and (self._trained_steps is None or int(match.group(2)) in self._trained_steps):
                by_sign[match.group(1)].append(float(value))
        both = by_sign["pos_upper"] + by_sign["neg_lower"]
        if both:
            shown["clip"] = sum(both) / len(both)
        for sign, key in (("pos_upper", "clip+"), ("neg_lower", "clip-")):
            if by_sign[sign]:
                shown[key] = sum(by_sign[sign]) / len(by_sign[sign])
        # GRPOModule logs the same reward as `reward` for Lightning's own bar: shown once, as above.
        extra = {k: v for k, v in trainer.progress_bar_metrics.items() if k not in ("reward", "v_num")}
        return {**shown, **extra}
