"""Qwen-Image (diffusers `QwenImagePipeline`): the backbone, and a tiny random-weight pipeline built in code.

What differs from SD3 and Flux, and where each is handled (the ground truth is `QwenImagePipeline.__call__`,
diffusers/pipelines/qwenimage/pipeline_qwenimage.py of the installed diffusers):
- text: one Qwen2.5-VL encoder; a prompt is wrapped in a chat template whose first 34 tokens (the system
  prompt) are dropped, so embeddings have a variable length and a mask (`prompt_embeds_mask`); there is no
  pooled embedding. `collate` pads rows to the batch's longest (zeros, mask 0). The pipeline passes no mask
  when nothing is padded, and so does `_transformer_forward` (also the fast path: an unmasked attention).
- guidance: true CFG (`true_cfg_scale` with a negative prompt) followed by a per-token rescale of the guided
  velocity to the norm of the conditional one (`velocity`).
- latents: 16-channel VAE latents packed into 2x2 patches (as Flux), timestep = sigma, rotary positions from
  `img_shapes`; the VAE is a causal 3D one (one frame) normalised by per-channel `latents_mean` /
  `latents_std` from its config; its downsampling is `2 ** len(temperal_downsample)`, not read from
  `block_out_channels` (it has none), hence `load` below.
- schedule: the pipeline's own sigmas, `linspace(1, 1/n, n)` shifted by mu from the image's token count, which
  is what `flow_match_sigmas` does with `image_seq_len()` (checked by tests/test_qwen_image.py).

`TinyQwenImageBackbone` builds a real `QwenImagePipeline` with tiny configs and seeded random weights (no
hub); its tokenizer is a byte-level BPE whose merges make the system prompt exactly the 34 tokens the pipeline
drops.
"""

from __future__ import annotations

import logging

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from tokenizers import AddedToken
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from guardrl.policy.backbones import OPTION, TRUNCATION_MESSAGE, FlowBackbone, PackedLatents, _is_int
from guardrl.policy.random_weights import _cast, _default_dtype, prompt_seed
from guardrl.policy.tiny import TINY_WORDS, _bytes_to_unicode, _eval

# QwenImagePipeline.check_inputs refuses a max_sequence_length above 1024 (its tokenizer_max_length).
MAX_SEQUENCE_LENGTH = 1024


class QwenImageBackbone(PackedLatents, FlowBackbone):
    """Qwen-Image (MMDiT with a Qwen2.5-VL text encoder, variable-length masked text, true CFG with the
    pipeline's norm rescale, packed 2x2 latents, dynamic exponential shift)."""

    pipeline_class = QwenImagePipeline
    shard_block_names = ("transformer_blocks",)  # 60 dual-stream blocks in the released model

    def __init__(
        self,
        pretrained_model_name_or_path: str | None = None,
        torch_dtype: str = "float32",
        resolution: int = 1024,
        max_sequence_length: int = 512,
        prompt_cache_size: int = 4096,
        offload_text_encoders: bool = False,
        offload_vae: bool = False,
        height: int | None = None,
        width: int | None = None,
    ) -> None:
        """
        Args:
            max_sequence_length: text tokens kept per prompt after the chat template's system prompt is
                dropped (QwenImagePipeline's `max_sequence_length`, default 512, at most 1024).
            The other arguments are FlowBackbone's (guardrl/policy/backbones.py).
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
        if _is_int(max_sequence_length) and max_sequence_length > MAX_SEQUENCE_LENGTH:
            raise ValueError(
                f"{OPTION}.max_sequence_length must be an integer in [1, {MAX_SEQUENCE_LENGTH}] (text "
                f"tokens; QwenImagePipeline refuses longer) for Qwen-Image, got {max_sequence_length!r}"
            )

    # ----- loading
    def _encode(self, prompts, device):
        pipe = self.pipeline
        embeds, mask = pipe._get_qwen_prompt_embeds(prompts, device)
        if embeds.shape[1] > self.max_sequence_length:
            # QwenImagePipeline.encode_prompt cuts silently; say it the way diffusers says it for T5, so that
            # FlowBackbone counts it and warns once per run.
            logging.getLogger(type(pipe).__module__).warning(
                f"{TRUNCATION_MESSAGE} because `max_sequence_length` is set to "
                f"{self.max_sequence_length} tokens"
            )
        embeds, mask = pipe.encode_prompt(
            prompts,
            device=device,
            prompt_embeds=embeds,
            prompt_embeds_mask=mask,
            max_sequence_length=self.max_sequence_length,
        )
        if mask is None:  # encode_prompt drops a mask without padding; guardrl always carries one
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def collate(self, rows):
        """Pad each row's text to the longest in `rows` (embeddings 0, mask 0) and concatenate."""
        length = max(row["prompt_embeds"].shape[1] for row in rows)

        def padded(t: torch.Tensor) -> torch.Tensor:
            # pad the sequence dim (1) at the end: (B, L, D) or (B, L)
            pad = [0, 0] * (t.dim() - 2) + [0, length - t.shape[1]]
            return torch.nn.functional.pad(t, pad)

        out = {
            name: torch.cat([padded(row[name]) for row in rows])
            for name in ("prompt_embeds", "prompt_embeds_mask")
        }
        for name in rows[0]:
            if name not in out:
                out[name] = torch.cat([row[name] for row in rows])
        return out

    # ----- velocity
    def _transformer_forward(self, transformer, latents, t, conditioning, guidance_scale):
        h, w = self._latent_hw()
        embeds = conditioning["prompt_embeds"].to(latents.dtype)
        mask = conditioning["prompt_embeds_mask"]
        # As QwenImagePipeline.encode_prompt: no mask when no row is padded.
        mask = None if bool(mask.all()) else mask
        # Qwen-Image takes sigma-scale timesteps (the pipeline passes timestep / 1000); its guidance is true
        # CFG, never an embedding (guidance=None, as the pipeline for a transformer without guidance_embeds).
        return transformer(
            hidden_states=latents,
            timestep=t.to(latents.dtype),
            guidance=None,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=embeds,
            img_shapes=[[(1, h // 2, w // 2)]] * latents.shape[0],
            return_dict=False,
        )[0]

    def _guide(self, v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
        """QwenImagePipeline's CFG: v = v_u + g (v_c - v_u), then each token's velocity rescaled to the norm
        of v_c's (over the packed channels, the last dim)."""
        guided = super()._guide(v_uncond, v_cond, scale)
        return guided * (v_cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))

    # ----- images
    @torch.no_grad()
    def _decode(self, latents):
        vae = self.vae
        z = self.pipeline._unpack_latents(latents, self.height, self.width, self.vae_scale_factor)
        z = z.to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
        z = z / inverse_std + mean  # the pipeline's order of operations: latents / (1 / std) + mean
        images = vae.decode(z, return_dict=False)[0][:, :, 0]  # the one frame
        return (images.float() / 2 + 0.5).clamp(0, 1)


# ----- the tiny pipeline
# The words of the chat template's system prompt (QwenImagePipeline.prompt_template_encode): the tiny
# tokenizer's merges make each one token, so the prompt's prefix is the 34 tokens the pipeline drops, as with
# the released Qwen2.5-VL tokenizer.
TEMPLATE_WORDS = (
    "system user assistant Describe the image by detailing color shape size texture quantity text spatial "
    "relationships of objects and background"
).split()
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    # Byte-pair encoding of one pre-token: merge the lowest-ranked adjacent pair until none is left.
    while len(symbols) > 1:
        pairs = [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
        if not pairs:
            break
        _, i = min(pairs)
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def make_qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE Qwen2 tokenizer: the 256 byte symbols, the chat template's special tokens, and merges
    that make each template word and TINY_WORDS (bare and after a space, "Ġ") a single token."""
    vocab = {c: i for i, c in enumerate(_bytes_to_unicode())}
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(TEMPLATE_WORDS + TINY_WORDS):
        for form in (word, "\u0120" + word):
            # Merges appended after the existing ones only act once those are exhausted, so extending a
            # word's current pieces left to right never changes how an earlier word tokenizes.
            pieces = _bpe(list(form), ranks)
            current = pieces[0]
            for piece in pieces[1:]:
                ranks.setdefault((current, piece), len(ranks))
                current += piece
                vocab.setdefault(current, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=sorted(ranks, key=ranks.get), model_max_length=2048)
    tokenizer.add_tokens([AddedToken(token, special=True) for token in SPECIAL_TOKENS])
    return tokenizer


def _qwen_text_encoder(
    tokenizer: Qwen2Tokenizer, hidden: int, seed: int
) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    # The vision tower is built (the class always has one) but never run: prompts carry no image tokens,
    # whose ids are placed past the tokenizer's vocabulary.
    vocab = len(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab + 3,
            "hidden_size": hidden,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "bos_token_id": tokenizer.eos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": hidden,
        },
        vision_start_token_id=vocab,
        vision_end_token_id=vocab + 1,
        image_token_id=vocab + 2,
        video_token_id=vocab + 2,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _tiny_qwen_vae(seed: int) -> AutoencoderKLQwenImage:
    torch.manual_seed(seed)
    # Three downsamplings give vae_scale_factor 8, as in the released VAE. The latent statistics are made-up,
    # non-trivial values so that a decode which ignored them (or applied them the wrong way) would differ.
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[-0.25, 0.5, 0.125, -0.5],
        latents_std=[2.0, 0.5, 1.5, 1.25],
    )


def tiny_qwen_image_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # The released scheduler's kind of schedule (dynamic exponential shift, terminal shift), with a base and a
    # max shift that differ so that the image's token count matters.
    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=16,
        max_image_seq_len=256,
        time_shift_type="exponential",
        shift_terminal=0.02,
    )


def make_tiny_qwen_image_pipeline(seed: int = 0, num_layers: int = 2) -> QwenImagePipeline:
    """A Qwen-Image pipeline with tiny random weights (a two-block transformer); 128 px images from packed
    4 x 16 x 16 latents. Sizes follow diffusers' dummy components (tests/pipelines/qwenimage/test_qwenimage.py
    of huggingface/diffusers at 58eb52c0803ea9af3abec60841c2a093bdf1f951) with the released VAE's x8
    downsampling."""
    tokenizer = make_qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    pipe = QwenImagePipeline(
        transformer=transformer,
        scheduler=tiny_qwen_image_scheduler(),
        vae=_tiny_qwen_vae(seed + 1),
        text_encoder=_qwen_text_encoder(tokenizer, 16, seed + 2),
        tokenizer=tokenizer,
    )
    return _eval(pipe)


class TinyQwenImageBackbone(QwenImageBackbone):
    """The tiny random-weight Qwen-Image pipeline, built in code from a seed (no files, no hub)."""

    def __init__(
        self,
        seed: int = 0,
        num_layers: int = 2,
        resolution: int = 128,
        max_sequence_length: int = 32,
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
            max_sequence_length=max_sequence_length,
            prompt_cache_size=prompt_cache_size,
            offload_text_encoders=offload_text_encoders,
            offload_vae=offload_vae,
            height=height,
            width=width,
        )
        if not (_is_int(num_layers) and num_layers >= 1):
            raise ValueError(f"{OPTION}.num_layers must be an integer >= 1, got {num_layers!r}")
        self.seed = seed
        self.num_layers = num_layers

    def _load_pipeline(self):
        return make_tiny_qwen_image_pipeline(self.seed, self.num_layers)

    def stock_pipeline(self) -> QwenImagePipeline:
        """A fresh stock diffusers pipeline with the same weights (tests/test_backbone_contract.py)."""
        return self._load_pipeline()  # built in code: a fresh one with the same weights

    def stock_call_kwargs(self, guidance_scale: float) -> dict:
        """The stock pipeline's call arguments that match this backbone's sampling at `guidance_scale`: true
        CFG needs a negative prompt (the pipeline skips CFG without one); guardrl's negative is "" (its
        embedding is broadcast over the batch by the transformer's modulation, as in the pipeline)."""
        kwargs = {"true_cfg_scale": guidance_scale, "max_sequence_length": self.max_sequence_length}
        if guidance_scale > 1.0:
            kwargs["negative_prompt"] = ""
        return kwargs


# ----- the published shapes with random weights (for speed and memory; see guardrl/policy/random_weights.py)
# Qwen/Qwen-Image transformer/config.json and vae/config.json, which diffusers' constructors take as their
# defaults (huggingface/diffusers 58eb52c0803ea9af3abec60841c2a093bdf1f951:
# src/diffusers/models/transformers/transformer_qwenimage.py and
# src/diffusers/models/autoencoders/autoencoder_kl_qwenimage.py); written out so that a diffusers default
# changing later cannot change them silently.
QWEN_IMAGE_TRANSFORMER = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)
# fmt: off
QWEN_IMAGE_VAE = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                  0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
)
# fmt: on
# Qwen/Qwen-Image scheduler/scheduler_config.json: a dynamic exponential shift from mu in [0.5, 0.9] over
# 256..8192 image tokens, the last sigma shifted to 0.02.
QWEN_IMAGE_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
)
QWEN_IMAGE_TEXT_WIDTH = 3584  # Qwen2.5-VL-7B's hidden size = the transformer's joint_attention_dim
# The chat template's tail after the prompt (<|im_end|> \n <|im_start|> assistant \n): 5 tokens.
TEMPLATE_TAIL_TOKENS = 5
SMALL_QWEN_IMAGE_TRANSFORMER = dict(
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=64,
    axes_dims_rope=(8, 4, 4),
)
SMALL_QWEN_IMAGE_VAE = dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1)


def qwen_image_transformer_config(small: bool = False) -> dict:
    """The released Qwen-Image transformer config, shrunken to a few narrow layers when `small`."""
    return dict(QWEN_IMAGE_TRANSFORMER, **(SMALL_QWEN_IMAGE_TRANSFORMER if small else {}))


def build_qwen_image_transformer(
    small: bool, dtype: torch.dtype, seed: int = 0
) -> QwenImageTransformer2DModel:
    """A random-weight Qwen-Image transformer in `dtype` on the current default device (a
    `torch.device("meta")` context builds the 20B one without memory)."""
    torch.manual_seed(seed)
    with _default_dtype(dtype):
        transformer = QwenImageTransformer2DModel(**qwen_image_transformer_config(small))
    return _cast(transformer, dtype)


class RandomQwenImageBackbone(QwenImageBackbone):
    """Qwen-Image's transformer and VAE with random weights; no text encoder: a prompt's embeddings are
    random (B, L, 3584) rows seeded by the prompt, L = one token per word plus the template's 5 trailing
    tokens (capped at max_sequence_length), so batches pad and mask as with real prompts. For timing and
    memory only (guardrl/policy/random_weights.py explains the idea)."""

    def __init__(
        self,
        torch_dtype: str = "float32",
        resolution: int = 1024,
        max_sequence_length: int = 512,
        small: bool = False,
        seed: int = 0,
        prompt_cache_size: int = 4096,
        offload_vae: bool = False,
        height: int | None = None,
        width: int | None = None,
    ) -> None:
        """
        Args:
            small: shrunken shapes (two narrow blocks, a narrow VAE) that run on a CPU in seconds.
            seed: seed of the weights and of the prompt embeddings.
            The others: QwenImageBackbone's.
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
        transformer = build_qwen_image_transformer(self.small, self.model_dtype, self.seed)
        torch.manual_seed(self.seed + 1)
        with _default_dtype(self.model_dtype):
            vae = AutoencoderKLQwenImage(
                **dict(QWEN_IMAGE_VAE, **(SMALL_QWEN_IMAGE_VAE if self.small else {}))
            )
        vae = _cast(vae, self.model_dtype)
        scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
        return QwenImagePipeline(
            transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=None, tokenizer=None
        )

    def _encode(self, prompts, device):
        width = SMALL_QWEN_IMAGE_TRANSFORMER["joint_attention_dim"] if self.small else QWEN_IMAGE_TEXT_WIDTH
        embeds = []
        for prompt in prompts:
            length = min(len(prompt.split()) + TEMPLATE_TAIL_TOKENS, self.max_sequence_length)
            generator = torch.Generator().manual_seed(prompt_seed(prompt, self.seed))
            embeds.append(torch.randn(1, length, width, generator=generator))
        rows = [
            {"prompt_embeds": e.to(device, self.model_dtype), "prompt_embeds_mask": torch.ones(e.shape[:2])}
            for e in embeds
        ]
        out = self.collate(rows)
        out["prompt_embeds_mask"] = out["prompt_embeds_mask"].to(device, torch.long)
        return out
