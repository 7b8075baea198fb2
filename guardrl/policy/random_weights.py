"""Backbones with the published SD3.5-Medium, SD3.5-Large and FLUX.1-dev shapes and random weights (nothing
downloaded).

What they are for: measuring the speed and memory of a real-size run on your own GPUs before fetching any
weights (`bench/gpu_bench.py` runs a GRPO iteration on them; docs/benchmarks.md), and testing a multi-GPU
launch end to end. Only the shapes matter for speed and memory, so the transformer and the VAE are built from
the configs the released models ship with (diffusers' `transformer/config.json`, `vae/config.json` and
`scheduler/scheduler_config.json`), and the text encoders are not built at all: a prompt's embeddings are
random tensors of the real shapes, a fixed function of the prompt text (as a run with a warm prompt cache sees
them; T5-XXL alone would be 9.5 GB to initialise for nothing). The images they make are noise, and any reward
on them is meaningless: use them for time and memory, never for results.

    model:
      backbone:
        class_path: guardrl.policy.RandomSD35MediumBackbone  # or RandomSD35Large-, RandomFluxDevBackbone
        init_args: {torch_dtype: bfloat16, resolution: 512}

`small: true` shrinks the transformer, the VAE and the embeddings to a few narrow layers (same architecture,
same code paths), so that the whole path runs on a CPU in seconds (the tests; `gpu_bench.py --small`).

Weights are initialised by diffusers' own constructors, on the device Lightning builds the model on (its
`configure_model` runs under the strategy's device context) and directly in `torch_dtype`, so a 12B-parameter
Flux never exists in float32 in host memory.
"""

from __future__ import annotations

import hashlib
import inspect
from contextlib import contextmanager

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
)

from guardrl.policy.backbones import FluxBackbone, SD3Backbone

# Published configs (diffusers' config.json of each model's folder), minus bookkeeping keys.
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
# SD3.5-Large: the MMDiT of SD3.5-Medium, deeper and wider (38 blocks of 38 heads x 64 = 2432), QK-norm, no
# dual-attention (MMDiT-X) layers, a smaller position table.
SD35_LARGE_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=38,
    attention_head_dim=64,
    num_attention_heads=38,
    joint_attention_dim=4096,
    caption_projection_dim=2432,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
    qk_norm="rms_norm",
)
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# Both VAEs: 16 latent channels, x8 downsampling, no quant convs; they differ in their latent scale and shift.
_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
    mid_block_add_attention=True,
)
SD35_MEDIUM_VAE = dict(_VAE, scaling_factor=1.5305, shift_factor=0.0609)
FLUX_DEV_VAE = dict(_VAE, scaling_factor=0.3611, shift_factor=0.1159)
SD35_MEDIUM_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
# Text-side widths of the prompt embeddings: (token width, pooled width).
SD35_MEDIUM_TEXT = (4096, 2048)  # CLIP-L + CLIP-G pooled; T5-XXL / padded CLIP tokens
FLUX_DEV_TEXT = (4096, 768)  # T5-XXL tokens; CLIP-L pooled
SD3_CLIP_TOKENS = 77  # SD3 puts 77 CLIP tokens before the T5 tokens

# small: the same architectures, a few narrow layers (runs anywhere in seconds).
SMALL_TRANSFORMER = {
    "sd35m": dict(
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        caption_projection_dim=64,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        dual_attention_layers=(0,),
    ),
    "sd35l": dict(
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        caption_projection_dim=64,
        joint_attention_dim=64,
        pooled_projection_dim=32,
    ),
    "flux": dict(
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    ),
}
SMALL_VAE = dict(block_out_channels=(8,) * 4, layers_per_block=1, norm_num_groups=4, sample_size=32)
SMALL_TEXT = (64, 32)


TRANSFORMERS = {
    "sd35m": SD35_MEDIUM_TRANSFORMER,
    "sd35l": SD35_LARGE_TRANSFORMER,
    "flux": FLUX_DEV_TRANSFORMER,
}


def transformer_config(kind: str, small: bool = False) -> dict:
    """The transformer config of "sd35m", "sd35l" or "flux", shrunken when `small`."""
    config = dict(TRANSFORMERS[kind])
    if small:
        config.update(SMALL_TRANSFORMER[kind])
    return config


@contextmanager
def _default_dtype(dtype: torch.dtype):
    # Parameters are created in `dtype` directly (half the host/device memory of building in float32 first).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # The parameters are already in `dtype`; this casts the float32 buffers (SD3's position table) as
    # from_pretrained(torch_dtype=...) does. nn.Module.to, not diffusers' override, which warns about casting
    # instead of loading with torch_dtype (there is nothing to load here).
    return torch.nn.Module.to(module, dtype)


def build_transformer(kind: str, small: bool, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A random-weight SD3.5-Medium ("sd35m"), SD3.5-Large ("sd35l") or FLUX.1-dev ("flux") transformer in
    `dtype`, built on the current default device (a `torch.device(...)` context puts it on a GPU or the meta
    device)."""
    cls = FluxTransformer2DModel if kind == "flux" else SD3Transformer2DModel
    torch.manual_seed(seed)
    with _default_dtype(dtype):
        transformer = cls(**transformer_config(kind, small))
    return _cast(transformer, dtype)


def _build_vae(config: dict, small: bool, dtype: torch.dtype, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    with _default_dtype(dtype):
        vae = AutoencoderKL(**dict(config, **(SMALL_VAE if small else {})))
    return _cast(vae, dtype)


def prompt_seed(prompt: str, seed: int) -> int:
    """A stable 63-bit seed of (prompt, seed): the same in every process and Python (unlike hash())."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def random_prompt_embeddings(
    prompts: list[str],
    tokens: int,
    width: int,
    pooled_width: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds (B, tokens, width), pooled (B, pooled_width)) drawn from N(0, 1) seeded by each prompt."""
    embeds, pooled = [], []
    for prompt in prompts:
        generator = torch.Generator().manual_seed(prompt_seed(prompt, seed))
        embeds.append(torch.randn(tokens, width, generator=generator))
        pooled.append(torch.randn(pooled_width, generator=generator))
    return torch.stack(embeds).to(device, dtype), torch.stack(pooled).to(device, dtype)


class _RandomWeights:
    """What both random-weight backbones share; the subclass names the model's configs and its pipeline."""

    kind: str  # "sd35m", "sd35l" or "flux"
    vae_config: dict
    scheduler_config: dict
    text_widths: tuple[int, int]  # (token width, pooled width) at the full shapes
    clip_tokens: int  # tokens before the T5 ones
    default_max_sequence_length: int

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
    ) -> None:
        """
        Args:
            torch_dtype: dtype of the transformer and VAE weights ("bfloat16" for a GPU run).
            resolution: image height and width in pixels (a multiple of 16); `height` / `width` override it.
            max_sequence_length: T5 tokens per prompt; None: the model's (SD3.5-Medium 256, FLUX.1-dev 512).
                SD3's embeddings have 77 CLIP tokens before these.
            small: shrunken shapes (a few narrow layers) that run on a CPU in seconds.
            seed: seed of the weights and of the prompt embeddings.
        """
        if max_sequence_length is None:
            max_sequence_length = self.default_max_sequence_length
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
            raise ValueError(f"model.backbone.init_args.small must be true or false, got {small!r}")
        self.small = small
        self.seed = seed

    def _load_pipeline(self):
        transformer = build_transformer(self.kind, self.small, self.model_dtype, self.seed)
        vae = _build_vae(self.vae_config, self.small, self.model_dtype, self.seed + 1)
        scheduler = FlowMatchEulerDiscreteScheduler(**self.scheduler_config)
        # No text encoders or tokenizers (SD3: three of each, Flux: two): _encode makes the embeddings.
        no_text = {
            name: None
            for name in inspect.signature(self.pipeline_class).parameters
            if name.startswith(("text_encoder", "tokenizer"))
        }
        return self.pipeline_class(transformer=transformer, vae=vae, scheduler=scheduler, **no_text)

    def _encode(self, prompts, device):
        width, pooled = SMALL_TEXT if self.small else self.text_widths
        tokens = self.clip_tokens + self.max_sequence_length
        embeds, pooled_embeds = random_prompt_embeddings(
            prompts, tokens, width, pooled, self.seed, device, self.model_dtype
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled_embeds}


class RandomSD35MediumBackbone(_RandomWeights, SD3Backbone):
    """SD3.5-Medium's transformer and VAE with random weights; prompt embeddings random per prompt (no text
    encoders). For timing and memory only (module docstring)."""

    kind, vae_config, scheduler_config = "sd35m", SD35_MEDIUM_VAE, SD35_MEDIUM_SCHEDULER
    text_widths, clip_tokens, default_max_sequence_length = SD35_MEDIUM_TEXT, SD3_CLIP_TOKENS, 256


class RandomSD35LargeBackbone(_RandomWeights, SD3Backbone):
    """SD3.5-Large's transformer and VAE (the same VAE, text encoders and schedule as SD3.5-Medium) with
    random weights; prompt embeddings random per prompt. For timing and memory only (module docstring)."""

    kind, vae_config, scheduler_config = "sd35l", SD35_MEDIUM_VAE, SD35_MEDIUM_SCHEDULER
    text_widths, clip_tokens, default_max_sequence_length = SD35_MEDIUM_TEXT, SD3_CLIP_TOKENS, 256


class RandomFluxDevBackbone(_RandomWeights, FluxBackbone):
    """FLUX.1-dev's transformer (with its guidance embedding) and VAE with random weights; prompt embeddings
    random per prompt (no text encoders). For timing and memory only (module docstring)."""

    kind, vae_config, scheduler_config = "flux", FLUX_DEV_VAE, FLUX_DEV_SCHEDULER
    text_widths, clip_tokens, default_max_sequence_length = FLUX_DEV_TEXT, 0, 512
