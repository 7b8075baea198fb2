"""FLUX.1-Kontext: Flux with a conditioning image (image editing), as diffusers' `FluxKontextPipeline` runs
it.

What Kontext adds to FLUX.1 (ground truth: `FluxKontextPipeline.__call__`, diffusers 0.42):
- the conditioning image is resized (by default to the preferred Kontext resolution nearest its aspect ratio;
  `condition_image_size`: a square S x S instead, as Flow-Factory's `condition_image_size`), normalized to
  [-1, 1], VAE-encoded (the distribution's mode; the VAE's shift and scaling from its config) and packed
  like the noisy latents;
- its tokens get their own position ids: the noisy latents' grid ids with the first axis set to 1;
- each forward concatenates the image tokens after the noisy tokens along the sequence (ids likewise) and
  keeps only the noisy tokens' velocity. The sigma schedule (dynamic shift from the noisy tokens' count),
  the timestep scale, guidance and decoding are FLUX.1's.

The image's tensors ride in the `Conditioning` (batch-first, `image_latents` and `image_ids`), so that
`select` picks them with their prompts. A tiny random-weight version for tests (`TinyFluxKontextBackbone`)
and one of the published shapes for timing and memory (`RandomFluxKontextBackbone`, FLUX.1-dev's
transformer, VAE and scheduler: FLUX.1-Kontext-dev ships the same configs) are at the end of this file.
"""

from __future__ import annotations

import torch
from diffusers import FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

from guardrl.policy.backbones import OPTION, FluxBackbone, _is_int
from guardrl.policy.random_weights import FLUX_DEV_SCHEDULER, FLUX_DEV_TEXT, FLUX_DEV_VAE, _RandomWeights
from guardrl.policy.tiny import _eval, make_tiny_flux_pipeline


def _check_condition_image_size(size) -> None:
    if size is not None and (not _is_int(size) or size < 16):
        raise ValueError(
            f"{OPTION}.condition_image_size must be null (the preferred Kontext resolution nearest each "
            f"image's aspect ratio) or an integer >= 16 (pixels, a multiple of 16), got {size!r}"
        )


class FluxKontextBackbone(FluxBackbone):
    """FLUX.1-Kontext-dev (black-forest-labs/FLUX.1-Kontext-dev): FLUX.1 conditioned on one image per prompt
    (data.image_field)."""

    pipeline_class = FluxKontextPipeline
    takes_condition_image = True

    def __init__(
        self,
        pretrained_model_name_or_path: str | None = None,
        torch_dtype: str = "float32",
        resolution: int = 512,
        max_sequence_length: int = 512,
        prompt_cache_size: int = 4096,
        offload_text_encoders: bool = False,
        offload_vae: bool = False,
        height: int | None = None,
        width: int | None = None,
        condition_image_size: int | None = None,
    ) -> None:
        """
        Args:
            condition_image_size: the conditioning image is resized to this square size in pixels (a
                multiple of 16) before it is encoded; null: to the preferred Kontext resolution nearest its
                aspect ratio (about 1024 x 1024 px; what FluxKontextPipeline does by default). All images
                of a batch must come out the same size.
            The other arguments: see FlowBackbone.
        """
        super().__init__(
            pretrained_model_name_or_path,
            torch_dtype,
            resolution,
            max_sequence_length,
            prompt_cache_size,
            offload_text_encoders,
            offload_vae,
            height,
            width,
        )
        _check_condition_image_size(condition_image_size)
        self.condition_image_size = condition_image_size
        self._last_image: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None

    def load(self) -> None:
        if self.is_loaded:
            return
        super().load()
        multiple = self.vae_scale_factor * self.latent_patch_multiple
        size = self.condition_image_size
        if size is not None and size % multiple:
            lower = size // multiple * multiple
            nearest = f"{lower} or {lower + multiple}" if lower else f"{multiple}"
            raise ValueError(
                f"{OPTION}.condition_image_size={size} is not allowed for this model: it must be a multiple "
                f"of {multiple} (VAE downsampling x{self.vae_scale_factor} times the 2x2 packing), e.g. "
                f"{nearest}"
            )

    # ----- the conditioning image
    def _condition_size(self, image: torch.Tensor) -> tuple[int, int]:
        """(height, width) the image is resized to, as FluxKontextPipeline.__call__ step 3 computes it."""
        processor = self.pipeline.image_processor
        multiple = self.vae_scale_factor * 2
        if self.condition_image_size is not None:
            height = width = self.condition_image_size
        else:
            # the image's size floored to the processor's multiple, then the preferred resolution nearest
            # its aspect ratio
            height, width = processor.get_default_height_width(image)
            aspect_ratio = width / height
            _, width, height = min(
                (abs(aspect_ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS
            )
        return height // multiple * multiple, width // multiple * multiple

    @torch.no_grad()
    def _encode_condition_image(self, image: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"{type(self).__name__}: a conditioning image must be a (3, H, W) tensor in [0, 1] (RGB), "
                f"got shape {tuple(image.shape)}"
            )
        # A group repeats its prompt's image: encode it once (the result is bitwise what encoding it again
        # would give, so this changes no number).
        if self._last_image is not None:
            last, rows = self._last_image
            if last.shape == image.shape and last.device == image.device and torch.equal(last, image):
                return {name: t.to(device) for name, t in rows.items()}
        pipe = self.pipeline
        batch = image[None].float()
        height, width = self._condition_size(batch)
        # the pipeline's preprocessing: resize (a tensor: nearest), then [0, 1] -> [-1, 1]
        batch = pipe.image_processor.resize(batch, height, width)
        batch = pipe.image_processor.preprocess(batch, height, width)
        vae = self.vae
        latents = pipe._encode_vae_image(batch.to(device=device, dtype=vae.dtype), generator=None)
        latents = latents.to(self.model_dtype)  # prepare_latents works in the prompt embeddings' dtype
        channels, latent_h, latent_w = latents.shape[1:]
        packed = pipe._pack_latents(latents, 1, channels, latent_h, latent_w)
        ids = pipe._prepare_latent_image_ids(1, latent_h // 2, latent_w // 2, device, self.model_dtype)
        ids[..., 0] = 1  # the image's tokens: the noisy grid's ids with the first axis set to 1
        rows = {"image_latents": packed, "image_ids": ids[None]}
        self._last_image = (image.detach().clone(), rows)
        return rows

    @torch.no_grad()
    def encode_prompts(self, prompts, with_negative, images=None):
        # the VAE encodes the conditioning images: on the device while it does, when it is offloaded
        onload = ["vae"] if images is not None and self.offload_vae else []
        with self._onloaded(onload, self.transformer.device):
            return super().encode_prompts(prompts, with_negative, images)

    def collate(self, rows):
        sizes = {tuple(row["image_latents"].shape[1:]) for row in rows if "image_latents" in row}
        if len(sizes) > 1:
            raise ValueError(
                f"{type(self).__name__}: the conditioning images of one batch have different sizes after "
                f"resizing ({sorted(sizes)} tokens x channels): use images of one aspect ratio, or set "
                f"{OPTION}.condition_image_size to resize every image to one square size"
            )
        return super().collate(rows)

    # ----- the forward
    def _transformer_forward(self, transformer, latents, t, conditioning, guidance_scale):
        batch, tokens = latents.shape[:2]
        h, w = self._latent_hw()
        noisy_ids = self.pipeline._prepare_latent_image_ids(
            batch, h // 2, w // 2, latents.device, latents.dtype
        )
        # every row's image has the same size (collate checks it), so one set of ids serves the batch
        image_ids = conditioning["image_ids"][0].to(latents.dtype)
        hidden = torch.cat([latents, conditioning["image_latents"].to(latents.dtype)], dim=1)
        prompt_embeds = conditioning["prompt_embeds"]
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((batch,), guidance_scale, device=latents.device, dtype=torch.float32)
        velocity = transformer(
            hidden_states=hidden,
            timestep=t.to(latents.dtype),  # sigma scale, as FluxKontextPipeline passes timestep / 1000
            guidance=guidance,
            pooled_projections=conditioning["pooled_prompt_embeds"].to(latents.dtype),
            encoder_hidden_states=prompt_embeds.to(latents.dtype),
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=latents.device, dtype=latents.dtype),
            img_ids=torch.cat([noisy_ids, image_ids]),  # the sequence: noisy tokens, then image tokens
            return_dict=False,
        )[0]
        return velocity[:, :tokens]  # the image tokens' outputs are not a velocity of anything


# ---------------------------------------------------------------------------------------------------- tiny
def make_tiny_flux_kontext_pipeline(seed: int = 0, guidance_embeds: bool = True) -> FluxKontextPipeline:
    """A FluxKontextPipeline with the tiny Flux components of `make_tiny_flux_pipeline` (the transformer is
    the same FluxTransformer2DModel class; ~70k parameters). Kontext-dev is guidance-distilled, so the
    guidance embedding is on by default. As in diffusers' tests/pipelines/flux/test_pipeline_flux_kontext.py,
    the dummy components are the Flux ones (in_channels = 4 x the VAE's latent channels, rotary axes over
    the three id columns)."""
    components = make_tiny_flux_pipeline(seed, guidance_embeds).components
    return _eval(FluxKontextPipeline(**components))


class TinyFluxKontextBackbone(FluxKontextBackbone):
    """The tiny random-weight Kontext pipeline, built in code from a seed (no files, no hub); conditioning
    images are resized to 32 x 32 px unless `condition_image_size` says otherwise (null: the pipeline's
    ~1024 px preferred resolutions, slow on a CPU)."""

    def __init__(
        self,
        seed: int = 0,
        guidance_embeds: bool = True,
        resolution: int = 128,
        prompt_cache_size: int = 4096,
        offload_text_encoders: bool = False,
        offload_vae: bool = False,
        height: int | None = None,
        width: int | None = None,
        condition_image_size: int | None = 32,
    ):
        super().__init__(
            None,
            "float32",
            resolution,
            max_sequence_length=32,
            prompt_cache_size=prompt_cache_size,
            offload_text_encoders=offload_text_encoders,
            offload_vae=offload_vae,
            height=height,
            width=width,
            condition_image_size=condition_image_size,
        )
        self.seed = seed
        self.guidance_embeds = guidance_embeds

    def _load_pipeline(self):
        return make_tiny_flux_kontext_pipeline(self.seed, self.guidance_embeds)

    def stock_pipeline(self) -> FluxKontextPipeline:
        """A fresh stock diffusers pipeline with the same weights (see TinySD3Backbone.stock_pipeline)."""
        return self._load_pipeline()  # built in code: a fresh one with the same weights

    def stock_call_kwargs(self, guidance_scale: float) -> dict:
        """The stock call's arguments that match this backbone's sampling. `max_area` keeps the pipeline at
        height x width (it rescales to 1024^2 px by default); with a fixed condition_image_size the pipeline
        must keep the image's own size (`_auto_resize=False`), so pass it images of that size
        (`example_condition_images`)."""
        return {
            "guidance_scale": guidance_scale,
            "max_sequence_length": self.max_sequence_length,
            "max_area": self.height * self.width,
            "_auto_resize": self.condition_image_size is None,
        }

    def example_condition_images(self, count: int, seed: int = 0) -> list[torch.Tensor]:
        """`count` distinct random conditioning images (3, S, S) in [0, 1], S = condition_image_size (64 px
        when null), that the stock pipeline called with `stock_call_kwargs` preprocesses as this backbone
        does."""
        size = self.condition_image_size or 64
        generator = torch.Generator().manual_seed(seed)
        return [torch.rand(3, size, size, generator=generator) for _ in range(count)]


# ------------------------------------------------------------------------------------------ random weights
class RandomFluxKontextBackbone(_RandomWeights, FluxKontextBackbone):
    """FLUX.1-Kontext-dev's transformer (FLUX.1-dev's shape: 19 double and 38 single blocks, guidance
    embedding, 11.9B parameters) and VAE with random weights; prompt embeddings random per prompt (no text
    encoders, guardrl/policy/random_weights.py). The conditioning images are real inputs: each is resized to
    `condition_image_size` and encoded by the random VAE, and its tokens join the noisy ones in every forward,
    as in FluxKontextBackbone, so the cost measured is an edit's. For timing and memory only."""

    kind, vae_config, scheduler_config = "flux", FLUX_DEV_VAE, FLUX_DEV_SCHEDULER
    text_widths, clip_tokens, default_max_sequence_length = FLUX_DEV_TEXT, 0, 512
    # the contract test's conditioning images (the same as the tiny backbone's)
    example_condition_images = TinyFluxKontextBackbone.example_condition_images

    def __init__(
        self,
        torch_dtype: str = "float32",
        resolution: int = 512,
        max_sequence_length: int | None = None,
        small: bool = False,
        seed: int = 0,
        prompt_cache_size: int = 4096,
        offload_vae: bool = False,
        height: int | None = None,
        width: int | None = None,
        condition_image_size: int | None = None,
    ) -> None:
        """
        Args:
            condition_image_size: as FluxKontextBackbone's (configs/flux_kontext: 384, the resolution).
            The others: as RandomFluxDevBackbone's (guardrl/policy/random_weights.py).
        """
        super().__init__(
            torch_dtype,
            resolution,
            max_sequence_length,
            small,
            seed,
            prompt_cache_size,
            offload_vae,
            height,
            width,
        )
        _check_condition_image_size(condition_image_size)
        self.condition_image_size = condition_image_size
