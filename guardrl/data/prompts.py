"""Prompt files read line by line (never loaded whole), split across ranks, repeated per group.

Formats: `.txt` (one prompt per line; blank lines skipped) and `.jsonl` (one JSON object per line, the prompt
under `prompt_field`). The stream is endless: after the last prompt it starts the file again (epoch + 1).
Shuffling, when asked, uses a bounded buffer seeded by (seed, epoch), so order is reproducible without
holding the file in memory.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator

from torch.utils.data import IterableDataset

from guardrl.types import PromptBatch

PROMPT_FILE_SUFFIXES = (".txt", ".jsonl")


def check_prompt_file(path: str, option: str = "data.train_prompts") -> None:
    """Fail early, naming the option, when a prompt file is missing or of an unknown type."""
    if not path:
        raise ValueError(f"{option} is required: a .txt or .jsonl prompt file, got {path!r}")
    if not str(path).endswith(PROMPT_FILE_SUFFIXES):
        raise ValueError(
            f"{option}={path!r}: the file must end in one of {PROMPT_FILE_SUFFIXES} "
            "(.txt: one prompt per line; .jsonl: one JSON object per line)"
        )
    if os.path.isdir(path):
        raise ValueError(f"{option}={path!r} is a directory: it must be a .txt or .jsonl prompt file")
    if not os.path.isfile(path):
        where = "" if os.path.isabs(path) else f" (relative to the working directory {os.getcwd()!r})"
        raise ValueError(
            f"{option}={path!r}: no such file{where}; it must be an existing .txt or .jsonl file"
        )


def count_prompts(path: str, prompt_field: str = "prompt", limit: int | None = None) -> int:
    """How many prompts the file holds, reading at most `limit` of them (the file is never loaded whole)."""
    count = 0
    for _ in iter_prompt_file(path, prompt_field):
        count += 1
        if limit is not None and count >= limit:
            break
    return count


def iter_prompt_file(
    path: str, prompt_field: str = "prompt", option: str = "data.train_prompts"
) -> Iterator[str]:
    """Yield the prompts of a file in order, one line at a time."""
    is_jsonl = path.endswith(".jsonl")
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                # utf-8-sig on the first line: a byte-order mark (Windows editors write one) is not prompt
                # text.
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8").strip()
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{option}={path!r}: line {line_number} is not valid UTF-8 ({e.reason} at byte "
                    f"{e.start} of the line): prompt files must be UTF-8 (re-save the file as UTF-8)"
                ) from None
            if not line:
                continue
            if not is_jsonl:
                yield line
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{option}={path!r}: line {line_number} is not valid JSON ({e.msg}): a .jsonl file "
                    "holds one JSON object per line"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get(prompt_field), str):
                if not isinstance(record, dict):
                    found = f"a JSON {type(record).__name__}"
                elif prompt_field in record:
                    found = f"{repr(record[prompt_field])[:40]} under {prompt_field!r}"
                else:
                    found = f"keys {sorted(record)[:8]}"
                raise ValueError(
                    f"{option}={path!r}: line {line_number} has no string field {prompt_field!r} (found "
                    f"{found}): each line must be a JSON object with the prompt under data.prompt_field"
                )
            if not record[prompt_field].strip():
                raise ValueError(
                    f"{option}={path!r}: line {line_number} has an empty {prompt_field!r}: every JSON line "
                    "must hold a non-empty prompt"
                )
            yield record[prompt_field]


class PromptStream(IterableDataset):
    """Endless stream of `PromptBatch`es for one rank.

    Rank r of W takes the prompts whose index in the (shuffled) pass satisfies i % W == r, so every group
    lives on one rank. Each batch holds `prompts_per_batch` distinct prompts, each repeated `group_size`
    times.
    """

    def __init__(
        self,
        path: str,
        group_size: int,
        prompts_per_batch: int,
        prompt_field: str = "prompt",
        shuffle_buffer_size: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_position: int = 0,
    ) -> None:
        self.path = path
        self.group_size = group_size
        self.prompts_per_batch = prompts_per_batch
        self.prompt_field = prompt_field
        self.shuffle_buffer_size = shuffle_buffer_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_position = start_position

    def _one_pass(self, epoch: int) -> Iterator[str]:
        prompts = iter_prompt_file(self.path, self.prompt_field)
        if self.shuffle_buffer_size <= 1:
            yield from prompts
            return
        rng = random.Random(f"{self.seed}-{epoch}")
        buffer: list[str] = []
        for prompt in prompts:
            buffer.append(prompt)
            if len(buffer) >= self.shuffle_buffer_size:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def _rank_prompts(self) -> Iterator[tuple[int, int, str]]:
        """(epoch, global index within the pass, prompt) for this rank, forever."""
        epoch = 0
        while True:
            found = False
            for index, prompt in enumerate(self._one_pass(epoch)):
                if index % self.world_size == self.rank:
                    found = True
                    yield epoch, index, prompt
            if not found:
                raise ValueError(
                    f"data.train_prompts={self.path!r} has no prompt for rank {self.rank} of "
                    f"{self.world_size}: it needs at least as many prompts as there are ranks "
                    "(trainer.devices * trainer.num_nodes)"
                )
            epoch += 1

    def __iter__(self) -> Iterator[PromptBatch]:
        position = 0
        pending: list[tuple[int, int, str]] = []
        for item in self._rank_prompts():
            position += 1
            if position <= self.start_position:
                continue  # resuming: skip what an earlier run consumed
            pending.append(item)
            if len(pending) < self.prompts_per_batch:
                continue
            prompts = [p for _, _, p in pending for _ in range(self.group_size)]
            yield PromptBatch(prompts=prompts, group_size=self.group_size, stream_position=position)
            pending = []
