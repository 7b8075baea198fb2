"""The LAION aesthetic predictor: a small MLP on normalised CLIP ViT-L/14 image embeddings.

Source: github.com/christophschuhmann/improved-aesthetic-predictor (simple_inference.py: `MLP(768)`,
`clip.load("ViT-L/14")`, the image embedding L2-normalised, then the MLP). The MLP is five Linear layers with
no activation between them, dropouts 0.2 / 0.2 / 0.1 (identity at eval time): 768 -> 1024 -> 128 -> 64 -> 16
-> 1. The released weights (e.g. `sac+logos+ava1-l14-linearMSE.pth`, the ones DDPO and FlowGRPO use) are a
plain state dict with keys `layers.{0,2,4,6,7}.{weight,bias}`; this module's layer indices match them, so the
file loads as is. Scores are on the AVA 1-10 rating scale (typical generated images score about 4.5-7).

FlowGRPO (flow_grpo/aesthetic_scorer.py) runs the CLIP part through transformers' `CLIPModel` /
`CLIPProcessor` of `openai/clip-vit-large-patch14`, which is also what this class loads (from a local path or
a hub id); the preprocessing is the processor's, on tensors or through PIL (see
guardrl/rewards/clip_rewards.py). Both models load eagerly in the constructor, frozen and in eval mode.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from guardrl.rewards.base import Reward
from guardrl.rewards.weights import load_state_dict_file
from guardrl.rewards.clip_rewards import _features, clip_preprocess, freeze, resolve_dtype, to_pil_images


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head; indices match the released state dicts."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


class LaionAesthetic(Reward):
    """LAION aesthetic score: `mlp(normalize(CLIP image embedding))`, ignoring the prompt.

    Args:
        mlp_weights: local .pth / .safetensors state dict of the MLP (e.g. sac+logos+ava1-l14-linearMSE.pth).
        pretrained: the CLIP model, local path or hub id (ViT-L/14 for the released heads).
        processor: where the CLIPProcessor is (defaults to `pretrained`).
        preprocess: "tensor" (on device) or "pil" (the original's uint8 PIL round trip).
    """

    def __init__(
        self,
        mlp_weights: str,
        pretrained: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        torch_dtype: str = "float32",
        preprocess: str = "tensor",
        weight: float = 1.0,
        name: str | None = "aesthetic",
    ) -> None:
        super().__init__(weight=weight, name=name)
        from transformers import CLIPImageProcessor, CLIPModel

        if preprocess not in ("tensor", "pil"):
            raise ValueError(f"reward {self.name!r}: preprocess={preprocess!r} must be 'tensor' or 'pil'")
        self.preprocess = preprocess
        self.dtype = resolve_dtype(torch_dtype)
        self.image_processor = CLIPImageProcessor.from_pretrained(processor or pretrained)
        self.clip = freeze(CLIPModel.from_pretrained(pretrained, dtype=self.dtype))
        dim = self.clip.config.projection_dim
        self.mlp = AestheticMLP(dim)
        state = load_state_dict_file(mlp_weights)
        try:
            self.mlp.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(
                f"reward {self.name!r}: {mlp_weights!r} is not an aesthetic MLP for {dim}-d "
                f"CLIP embeddings: {e}"
            ) from None
        freeze(self.mlp)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        if self.preprocess == "pil":
            pixels = self.image_processor(images=to_pil_images(images), return_tensors="pt")["pixel_values"]
        else:
            pixels = clip_preprocess(images, self.image_processor)
        device = next(self.clip.parameters()).device
        pixels = pixels.to(device=device, dtype=self.dtype)
        features = _features(self.clip.get_image_features(pixel_values=pixels))
        return F.normalize(features.float(), dim=-1)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.mlp(self.image_embeddings(images)).squeeze(-1).to(images.device)
