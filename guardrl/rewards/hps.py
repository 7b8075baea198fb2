"""HPSv2.1 (Wu et al. 2023, "Human Preference Score v2", arXiv 2306.09341): an open_clip ViT-H-14 fine-tuned
on human preferences; score = cosine of the normalised image and text embeddings (about 0.2-0.35).

The model needs `open_clip_torch`, which is not a guardrl dependency: on this project's reference environment
(torch 2.13 CPU, no torchvision) `pip install --dry-run open_clip_torch` wants torchvision and a new torch
build (torch 2.14.1 with the CUDA 13 wheels), so it is not installed here and this class is NOT exercised by
the test suite beyond its preprocessing and its import error. Where open_clip is installed (it works with
current torch), the class loads a local checkpoint; otherwise serve it from its own environment:

    python -m guardrl.rewards.server --reward guardrl.rewards.hps.HPSv21 \
        --init-args '{"checkpoint": "/models/HPS_v2.1_compressed.pt"}' --port 8766

and train with a `guardrl.rewards.RemoteReward` pointing at it (docs/rewards.md).

What the original does (github.com/tgxs002/HPSv2, hpsv2/img_score.py and its vendored
hpsv2/src/open_clip/transform.py, as FlowGRPO's flow_grpo/hpsv2_scorer.py uses it):
`create_model_and_transforms("ViT-H-14", "laion2B-s32B-b79K", ...)`, then
`model.load_state_dict(torch.load("HPS_v2.1_compressed.pt")["state_dict"])`, `get_tokenizer("ViT-H-14")`,
and the validation transform: ToTensor, then torchvision `Resize(224, BICUBIC)` *on the float tensor*, then
`CenterCrop(224)` and the OpenAI CLIP mean/std normalisation; score = diag(image_features @ text_features.T)
with both L2-normalised. `hps_preprocess` below does that transform in torch (torchvision's tensor resize is
`F.interpolate(bicubic, antialias=True)` from torchvision 0.17; its center crop rounds the offset).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from guardrl.rewards.base import Reward
from guardrl.rewards.clip_rewards import freeze, quantize_uint8, resolve_dtype

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def hps_preprocess(images: torch.Tensor, image_size: int = 224) -> torch.Tensor:
    """HPSv2's validation transform on (B, 3, H, W) images in [0, 1] (quantised to 8 bits first, as the
    original reads uint8 images): shortest edge -> image_size (bicubic, antialiased, float), center crop
    (torchvision's rounded offset), OpenAI CLIP normalisation."""
    x = quantize_uint8(images)
    h, w = x.shape[-2:]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = image_size, int(image_size * long / short)
    size = (new_long, new_short) if w <= h else (new_short, new_long)
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    h, w = x.shape[-2:]
    top, left = round((h - image_size) / 2.0), round((w - image_size) / 2.0)  # torchvision's rule
    x = x[..., top:top + image_size, left:left + image_size]
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


class HPSv21(Reward):
    """HPSv2.1 through open_clip (loaded at construction, frozen). See the module docstring.

    Args:
        checkpoint: local path of `HPS_v2.1_compressed.pt` (hub: xswu/HPSv2).
        architecture: open_clip model name (ViT-H-14 for HPSv2 / v2.1).
    """

    def __init__(self, checkpoint: str, architecture: str = "ViT-H-14", torch_dtype: str = "float32",
                 weight: float = 1.0, name: str | None = "hpsv21") -> None:
        super().__init__(weight=weight, name=name)
        try:
            import open_clip
        except ImportError as e:
            raise ImportError(
                f"reward {self.name!r}: HPSv2.1 needs open_clip_torch (pip install open_clip_torch), "
                "which is not a guardrl dependency; install it, or serve this reward from its own environment with "
                "`python -m guardrl.rewards.server --reward guardrl.rewards.hps.HPSv21 ...` and use "
                f"RemoteReward (docs/rewards.md). ({e})"
            ) from None
        self.dtype = resolve_dtype(torch_dtype)
        model = open_clip.create_model(architecture, pretrained=None)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)  # tensors only, no pickled code
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        self.model = freeze(model.to(self.dtype))
        self.tokenizer = open_clip.get_tokenizer(architecture)
        self.image_size = int(model.visual.image_size[0] if isinstance(model.visual.image_size, (tuple, list))
                              else model.visual.image_size)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        pixels = hps_preprocess(images, self.image_size).to(device=device, dtype=self.dtype)
        image_features = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        tokens = self.tokenizer(list(prompts)).to(device)
        text_features = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return (image_features * text_features).sum(-1).to(images.device)
