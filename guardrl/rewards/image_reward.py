"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation", arXiv 2304.05977, github.com/THUDM/ImageReward), ported onto transformers' BLIP classes.

The original (PyPI `image-reward` 1.5, `ImageReward/ImageReward.py` and its vendored BLIP code in
`ImageReward/models/BLIP/`) scores a (prompt, image) pair as follows:

* image: torchvision `Resize(224, BICUBIC)` (shortest edge to 224 with PIL's bicubic, the long edge
  `int(224 * long / short)`), `CenterCrop(224)` (offset `int(round((size - 224) / 2))`, Python's round:
  half to even), RGB, `ToTensor`, `Normalize` with OpenAI CLIP's mean/std;
* image encoder: BLIP's ViT-L/16 at 224 px (`create_vit('large')`: width 1024, 24 blocks, 16 heads, MLP 4096,
  LayerNorm eps 1e-6, pre-norm blocks, a final LayerNorm; all image tokens, class token first);
* text: `BertTokenizer('bert-base-uncased')` plus '[DEC]' (bos) and '[ENC]' (an additional special token),
  `padding='max_length', truncation=True, max_length=35`. The input ids go to the text encoder as the
  tokenizer returns them: `ImageReward.score` does NOT put '[ENC]' in place of '[CLS]' (BLIP's ITM head does;
  this model does not), so neither does this class;
* text encoder: BLIP's `med.py` BERT (`BertModel(med_config, add_pooling_layer=False)`; released med_config:
  BERT-base, 12 layers, 768 wide, 30524 tokens, no token-type embeddings) with a cross-attention block in
  every layer attending to all image tokens (`encoder_width` = the ViT's width), bidirectional self-attention
  with the padding mask;
* head: the first token's last hidden state, float32, into `MLP(768)`: Linear 768-1024-128-64-16-1 with
  dropouts between the first four (identity at eval) and no activations: the same layout as the LAION
  aesthetic head, so `AestheticMLP` is reused;
* score: `(mlp - 0.16717362830052426) / 1.0333394966054072`.

Here the ViT is transformers' `BlipVisionModel` and the text encoder `BlipTextModel` (transformers' own port
of med.py, with cross-attention layers when `is_decoder=True` in its config, called with `is_decoder=False`
for the bidirectional mask). The released checkpoint `ImageReward.pt` (hub: THUDM/ImageReward) is a plain
state dict under the original names (`blip.visual_encoder.*`, `blip.text_encoder.*`, `blip.vision_proj.*`,
`blip.text_proj.*`, `mlp.layers.*`); `convert_state_dict` maps it onto these modules (`vision_proj`,
`text_proj` and the `position_ids` buffer are not used by the score and are dropped).

API: `score(images, prompts)` scores each image with its own prompt, in one batch; the original scores one
pair per call (`score(prompt, image)`, or `inference_rank(prompt, images)` for one prompt and many images).
Batching changes the scores by float rounding only (measured at most 7e-6 on the fixture).

Proof of equivalence: tests/fixtures/image_reward/ holds a tiny random-weight model built with the ORIGINAL
package code (scripts/make_image_reward_fixture.py, run in a separate venv with transformers 4.40), its state
dict under the original names, images and the original's scores; tests/test_image_reward.py loads it through
this class's loading code and compares (docs/rewards.md).

Preprocessing, by `preprocess`:

* ``"pil"``: the original's path exactly: uint8 -> PIL -> `Image.resize(BICUBIC)` -> crop -> /255 ->
  normalise (what torchvision's Resize/CenterCrop/ToTensor do on a PIL image; torchvision is not needed).
* ``"tensor"`` (default): on the images' device: 8-bit quantisation, the two-pass PIL-like bicubic resize of
  `guardrl.rewards.clip_rewards.clip_preprocess`, torchvision's rounded center-crop offset, normalise. Equal
  to the PIL path where no resize is needed; within a few 8-bit levels where one is (tested).
"""

from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace

import numpy as np
import torch

from guardrl.rewards.aesthetic import AestheticMLP
from guardrl.rewards.base import Reward
from guardrl.rewards.clip_rewards import clip_preprocess, freeze, resolve_dtype, to_pil_images
from guardrl.rewards.hps import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from guardrl.rewards.weights import describe_mismatch, few, read_tensor_state, resolve_weights_file

IMAGE_REWARD_MEAN = 0.16717362830052426  # ImageReward.py: self.mean
IMAGE_REWARD_STD = 1.0333394966054072  # ImageReward.py: self.std
MAX_LENGTH = 35  # ImageReward.py: tokenizer(..., padding='max_length', truncation=True, max_length=35)
CHECKPOINT_NAMES = ("ImageReward.pt", "ImageReward.safetensors")

# The released med_config.json (THUDM/ImageReward, the same as BLIP's configs/med_config.json).
RELEASED_MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}

# BLIP's create_vit('large', 224), in the original VisionTransformer's argument names.
VIT_LARGE = {
    "img_size": 224,
    "patch_size": 16,
    "embed_dim": 1024,
    "depth": 24,
    "num_heads": 16,
    "mlp_ratio": 4.0,
}
_VIT_LAYER_NORM_EPS = 1e-6  # vit.py: partial(nn.LayerNorm, eps=1e-6)

# Original ViT names (under blip.visual_encoder.) -> BlipVisionModel names: (original prefix, BlipVisionModel
# prefix, the names allowed after it); N stands for a block number. Both directions are derived from this one
# table: conversion on load, and the original names in mismatch messages.
_VISION_NAMES = [
    ("cls_token", "embeddings.class_embedding", ""),
    ("pos_embed", "embeddings.position_embedding", ""),
    ("patch_embed.proj.", "embeddings.patch_embedding.", r"(weight|bias)"),
    ("blocks.N.norm1.", "encoder.layers.N.layer_norm1.", r"(weight|bias)"),
    ("blocks.N.attn.qkv.", "encoder.layers.N.self_attn.qkv.", r"(weight|bias)"),
    ("blocks.N.attn.proj.", "encoder.layers.N.self_attn.projection.", r"(weight|bias)"),
    ("blocks.N.norm2.", "encoder.layers.N.layer_norm2.", r"(weight|bias)"),
    ("blocks.N.mlp.", "encoder.layers.N.mlp.", r"(fc1|fc2)\.(weight|bias)"),
    ("norm.", "post_layernorm.", r"(weight|bias)"),
]


def _prefix_pattern(prefix: str) -> str:
    return re.escape(prefix).replace("N", r"(?P<block>\d+)")


def _rename(name: str, rules: list[tuple[str, str, str]]) -> str | None:
    """`name` with the first rule whose source prefix (and allowed suffix) matches renamed; None if none
    does."""
    for source, target, suffix in rules:
        match = re.fullmatch(_prefix_pattern(source) + f"(?P<rest>{suffix})", name)
        if match:
            block = match.groupdict().get("block")
            return (target.replace("N", block) if block is not None else target) + match["rest"]
    return None


# The same table read the other way, any suffix (it only names keys in messages).
_VISION_INVERSE = [(target, source, r".*") for source, target, _ in _VISION_NAMES]

# Original keys the score never uses: dropped on load (the original loads them into unused modules).
_UNUSED = [
    r"^blip\.vision_proj\.",
    r"^blip\.text_proj\.",
    r"^blip\.text_encoder\.embeddings\.position_ids$",
    r"^blip\.text_encoder\.pooler\.",
]
_PREFIXES = {"blip.visual_encoder.": "vision", "blip.text_encoder.": "text", "mlp.": "mlp"}


def convert_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict, list[str]]:
    """Original ImageReward keys -> (vision, text, mlp) state dicts for BlipVisionModel, BlipTextModel and
    AestheticMLP, plus the original keys that match no rule (not counting the known unused ones).

    The text encoder's names are the same in med.py and transformers' BlipTextModel (both come from BERT:
    `embeddings.{word_embeddings,position_embeddings,LayerNorm}`, `encoder.layer.N.{attention,crossattention}.
    {self.{query,key,value},output.{dense,LayerNorm}}`, `encoder.layer.N.{intermediate,output}.*`); the MLP's
    are `layers.{0,2,4,6,7}.*` in both.
    """
    parts: dict[str, dict] = {"vision": {}, "text": {}, "mlp": {}}
    unknown = []
    for key, value in state.items():
        if any(re.search(pattern, key) for pattern in _UNUSED):
            continue
        prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
        if prefix is None:
            unknown.append(key)
            continue
        rest = key[len(prefix) :]
        if _PREFIXES[prefix] == "vision":
            rest = _rename(rest, _VISION_NAMES)
            if rest is None:
                unknown.append(key)
                continue
        parts[_PREFIXES[prefix]][rest] = value
    return parts["vision"], parts["text"], parts["mlp"], unknown


def _original_name(part: str, name: str) -> str:
    """BlipVisionModel / BlipTextModel / AestheticMLP key -> the original checkpoint's key (for messages)."""
    if part == "text":
        return "blip.text_encoder." + name
    if part == "mlp":
        return "mlp." + name
    return "blip.visual_encoder." + (_rename(name, _VISION_INVERSE) or name)


def build_modules(med: dict, vit: dict, bos_token_id: int | None = None, sep_token_id: int | None = None):
    """(BlipVisionModel, BlipTextModel, AestheticMLP) for a med_config dict and a vision config dict in the
    original VisionTransformer's terms; the two BLIP models on the meta device (their weights come from the
    checkpoint, loaded with `assign=True`)."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    vision_config = BlipVisionConfig(
        hidden_size=vit["embed_dim"],
        intermediate_size=int(vit["embed_dim"] * vit["mlp_ratio"]),
        num_hidden_layers=vit["depth"],
        num_attention_heads=vit["num_heads"],
        image_size=vit["img_size"],
        patch_size=vit["patch_size"],
        hidden_act="gelu",
        layer_norm_eps=_VIT_LAYER_NORM_EPS,
        attention_dropout=0.0,
    )
    text_config = BlipTextConfig(
        vocab_size=med["vocab_size"],
        hidden_size=med["hidden_size"],
        encoder_hidden_size=vit["embed_dim"],  # BLIP_Pretrain: encoder_config.encoder_width = vision_width
        intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=med.get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=med.get("attention_probs_dropout_prob", 0.1),
        initializer_range=med.get("initializer_range", 0.02),
        pad_token_id=med.get("pad_token_id", 0),
        bos_token_id=bos_token_id,
        eos_token_id=sep_token_id,
        sep_token_id=sep_token_id,
        use_cache=False,
        is_decoder=True,
    )  # builds the cross-attention blocks; forward runs with is_decoder=False
    vision_config._attn_implementation = "eager"
    text_config._attn_implementation = "eager"
    with torch.device("meta"):  # no random init of ~450M parameters: every weight comes from the checkpoint
        vision = BlipVisionModel(vision_config)
        text = BlipTextModel(text_config, add_pooling_layer=False)
    return vision, text, AestheticMLP(med["hidden_size"])


def state_dict_mismatches(parts, vision, text, mlp) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shape mismatches) of `convert_state_dict`'s output against the three modules,
    each named by the original checkpoint key."""
    unexpected = list(parts[3])
    missing, shapes = [], []
    for part, module, sub in zip(("vision", "text", "mlp"), (vision, text, mlp), parts[:3]):
        expected = module.state_dict()
        missing += [_original_name(part, k) for k in expected if k not in sub]
        unexpected += [_original_name(part, k) for k in sub if k not in expected]
        shapes += [
            f"{_original_name(part, k)}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
            for k, v in sub.items()
            if k in expected and tuple(v.shape) != tuple(expected[k].shape)
        ]
    return missing, unexpected, shapes


def image_reward_preprocess(images: torch.Tensor, image_size: int = 224) -> torch.Tensor:
    """The original's Resize(image_size, BICUBIC) + CenterCrop(image_size) + ToTensor + Normalize on
    (B, 3, H, W) float images in [0, 1], in torch on their device; returns (B, 3, image_size, image_size)."""
    resize_only = SimpleNamespace(
        do_resize=True,
        size={"shortest_edge": int(image_size)},
        resample=3,
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=False,
    )
    x = clip_preprocess(images, resize_only)  # 8-bit quantised, PIL-like two-pass bicubic, still in [0, 1]
    h, w = x.shape[-2:]
    top, left = int(round((h - image_size) / 2.0)), int(round((w - image_size) / 2.0))  # torchvision's rule
    x = x[..., top : top + image_size, left : left + image_size]
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def image_reward_crop_pil(image, image_size: int = 224):
    """The original's torchvision Resize(image_size, BICUBIC) + CenterCrop(image_size) on a PIL image, in
    PIL: the resized size is (int(size * long / short), size), the crop offset int(round(excess / 2))."""
    from PIL import Image

    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = int(image_size), int(int(image_size) * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - image_size) / 2.0)), int(round((new_w - image_size) / 2.0))
    return image.crop((left, top, left + image_size, top + image_size)).convert("RGB")


def image_reward_preprocess_pil(images: torch.Tensor, image_size: int = 224) -> torch.Tensor:
    """The original's exact path: uint8 -> PIL -> resize/crop in PIL -> /255 -> normalise (CPU)."""
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    out = []
    for image in to_pil_images(images):
        array = np.asarray(image_reward_crop_pil(image, image_size), dtype=np.uint8)
        x = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255
        out.append((x - mean) / std)
    return torch.stack(out)


class ImageReward(Reward):
    """ImageReward on transformers' BLIP modules (module docstring). Scores are z-scored (about -2..2 on real
    images; the original's mean/std).

    Args:
        checkpoint: the released `ImageReward.pt` (a plain state dict under the original key names; `.pt`,
            `.pth`, `.bin` read with `torch.load(weights_only=True)`, or `.safetensors`), a directory holding
            `ImageReward.pt` or `ImageReward.safetensors`, or a hub id whose repo holds `ImageReward.pt`
            (THUDM/ImageReward).
        med_config: the BLIP text encoder's BERT config (`med_config.json`): a path, a dict, or None for the
            `med_config.json` beside the checkpoint (in its directory or hub repo) when there is one, else the
            released values (`RELEASED_MED_CONFIG`, BERT-base).
        tokenizer: BERT tokenizer path or hub id (the original: `bert-base-uncased`); '[DEC]' and '[ENC]' are
            added as the original does.
        vision_config: the ViT's size in the original VisionTransformer's terms (`img_size`, `patch_size`,
            `embed_dim`, `depth`, `num_heads`, `mlp_ratio`): a path to a JSON file, a dict, or None for the
            released model's ViT-L/16 at 224 px (`VIT_LARGE`).
        torch_dtype: dtype of the BLIP weights ('float32', 'bfloat16', 'float16'); the MLP head runs in
            float32, on float32 features, as in the original.
        preprocess: 'tensor' (on device) or 'pil' (the original's path); see the module docstring.
    """

    def __init__(
        self,
        checkpoint: str = "THUDM/ImageReward",
        med_config: str | dict | None = None,
        tokenizer: str = "bert-base-uncased",
        vision_config: str | dict | None = None,
        torch_dtype: str = "float32",
        preprocess: str = "tensor",
        weight: float = 1.0,
        name: str | None = "image_reward",
    ) -> None:
        super().__init__(weight=weight, name=name)
        if preprocess not in ("tensor", "pil"):
            raise ValueError(f"reward {self.name!r}: preprocess={preprocess!r} must be 'tensor' or 'pil'")
        self.preprocess = preprocess
        self.dtype = resolve_dtype(torch_dtype)
        checkpoint_file, med_beside = self._resolve_checkpoint(checkpoint)
        self.checkpoint = checkpoint_file
        med = self._med_config(med_config if med_config is not None else med_beside)
        vit = self._vision_config(vision_config)
        self.image_size = int(vit["img_size"])
        self.tokenizer = self._tokenizer(tokenizer, med["vocab_size"])

        vision, text, mlp = build_modules(med, vit, self.tokenizer.bos_token_id, self.tokenizer.sep_token_id)
        self._load(checkpoint_file, vision, text, mlp)
        self.vision_model = freeze(vision.to(self.dtype))
        self.text_model = freeze(text.to(self.dtype))
        self.mlp = freeze(mlp.float())

    # ------------------------------------------------------------------ construction

    def _error(self, message: str) -> ValueError:
        return ValueError(f"reward {self.name!r}: {message}")

    def _resolve_checkpoint(self, checkpoint: str) -> tuple[str, str | None]:
        """-> (weights file, med_config.json beside it or None)."""
        path = resolve_weights_file(checkpoint, CHECKPOINT_NAMES, self._error)
        if os.path.exists(str(checkpoint)):  # a local file or directory
            beside = os.path.join(os.path.dirname(os.path.abspath(path)), "med_config.json")
            return path, beside if os.path.isfile(beside) else None
        try:  # a hub id: its repo's med_config.json, if it has one
            from huggingface_hub import hf_hub_download

            return path, hf_hub_download(str(checkpoint), "med_config.json")
        except Exception:
            return path, None

    def _config_dict(self, option: str, value, default: dict, allowed: str) -> dict:
        """A config option given as None (a copy of `default`), a dict, or a path to a JSON file."""
        if value is None:
            return dict(default)
        if isinstance(value, dict):
            return dict(value)
        if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
            with open(value) as f:
                return json.load(f)
        raise self._error(f"{option}={value!r} must be {allowed}")

    def _med_config(self, med_config) -> dict:
        config = self._config_dict(
            "med_config",
            med_config,
            RELEASED_MED_CONFIG,
            "a path to a med_config.json file, a dict, or None (the med_config.json beside the checkpoint, "
            "else the released BERT-base)",
        )
        required = [
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        ]
        missing = [k for k in required if k not in config]
        if missing:
            raise self._error(f"med_config lacks {missing}; it needs {required}")
        if not config.get("add_cross_attention", False):
            raise self._error(
                f"med_config add_cross_attention={config.get('add_cross_attention')!r}: "
                "ImageReward's text encoder cross-attends to the image, it must be true"
            )
        position = config.get("position_embedding_type", "absolute")
        if position != "absolute":
            raise self._error(
                f"med_config position_embedding_type={position!r}: only 'absolute' is supported "
                "(BLIP's and ImageReward's)"
            )
        return config

    def _vision_config(self, vision_config) -> dict:
        config = self._config_dict(
            "vision_config",
            vision_config,
            VIT_LARGE,
            "a path to a JSON file, a dict, or None (ViT-L/16 at 224 px, the released model's)",
        )
        unknown = sorted(set(config) - set(VIT_LARGE))
        if unknown:
            raise self._error(f"vision_config has unknown keys {unknown}; allowed: {sorted(VIT_LARGE)}")
        config = {**VIT_LARGE, **config}
        if config["img_size"] % config["patch_size"] or config["embed_dim"] % config["num_heads"]:
            raise self._error(
                f"vision_config {config}: img_size must be a multiple of patch_size and embed_dim "
                "of num_heads"
            )
        return config

    def _tokenizer(self, tokenizer: str, vocab_size: int):
        from transformers import BertTokenizer

        try:
            tok = BertTokenizer.from_pretrained(tokenizer)
        except Exception as e:
            raise self._error(
                f"tokenizer={tokenizer!r}: could not load a BERT tokenizer from that path or hub id "
                f"({type(e).__name__}: {e})"
            ) from None
        tok.add_special_tokens({"bos_token": "[DEC]"})  # as BLIP's init_tokenizer
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        if len(tok) > vocab_size:
            raise self._error(
                f"tokenizer={tokenizer!r} has {len(tok)} tokens with [DEC] and [ENC], more than "
                f"the text encoder's vocab_size={vocab_size} (med_config)"
            )
        return tok

    def _load(self, path: str, vision, text, mlp) -> None:
        state = read_tensor_state(path, self._error)
        parts = convert_state_dict(state)
        missing, unexpected, shapes = state_dict_mismatches(parts, vision, text, mlp)
        if missing or unexpected or shapes:
            raise self._error(
                f"checkpoint={path!r} does not match the ImageReward architecture: "
                + describe_mismatch(missing, unexpected, shapes)
                + "expected the original key names (blip.visual_encoder.*, blip.text_encoder.*, "
                "mlp.layers.*) of the released ImageReward.pt, with med_config and vision_config giving its "
                "sizes"
            )
        vision.load_state_dict({k: v.float() for k, v in parts[0].items()}, strict=True, assign=True)
        text.load_state_dict({k: v.float() for k, v in parts[1].items()}, strict=True, assign=True)
        mlp.load_state_dict({k: v.float() for k, v in parts[2].items()}, strict=True)
        # the non-persistent position_ids buffer was made on the meta device: make it again
        embeddings = text.embeddings
        embeddings.position_ids = torch.arange(embeddings.position_embeddings.num_embeddings).expand((1, -1))
        left = [
            n
            for n, t in [
                *vision.named_parameters(),
                *vision.named_buffers(),
                *text.named_parameters(),
                *text.named_buffers(),
            ]
            if t.is_meta
        ]
        if (
            left
        ):  # a transformers version with other buffers: fail here, not with meta tensors at the first call
            raise RuntimeError(f"reward {self.name!r}: tensors not set from the checkpoint: {few(left)}")

    # ------------------------------------------------------------------ scoring

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """The vision model's input for (B, 3, H, W) images in [0, 1], by the chosen preprocessing."""
        if self.preprocess == "pil":
            out = image_reward_preprocess_pil(images, self.image_size)
        else:
            out = image_reward_preprocess(images, self.image_size)
        return out.to(device=self.device, dtype=self.dtype)

    def features(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The text encoder's first-token output (B, hidden) for each (image, prompt) pair, float32."""
        device = self.device
        image_embeds = self.vision_model(pixel_values=self.pixel_values(images)).last_hidden_state
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
        out = self.text_model(
            input_ids=tokens["input_ids"].to(device),
            attention_mask=tokens["attention_mask"].to(device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        )
        return out.last_hidden_state[:, 0, :].float()

    @property
    def device(self) -> torch.device:
        return self.mlp.layers[0].weight.device

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raw = self.mlp(self.features(images, prompts)).squeeze(-1)
        return ((raw - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD).to(images.device)  # as ImageReward.py, float32
