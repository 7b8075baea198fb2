"""Z-Image (Tongyi-MAI; diffusers `ZImagePipeline`): the backbone, a tiny random-weight pipeline built in
code, and a random-weight backbone of the published 6B shapes.

What Z-Image does differently from SD3 / Flux, all of it read from diffusers 0.42
`pipelines/z_image/pipeline_z_image.py` (`ZImagePipeline.__call__`) and
`models/transformers/transformer_z_image.py` (`ZImageTransformer2DModel.forward`):
- the transformer takes Python lists, one tensor per sample: latents (C, 1, H, W) (a frame axis) and caption
  features (L_i, cap_feat_dim) of each prompt's own length L_i; it returns a list of (C, 1, H, W);
- its timestep is 1 - sigma (`(1000 - t) / 1000` of the scheduler's t = 1000 sigma), and it predicts
  x0 - noise: the pipeline steps on the negated output. guardrl's v is noise - x0, so the backbone negates;
- text: one Qwen3 model; a prompt is wrapped in the tokenizer's chat template, padded to
  `max_sequence_length`, and the second-to-last hidden state of its real (unmasked) tokens is its caption.
  guardrl keeps the padded (B, max_sequence_length, width) tensor plus a mask (`prompt_embeds_mask`), so a
  row never depends on its batch, and the forward cuts each row back to its own tokens;
- CFG: the pipeline's `guidance_scale` g gives pos + g (pos - neg), i.e. guardrl's (standard) scale w = g + 1
  (neg + w (pos - neg)); g = 0 (Z-Image-Turbo) is guardrl's w = 1, no guidance. The pipeline's defaults
  `cfg_normalization=False` and `cfg_truncation=1.0` change nothing, and guardrl reproduces that default path;
- the schedule: sigmas linspace(1, 1/S, S) passed to the scheduler with mu from the image's token count (the
  scheduler applies its static shift, 3 for Z-Image-Turbo, or the dynamic one when its config asks).
"""

from __future__ import annotations

import logging

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

from guardrl.policy.backbones import OPTION, TRUNCATION_MESSAGE, FlowBackbone, _is_int
from guardrl.policy.random_weights import FLUX_DEV_VAE, _build_vae, _cast, _default_dtype, prompt_seed
from guardrl.policy.tiny import TINY_WORDS

# ZImagePipeline.__call__'s default max_sequence_length: Qwen tokens, chat template included.
Z_IMAGE_MAX_SEQUENCE_LENGTH = 512
# ZImageTransformer2DModel pads every caption and image sequence to a multiple of this (SEQ_MULTI_OF).
_SEQ_MULTIPLE = 32
# ZImagePipeline requires height and width divisible by vae_scale_factor * 2: the transformer's 2x2 patches
# (its forward's default patch_size, which the pipeline never overrides).
_PATCH = 2


class ZImageBackbone(FlowBackbone):
    """Z-Image / Z-Image-Turbo: a single-stream DiT with noise and context refiners, a Qwen3 text encoder and
    the FLUX.1 VAE.

    `sampling.guidance_scale` is guardrl's standard CFG scale w: the stock pipeline's `guidance_scale` is
    w - 1 (module docstring). Z-Image-Turbo samples without guidance (pipeline 0.0, guardrl 1.0).
    """

    pipeline_class = ZImagePipeline
    latent_patch_multiple = _PATCH
    # The 2 noise-refiner blocks (image tokens), the 2 context-refiner blocks (caption tokens), then the 30
    # single-stream blocks; all are ZImageTransformerBlock with the same attention (to_q/k/v, to_out.0).
    shard_block_names = ("noise_refiner", "context_refiner", "layers")

    def __init__(
        self,
        pretrained_model_name_or_path: str | None = None,
        torch_dtype: str = "float32",
        resolution: int = 512,
        max_sequence_length: int = Z_IMAGE_MAX_SEQUENCE_LENGTH,
        prompt_cache_size: int = 4096,
        offload_text_encoders: bool = False,
        offload_vae: bool = False,
        height: int | None = None,
        width: int | None = None,
    ) -> None:
        """
        Args:
            pretrained_model_name_or_path: a local diffusers ZImagePipeline directory or a hub id
                (Tongyi-MAI/Z-Image-Turbo).
            max_sequence_length: Qwen tokens per prompt, chat template included (the pipeline's default: 512).
            Others: as `FlowBackbone`.
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

    def load(self) -> None:
        super().load()
        self._check_rope_range()

    def _check_rope_range(self) -> None:
        # The transformer's 3-axis RoPE has a table of axes_lens positions per axis: captions take positions
        # 1..L (L padded to 32) on axis 0 and the image L + 1 there, its token rows and columns axes 1 and 2.
        # Beyond them the forward fails with an index error deep in the model; say which option to change.
        lens = list(self.transformer.config.axes_lens)
        caption = -(-self.max_sequence_length // _SEQ_MULTIPLE) * _SEQ_MULTIPLE
        if caption + 1 >= lens[0]:
            raise ValueError(
                f"{OPTION}.max_sequence_length={self.max_sequence_length} is too long for this transformer: "
                f"captions padded to {caption} tokens need RoPE position {caption + 1} but its axes_lens[0] "
                f"is {lens[0]}; it must be at most {(lens[0] - 2) // _SEQ_MULTIPLE * _SEQ_MULTIPLE}"
            )
        h, w = self._latent_hw()
        pixels = self.vae_scale_factor * _PATCH  # per image token
        for option, tokens, limit in (("height", h // _PATCH, lens[1]), ("width", w // _PATCH, lens[2])):
            if tokens > limit:
                option = "resolution" if self.height == self.width == self.resolution else option
                size = self.height if option == "height" else self.width
                raise ValueError(
                    f"{OPTION}.{option}={size} is too large for this transformer: {size} pixels make "
                    f"{tokens} image tokens (one per {pixels} pixels), its RoPE table (axes_lens) holds "
                    f"{limit}; it must be at most {limit * pixels} pixels"
                )

    # ----- text
    def _encode(self, prompts, device):
        pipe = self.pipeline
        for prompt in prompts:
            self._note_truncation(prompt)
        # encode_prompt replaces the list's items by their chat-templated text: give it a copy.
        embeds, _ = pipe.encode_prompt(
            prompt=list(prompts),
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        width = embeds[0].shape[-1]
        padded = embeds[0].new_zeros(len(embeds), self.max_sequence_length, width)
        mask = torch.zeros(len(embeds), self.max_sequence_length, dtype=torch.bool, device=padded.device)
        for i, row in enumerate(embeds):
            padded[i, : row.shape[0]] = row
            mask[i, : row.shape[0]] = True
        return {"prompt_embeds": padded, "prompt_embeds_mask": mask}

    def _note_truncation(self, prompt: str) -> None:
        # ZImagePipeline truncates silently; say it through diffusers' logger in the words the base class
        # counts (FlowBackbone.encode_prompts keeps such records out of the log and reports them once).
        tokenizer = self.pipeline.tokenizer
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )
        if len(tokenizer(text).input_ids) > self.max_sequence_length:
            logging.getLogger(type(self.pipeline).__module__).warning(
                TRUNCATION_MESSAGE + " (the prompt exceeds max_sequence_length=%d)", self.max_sequence_length
            )

    # ----- latents
    def _latent_hw(self) -> tuple[int, int]:
        # ZImagePipeline.prepare_latents: 2 * (height // (vae_scale_factor * 2)), the same for the width
        unit = self.vae_scale_factor * _PATCH
        return 2 * (self.height // unit), 2 * (self.width // unit)

    def image_seq_len(self) -> int:
        h, w = self._latent_hw()
        return (h // _PATCH) * (w // _PATCH)

    def initial_noise(self, batch_size, generator, device):
        h, w = self._latent_hw()
        shape = (batch_size, self.transformer.config.in_channels, h, w)
        return torch.randn(shape, generator=generator, device=generator.device).to(device)

    def sigmas(self, num_inference_steps: int) -> torch.Tensor:
        """ZImagePipeline's schedule: linspace(1, 1/S, S), shifted by the scheduler (mu: image tokens)."""
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(
                "num_inference_steps (sampling.num_inference_steps) must be >= 1, got "
                f"{num_inference_steps!r}"
            )
        config = self.scheduler.config
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        mu = calculate_shift(
            self.image_seq_len(),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(num_inference_steps), mu=mu)
        return scheduler.sigmas.to(torch.float64).cpu()

    # ----- the forward
    def _transformer_forward(self, transformer, latents, t, conditioning, guidance_scale):
        embeds = conditioning["prompt_embeds"].to(latents.dtype)
        captions = [row[keep] for row, keep in zip(embeds, conditioning["prompt_embeds_mask"])]
        # The pipeline's timestep: (1000 - t) / 1000 of the scheduler's t = 1000 sigma, in float32.
        timestep = (1000 - t.float() * 1000) / 1000
        out = transformer(list(latents.unsqueeze(2).unbind(0)), timestep, captions, return_dict=False)[0]
        # Z-Image predicts x0 - noise (the pipeline steps on -output); guardrl's velocity is noise - x0.
        return -torch.stack(out).squeeze(2)

    @torch.no_grad()
    def _decode(self, latents):
        vae = self.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------
# A tiny Z-Image pipeline built in code
# ----------------------------------------------------------------------------------------------------------

# Qwen3's chat template, reduced to what ZImagePipeline uses: user turns, then the assistant's generation
# prompt; `enable_thinking=False` would add an empty think block (the pipeline passes True).
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
_QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _byte_symbols() -> dict[int, str]:
    # The GPT-2 / Qwen byte-level alphabet: printable bytes stand for themselves, the others (space: "Ġ",
    # newline: "Ċ") for 256 + their rank among the non-printable bytes.
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return symbols


def make_qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE Qwen tokenizer: the 256 byte symbols, merges for TINY_WORDS (and the chat template's
    role names) with and without a leading space, Qwen's special tokens and the chat template."""
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for byte in range(256):
        vocab[symbols[byte]] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in (*TINY_WORDS, "user", "assistant"):
        for form in (symbols[ord(" ")] + word, word):
            current = form[0]
            for piece in form[1:]:
                if (current, piece) not in merges:
                    merges.append((current, piece))
                current += piece
                vocab.setdefault(current, len(vocab))
    for special in _QWEN_SPECIAL:
        vocab[special] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def _tiny_qwen3(width: int, tokenizer: Qwen2Tokenizer, seed: int) -> Qwen3Model:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=37,
        num_hidden_layers=2,  # the pipeline reads hidden_states[-2]: the first layer's output
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Qwen3Model(config)


# Z-Image ships the FLUX.1 VAE: 16 latent channels, latents scaled by 0.3611 and shifted by 0.1159
# (random_weights.FLUX_DEV_VAE has the full shape).
_TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8,) * 4,
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=4,
    sample_size=32,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)
# Z-Image-Turbo's scheduler: static shift 3 (Tongyi-MAI/Z-Image src/config/model.py: DEFAULT_SCHEDULER_SHIFT
# 3.0, DEFAULT_SCHEDULER_USE_DYNAMIC_SHIFTING False).
Z_IMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
# The tiny transformer. Its width is set by one fixed cost: the timestep MLP is 256 -> 1024 -> min(dim, 256)
# wide at any size (~0.36M parameters at dim 96), and the FSDP2 blocks must still hold most parameters.
TINY_TRANSFORMER = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=96,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=3,
    n_kv_heads=3,
    qk_norm=True,
    cap_feat_dim=32,
    axes_dims=[8, 12, 12],  # head dim 32
    axes_lens=[64, 32, 32],  # captions of up to 32 tokens; images up to 512 px
)


def _fill_pad_tokens(transformer: ZImageTransformer2DModel, seed: int) -> None:
    # The image and caption pad tokens are created with torch.empty (loaded weights fill them); random
    # memory would make two builds differ, or hold NaNs. Seeded normal values instead.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("x_pad_token", "cap_pad_token"):
            pad = getattr(transformer, name)
            pad.copy_(torch.randn(pad.shape, generator=generator).to(pad.dtype))


def make_tiny_z_image_pipeline(seed: int = 0) -> ZImagePipeline:
    """A ZImagePipeline with ~0.9M transformer parameters (most of them the fixed-size timestep MLP), a
    2-layer Qwen3 of width 32 and a 16-channel x8 VAE; 128 px images from 16 x 16 x 16 latents."""
    tokenizer = make_qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(**TINY_TRANSFORMER)
    _fill_pad_tokens(transformer, seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**_TINY_VAE)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER),
        vae=vae,
        text_encoder=_tiny_qwen3(TINY_TRANSFORMER["cap_feat_dim"], tokenizer, seed + 2),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # modules built by hand are in train mode
    return pipe


class TinyZImageBackbone(ZImageBackbone):
    """The tiny random-weight Z-Image pipeline, built in code from a seed (no files, no hub)."""

    def __init__(
        self,
        seed: int = 0,
        resolution: int = 128,
        prompt_cache_size: int = 4096,
        offload_text_encoders: bool = False,
        offload_vae: bool = False,
        height: int | None = None,
        width: int | None = None,
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
        )
        self.seed = seed

    def _load_pipeline(self):
        return make_tiny_z_image_pipeline(self.seed)

    def stock_pipeline(self) -> ZImagePipeline:
        """A fresh stock diffusers pipeline with the same weights (tests/test_backbone_contract.py)."""
        return self._load_pipeline()  # built in code: a fresh one with the same weights

    def stock_call_kwargs(self, guidance_scale: float) -> dict:
        # The pipeline's scale is guardrl's minus one (pos + g (pos - neg)); its CFG options stay at their
        # defaults (no normalization, no truncation), which is the path guardrl reproduces.
        return {"guidance_scale": guidance_scale - 1.0, "max_sequence_length": self.max_sequence_length}


# ----------------------------------------------------------------------------------------------------------
# Random weights of the published shapes
# ----------------------------------------------------------------------------------------------------------

# Tongyi-MAI/Z-Image-Turbo transformer/config.json (the same numbers as Tongyi-MAI/Z-Image
# src/config/model.py, DEFAULT_TRANSFORMER_* and ROPE_*).
Z_IMAGE_TURBO_TRANSFORMER = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=2560,  # Qwen3-4B's hidden size
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[32, 48, 48],
    axes_lens=[1536, 512, 512],
)
SMALL_Z_IMAGE_TRANSFORMER = dict(
    dim=96, n_layers=2, n_refiner_layers=1, n_heads=3, n_kv_heads=3, cap_feat_dim=64, axes_dims=[8, 12, 12]
)


def build_z_image_transformer(small: bool, dtype: torch.dtype, seed: int = 0) -> ZImageTransformer2DModel:
    """The Z-Image-Turbo transformer with random weights in `dtype`, on the current default device (a
    `torch.device("meta")` context builds it without memory)."""
    config = dict(Z_IMAGE_TURBO_TRANSFORMER, **(SMALL_Z_IMAGE_TRANSFORMER if small else {}))
    torch.manual_seed(seed)
    with _default_dtype(dtype):
        transformer = ZImageTransformer2DModel(**config)
    if transformer.x_pad_token.device.type != "meta":
        _fill_pad_tokens(transformer, seed)
    return _cast(transformer, dtype)


class RandomZImageTurboBackbone(ZImageBackbone):
    """Z-Image-Turbo's transformer and VAE with random weights; caption features random per prompt (no
    Qwen3-4B). For timing and memory only (guardrl/policy/random_weights.py explains why)."""

    def __init__(
        self,
        torch_dtype: str = "float32",
        resolution: int = 512,
        max_sequence_length: int = Z_IMAGE_MAX_SEQUENCE_LENGTH,
        small: bool = False,
        seed: int = 0,
        prompt_cache_size: int = 4096,
        offload_vae: bool = False,
        height: int | None = None,
        width: int | None = None,
    ) -> None:
        """
        Args:
            max_sequence_length: caption tokens per prompt; every prompt gets all of them (the longest
                caption the pipeline makes, so the cost measured is the worst case).
            small: shrunken shapes (a few narrow layers) that run on a CPU in seconds.
            seed: seed of the weights and of the caption features.
            Others: as `ZImageBackbone`.
        """
        super().__init__(
            None,
            torch_dtype,
            resolution,
            max_sequence_length,
            prompt_cache_size,
            offload_text_encoders=False,
            offload_vae=offload_vae,
            height=height,
            width=width,
        )
        if not isinstance(small, bool):
            raise ValueError(f"{OPTION}.small must be true or false, got {small!r}")
        self.small = small
        self.seed = seed

    def _load_pipeline(self):
        transformer = build_z_image_transformer(self.small, self.model_dtype, self.seed)
        # Z-Image ships the FLUX.1 VAE (same config and latent scale / shift)
        vae = _build_vae(FLUX_DEV_VAE, self.small, self.model_dtype, self.seed + 1)
        scheduler = FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER)
        return ZImagePipeline(
            scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
        )

    def _note_truncation(self, prompt: str) -> None:
        pass  # no tokenizer: captions are random and always max_sequence_length long

    def _encode(self, prompts, device):
        width = self.transformer.config.cap_feat_dim
        rows = []
        for prompt in prompts:
            generator = torch.Generator().manual_seed(prompt_seed(prompt, self.seed))
            rows.append(torch.randn(self.max_sequence_length, width, generator=generator))
        embeds = torch.stack(rows).to(device, self.model_dtype)
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}


__all__ = [
    "RandomZImageTurboBackbone",
    "TinyZImageBackbone",
    "ZImageBackbone",
    "make_qwen_tokenizer",
    "make_tiny_z_image_pipeline",
]
