"""PromptDataModule: the prompt stream as a LightningDataModule."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from guardrl.data.prompts import PromptStream, check_image_field, check_prompt_file, count_prompts


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class PromptDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_prompts: str,
        group_size: int = 4,
        prompts_per_batch: int = 2,
        prompt_field: str = "prompt",
        shuffle_buffer_size: int = 0,
        seed: int = 0,
        image_field: str | None = None,
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
            image_field: editing models: the key of each prompt's conditioning image path in a .jsonl line
                (relative to the .jsonl file's directory, or absolute); null: text-to-image.
        """
        super().__init__()
        if not _is_int(group_size) or group_size < 2:
            raise ValueError(
                "data.group_size must be an integer >= 2 (a group-relative advantage compares each sample "
                f"with the other samples of its prompt, so a group needs at least two), got {group_size!r}"
            )
        if not _is_int(prompts_per_batch) or prompts_per_batch < 1:
            raise ValueError(f"data.prompts_per_batch must be an integer >= 1, got {prompts_per_batch!r}")
        if not _is_int(shuffle_buffer_size) or shuffle_buffer_size < 0:
            raise ValueError(
                "data.shuffle_buffer_size must be an integer >= 0 (0: file order), "
                f"got {shuffle_buffer_size!r}"
            )
        if not isinstance(prompt_field, str) or not prompt_field:
            raise ValueError(
                f"data.prompt_field must be a non-empty string (the .jsonl key), got {prompt_field!r}"
            )
        check_image_field(image_field)
        self.image_field = image_field
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
        # Checked here, before the model loads its weights, rather than when the first batch is read.
        check_prompt_file(self.train_prompts)
        check_image_field(self.image_field, self.train_prompts)
        world_size = self.trainer.world_size if self.trainer is not None else 1
        # Reads at most world_size prompts: the file is never loaded whole.
        found = count_prompts(
            self.train_prompts, self.prompt_field, limit=max(world_size, 1), image_field=self.image_field
        )
        if found == 0:
            raise ValueError(
                f"data.train_prompts={self.train_prompts!r} contains no prompt (empty, or only blank "
                "lines): it needs at least one non-blank line"
            )
        if found < world_size:
            raise ValueError(
                f"data.train_prompts={self.train_prompts!r} has {found} prompt(s) for {world_size} ranks "
                "(trainer.devices * trainer.num_nodes): it needs at least as many prompts as there are "
                "ranks, since every group stays on one rank"
            )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        stream = PromptStream(
            self.train_prompts,
            self.group_size,
            self.prompts_per_batch,
            self.prompt_field,
            self.shuffle_buffer_size,
            self.seed,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            start_position=self.start_position,
            image_field=self.image_field,
        )
        # batch_size=None: the stream yields whole PromptBatches; reading lines needs no worker processes.
        return DataLoader(stream, batch_size=None, num_workers=0)
