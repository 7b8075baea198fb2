"""The toy text-to-image model: a pixel-space diffusers SD3 transformer and a small word-level text encoder.

The generator is a stock `diffusers.SD3Transformer2DModel` (the MMDiT of Stable Diffusion 3), the same class
the SD3 backbone trains, working directly on 3 x 32 x 32 pixels in [-1, 1] (no VAE). Its text input comes from
`ToyTextEncoder`, trained with it: the grammar's closed vocabulary (about 30 words), a word embedding plus a
learned position embedding, two pre-norm transformer layers, then a projection to the transformer's
`joint_attention_dim` (the per-token `encoder_hidden_states`) and a pooled projection of the token mean (SD3's
`pooled_projections`). The null prompt "" (classifier-free guidance) is all padding tokens.

Weights live in one safetensors file (`transformer.*` and `text_encoder.*` keys) next to a JSON config that
names both modules' constructor arguments; `guardrl/toy/weights/` holds the pretrained pair the package ships.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field

import torch
from diffusers import SD3Transformer2DModel
from torch import nn

from guardrl.toy.files import save_safetensors_atomic, write_json_atomic
from guardrl.toy.grammar import COUNT_WORDS
from guardrl.toy.world import COLORS, RELATIONS, SHAPES

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
WEIGHTS_FILE = "toy_model.safetensors"
CONFIG_FILE = "toy_model.json"
PAD, UNK = "<pad>", "<unk>"


def toy_vocabulary() -> list[str]:
    """Every word of the grammar (plus <pad> and <unk>), in a fixed order: index 0 is the padding token."""
    words = ["a", "an", "and", *COUNT_WORDS.values(), *COLORS, *SHAPES, *(s + "s" for s in SHAPES)]
    for relation in RELATIONS:
        words += relation.split()
    return [PAD, UNK, *dict.fromkeys(words)]


def default_transformer_config() -> dict:
    """SD3Transformer2DModel arguments of the shipped model (pixel space, 32 x 32, patch 4: 64 image
    tokens)."""
    return dict(
        sample_size=32,
        patch_size=4,
        in_channels=3,
        out_channels=3,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=128,
        pooled_projection_dim=64,
        pos_embed_max_size=8,
    )


@dataclass
class TextEncoderConfig:
    vocab: list[str] = field(default_factory=toy_vocabulary)
    max_length: int = 10  # the longest grammar sentence has 8 words
    width: int = 64
    num_layers: int = 2
    num_heads: int = 4
    ff_mult: int = 2
    out_dim: int = 64  # = the transformer's joint_attention_dim
    pooled_dim: int = 64  # = the transformer's pooled_projection_dim


class ToyTextEncoder(nn.Module):
    """Closed-vocabulary word encoder: tokens -> (hidden states (B, L, out_dim), pooled (B, pooled_dim))."""

    def __init__(self, config: TextEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or TextEncoderConfig()
        self.index = {word: i for i, word in enumerate(config.vocab)}
        if config.vocab[0] != PAD or UNK not in self.index:
            raise ValueError(f"the vocabulary must start with {PAD!r} and contain {UNK!r}")
        self.token_embedding = nn.Embedding(len(config.vocab), config.width)
        self.position_embedding = nn.Parameter(torch.zeros(config.max_length, config.width))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)
        layer = nn.TransformerEncoderLayer(
            config.width,
            config.num_heads,
            config.ff_mult * config.width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)
        self.proj = nn.Linear(config.width, config.out_dim)
        self.pooled_proj = nn.Linear(config.width, config.pooled_dim)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_length) word ids; case, repeated spaces and a final period are ignored; unknown words map
        to <unk>, and words past max_length are dropped. "" is all padding (the null prompt)."""
        unk = self.index[UNK]
        ids = torch.zeros(len(prompts), self.config.max_length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = re.sub(r"[.\s]+$", "", prompt.strip().lower()).split()[: self.config.max_length]
            for col, word in enumerate(words):
                ids[row, col] = self.index.get(word, unk)
        return ids

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # No key-padding mask: padding is an ordinary learned token, so the all-padding null prompt is finite.
        h = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        h = self.norm(self.layers(h))
        return self.proj(h), self.pooled_proj(h.mean(dim=1))

    def encode(
        self, prompts: list[str], device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = device if device is not None else self.token_embedding.weight.device
        return self(self.tokenize(prompts).to(device))


def build_toy_model(
    transformer_config: dict | None = None, text_config: TextEncoderConfig | dict | None = None, seed: int = 0
) -> tuple[SD3Transformer2DModel, ToyTextEncoder]:
    """Freshly initialised (transformer, text encoder), seeded."""
    transformer_config = {**default_transformer_config(), **(transformer_config or {})}
    if isinstance(text_config, dict):
        text_config = TextEncoderConfig(**text_config)
    text_config = text_config or TextEncoderConfig(
        out_dim=transformer_config["joint_attention_dim"],
        pooled_dim=transformer_config["pooled_projection_dim"],
    )
    if text_config.out_dim != transformer_config["joint_attention_dim"] or (
        text_config.pooled_dim != transformer_config["pooled_projection_dim"]
    ):
        raise ValueError(
            "the text encoder's out_dim / pooled_dim must equal joint_attention_dim / pooled_projection_dim"
        )
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**transformer_config)
    text_encoder = ToyTextEncoder(text_config)
    return transformer, text_encoder


def model_config(transformer: SD3Transformer2DModel, text_encoder: ToyTextEncoder, **extra) -> dict:
    keys = default_transformer_config().keys()
    return {
        "transformer": {k: transformer.config[k] for k in keys},
        "text_encoder": asdict(text_encoder.config),
        **extra,
    }


def save_toy_model(
    directory: str,
    transformer: SD3Transformer2DModel,
    text_encoder: ToyTextEncoder,
    dtype: torch.dtype = torch.float16,
    **extra,
) -> str:
    """Write WEIGHTS_FILE and CONFIG_FILE (with `extra` entries, e.g. training settings) under `directory`,
    atomically (a reader never sees half a file). Returns the weights path."""
    os.makedirs(directory, exist_ok=True)
    tensors = {f"transformer.{k}": v for k, v in transformer.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()})
    tensors = {k: v.detach().to(dtype).contiguous().cpu() for k, v in tensors.items()}
    path = save_safetensors_atomic(os.path.join(directory, WEIGHTS_FILE), tensors)
    write_json_atomic(os.path.join(directory, CONFIG_FILE), model_config(transformer, text_encoder, **extra))
    return path


def load_toy_model(
    directory: str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[SD3Transformer2DModel, ToyTextEncoder, dict]:
    """(transformer, text encoder, config) from a directory written by `save_toy_model` (None: the shipped
    weights), in eval mode, in `dtype`."""
    from safetensors.torch import load_file

    directory = WEIGHTS_DIR if directory is None else directory
    weights = os.path.join(directory, WEIGHTS_FILE)
    config_path = os.path.join(directory, CONFIG_FILE)
    for path in (weights, config_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"toy model weights_path={directory!r} has no {os.path.basename(path)}: it must be a "
                "directory written by `python -m guardrl.toy.pretrain --out DIR` (or None for the shipped "
                "weights)"
            )
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    transformer, text_encoder = build_toy_model(config["transformer"], config["text_encoder"])
    tensors = load_file(weights)
    for prefix, module in (("transformer.", transformer), ("text_encoder.", text_encoder)):
        state = {k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(state, strict=True)
        module.to(dtype).eval()
    return transformer, text_encoder, config


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
