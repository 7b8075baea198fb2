"""Prompt files read line by line (never loaded whole), split across ranks, repeated per group.

Formats: `.txt` (one prompt per line; blank lines skipped) and `.jsonl` (one JSON object per line, the prompt
under `prompt_field`). The stream is endless: after the last prompt it starts the file again (epoch + 1).
Shuffling, when asked, uses a bounded buffer seeded by (seed, epoch), so order is reproducible without
holding the file in memory.

Editing models (data.image_field): each .jsonl line also names a conditioning image under `image_field`, a
path relative to the .jsonl file's directory (or absolute). The stream carries paths; a batch's images are
read when the batch is built (each once, repeated group_size times like its prompt), never all at once.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import IterableDataset

from guardrl.types import PromptBatch

PROMPT_FILE_SUFFIXES = (".txt", ".jsonl")
IMAGE_OPTION = "data.image_field"


class PromptRecord(NamedTuple):
    """One prompt of a file: its text, its 1-based line number, and (data.image_field set) the resolved path
    of its conditioning image."""

    prompt: str
    line_number: int
    image_path: str | None = None
    fields: dict | None = None  # a .jsonl line's whole object (evaluation groups read it); None for .txt


def check_image_field(image_field, path: str | None = None) -> None:
    """data.image_field is null (text-to-image) or a non-empty .jsonl key, and needs a .jsonl prompt file."""
    if image_field is None:
        return
    if not isinstance(image_field, str) or not image_field:
        raise ValueError(
            f"{IMAGE_OPTION} must be null (text-to-image) or a non-empty string (the .jsonl key of each "
            f"prompt's conditioning image path), got {image_field!r}"
        )
    if path is not None and not str(path).endswith(".jsonl"):
        raise ValueError(
            f"{IMAGE_OPTION}={image_field!r} needs a .jsonl prompt file (one JSON object per line, the image "
            f"path under {image_field!r}), but data.train_prompts={path!r} is not one"
        )


def load_condition_image(record: PromptRecord, source: str) -> torch.Tensor:
    """The conditioning image of `record` (a line of the prompt file `source`): (3, H, W) float32 in [0, 1],
    RGB."""
    where = f"{IMAGE_OPTION}: line {record.line_number} of {source!r} names the image {record.image_path!r}"
    if not os.path.isfile(record.image_path):
        what = "a directory" if os.path.isdir(record.image_path) else "no such file"
        raise ValueError(
            f"{where}: {what}; it must be an existing image file (PNG, JPEG, ...; a relative path is read "
            "from the .jsonl file's directory)"
        )
    try:
        with Image.open(record.image_path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(
            f"{where}, which is not a readable image ({type(e).__name__}: {e}): it must be an image file "
            "that PIL can open (PNG, JPEG, WebP, ...)"
        ) from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0


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


def count_prompts(
    path: str, prompt_field: str = "prompt", limit: int | None = None, image_field: str | None = None
) -> int:
    """How many prompts the file holds, reading at most `limit` of them (the file is never loaded whole).
    With `image_field`, the images of the prompts read are opened too, so that a bad one fails early."""
    count = 0
    for record in iter_prompt_records(path, prompt_field, image_field):
        if image_field is not None:
            load_condition_image(record, path)
        count += 1
        if limit is not None and count >= limit:
            break
    return count


def iter_prompt_file(
    path: str, prompt_field: str = "prompt", option: str = "data.train_prompts"
) -> Iterator[str]:
    """Yield the prompts of a file in order, one line at a time."""
    for record in iter_prompt_records(path, prompt_field, None, option):
        yield record.prompt


def iter_prompt_records(
    path: str,
    prompt_field: str = "prompt",
    image_field: str | None = None,
    option: str = "data.train_prompts",
) -> Iterator[PromptRecord]:
    """Yield the `PromptRecord`s of a file in order, one line at a time (image paths resolved, not read)."""
    is_jsonl = path.endswith(".jsonl")
    check_image_field(image_field, path)
    base = os.path.dirname(os.path.abspath(path))
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
                yield PromptRecord(line, line_number)
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
            image_path = None
            if image_field is not None:
                image_path = record.get(image_field)
                if not isinstance(image_path, str) or not image_path.strip():
                    found = (
                        f"{repr(image_path)[:40]} under {image_field!r}"
                        if image_field in record
                        else f"keys {sorted(record)[:8]}"
                    )
                    raise ValueError(
                        f"{IMAGE_OPTION}={image_field!r}: line {line_number} of {path!r} has no image path "
                        f"(found {found}): with data.image_field set, every line needs a non-empty string "
                        f"path under {image_field!r} (relative to the .jsonl file's directory, or absolute)"
                    )
                image_path = os.path.join(base, os.path.expanduser(image_path))
            yield PromptRecord(record[prompt_field], line_number, image_path, record)


class PromptStream(IterableDataset):
    """Endless stream of `PromptBatch`es for one rank.

    Rank r of W takes the prompts whose index in the (shuffled) pass satisfies i % W == r, so every group
    lives on one rank. Each batch holds `prompts_per_batch` distinct prompts, each repeated `group_size`
    times; with `image_field`, their conditioning images too (read when the batch is built).
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
        image_field: str | None = None,
    ) -> None:
        check_image_field(image_field, path)
        self.path = path
        self.group_size = group_size
        self.prompts_per_batch = prompts_per_batch
        self.prompt_field = prompt_field
        self.shuffle_buffer_size = shuffle_buffer_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_position = start_position
        self.image_field = image_field

    def _one_pass(self, epoch: int) -> Iterator[PromptRecord]:
        records = iter_prompt_records(self.path, self.prompt_field, self.image_field)
        if self.shuffle_buffer_size <= 1:
            yield from records
            return
        rng = random.Random(f"{self.seed}-{epoch}")
        buffer: list[PromptRecord] = []  # records hold image paths, never images
        for record in records:
            buffer.append(record)
            if len(buffer) >= self.shuffle_buffer_size:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def _rank_prompts(self) -> Iterator[tuple[int, int, PromptRecord]]:
        """(epoch, global index within the pass, record) for this rank, forever."""
        epoch = 0
        while True:
            found = False
            for index, record in enumerate(self._one_pass(epoch)):
                if index % self.world_size == self.rank:
                    found = True
                    yield epoch, index, record
            if not found:
                raise ValueError(
                    f"data.train_prompts={self.path!r} has no prompt for rank {self.rank} of "
                    f"{self.world_size}: it needs at least as many prompts as there are ranks "
                    "(trainer.devices * trainer.num_nodes)"
                )
            epoch += 1

    def __iter__(self) -> Iterator[PromptBatch]:
        position = 0
        pending: list[PromptRecord] = []
        for _, _, record in self._rank_prompts():
            position += 1
            if position <= self.start_position:
                continue  # resuming: skip what an earlier run consumed (its images are never read)
            pending.append(record)
            if len(pending) < self.prompts_per_batch:
                continue
            prompts = [r.prompt for r in pending for _ in range(self.group_size)]
            images = None
            if self.image_field is not None:
                # each image read once, the same tensor repeated for its group
                images = [load_condition_image(r, self.path) for r in pending]
                images = [image for image in images for _ in range(self.group_size)]
            yield PromptBatch(
                prompts=prompts, group_size=self.group_size, stream_position=position, images=images
            )
            pending = []
