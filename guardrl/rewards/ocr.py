"""OCR reward for text rendering: does the image show the prompt's quoted text?

The rule is FlowGRPO's `OcrScorer` (flow_grpo/ocr.py in the FlowGRPO code base, github.com/yifan123/flow_grpo;
read in the fork github.com/zhtmike/flow_grpo, which carries the file unchanged):

* target = `prompt.split('"')[1]`: the text between the first two double quotes (FlowGRPO fails on a prompt
  with no quote; here that is a clear error by default, or the whole prompt with `missing_quote="prompt"`);
* the recognised text is the recogniser's lines joined with no separator; both strings drop their spaces
  (`replace(" ", "")`) and are lower-cased;
* if the target occurs inside the recognised text, distance = 0; otherwise the Levenshtein distance, capped at
  len(target) ("recognized many unrelated characters");
* reward = 1 - distance / len(target), in [0, 1].

FlowGRPO normalises by the target's length (not by max(len(a), len(b))), and the cap keeps the reward >= 0;
`normalize="max"` gives the symmetric 1 - d / max(len) instead (no containment shortcut, no cap needed).

FlowGRPO recognises with PaddleOCR, which does not belong in this process (paddlepaddle); the recogniser is
pluggable (`Recognizer`): the default `TrOCRRecognizer` runs a transformers VisionEncoderDecoder (TrOCR) from
a local path or hub id, and PaddleOCR can be served behind `python -m guardrl.rewards.server`
(docs/rewards.md).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from guardrl.rewards.base import Reward, build_component
from guardrl.rewards.clip_rewards import clip_preprocess, freeze, resolve_dtype, to_pil_images


@runtime_checkable
class Recognizer(Protocol):
    """Reads the text in each image: (B, 3, H, W) float in [0, 1] -> B strings."""

    def __call__(self, images: torch.Tensor) -> list[str]: ...


def quoted_text(prompt: str, missing_quote: str = "error") -> str:
    """FlowGRPO's target: `prompt.split('"')[1]`, the text between the first two double quotes.

    A prompt with one quote gives everything after it, as `split` does. With no quote: a ValueError
    (`missing_quote="error"`) or the whole prompt (`missing_quote="prompt"`).
    """
    parts = prompt.split('"')
    if len(parts) < 2:
        if missing_quote == "prompt":
            return prompt
        raise ValueError(f"OCR reward: the prompt {prompt!r} has no double-quoted text to render")
    return parts[1]


def normalize_text(text: str) -> str:
    """FlowGRPO's normalisation: drop spaces (only ' '), lower-case."""
    return text.replace(" ", "").lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ocr_score(recognized: str, target: str, normalize: str = "target") -> float:
    """The reward of one image, from its recognised text and the prompt's quoted text (both raw)."""
    recognized, target = normalize_text(recognized), normalize_text(target)
    if normalize == "max":
        longest = max(len(recognized), len(target))
        return 1.0 - levenshtein(recognized, target) / longest if longest else 1.0
    if normalize != "target":
        raise ValueError(f"OCR reward: normalize={normalize!r} must be 'target' (FlowGRPO) or 'max'")
    if not target:
        return 1.0 if not recognized else 0.0  # FlowGRPO divides by zero here; an empty target is degenerate
    distance = 0 if target in recognized else min(levenshtein(recognized, target), len(target))
    return 1.0 - distance / len(target)


class TrOCRRecognizer(torch.nn.Module):
    """A transformers VisionEncoderDecoderModel (TrOCR, e.g. `microsoft/trocr-base-printed`) and its image
    processor + tokenizer, from one local path or hub id; greedy decoding. Loads at construction, frozen.

    TrOCR reads one line of text per image (it was trained on cropped lines): on a whole generated image it is
    weaker than a detector + recogniser such as PaddleOCR, which FlowGRPO uses. Use it for a self-contained
    setup, or serve PaddleOCR (docs/rewards.md)."""

    def __init__(
        self,
        pretrained: str = "microsoft/trocr-base-printed",
        torch_dtype: str = "float32",
        max_new_tokens: int = 32,
        preprocess: str = "tensor",
    ) -> None:
        super().__init__()
        from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

        if preprocess not in ("tensor", "pil"):
            raise ValueError(f"TrOCRRecognizer: preprocess={preprocess!r} must be 'tensor' or 'pil'")
        self.preprocess = preprocess
        self.dtype = resolve_dtype(torch_dtype)
        self.max_new_tokens = max_new_tokens
        self.image_processor = AutoImageProcessor.from_pretrained(pretrained)
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained)
        self.model = freeze(VisionEncoderDecoderModel.from_pretrained(pretrained, dtype=self.dtype))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[str]:
        if self.preprocess == "pil":
            pixels = self.image_processor(images=to_pil_images(images), return_tensors="pt")["pixel_values"]
        else:
            pixels = clip_preprocess(images, self.image_processor)
        device = next(self.model.parameters()).device
        ids = self.model.generate(
            pixel_values=pixels.to(device=device, dtype=self.dtype),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
        )
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)


class OcrReward(Reward):
    """FlowGRPO's OCR reward with a pluggable recogniser (see the module docstring for the exact rule).

    Args:
        recognizer: a `Recognizer` (any callable images -> list[str]), a {"class_path", "init_args"} dict,
            or a local path / hub id of a TrOCR VisionEncoderDecoder model (loaded at construction).
        normalize: "target" (FlowGRPO: distance capped at, and divided by, the target's length, 0 when the
            target is contained in the recognised text) or "max" (1 - distance / max of the two lengths).
        missing_quote: "error" or "prompt" (score against the whole prompt) for a prompt with no quote.
    """

    def __init__(
        self,
        recognizer: str | dict | Recognizer = "microsoft/trocr-base-printed",
        normalize: str = "target",
        missing_quote: str = "error",
        weight: float = 1.0,
        name: str | None = "ocr",
    ) -> None:
        super().__init__(weight=weight, name=name)
        if normalize not in ("target", "max"):
            raise ValueError(f"reward {self.name!r}: normalize={normalize!r} must be 'target' or 'max'")
        if missing_quote not in ("error", "prompt"):
            raise ValueError(
                f"reward {self.name!r}: missing_quote={missing_quote!r} must be 'error' or 'prompt'"
            )
        self.normalize = normalize
        self.missing_quote = missing_quote
        self.recognizer = build_component(
            recognizer, TrOCRRecognizer, f"reward {self.name!r}: recognizer", "images -> list[str]"
        )  # an nn.Module one is registered (moved by Lightning)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        targets = [quoted_text(p, self.missing_quote) for p in prompts]  # fail before running the recogniser
        texts = self.recognizer(images)
        if not (
            isinstance(texts, (list, tuple))
            and len(texts) == len(prompts)
            and all(isinstance(t, str) for t in texts)
        ):
            raise ValueError(
                f"reward {self.name!r}: the recognizer must return {len(prompts)} strings, got "
                f"{str(texts)[:200]}"
            )
        scores = [ocr_score(text, target, self.normalize) for text, target in zip(texts, targets)]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)
