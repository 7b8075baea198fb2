"""CLIP-based rewards: PickScore and CLIPScore, loaded with `from_pretrained` from a local path or a hub id.

Both models load eagerly, in the constructor (a wrong path fails when the run is configured, not at the first
reward call), are frozen (`requires_grad_(False)`) and put in eval mode. They are `nn.Module` children of the
reward, so Lightning moves them to the training device; guardrl's checkpoints keep only trainable policy keys,
so these weights never enter a checkpoint.

Image preprocessing reproduces the model's `CLIPImageProcessor` (resize the shortest edge, center crop,
rescale, normalise) in one of two ways, chosen by `preprocess`:

* ``"tensor"`` (default): on the images' device, in torch. The images are first quantised to 8 bits (what the
  originals see: FlowGRPO turns its float images into uint8 PIL images before the processor), resized with
  `F.interpolate(mode="bicubic", antialias=True)` in two passes, horizontal then vertical, rounding to 8 bits
  after each (as PIL does), center-cropped with transformers' rule (`top = (h - crop_h) // 2`), rescaled and
  normalised with the processor's mean and std. Where no resize is needed (the shortest edge already has the
  processor's size) this equals the processor's output on the PIL image to float precision (tested to 1e-5).
  Where a resize is needed, PIL's fixed-point kernel is not bit-identical: measured at most 2 8-bit levels on
  a pixel and under 0.1 level on average (tests/test_model_rewards.py; docs/rewards.md).
* ``"pil"``: the originals' exact path: uint8 -> PIL -> the processor (CPU, one image at a time).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from guardrl.rewards.base import Reward

# PIL resampling codes used by image processors (PIL.Image.Resampling): torch interpolate modes for them.
_TORCH_MODE_FOR_PIL_RESAMPLE = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


def resolve_dtype(torch_dtype: str | torch.dtype | None) -> torch.dtype:
    """'float32' / 'bfloat16' / 'float16' (or a torch.dtype, or None for float32) -> torch.dtype."""
    if torch_dtype is None:
        return torch.float32
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    dtype = getattr(torch, str(torch_dtype).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"torch_dtype={torch_dtype!r}: expected a floating dtype such as 'float32' or 'bfloat16'"
        )
    return dtype


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (no dropout) and no gradients: a reward model is never trained."""
    module.eval()
    module.requires_grad_(False)
    return module


def _size_get(size, key: str):
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> the same images at 8-bit precision (still float in [0, 1])."""
    return (images.float().clamp(0, 1) * 255).round() / 255


def to_pil_images(images: torch.Tensor) -> list:
    """(B, 3, H, W) float in [0, 1] -> list of RGB PIL images (the uint8 round trip the originals make)."""
    from PIL import Image

    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    arrays = arrays.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]


def resize_output_size(height: int, width: int, image_processor) -> tuple[int, int]:
    """The (height, width) the processor resizes to: transformers' get_resize_output_image_size rule."""
    size = image_processor.size
    shortest = _size_get(size, "shortest_edge")
    if shortest is not None:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = int(shortest), int(int(shortest) * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    return int(_size_get(size, "height")), int(_size_get(size, "width"))


def clip_preprocess(images: torch.Tensor, image_processor) -> torch.Tensor:
    """A CLIPImageProcessor's resize / center crop / rescale / normalise, on tensors.

    images: (B, 3, H, W) float in [0, 1], any device. Returns pixel_values (B, 3, crop_h, crop_w) float32.
    """
    x = quantize_uint8(images)
    if getattr(image_processor, "do_resize", None):
        out_h, out_w = resize_output_size(x.shape[-2], x.shape[-1], image_processor)
        if (out_h, out_w) != tuple(x.shape[-2:]):
            resample = int(getattr(image_processor, "resample", 3))
            mode = _TORCH_MODE_FOR_PIL_RESAMPLE.get(resample)
            if mode is None:
                raise ValueError(
                    f"image processor resample={resample}: only nearest (0), bilinear (2) and "
                    "bicubic (3) have a tensor implementation; use preprocess='pil'"
                )
            kwargs = {} if mode == "nearest-exact" else {"align_corners": False, "antialias": True}
            # PIL resizes in two passes, horizontal then vertical, rounding to 8 bits after each: do the same.
            if out_w != x.shape[-1]:
                x = quantize_uint8(F.interpolate(x, size=(x.shape[-2], out_w), mode=mode, **kwargs))
            if out_h != x.shape[-2]:
                x = quantize_uint8(F.interpolate(x, size=(out_h, out_w), mode=mode, **kwargs))
    crop = getattr(image_processor, "crop_size", None)
    if getattr(image_processor, "do_center_crop", None) and crop is not None:
        crop_h, crop_w = int(_size_get(crop, "height")), int(_size_get(crop, "width"))
        h, w = x.shape[-2:]
        if crop_h > h or crop_w > w:
            raise ValueError(
                f"center crop {crop_h}x{crop_w} is larger than the resized image {h}x{w}; "
                "use preprocess='pil' (the processor pads)"
            )
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
        x = x[..., top : top + crop_h, left : left + crop_w]
    # x holds value / 255; the processor sees 0..255 values and multiplies them by rescale_factor (1/255)
    if getattr(image_processor, "do_rescale", None):
        factor = float(image_processor.rescale_factor)
        if abs(factor * 255 - 1) > 1e-6:
            x = x * (255 * factor)
    else:
        x = x * 255
    if getattr(image_processor, "do_normalize", None):
        mean = torch.tensor(image_processor.image_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(image_processor.image_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x.contiguous()


class _ClipReward(Reward):
    """A transformers CLIPModel + CLIPProcessor, frozen; subclasses turn the two embeddings into a score."""

    def __init__(
        self,
        pretrained: str,
        processor: str | None = None,
        torch_dtype: str = "float32",
        preprocess: str = "tensor",
        max_length: int = 77,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        from transformers import CLIPModel, CLIPProcessor

        if preprocess not in ("tensor", "pil"):
            raise ValueError(f"reward {self.name!r}: preprocess={preprocess!r} must be 'tensor' or 'pil'")
        self.pretrained = pretrained
        self.processor_path = processor or pretrained
        self.preprocess = preprocess
        self.max_length = max_length
        self.dtype = resolve_dtype(torch_dtype)
        self.processor = CLIPProcessor.from_pretrained(self.processor_path)
        self.model = freeze(CLIPModel.from_pretrained(pretrained, dtype=self.dtype))

    @property
    def image_processor(self):
        return self.processor.image_processor

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """The model's input for (B, 3, H, W) images in [0, 1], by the chosen preprocessing."""
        if self.preprocess == "pil":
            out = self.image_processor(images=to_pil_images(images), return_tensors="pt")["pixel_values"]
        else:
            out = clip_preprocess(images, self.image_processor)
        return out.to(device=self.model.logit_scale.device, dtype=self.dtype)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (B, D), float32."""
        features = _features(self.model.get_image_features(pixel_values=self.pixel_values(images)))
        return F.normalize(features.float(), dim=-1)

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings (B, D), float32; prompts truncated to `max_length` tokens."""
        tokens = self.processor(
            text=list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        device = self.model.logit_scale.device
        features = _features(
            self.model.get_text_features(
                input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
            )
        )
        return F.normalize(features.float(), dim=-1)

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per-pair cosine similarity (B,) of each image with its own prompt."""
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)


def _features(output) -> torch.Tensor:
    # transformers 4.x returns the projected tensor; 5.x returns a model output holding it as pooler_output
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


class PickScore(_ClipReward):
    """PickScore (Kirstain et al. 2023, "Pick-a-Pic", arXiv 2305.01569): a CLIP-H fine-tuned on human
    preferences. score = logit_scale.exp() * cos(image embedding, prompt embedding), as in the model card of
    `yuvalkirstain/PickScore_v1` (github.com/yuvalkirstain/PickScore), whose processor is the one of
    `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`. Typical values are around 20-23.

    `scale` divides the score: FlowGRPO's PickScoreScorer returns `scores / 26` ("norm to 0-1";
    flow_grpo/pickscore_scorer.py of github.com/yifan123/flow_grpo, read in the fork
    github.com/ltt0716/flow_grpo_official), so `scale=26` gives FlowGRPO's reward and the default
    `scale=1` the raw PickScore.
    """

    def __init__(
        self,
        pretrained: str = "yuvalkirstain/PickScore_v1",
        processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        torch_dtype: str = "float32",
        scale: float = 1.0,
        preprocess: str = "tensor",
        max_length: int = 77,
        weight: float = 1.0,
        name: str | None = "pickscore",
    ) -> None:
        super().__init__(pretrained, processor, torch_dtype, preprocess, max_length, weight, name)
        if not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"reward {self.name!r}: scale must be a number > 0, got {scale!r}")
        self.scale = float(scale)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        logit_scale = self.model.logit_scale.float().exp()
        return (logit_scale * self.cosine(images, prompts) / self.scale).to(images.device)


class CLIPScore(_ClipReward):
    """CLIPScore (Hessel et al. 2021, arXiv 2104.08718) as torchmetrics defines it
    (torchmetrics.multimodal.CLIPScore: `max(100 * cos(E_I, E_C), 0)`), per image: in [0, 100].

    Why not wrap torchmetrics' class: it returns the batch mean (a reward needs one score per image), takes a
    local path only through a callable, cuts long captions by slicing the token ids (dropping the end token
    CLIP pools from) instead of truncating, and always preprocesses through PIL on the CPU. The definition is
    the same, and the test checks our score against `torchmetrics.functional.multimodal.clip_score` image by
    image. `scale=100` (default) is torchmetrics'; `clamp_at_zero=False` gives the raw scaled cosine.
    """

    def __init__(
        self,
        pretrained: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        torch_dtype: str = "float32",
        scale: float = 100.0,
        clamp_at_zero: bool = True,
        preprocess: str = "tensor",
        max_length: int = 77,
        weight: float = 1.0,
        name: str | None = "clipscore",
    ) -> None:
        super().__init__(pretrained, processor, torch_dtype, preprocess, max_length, weight, name)
        self.scale = float(scale)
        self.clamp_at_zero = clamp_at_zero

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scores = self.scale * self.cosine(images, prompts)
        if self.clamp_at_zero:
            scores = scores.clamp(min=0)
        return scores.to(images.device)
