"""Tiny random-weight SD3 and Flux pipelines built in code: offline, deterministic, CPU-fast.

They are real diffusers pipelines (the same classes as SD3.5-Medium and FLUX.1-dev, a few thousand times
smaller), so everything guardrl does with them (prompt encoding, sampling, LoRA, export) is the code path a
full-size model takes. Sizes follow the diffusers test suite's dummy components; the dimension rules:
SD3's text width = 2 x CLIP hidden = T5 d_model = joint_attention_dim, its pooled width = 2 x CLIP projection;
Flux's pooled width = CLIP hidden, its VAE latent channels = transformer in_channels / 4.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from guardrl.policy.backbones import FluxBackbone, SD3Backbone

# Words the tiny tokenizers know as whole tokens; any other text still tokenizes (byte-level CLIP BPE,
# character-level T5 pieces).
TINY_WORDS = (
    "a an the of and on in with photo painting red green blue yellow cyan magenta white black circle "
    "square triangle cat dog car house tree sky small large two three left right"
).split()


def _bytes_to_unicode() -> list[str]:
    # GPT-2/CLIP byte-level alphabet: 256 printable stand-ins for the 256 byte values.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
    printable += list(range(ord("\xae"), ord("\xff") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def make_clip_tokenizer(directory: str) -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer: 256 byte symbols (plain and word-final) and merges for TINY_WORDS."""
    vocab: dict[str, int] = {}
    alphabet = _bytes_to_unicode()
    for c in alphabet:
        vocab.setdefault(c, len(vocab))
    for c in alphabet:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for word in TINY_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            if f"{current} {piece}" not in merges:
                merges.append(f"{current} {piece}")
            current += piece
            vocab.setdefault(current, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(directory, model_max_length=77)


def make_t5_tokenizer() -> T5TokenizerFast:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in TINY_WORDS]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def _clip_text_encoder(hidden: int, projection: int, with_projection: bool, tokenizer, seed: int):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _t5_text_encoder(d_model: int, tokenizer, seed: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def _tiny_vae(latent_channels: int, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    # 4 blocks give vae_scale_factor 8, as in the real SD3 and Flux VAEs. scaling_factor 1.5035 is a
    # transposition of SD3's 1.5305; it only scales this random VAE's latents, and the tiny-model numbers in
    # the docs and tests were measured with it, so it stays (random_weights.SD35_MEDIUM_VAE has the published
    # value).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8,) * 4,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _eval(pipe):
    # Modules built by hand are in train mode; T5's dropout would make two identical calls differ.
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def make_tiny_sd3_pipeline(
    seed: int = 0, num_layers: int = 2, qk_norm: str | None = None
) -> StableDiffusion3Pipeline:
    """An SD3 pipeline with ~79k transformer parameters (~150k with text encoders and VAE); 128 px images from
    4 x 16 x 16 latents. qk_norm="rms_norm": the SD3.5 blocks' QK normalisation (SD3.5-Large's architecture,
    which has no dual-attention layers either)."""
    with tempfile.TemporaryDirectory() as tmp:
        clip_tokenizer = make_clip_tokenizer(os.path.join(tmp, "clip"))
    t5_tokenizer = make_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=32,
        qk_norm=qk_norm,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(4, seed + 1),
        text_encoder=_clip_text_encoder(16, 32, True, clip_tokenizer, seed + 2),
        tokenizer=clip_tokenizer,
        text_encoder_2=_clip_text_encoder(16, 32, True, clip_tokenizer, seed + 3),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=_t5_text_encoder(32, t5_tokenizer, seed + 4),
        tokenizer_3=t5_tokenizer,
    )
    return _eval(pipe)


def make_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = False) -> FluxPipeline:
    """A Flux pipeline with ~70k transformer parameters; 128 px images from packed 4 x 16 x 16 latents."""
    with tempfile.TemporaryDirectory() as tmp:
        clip_tokenizer = make_clip_tokenizer(os.path.join(tmp, "clip"))
    t5_tokenizer = make_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
            shift=3.0,
        ),
        vae=_tiny_vae(4, seed + 1),
        text_encoder=_clip_text_encoder(32, 32, False, clip_tokenizer, seed + 2),
        tokenizer=clip_tokenizer,
        text_encoder_2=_t5_text_encoder(32, t5_tokenizer, seed + 4),
        tokenizer_2=t5_tokenizer,
    )
    return _eval(pipe)


class TinySD3Backbone(SD3Backbone):
    """The tiny random-weight SD3 pipeline, built in code from a seed (no files, no hub)."""

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
        if not (isinstance(num_layers, int) and not isinstance(num_layers, bool) and num_layers >= 1):
            raise ValueError(
                f"model.backbone.init_args.num_layers must be an integer >= 1, got {num_layers!r}"
            )
        self.seed = seed
        self.num_layers = num_layers

    def _load_pipeline(self):
        return make_tiny_sd3_pipeline(self.seed, self.num_layers)

    def stock_pipeline(self) -> StableDiffusion3Pipeline:
        """A fresh stock diffusers pipeline with the same weights (tests/test_backbone_contract.py samples
        with it and with guardrl's sampler and compares the images)."""
        return self._load_pipeline()  # built in code: a fresh one with the same weights

    def stock_call_kwargs(self, guidance_scale: float) -> dict:
        """The stock pipeline's call arguments that match this backbone's sampling at `guidance_scale`."""
        return {"guidance_scale": guidance_scale, "max_sequence_length": self.max_sequence_length}


class TinyFluxBackbone(FluxBackbone):
    """The tiny random-weight Flux pipeline, built in code from a seed (no files, no hub)."""

    def __init__(
        self,
        seed: int = 0,
        guidance_embeds: bool = False,
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
        self.guidance_embeds = guidance_embeds

    def _load_pipeline(self):
        return make_tiny_flux_pipeline(self.seed, self.guidance_embeds)

    def stock_pipeline(self) -> FluxPipeline:
        """A fresh stock diffusers pipeline with the same weights (see TinySD3Backbone.stock_pipeline)."""
        return self._load_pipeline()  # built in code: a fresh one with the same weights

    def stock_call_kwargs(self, guidance_scale: float) -> dict:
        # FLUX.1's guidance is the distilled embedding (guidance_scale); true CFG stays off (true_cfg_scale 1)
        return {"guidance_scale": guidance_scale, "max_sequence_length": self.max_sequence_length}
