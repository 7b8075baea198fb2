"""`ToyBackbone`: the toy model (guardrl/toy/model.py) behind guardrl's FlowBackbone interface.

`--model.backbone guardrl.toy.ToyBackbone` trains it with GRPOModule exactly like SD3: the same transformer
class, the same SD3 timestep convention (t x 1000), true classifier-free guidance with the null prompt "".
What differs is that it works in pixel space: latents are images in [-1, 1], `decode` maps them to [0, 1]
(no VAE), and the text encoder is the small word-level one trained with it.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusers import StableDiffusion3Pipeline

from guardrl.policy.backbones import OPTION, FlowBackbone, SD3Backbone, _is_int
from guardrl.toy.model import load_toy_model


class ToyBackbone(FlowBackbone):
    """The pretrained toy text-to-image model (pixel-space SD3 transformer + word-level text encoder)."""

    pipeline_class = None  # not a diffusers pipeline: components are loaded by `load_toy_model`
    # Its transformer is a diffusers SD3Transformer2DModel: SD3's LoRA format holds it, and
    # `SD3Transformer2DModel.load_lora_adapter(dir, prefix="transformer", use_safetensors=True)` loads it
    # back.
    lora_format_class = StableDiffusion3Pipeline

    def __init__(
        self,
        weights_path: str | None = None,
        resolution: int = 32,
        torch_dtype: str = "float32",
        shift: float = 1.0,
        prompt_cache_size: int = 4096,
    ) -> None:
        """
        Args:
            weights_path: a directory written by `python -m guardrl.toy.pretrain --out DIR`; None loads the
                weights shipped in guardrl/toy/weights/.
            resolution: image size in pixels; must be the size the model was trained at (32 for the shipped
                one).
            torch_dtype: dtype of the transformer and text encoder.
            shift: the sigma schedule's shift (FlowMatchEulerDiscreteScheduler; 1.0 = linear, as pretrained).
        """
        super().__init__(
            None, torch_dtype, resolution, max_sequence_length=16, prompt_cache_size=prompt_cache_size
        )
        if not (isinstance(shift, (int, float)) and not isinstance(shift, bool) and shift > 0):
            raise ValueError(f"{OPTION}.shift must be a number > 0, got {shift!r}")
        self.weights_path = weights_path
        self.shift = float(shift)
        self.model_config: dict = {}

    def load(self) -> None:
        if self.is_loaded:
            return
        transformer, text_encoder, config = load_toy_model(self.weights_path, self.model_dtype)
        size = transformer.config.sample_size
        if not _is_int(self.resolution) or self.resolution != size:
            raise ValueError(
                f"{OPTION}.resolution={self.resolution} is not allowed for this model: the toy model at "
                f"{self.weights_path or 'guardrl/toy/weights'} was trained on {size} x {size} images"
            )
        for module in (transformer, text_encoder):
            module.requires_grad_(False)
            module.eval()
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.model_config = config
        self.vae_scale_factor = 1
        self._pipe = SimpleNamespace(
            transformer=transformer,
            text_encoder=text_encoder,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=self.shift),
        )

    def check_image_size(self, height, width, height_option, width_option) -> None:
        # pixel space at the pretrained size only: its positional embedding was trained at that size
        size = self.transformer.config.sample_size
        for option, value in ((height_option, height), (width_option, width)):
            if value != size:
                raise ValueError(
                    f"{option}={value!r} is not allowed for this model: the toy model was trained on "
                    f"{size} x {size} images"
                )

    # The same transformer class as SD3, called the same way: SD3's patch multiple and forward (timesteps on
    # the 0..1000 scale), not a copy of them.
    latent_patch_multiple = SD3Backbone.latent_patch_multiple
    _transformer_forward = SD3Backbone._transformer_forward

    def _encode(self, prompts, device):
        embeds, pooled = self.text_encoder.encode(list(prompts), device)
        return {
            "prompt_embeds": embeds.to(self.model_dtype),
            "pooled_prompt_embeds": pooled.to(self.model_dtype),
        }

    def initial_noise(self, batch_size, generator, device):
        c = self.transformer.config.in_channels
        noise = torch.randn(
            (batch_size, c, self.height, self.width), generator=generator, device=generator.device
        )
        return noise.to(device)

    @torch.no_grad()
    def _decode(self, latents):
        # Pixel space: the model's [-1, 1] output is the image.
        return (latents.float() / 2 + 0.5).clamp(0, 1)
