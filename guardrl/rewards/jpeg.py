"""JPEG compressibility: DDPO's first reward (Black et al. 2023, "Training Diffusion Models with
Reinforcement Learning", arXiv 2305.13301): the negative size of the image saved as JPEG, in kilobytes."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from guardrl.rewards.base import Reward


def jpeg_size_kb(image: torch.Tensor, quality: int) -> float:
    """Size in kB (1000 bytes) of one (3, H, W) image in [0, 1] saved as JPEG at the given quality."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


class JpegCompressibility(Reward):
    """reward = -(JPEG size in kB): smoother, flatter images score higher. Offline, deterministic."""

    def __init__(self, quality: int = 95, weight: float = 1.0, name: str | None = "jpeg_compressibility"):
        super().__init__(weight=weight, name=name)
        if not (isinstance(quality, int) and not isinstance(quality, bool) and 1 <= quality <= 95):
            raise ValueError(
                f"reward {self.name!r}: quality (model.rewards[...].init_args.quality) must be an integer in "
                f"[1, 95] (PIL's useful JPEG range), got {quality!r}"
            )
        self.quality = quality

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        sizes = [jpeg_size_kb(image, self.quality) for image in images]
        return -torch.tensor(sizes, dtype=torch.float32, device=images.device)
