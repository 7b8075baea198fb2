"""Prompt data: streamed prompt files (and editing models' conditioning images) and the PromptDataModule."""

from guardrl.data.datamodule import PromptDataModule
from guardrl.data.prompts import PromptStream, iter_prompt_file, iter_prompt_records, load_condition_image

__all__ = [
    "PromptDataModule",
    "PromptStream",
    "iter_prompt_file",
    "iter_prompt_records",
    "load_condition_image",
]
