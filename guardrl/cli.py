"""The `guardrl` command: LightningCLI over GRPOModule and PromptDataModule.

    guardrl fit --config configs/tiny/grpo_guard.yaml [--model.grpo.clip_range 1e-5] [--ckpt_path ...]
    guardrl fit --config configs/tiny/grpo_guard.yaml --print_config
"""

from __future__ import annotations

import os

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from guardrl.callbacks import RatioStatsCallback
from guardrl.data import PromptDataModule
from guardrl.module import GRPOModule


class GuardRLCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The group size is set once, on the data, and copied to the model.
        parser.link_arguments("data.group_size", "model.group_size")
        # The ratio statistics are part of every run (their tags are documented in the README).
        parser.add_lightning_class_args(RatioStatsCallback, "ratio_stats")
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


def main(args: list[str] | None = None, run: bool = True) -> GuardRLCLI:
    # Field docstrings of the option dataclasses become --help text.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    return GuardRLCLI(
        GRPOModule,
        PromptDataModule,
        args=args,
        run=run,
        auto_configure_optimizers=False,
        # Resuming into the run's own directory rewrites config.yaml instead of refusing to start.
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":  # pragma: no cover - `python -m guardrl.cli` works like the console script
    main()
