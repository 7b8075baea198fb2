"""PromptDataModule: the prompt stream as a LightningDataModule."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from guardrl.data.prompts import PromptStream, check_prompt_file, iter_prompt_file


class PromptDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_prompts: str,
        group_size: int = 4,
        prompts_per_batch: int = 2,
        prompt_field: str = "prompt",
        shuffle_buffer_size: int = 0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            train_prompts: a .txt (one prompt per line) or .jsonl file, read as a stream.
            group_size: samples per prompt (G); every group stays on one rank. Linked to model.group_size.
            prompts_per_batch: distinct prompts per rank per GRPO iteration; the rank's batch is
                prompts_per_batch * group_size samples.
            prompt_field: the key of the prompt in a .jsonl line.
            shuffle_buffer_size: shuffle within a buffer of this many prompts (0: file order).
            seed: seed of the shuffle.
        """
        super().__init__()
        if group_size < 2:
            raise ValueError(
                f"data.group_size must be >= 2 (a group-relative advantage needs at least two samples), got {group_size}"
            )
        if prompts_per_batch < 1:
            raise ValueError(f"data.prompts_per_batch must be >= 1, got {prompts_per_batch}")
        if shuffle_buffer_size < 0:
            raise ValueError(f"data.shuffle_buffer_size must be >= 0, got {shuffle_buffer_size}")
        self.train_prompts = train_prompts
        self.group_size = group_size
        self.prompts_per_batch = prompts_per_batch
        self.prompt_field = prompt_field
        self.shuffle_buffer_size = shuffle_buffer_size
        self.seed = seed
        self.start_position = 0

    @property
    def batch_size(self) -> int:
        """Samples per rank per iteration."""
        return self.prompts_per_batch * self.group_size

    def setup(self, stage: str) -> None:
        check_prompt_file(self.train_prompts)
        if next(iter_prompt_file(self.train_prompts, self.prompt_field), None) is None:
            raise ValueError(f"data.train_prompts={self.train_prompts!r} contains no prompt (only blank lines?)")

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        stream = PromptStream(
            self.train_prompts, self.group_size, self.prompts_per_batch, self.prompt_field,
            self.shuffle_buffer_size, self.seed,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            start_position=self.start_position,
        )
        # batch_size=None: the stream yields whole PromptBatches; reading lines needs no worker processes.
        return DataLoader(stream, batch_size=None, num_workers=0)
