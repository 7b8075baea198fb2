"""FLUX.2 [klein] (diffusers `Flux2KleinPipeline`): the backbone, a tiny random-weight pipeline built in
code, and random-weight backbones of the published 4B and 9B shapes.

What differs from FLUX.1 (`FluxBackbone`, guardrl/policy/backbones.py), read from the installed
diffusers/pipelines/flux2/pipeline_flux2_klein.py (`Flux2KleinPipeline.__call__`), which this backbone
reproduces (tests/test_backbone_contract.py, tests/test_flux2_klein.py):
- text: one Qwen3 causal LM; a token's embedding is the hidden states of several layers
  (`text_encoder_out_layers`, (9, 18, 27) by default) side by side, so its width is layers x hidden size.
  Every prompt goes through Qwen3's chat template and is padded to `max_sequence_length`, and the transformer
  gets no mask: rows are fixed-length and join with the default `collate`. No pooled embedding.
- latents: the VAE's latents are patchified 2 x 2 into channels, (B, 4C, H/16, W/16), and normalised by the
  VAE's own batch-norm statistics (`vae.bn.running_mean` / `running_var`, `vae.config.batch_norm_eps`).
  guardrl keeps them in that 4-D layout (what the pipeline's `latents=` takes) and packs them to
  (B, tokens, 4C) only around the transformer; the rotary position ids have four axes (T, H, W, L), for
  image and text tokens alike.
- guidance: no guidance embedding. The base models ("klein-base", `is_distilled: false`) use true
  classifier-free guidance against the empty prompt; the step-distilled ones (`is_distilled: true`) ignore
  guidance.
- schedule: the pipeline's own shift, `compute_empirical_mu(image tokens, steps)` (it depends on the number
  of steps too), not FLUX.1's linear interpolation.
- LoRA: the single-stream blocks fuse their projections (`attn.to_qkv_mlp_proj`, and `attn.to_out`, a
  Linear), so the usual targets (to_q, to_k, to_v, to_out.0) reach only the double-stream blocks:
  `lora_targets()` adds the fused ones (lora.target_modules null uses it), as diffusers'
  examples/dreambooth/train_dreambooth_lora_flux2_klein.py does; configs/flux2_klein/grpo_pickscore.yaml
  lists Flow-Factory's targets, which reach both kinds too.
"""

from __future__ import annotations

import inspect
import logging

import numpy as np
import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

from guardrl.policy.backbones import OPTION, TRUNCATION_MESSAGE, FlowBackbone, _is_int
from guardrl.policy.random_weights import (
    SMALL_VAE,
    _cast,
    _default_dtype,
    _RandomWeights,
    random_prompt_embeddings,
)
from guardrl.policy.tiny import TINY_WORDS, _bytes_to_unicode, _eval

# The pipeline's own default layers (its __call__ signature), so that a backbone and a stock call agree.
PIPELINE_OUT_LAYERS = tuple(
    inspect.signature(Flux2KleinPipeline.__call__).parameters["text_encoder_out_layers"].default
)


class Flux2KleinBackbone(FlowBackbone):
    """FLUX.2 [klein] 4B / 9B, base or step-distilled (module docstring: what differs from FLUX.1)."""

    pipeline_class = Flux2KleinPipeline
    latent_patch_multiple = 2
    shard_block_names = ("transformer_blocks", "single_transformer_blocks")  # double, then single blocks

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
        text_encoder_out_layers: list[int] | None = None,
    ) -> None:
        """
        Args:
            pretrained_model_name_or_path: a local diffusers Flux2KleinPipeline directory or a hub id
                (black-forest-labs/FLUX.2-klein-4B, -klein-base-4B, -klein-9B, -klein-base-9B).
            max_sequence_length: Qwen3 tokens per prompt, chat template included (the pipeline's 512); every
                prompt is padded to it and longer ones are cut.
            text_encoder_out_layers: the Qwen3 hidden states (0: the token embeddings, i: after layer i)
                stacked into a token's embedding; null: the pipeline's default (9, 18, 27).
            The other arguments are `FlowBackbone`'s (guardrl/policy/backbones.py).
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
        layers = PIPELINE_OUT_LAYERS if text_encoder_out_layers is None else text_encoder_out_layers
        if (
            isinstance(layers, (str, bytes))
            or not isinstance(layers, (list, tuple))
            or not layers
            or not all(_is_int(i) and i >= 0 for i in layers)
        ):
            raise ValueError(
                f"{OPTION}.text_encoder_out_layers must be a non-empty list of integers >= 0 (Qwen3 "
                f"hidden-state indices, e.g. {list(PIPELINE_OUT_LAYERS)}) or null, got "
                f"{text_encoder_out_layers!r}"
            )
        self.text_encoder_out_layers = tuple(layers)

    def load(self) -> None:
        if self.is_loaded:
            return
        super().load()
        try:
            self._check_out_layers()
        except ValueError:
            self._pipe = None  # not loaded: a later load() checks again rather than returning early
            raise

    def _check_out_layers(self) -> None:
        text_encoder = getattr(self, "text_encoder", None)
        if text_encoder is None:
            return  # random-weight backbones make their embeddings without one
        depth = text_encoder.config.num_hidden_layers
        option = f"{OPTION}.text_encoder_out_layers"
        if max(self.text_encoder_out_layers) > depth:
            raise ValueError(
                f"{option}={list(self.text_encoder_out_layers)}: the text encoder has {depth} layers, so "
                f"each index must be in [0, {depth}]"
            )
        layers, hidden = list(self.text_encoder_out_layers), text_encoder.config.hidden_size
        width, expected = len(layers) * hidden, self.transformer.config.joint_attention_dim
        if width != expected:
            raise ValueError(
                f"{option}={layers}: {len(layers)} layers of width {hidden} make {width}-wide token "
                f"embeddings, but the transformer takes {expected} (joint_attention_dim): give "
                f"{expected // hidden} layers"
            )

    @property
    def uses_true_cfg(self) -> bool:
        # The pipeline's do_classifier_free_guidance: guidance_scale > 1 and not is_distilled.
        return not self.pipeline.config.is_distilled

    def lora_targets(self) -> list[str]:
        """The attention projections of the double blocks, and the single blocks' fused projections: their
        input (`to_qkv_mlp_proj`) and output (`attn.to_out`, a Linear; named by full path, because the
        double blocks' `to_out` is a ModuleList that peft cannot adapt), as diffusers'
        examples/dreambooth/train_dreambooth_lora_flux2_klein.py targets them."""
        singles = len(self.transformer.single_transformer_blocks)
        return (
            super().lora_targets()
            + ["to_qkv_mlp_proj"]
            + [f"single_transformer_blocks.{i}.attn.to_out" for i in range(singles)]
        )

    def _encode(self, prompts, device):
        self._log_truncations(prompts)
        embeds, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            device=device,
            max_sequence_length=self.max_sequence_length,
            text_encoder_out_layers=self.text_encoder_out_layers,
        )
        return {"prompt_embeds": embeds}

    def _log_truncations(self, prompts: list[str]) -> None:
        # The pipeline cuts a prompt at max_sequence_length without a word. Said here in diffusers' words, on
        # the pipeline's logger, so that FlowBackbone.encode_prompts counts it and warns once per run.
        tokenizer = self.pipeline.tokenizer
        logger = logging.getLogger(type(self.pipeline).__module__)
        for prompt in prompts:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            length = len(tokenizer(text)["input_ids"])
            if length > self.max_sequence_length:
                # the message must start with TRUNCATION_MESSAGE (the filter reads record.msg, unformatted)
                logger.warning(
                    TRUNCATION_MESSAGE + ": the chat-formatted prompt has %d Qwen3 tokens, more than "
                    "max_sequence_length=%d",
                    length,
                    self.max_sequence_length,
                )

    def _latent_hw(self) -> tuple[int, int]:
        # Flux2KleinPipeline.prepare_latents: the VAE latents' height and width, before the 2 x 2 patchify
        unit = self.vae_scale_factor * 2
        return 2 * (self.height // unit), 2 * (self.width // unit)

    def image_seq_len(self) -> int:
        h, w = self._latent_hw()
        return (h // 2) * (w // 2)

    def sigmas(self, num_inference_steps: int) -> torch.Tensor:
        """Flux2KleinPipeline.__call__, step 6: sigmas 1 .. 1/S shifted by the scheduler with
        mu = compute_empirical_mu(image tokens, S) (the pipeline's own helper), then a final 0."""
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(
                "num_inference_steps (sampling.num_inference_steps) must be >= 1, got "
                f"{num_inference_steps!r}"
            )
        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(sched.config, "use_flow_sigmas", False):
            sigmas = None  # the pipeline leaves the schedule to such a scheduler
        mu = compute_empirical_mu(image_seq_len=self.image_seq_len(), num_steps=num_inference_steps)
        if sigmas is None:
            sched.set_timesteps(num_inference_steps, mu=mu)
        else:
            sched.set_timesteps(sigmas=sigmas, mu=mu)
        return sched.sigmas.to(torch.float64).cpu()

    def initial_noise(self, batch_size, generator, device):
        # (B, 4C, h/2, w/2): the patchified layout Flux2KleinPipeline.prepare_latents draws (and takes)
        h, w = self._latent_hw()
        shape = (batch_size, self.transformer.config.in_channels, h // 2, w // 2)
        return torch.randn(shape, generator=generator, device=generator.device).to(device)

    def _transformer_forward(self, transformer, latents, t, conditioning, guidance_scale):
        pipe = self.pipeline
        img_ids = pipe._prepare_latent_ids(latents).to(latents.device)
        embeds = conditioning["prompt_embeds"].to(latents.dtype)
        txt_ids = pipe._prepare_text_ids(embeds).to(latents.device)
        # The pipeline passes the scheduler's timestep (sigma * 1000 in float32) cast to the model dtype, then
        # / 1000: the same operations here give the same rounding, in bfloat16 too.
        timestep = (t.float() * 1000.0).to(latents.dtype) / 1000
        out = transformer(
            hidden_states=pipe._pack_latents(latents),  # (B, tokens, 4C), tokens in row-major order
            timestep=timestep,
            guidance=None,  # klein has no guidance embedding; the pipeline always passes None
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return out.transpose(1, 2).reshape(latents.shape)  # back to (B, 4C, h/2, w/2)

    @torch.no_grad()
    def _decode(self, latents):
        vae = self.vae
        z = latents.to(vae.dtype)
        # Flux2KleinPipeline.__call__ after the loop: undo the batch-norm normalisation, then unpatchify.
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
            z.device, z.dtype
        )
        z = self.pipeline._unpatchify_latents(z * std + mean)
        images = vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)


# ------------------------------------------------------------------------------------------------ tiny
TINY_OUT_LAYERS = (1, 2, 3)  # the tiny Qwen3 has 3 layers; one hidden state from each
TINY_MAX_SEQUENCE_LENGTH = 64  # the chat template alone takes 16 of these tokens
TINY_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# The text Qwen3's chat template gives one user turn with add_generation_prompt=True and enable_thinking=False
# (what the pipeline asks for): the user turn, then an assistant turn opened with an empty thinking block.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def make_qwen_tokenizer() -> Qwen2TokenizerFast:
    """A byte-level BPE Qwen2 tokenizer: the 256 byte symbols, merges for TINY_WORDS (bare and after a space,
    GPT-2's "Ġ") and the chat roles, Qwen's special tokens and a chat template of Qwen3's layout."""
    alphabet = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    space = "\u0120"  # "Ġ": the byte-level symbol of the space byte
    for word in (*TINY_WORDS, "user", "assistant"):
        current = word[0]
        for char in word[1:]:
            if (current, char) not in merges:
                merges.append((current, char))
            current += char
            vocab.setdefault(current, len(vocab))
        # after a space: the whole word joins the space last (a lower-ranked merge than the word's own)
        merges.append((space, word))
        vocab.setdefault(space + word, len(vocab))
    for token in TINY_SPECIAL:
        vocab.setdefault(token, len(vocab))
    return Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        additional_special_tokens=list(TINY_SPECIAL[1:]),
        model_max_length=TINY_MAX_SEQUENCE_LENGTH,
        chat_template=TINY_CHAT_TEMPLATE,
    )


def _tiny_qwen3(tokenizer, seed: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=len(TINY_OUT_LAYERS),
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen3ForCausalLM(config)


def _tiny_flux2_vae(seed: int) -> AutoencoderKLFlux2:
    torch.manual_seed(seed)
    # 4 blocks: x8 downsampling as in the real FLUX.2 VAE (then the 2 x 2 patchify: 16 px per token).
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8,) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    # Batch-norm statistics that are not the identity (a fresh BatchNorm2d has mean 0, var 1), so that a
    # decode that skipped them would not reproduce the pipeline.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.running_mean.shape, generator=generator))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=generator))
    return vae


def make_tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = False) -> Flux2KleinPipeline:
    """A Flux2KleinPipeline with ~62k transformer parameters (1 double and 1 single block), a 3-layer Qwen3
    and a 4-channel VAE; 128 px images from (16, 8, 8) patchified latents. Sizes follow diffusers'
    tests/pipelines/flux2/test_pipeline_flux2_klein.py dummy components (head dim 16, 2 heads, rotary axes
    (4, 4, 4, 4)), with a VAE of the real x8 downsampling."""
    tokenizer = make_qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x the 2 x 2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16 * len(TINY_OUT_LAYERS),  # Qwen3 hidden size x stacked layers
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    pipe = Flux2KleinPipeline(
        # FLUX.1-dev's scheduler config, which diffusers' scripts/convert_flux2_to_diffusers.py gives FLUX.2
        scheduler=FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
            shift=3.0,
        ),
        vae=_tiny_flux2_vae(seed + 1),
        text_encoder=_tiny_qwen3(tokenizer, seed + 2),
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=is_distilled,
    )
    return _eval(pipe)


class TinyFlux2KleinBackbone(Flux2KleinBackbone):
    """The tiny random-weight FLUX.2 [klein] pipeline, built in code from a seed (no files, no hub).
    `is_distilled: false` is a "klein-base" (true CFG), `true` a step-distilled klein (guidance ignored)."""

    def __init__(
        self,
        seed: int = 0,
        is_distilled: bool = False,
        resolution: int = 128,
        prompt_cache_size: int = 4096,
        offload_text_encoders: bool = False,
        offload_vae: bool = False,
        height: int | None = None,
        width: int | None = None,
        text_encoder_out_layers: list[int] | None = None,
    ):
        """`text_encoder_out_layers`: null is one hidden state per layer of the 3-layer Qwen3, (1, 2, 3)."""
        super().__init__(
            None,
            "float32",
            resolution,
            max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
            prompt_cache_size=prompt_cache_size,
            offload_text_encoders=offload_text_encoders,
            offload_vae=offload_vae,
            height=height,
            width=width,
            text_encoder_out_layers=(
                list(TINY_OUT_LAYERS) if text_encoder_out_layers is None else text_encoder_out_layers
            ),
        )
        if not isinstance(is_distilled, bool):
            raise ValueError(f"{OPTION}.is_distilled must be true or false, got {is_distilled!r}")
        self.seed = seed
        self.is_distilled = is_distilled

    def _load_pipeline(self):
        return make_tiny_flux2_klein_pipeline(self.seed, self.is_distilled)

    def stock_pipeline(self) -> Flux2KleinPipeline:
        """A fresh stock diffusers pipeline with the same weights (see TinySD3Backbone.stock_pipeline in
        guardrl/policy/tiny.py)."""
        return self._load_pipeline()  # built in code: a fresh one with the same weights

    def stock_call_kwargs(self, guidance_scale: float) -> dict:
        # A distilled pipeline ignores guidance_scale (and warns); a base one runs true CFG against "".
        return {
            "guidance_scale": guidance_scale,
            "max_sequence_length": self.max_sequence_length,
            "text_encoder_out_layers": self.text_encoder_out_layers,
        }


# -------------------------------------------------------------------------------------------- random weights
# Published transformer configs: huggingface/diffusers scripts/convert_flux2_to_diffusers.py,
# `get_flux2_transformer_config` ("klein-4b", "klein-9b"), commit 58eb52c0803ea9af3abec60841c2a093bdf1f951.
_KLEIN_COMMON = dict(
    patch_size=1,
    in_channels=128,
    out_channels=None,
    attention_head_dim=128,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)
KLEIN_4B_TRANSFORMER = dict(
    _KLEIN_COMMON, num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680
)
KLEIN_9B_TRANSFORMER = dict(
    _KLEIN_COMMON, num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288
)
# The same script builds the FLUX.2 VAE as AutoencoderKLFlux2() (its defaults: 32 latent channels, x8, batch
# norm eps 1e-4) and takes FLUX.1-dev's scheduler config.
KLEIN_VAE: dict = {}
KLEIN_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
SMALL_KLEIN_TRANSFORMER = dict(
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=64,
    timestep_guidance_channels=32,
    axes_dims_rope=(4, 4, 4, 4),
)


class _RandomKlein(_RandomWeights):
    """A FLUX.2 [klein] transformer and VAE of the published shapes with random weights; prompt embeddings
    random per prompt, of the transformer's width (no Qwen3). For timing and memory only (see
    guardrl/policy/random_weights.py)."""

    transformer_config: dict
    vae_config, scheduler_config = KLEIN_VAE, KLEIN_SCHEDULER
    text_widths, clip_tokens, default_max_sequence_length = (0, 0), 0, 512  # 512: the pipeline's default

    def _load_pipeline(self):
        config = dict(self.transformer_config, **(SMALL_KLEIN_TRANSFORMER if self.small else {}))
        torch.manual_seed(self.seed)
        with _default_dtype(self.model_dtype):
            transformer = Flux2Transformer2DModel(**config)
        torch.manual_seed(self.seed + 1)
        with _default_dtype(self.model_dtype):
            vae = AutoencoderKLFlux2(**dict(self.vae_config, **(SMALL_VAE if self.small else {})))
        return Flux2KleinPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**self.scheduler_config),
            vae=_cast(vae, self.model_dtype),
            text_encoder=None,
            tokenizer=None,
            transformer=_cast(transformer, self.model_dtype),
            is_distilled=self.is_distilled,
        )

    def _encode(self, prompts, device):
        width = self.transformer.config.joint_attention_dim
        embeds, _ = random_prompt_embeddings(
            prompts, self.max_sequence_length, width, 0, self.seed, device, self.model_dtype
        )
        return {"prompt_embeds": embeds}


class RandomFlux2Klein4BBackbone(_RandomKlein, Flux2KleinBackbone):
    """FLUX.2 [klein] 4B (distilled: 4 steps, no CFG) with random weights; for timing and memory only."""

    transformer_config, is_distilled = KLEIN_4B_TRANSFORMER, True


class RandomFlux2Klein9BBackbone(_RandomKlein, Flux2KleinBackbone):
    """FLUX.2 [klein] 9B (distilled: 4 steps, no CFG) with random weights; for timing and memory only."""

    transformer_config, is_distilled = KLEIN_9B_TRANSFORMER, True
