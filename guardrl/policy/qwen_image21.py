"""Qwen-Image 2.1 (diffusers `QwenImage21Pipeline`, text-to-image): the backbone and a tiny random-weight
pipeline built in code.

What differs from Qwen-Image (guardrl/policy/qwen_image.py); the ground truth is
`QwenImage21Pipeline.__call__` and `QwenImage21Transformer2DModel.forward` of the installed diffusers
(diffusers/pipelines/qwenimage21/pipeline_qwenimage21.py, models/transformers/transformer_qwenimage21.py):
- text: one Qwen3-VL encoder behind a `Qwen3VLProcessor`; the prompt goes into the pipeline's raw t2i template
  (system prompt "Comprehend and analyze the provided prompt."), the system message's tokens (counted from the
  processor's chat template, `_drop_idx`) are dropped, and the kept rows are the last decoder layer's output
  BEFORE the final norm (the pipeline's forward hook). Variable length, a mask, no pooled embedding, nothing
  cut (the pipeline has no `max_sequence_length`). `_encode` calls the pipeline's own
  `_get_qwen_prompt_embeds`;
- the transformer: ONE single-stream block-causal sequence [text | target image]; the target image's rotary
  frame position is the text's length INCLUDING padding, so right-padding a prompt in a batch changes its
  velocity (not by rounding: the stock pipeline's batched output for a short prompt differs from the same
  prompt alone; tests/test_qwen_image21.py shows it). guardrl keeps every row's velocity independent of its
  batch: `_transformer_forward` runs the rows of each text length together, unpadded and unmasked, which is
  what the stock pipeline computes for a prompt on its own (and for true CFG, whose two sides it runs as two
  forwards). Timestep = sigma (the pipeline passes timestep / 1000); `img_mask` has one slot per 2x2 group of
  target latents; only the target tokens' outputs are the velocity;
- latents: 64-channel, 16x VAE, UNPATCHED: (B, h * w, C) with h = 2 * (H // 32) (the pipeline's
  `_pack_latents` is a plain flatten); sizes are multiples of 32 px (`latent_patch_multiple` = 2);
- guidance: plain true CFG, neg + g (pos - neg), no norm rescale (the base `_guide`); the release samples
  without guidance (true_cfg_scale 1);
- schedule (`sigmas`): the pipeline's `sample_sigmas` from its config when set (their count fixes the number
  of steps), else linspace(1, 1/S, S); either goes to the scheduler with mu from the token count h * w;
- decode: latents * latents_std + latents_mean (the VAE config's, in the pipeline's order), the 3D VAE's one
  frame; the VAE decodes RGBA (4 channels): guardrl's images are RGB, the alpha composited over white, as the
  pipeline itself flattens RGBA for its vision encoder ("trained with the alpha composited over white").

The tiny version builds a real `QwenImage21Pipeline` with tiny configs and seeded random weights (no hub).
transformers 5.24 cannot build `Qwen3VLProcessor` without torchvision, for the reason
guardrl/policy/qwen_image_edit.py gives for `Qwen2VLProcessor` (the video processor's base class); as there,
`ImageOnlyQwen3VLProcessor` is the same processor without the video slot, and `QwenImage21Backbone` loads a
pipeline's processor/ folder with it. No random-weight backbone at the published shape: the released configs
(Qwen/Qwen-Image-2.1 transformer/, vae/, scheduler/, model_index.json's sample_sigmas) could not be read
here, and diffusers' constructor defaults are not documented as equal to them.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from diffusers import (
    AutoencoderKLQwenImage21,
    FlowMatchEulerDiscreteScheduler,
    QwenImage21Pipeline,
    QwenImage21Transformer2DModel,
)
from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift
from tokenizers import AddedToken
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from guardrl.policy.backbones import OPTION, FlowBackbone, _is_int
from guardrl.policy.qwen_image import QwenImageBackbone, make_qwen_tokenizer, tiny_qwen_image_scheduler
from guardrl.policy.qwen_image_edit import VISION_TOKENS
from guardrl.policy.tiny import _eval

# The pipeline keeps every text token; FlowBackbone wants a number: not applied.
_UNUSED_MAX_SEQUENCE_LENGTH = 1024


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """`Qwen3VLProcessor` without its video processor: the same text and image processing, constructible and
    loadable without torchvision (see the module docstring; guardrl never passes videos)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def _from_pretrained_with_image_only_processor(path, **kwargs) -> QwenImage21Pipeline:
    """The stock QwenImage21Pipeline.from_pretrained, its processor/ folder read by ImageOnlyQwen3VLProcessor
    (a directory or a hub id)."""
    processor = ImageOnlyQwen3VLProcessor.from_pretrained(path, subfolder="processor")
    return QwenImage21Pipeline.from_pretrained(path, processor=processor, **kwargs)


# What FlowBackbone._load_pipeline calls as `pipeline_class` while QwenImage21Backbone loads: the class's name
# (for the model_index.json check) and the loader above.
_ImageOnlyProcessorLoader = SimpleNamespace(
    __name__=QwenImage21Pipeline.__name__, from_pretrained=_from_pretrained_with_image_only_processor
)


class QwenImage21Backbone(FlowBackbone):
    """Qwen-Image 2.1 text-to-image (single-stream block-causal DiT, Qwen3-VL text encoder, unpatched
    64-channel latents of a 16x RGBA VAE, plain true CFG, the pipeline's sample_sigmas)."""

    pipeline_class = QwenImage21Pipeline
    shard_block_names = ("transformer_blocks",)  # 32 single-stream blocks in the released model
    # one img_mask slot per 2 x 2 target latents: the pipeline floors sizes to multiples of 16 x 2 px
    latent_patch_multiple = 2
    collate = QwenImageBackbone.collate  # pad text to the batch's longest (zeros, mask 0)

    def __init__(
        self,
        pretrained_model_name_or_path: str | None = None,
        torch_dtype: str = "float32",
        resolution: int = 1024,
        prompt_cache_size: int = 4096,
        offload_text_encoders: bool = False,
        offload_vae: bool = False,
        height: int | None = None,
        width: int | None = None,
        use_sample_sigmas: bool = True,
    ) -> None:
        """
        Args:
            use_sample_sigmas: sample on the pipeline's `sample_sigmas` (model_index.json) when it has
                them, as the stock pipeline does; their count is then the only allowed
                sampling.num_inference_steps. false: linspace(1, 1/S, S), the pipeline's schedule without
                them (both shifted by the scheduler).
            The other arguments are FlowBackbone's (guardrl/policy/backbones.py). There is no
            max_sequence_length: QwenImage21Pipeline keeps every text token.
        """
        super().__init__(
            pretrained_model_name_or_path,
            torch_dtype,
            resolution,
            _UNUSED_MAX_SEQUENCE_LENGTH,
            prompt_cache_size,
            offload_text_encoders,
            offload_vae,
            height,
            width,
        )
        if not isinstance(use_sample_sigmas, bool):
            raise ValueError(f"{OPTION}.use_sample_sigmas must be true or false, got {use_sample_sigmas!r}")
        self.use_sample_sigmas = use_sample_sigmas

    # ----- loading
    def _load_pipeline(self):
        # The stock from_pretrained, with the processor/ folder read by ImageOnlyQwen3VLProcessor.
        self.pipeline_class = _ImageOnlyProcessorLoader
        try:
            return super()._load_pipeline()
        finally:
            del self.pipeline_class

    def lora_targets(self) -> list[str]:
        """The attention projections and the SwiGLU feed-forward of every single-stream block (the layers
        the transformer's tensor-parallel plan splits; the shared modulation stays out)."""
        return super().lora_targets() + ["img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out"]

    # ----- text
    def _encode(self, prompts, device):
        embeds, mask, _ = self.pipeline._get_qwen_prompt_embeds(prompts, None, device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask.to(torch.long)}

    # ----- latents and schedule
    def _latent_hw(self) -> tuple[int, int]:
        unit = self.vae_scale_factor * 2
        return 2 * (self.height // unit), 2 * (self.width // unit)

    def image_seq_len(self) -> int:
        h, w = self._latent_hw()
        return h * w  # unpatched: one token per latent pixel

    def initial_noise(self, batch_size, generator, device):
        # the pipeline draws (B, 1, C, h, w): the same numbers in the same order as (B, C, h, w)
        c = self.transformer.config.in_channels
        h, w = self._latent_hw()
        noise = torch.randn((batch_size, c, h, w), generator=generator, device=generator.device)
        return self.pipeline._pack_latents(noise, batch_size, c, h, w).to(device)

    def sigmas(self, num_inference_steps: int) -> torch.Tensor:
        """QwenImage21Pipeline's schedule: its config's `sample_sigmas` (if `use_sample_sigmas`) or
        linspace(1, 1/S, S), set on the scheduler with mu from the image's token count; S + 1 values."""
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(
                "num_inference_steps (sampling.num_inference_steps) must be >= 1, got "
                f"{num_inference_steps!r}"
            )
        sample_sigmas = self.pipeline.config.get("sample_sigmas") if self.use_sample_sigmas else None
        if sample_sigmas is None:
            base = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        elif len(sample_sigmas) != num_inference_steps:
            raise ValueError(
                f"the pipeline's sample_sigmas (model_index.json) fix the number of steps at "
                f"{len(sample_sigmas)}, but sampling.num_inference_steps={num_inference_steps}: set it to "
                f"{len(sample_sigmas)}, or {OPTION}.use_sample_sigmas=false to sample on "
                f"linspace(1, 1/S, S) instead"
            )
        else:
            base = np.asarray(sample_sigmas, dtype=np.float64)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        config = scheduler.config
        mu = calculate_shift(
            self.image_seq_len(),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(sigmas=base, mu=mu)
        return scheduler.sigmas.to(torch.float64).cpu()

    # ----- velocity
    def _transformer_forward(self, transformer, latents, t, conditioning, guidance_scale):
        h, w = self._latent_hw()
        tokens = latents.shape[1]
        lengths = conditioning["prompt_embeds_mask"].sum(dim=1)
        distinct = sorted(set(lengths.tolist()))
        out = None
        for length in distinct:
            # the rows whose prompt has this many tokens, without padding: each row's velocity is the one the
            # pipeline computes for its prompt alone (the module docstring says why padding would change it)
            rows = slice(None) if len(distinct) == 1 else (lengths == length).nonzero().squeeze(1)
            x = latents[rows]
            embeds = conditioning["prompt_embeds"][rows, :length].to(latents.dtype)
            n = x.shape[0]
            img_mask = torch.cat(
                [
                    torch.zeros(n, length, dtype=torch.bool, device=x.device),
                    torch.ones(n, tokens // 4, dtype=torch.bool, device=x.device),  # one slot per 2x2 latents
                ],
                dim=1,
            )
            velocity = transformer(
                hidden_states=x,
                timestep=t[rows].to(latents.dtype),  # sigma scale: the pipeline passes timestep / 1000
                encoder_hidden_states=embeds,
                encoder_hidden_states_mask=None,  # nothing padded: the pipeline passes no mask either
                img_shapes=[[(1, h, w)]] * n,
                img_mask=img_mask,
                return_dict=False,
            )[0][:, -tokens:]  # the text positions' outputs are no velocity
            if len(distinct) == 1:
                return velocity
            if out is None:
                out = velocity.new_zeros(latents.shape[0], *velocity.shape[1:])
            out = out.index_copy(0, rows, velocity)
        return out

    # ----- images
    @torch.no_grad()
    def _decode(self, latents):
        return rgba_over_white(self._decode_rgba(latents))

    @torch.no_grad()
    def _decode_rgba(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's image (B, C, H, W) in [0, 1] as the pipeline post-processes it (C = 4, RGBA, for the
        released VAE)."""
        vae = self.vae
        z = self.pipeline._unpack_latents(latents, self.height, self.width, self.vae_scale_factor)
        z = z.to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
        z = z * std + mean  # the pipeline's order of operations
        images = vae.decode(z, return_dict=False)[0][:, :, 0]  # the one frame
        return (images.float() / 2 + 0.5).clamp(0, 1)


def rgba_over_white(images: torch.Tensor) -> torch.Tensor:
    """(B, 4, H, W) RGBA in [0, 1] -> (B, 3, H, W) RGB, composited over white; RGB passes through."""
    if images.shape[1] == 3:
        return images
    rgb, alpha = images[:, :3], images[:, 3:4]
    return rgb * alpha + (1.0 - alpha)


# ----- the tiny pipeline
# A chat template of the released Qwen3-VL kind for text messages: what the pipeline's `_drop_idx` counts.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VIDEO_TOKEN = "<|video_pad|>"


def make_tiny_qwen3_vl_processor() -> ImageOnlyQwen3VLProcessor:
    """Qwen-Image's tiny byte-level BPE tokenizer (guardrl/policy/qwen_image.py) with the vision tokens added,
    a PIL image processor (16 px patches, as Qwen3-VL's; never run on text-only prompts), and
    `TINY_CHAT_TEMPLATE`."""
    tokenizer = make_qwen_tokenizer()
    tokenizer.add_tokens([AddedToken(token, special=True) for token in (*VISION_TOKENS, VIDEO_TOKEN)])
    return ImageOnlyQwen3VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(patch_size=16, merge_size=2),
        tokenizer=tokenizer,
        chat_template=TINY_CHAT_TEMPLATE,
    )


def _tiny_qwen3_vl_text_encoder(processor, hidden: int, seed: int) -> Qwen3VLForConditionalGeneration:
    tokenizer = processor.tokenizer
    torch.manual_seed(seed)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (*VISION_TOKENS, VIDEO_TOKEN)}
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [1, 1, 2]},
            "pad_token_id": tokenizer.pad_token_id,
        },
        # built (the class always has one) but never run: text-only prompts carry no image tokens
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids[VIDEO_TOKEN],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen3VLForConditionalGeneration(config)


def _tiny_qwen21_vae(seed: int, z_dim: int) -> AutoencoderKLQwenImage21:
    torch.manual_seed(seed)
    # Four downsamplings give the pipeline's fixed vae_scale_factor 16; RGBA out, as released. The latent
    # statistics are made-up, non-trivial values so that a decode which ignored them would differ.
    generator = torch.Generator().manual_seed(seed)
    return AutoencoderKLQwenImage21(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, False, True, True],
        latents_mean=(torch.randn(z_dim, generator=generator) * 0.5).tolist(),
        latents_std=(torch.rand(z_dim, generator=generator) * 1.5 + 0.5).tolist(),
    )


def make_tiny_qwen_image21_pipeline(
    seed: int = 0, num_layers: int = 2, sample_sigmas: list[float] | None = None
) -> QwenImage21Pipeline:
    """A QwenImage21Pipeline with tiny random weights (a two-block transformer, 8 latent channels); 128 px
    images from 8 x 8 latents (16x VAE)."""
    processor = make_tiny_qwen3_vl_processor()
    text_encoder = _tiny_qwen3_vl_text_encoder(processor, 16, seed + 2)
    torch.manual_seed(seed)
    z_dim = 8
    transformer = QwenImage21Transformer2DModel(
        patch_size=1,
        in_channels=z_dim,
        out_channels=z_dim,
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=16,
        mlp_ratio=3,
        axes_dims_rope=(4, 6, 6),
    )
    pipe = QwenImage21Pipeline(
        scheduler=tiny_qwen_image_scheduler(),  # the Qwen-Image one: its token count matters here too
        vae=_tiny_qwen21_vae(seed + 1, z_dim),
        text_encoder=text_encoder,
        processor=processor,
        transformer=transformer,
        sample_sigmas=sample_sigmas,
    )
    # model_index.json names the processor as the released pipeline's does (transformers Qwen3VLProcessor)
    pipe.register_to_config(processor=("transformers", "Qwen3VLProcessor"))
    return _eval(pipe)


class StockPerPromptQwenImage21Pipeline(QwenImage21Pipeline):
    """QwenImage21Pipeline whose `__call__` is the stock one, called once per prompt (with its row of
    `latents`), and whose "pt" images are composited over white (`rgba_over_white`), as guardrl's:
    tests/test_backbone_contract.py calls it with prompts of different lengths, which the stock call pads
    (and padding moves a short prompt's image; see the module docstring)."""

    def __call__(self, prompt=None, latents=None, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        outputs = []
        for i, text in enumerate(prompts):
            noise = None if latents is None else latents[i : i + 1]
            outputs.append(super().__call__(prompt=text, latents=noise, **kwargs).images)
        if isinstance(outputs[0], torch.Tensor):
            return SimpleNamespace(images=rgba_over_white(torch.cat(outputs)))
        return SimpleNamespace(images=[image for out in outputs for image in out])


class TinyQwenImage21Backbone(QwenImage21Backbone):
    """The tiny random-weight Qwen-Image 2.1 pipeline, built in code from a seed (no files, no hub)."""

    def __init__(
        self,
        seed: int = 0,
        num_layers: int = 2,
        resolution: int = 128,
        prompt_cache_size: int = 4096,
        offload_text_encoders: bool = False,
        offload_vae: bool = False,
        height: int | None = None,
        width: int | None = None,
        sample_sigmas: list[float] | None = None,
        use_sample_sigmas: bool = True,
    ):
        super().__init__(
            None,
            "float32",
            resolution,
            prompt_cache_size=prompt_cache_size,
            offload_text_encoders=offload_text_encoders,
            offload_vae=offload_vae,
            height=height,
            width=width,
            use_sample_sigmas=use_sample_sigmas,
        )
        if not (_is_int(num_layers) and num_layers >= 1):
            raise ValueError(f"{OPTION}.num_layers must be an integer >= 1, got {num_layers!r}")
        self.seed = seed
        self.num_layers = num_layers
        self.sample_sigmas = sample_sigmas

    def _load_pipeline(self):
        return make_tiny_qwen_image21_pipeline(self.seed, self.num_layers, self.sample_sigmas)

    def stock_pipeline(self) -> QwenImage21Pipeline:
        """A fresh pipeline with the same weights: the stock call once per prompt
        (`StockPerPromptQwenImage21Pipeline`)."""
        pipe = self._load_pipeline()
        stock = StockPerPromptQwenImage21Pipeline(**pipe.components, sample_sigmas=self.sample_sigmas)
        return _eval(stock)

    def stock_call_kwargs(self, guidance_scale: float) -> dict:
        """The stock call's arguments that match this backbone's sampling: true CFG needs a negative prompt
        (guardrl's is ""; the pipeline encodes it as " ", as it does for guardrl)."""
        kwargs: dict = {"true_cfg_scale": guidance_scale}
        if guidance_scale > 1.0:
            kwargs["negative_prompt"] = ""
        return kwargs
