"""Prompt data: streamed prompt files and the PromptDataModule."""

from guardrl.data.datamodule import PromptDataModule
from guardrl.data.prompts import PromptStream, iter_prompt_file

__all__ = ["PromptDataModule", "PromptStream", "iter_prompt_file"]
