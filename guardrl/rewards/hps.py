"""HPSv2.1 (Wu et al. 2023, "Human Preference Score v2", arXiv 2306.09341, github.com/tgxs002/HPSv2): an
open_clip ViT-H-14 fine-tuned on human preferences; score = cosine of the L2-normalised image and text
embeddings (about 0.2-0.35 on real images). Ported onto transformers' `CLIPModel`: open_clip is not needed.

The original (PyPI `hpsv2` 1.2.0, `hpsv2/img_score.py` and its vendored `hpsv2/src/open_clip/`; FlowGRPO's
`flow_grpo/hpsv2_scorer.py` does the same) scores a (prompt, image) pair as follows:

* model: `create_model_and_transforms('ViT-H-14', ..., precision='amp', light_augmentation=True,
  output_dict=True)`, then `model.load_state_dict(torch.load('HPS_v2.1_compressed.pt')['state_dict'])`
  (strict). ViT-H-14 (`model_configs/ViT-H-14.json`): image tower 224 px, patch 14, width 1280, 32 blocks,
  16 heads (head width 80), MLP 5120; text tower 77 tokens, vocab 49408, width 1024, 24 blocks, 16 heads,
  MLP 4096, causal mask; projection 1024; exact-erf GELU (no quick_gelu); LayerNorm eps 1e-5; pre-norm blocks
  (`nn.MultiheadAttention`); image: class token + `ln_pre`, the class token's output through `ln_post` and
  `proj`; text: `ln_final`, then the token at `text.argmax(-1)` (the end-of-text token, the largest id)
  through `text_projection`;
* image: `light_augmentation=True` makes the validation transform `_convert_to_rgb_or_rgba, ToTensor,
  ResizeMaxSize(224), Normalize(OpenAI CLIP mean/std)`: the LONGEST edge goes to 224
  (`round(dim * 224 / max(h, w))`, torchvision's tensor `resize(BICUBIC)`, i.e. `F.interpolate(bicubic,
  antialias=True)` with torchvision >= 0.17, on the float tensor), then zero padding (black, before the
  normalisation) to 224 x 224, `pad // 2` on the left / top. Square images are simply resized, so for them
  this equals open_clip's usual Resize(shortest) + CenterCrop. (torchvision < 0.17 resized tensors without
  antialiasing: scores computed with such an old install differ somewhat on downscaled images);
* text: open_clip's `tokenize`: `ftfy.fix_text`, `html.unescape` twice, whitespace collapsed, lower case,
  CLIP's byte-level BPE (`bpe_simple_vocab_16e6`), `[<start_of_text>] + tokens + [<end_of_text>]`, cut to
  77 with the last kept token replaced by end-of-text, padded with 0;
* score: `diag(image_features @ text_features.T)` with both features L2-normalised, per pair (under
  `torch.cuda.amp.autocast()`, i.e. float16 matmuls on a GPU; float32 on the CPU).

Here: `CLIPModel` built from the open_clip model config (`clip_config`; on the meta device, no random init),
the checkpoint's open_clip names converted by `convert_state_dict` (`in_proj_weight/bias` split into q/k/v,
`visual.proj` and `text_projection` transposed, `module.` prefixes dropped); anything missing, unexpected or
misshapen is refused, naming a few keys. Tokens: transformers' `CLIPTokenizer` (the same BPE; from `base`,
default `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`) on text cleaned as open_clip cleans it (`open_clip_clean`,
ftfy's `fix_text` included), padding with 0 and pooling at the argmax of
the ids, as the original. Each image is scored with its own prompt, in one batch (the original scores one
pair per call; batching changes scores by float rounding only).

Not reproduced: the original keeps RGBA images as 4 channels (`_convert_to_rgb_or_rgba`); images here are
RGB tensors. Where the longest edge is already 224 the original neither resizes nor pads, so a non-square
image of that size fails in its ViT; here it is padded (`hps_preprocess_pad`).

Preprocessing, by `resize`: ``"longest_pad"`` (default: img_score's `ResizeMaxSize`, above) or
``"shortest_crop"`` (open_clip's non-light validation transform: shortest edge -> 224 on the float tensor,
`CenterCrop` with torchvision's rounded offset; `hps_preprocess`); and by `preprocess`: ``"tensor"`` (default,
on the images' device, batched: 8-bit quantisation as the original reads uint8 images, then the same torch
ops) or ``"pil"`` (the original's path: uint8 PIL image -> ToTensor -> the same ops on the CPU, per
image). The two agree exactly on the CPU; on a GPU the bicubic kernel may round differently.

Proof of equivalence: tests/fixtures/hps/ holds a tiny random-weight ViT-H-14-shaped CLIP built with the
ORIGINAL code (scripts/make_hps_fixture.py, run in a separate venv with hpsv2 1.2.0's vendored open_clip and
open_clip_torch 3.3.0), its state dict as the released checkpoint stores it, images, prompts, the original's
token ids and pixels, and `hpsv2.img_score.score`'s own scores; tests/test_hps.py loads it through this class
and compares: scores within 2.7e-7, token ids and pixels identical (docs/rewards.md).
"""

from __future__ import annotations

import html
import json
import os
import re

import torch
import torch.nn.functional as F

from guardrl.rewards.base import Reward
from guardrl.rewards.clip_rewards import freeze, quantize_uint8, resolve_dtype, to_pil_images
from guardrl.rewards.weights import describe_mismatch, few, read_tensor_state, resolve_weights_file

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CHECKPOINT_NAME = "HPS_v2.1_compressed.pt"
DEFAULT_BASE = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# open_clip's model_configs/ViT-H-14.json (identical in open_clip_torch 3.3.0 and hpsv2 1.2.0's vendored copy)
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
_LAYER_NORM_EPS = 1e-5  # open_clip's LayerNorm is torch's default
# open_clip config keys that this port reproduces, and keys it accepts only at the value that means the plain
# CLIP architecture (anything else is refused with the key's name)
_VISION_KEYS = {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio"}
_VISION_PLAIN = {
    "ls_init_value": None,
    "input_patchnorm": False,
    "global_average_pool": False,
    "attentional_pool": False,
    "pool_type": "tok",
    "final_ln_after_pool": False,
    "no_ln_pre": False,
    "output_tokens": False,
    "timm_model_name": None,
    "patch_dropout": 0.0,
}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_TEXT_PLAIN = {
    "ls_init_value": None,
    "embed_cls": False,
    "pool_type": "argmax",
    "no_causal_mask": False,
    "proj_bias": False,
    "final_ln_after_pool": False,
    "output_tokens": False,
    "hf_model_name": None,
    "pad_id": 0,
}
_TOP_PLAIN = {"quick_gelu": False, "custom_text": False}


# ---------------------------------------------------------------------------------------------- preprocessing


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # torchvision's tensor resize: returns the input when the size is unchanged, else bicubic + antialias
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)


def hps_preprocess(images: torch.Tensor, image_size: int = 224) -> torch.Tensor:
    """open_clip's usual validation transform on (B, 3, H, W) images in [0, 1] (quantised to 8 bits first, as
    the original reads uint8 images): shortest edge -> image_size (bicubic, antialiased, on the float tensor),
    center crop (torchvision's rounded offset), OpenAI CLIP normalisation. HPSv2's `img_score.py` uses
    `hps_preprocess_pad` instead (equal on square images)."""
    x = quantize_uint8(images)
    h, w = x.shape[-2:]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = image_size, int(image_size * long / short)
    x = _resize(x, (new_long, new_short) if w <= h else (new_short, new_long))
    h, w = x.shape[-2:]
    top, left = round((h - image_size) / 2.0), round((w - image_size) / 2.0)  # torchvision's rule
    return _normalize(x[..., top : top + image_size, left : left + image_size])


def hps_preprocess_pad(images: torch.Tensor, image_size: int = 224) -> torch.Tensor:
    """HPSv2's `img_score.py` transform (`ResizeMaxSize`) on (B, 3, H, W) images in [0, 1], quantised to 8
    bits first: longest edge -> image_size (`round(dim * scale)`, bicubic, antialiased, on the float
    tensor), zero padding to image_size x image_size (`pad // 2` left / top), OpenAI CLIP normalisation.

    One deliberate difference: where the longest edge already equals image_size the original skips the resize
    AND the padding, so a non-square image reaches the ViT at the wrong size and fails; here it is padded."""
    x = quantize_uint8(images)
    h, w = (int(s) for s in x.shape[-2:])
    scale = image_size / float(max(h, w))
    size = (round(h * scale), round(w * scale)) if scale != 1.0 else (h, w)
    x = _resize(x, size)
    pad_h, pad_w = image_size - size[0], image_size - size[1]
    if pad_h or pad_w:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return _normalize(x)


_RESIZES = {"longest_pad": hps_preprocess_pad, "shortest_crop": hps_preprocess}


def hps_preprocess_pil(
    images: torch.Tensor, image_size: int = 224, resize: str = "longest_pad"
) -> torch.Tensor:
    """The original's path: uint8 PIL images -> ToTensor (/255) -> the chosen resize on the CPU, one image at
    a time (what `preprocess_val(pil_image)` does); returns a CPU batch."""
    import numpy as np

    out = []
    for image in to_pil_images(images):
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        out.append(_RESIZES[resize]((x.float() / 255)[None], image_size)[0])
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------- text


def open_clip_clean(text: str) -> str:
    """open_clip's text cleaning before BPE: `ftfy.fix_text`, `html.unescape` twice, strip, whitespace runs ->
    one space, lower case."""
    import ftfy  # a guardrl dependency; imported here, where it is used

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


# ---------------------------------------------------------------------------------------------- model config


def _image_size(vision: dict) -> int:
    size = vision["image_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"image_size={size!r}: only square images are supported")
        size = size[0]
    return int(size)


def check_model_config(cfg: dict) -> dict:
    """Validates an open_clip model config dict (the format of open_clip's `model_configs/*.json`, or the
    `model_cfg` of an `open_clip_config.json`) for the plain CLIP ViT architecture; returns a normalised copy.
    Raises ValueError naming what is not supported."""
    if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
        raise ValueError("an open_clip model config needs embed_dim, vision_cfg and text_cfg")
    problems = []
    sections = (("vision_cfg", _VISION_KEYS, _VISION_PLAIN), ("text_cfg", _TEXT_KEYS, _TEXT_PLAIN))
    for section, keys, plain in sections:
        for key, value in cfg[section].items():
            if key in keys:
                continue
            if key in plain and value == plain[key]:
                continue
            if section == "vision_cfg" and key == "patch_dropout":  # training only: identity at eval
                continue
            problems.append(f"{section}.{key}={value!r}")
    for key, value in cfg.items():
        if key in ("embed_dim", "vision_cfg", "text_cfg"):
            continue
        if key == "quick_gelu" and isinstance(value, bool):
            continue
        if key in _TOP_PLAIN and value == _TOP_PLAIN[key]:
            continue
        problems.append(f"{key}={value!r}")
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    for section, required in (
        ("vision_cfg", ["image_size", "layers", "width", "patch_size"]),
        ("text_cfg", ["width", "heads", "layers"]),
    ):
        problems += [f"{section}.{k} missing" for k in required if k not in cfg[section]]
    if problems:
        raise ValueError(
            "open_clip model config not supported by this port (plain CLIP ViT only): " + ", ".join(problems)
        )
    if not isinstance(vision["layers"], int):
        raise ValueError(f"vision_cfg.layers={vision['layers']!r}: ResNet towers are not supported")
    out = json.loads(json.dumps(cfg))
    out["vision_cfg"] = {
        "head_width": 64,
        "mlp_ratio": 4.0,
        **{k: v for k, v in vision.items() if k in _VISION_KEYS},
    }
    out["text_cfg"] = {
        "context_length": 77,
        "vocab_size": 49408,
        "mlp_ratio": 4.0,
        **{k: v for k, v in text.items() if k in _TEXT_KEYS},
    }
    out["quick_gelu"] = bool(cfg.get("quick_gelu", False))
    size, patch = _image_size(out["vision_cfg"]), out["vision_cfg"]["patch_size"]
    if (
        size % patch
        or out["vision_cfg"]["width"] % out["vision_cfg"]["head_width"]
        or out["text_cfg"]["width"] % out["text_cfg"]["heads"]
    ):
        raise ValueError(
            "open_clip model config: image_size must be a multiple of patch_size, and the "
            "widths of the head width / head count"
        )
    return out


def clip_config(cfg: dict):
    """transformers `CLIPConfig` equal to an open_clip model config (`check_model_config`'s keys)."""
    from transformers import CLIPConfig

    cfg = check_model_config(cfg)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    act = "quick_gelu" if cfg["quick_gelu"] else "gelu"  # nn.GELU() is the exact (erf) GELU, as "gelu" here
    config = CLIPConfig(
        text_config=dict(
            vocab_size=text["vocab_size"],
            hidden_size=text["width"],
            intermediate_size=int(text["width"] * text["mlp_ratio"]),
            num_hidden_layers=text["layers"],
            num_attention_heads=text["heads"],
            max_position_embeddings=text["context_length"],
            hidden_act=act,
            layer_norm_eps=_LAYER_NORM_EPS,
            attention_dropout=0.0,
            projection_dim=cfg["embed_dim"],
            pad_token_id=0,
            bos_token_id=text["vocab_size"] - 2,
            eos_token_id=text["vocab_size"] - 1,
        ),
        vision_config=dict(
            hidden_size=vision["width"],
            intermediate_size=int(vision["width"] * vision["mlp_ratio"]),
            num_hidden_layers=vision["layers"],
            num_attention_heads=vision["width"] // vision["head_width"],
            image_size=_image_size(vision),
            patch_size=vision["patch_size"],
            num_channels=3,
            hidden_act=act,
            layer_norm_eps=_LAYER_NORM_EPS,
            attention_dropout=0.0,
            projection_dim=cfg["embed_dim"],
        ),
        projection_dim=cfg["embed_dim"],
    )
    return config


# ---------------------------------------------------------------------------------------------- state dict

_BLOCK = [
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
]
_RENAMES = [
    ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight"),
    ("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias"),
    ("visual.ln_post.weight", "vision_model.post_layernorm.weight"),
    ("visual.ln_post.bias", "vision_model.post_layernorm.bias"),
    ("visual.proj", "visual_projection.weight"),  # transposed
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("ln_final.weight", "text_model.final_layer_norm.weight"),
    ("ln_final.bias", "text_model.final_layer_norm.bias"),
    ("text_projection", "text_projection.weight"),  # transposed
    ("logit_scale", "logit_scale"),
]
_TRANSPOSED = {"visual.proj", "text_projection"}
_BLOCK_RE = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def strip_module_prefix(state: dict) -> dict:
    """Drops the `module.` prefix DistributedDataParallel puts on every key (when all keys have it)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def open_clip_layout(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of the state dict of open_clip's CLIP (the class HPSv2 fine-tuned) for a model
    config: what a checkpoint must hold."""
    cfg = check_model_config(cfg)
    v, t, e = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    vw, tw, p = v["width"], t["width"], v["patch_size"]
    grid = (_image_size(v) // p) ** 2 + 1
    layout = {
        "visual.class_embedding": (vw,),
        "visual.positional_embedding": (grid, vw),
        "visual.proj": (vw, e),
        "visual.conv1.weight": (vw, 3, p, p),
        "visual.ln_pre.weight": (vw,),
        "visual.ln_pre.bias": (vw,),
        "visual.ln_post.weight": (vw,),
        "visual.ln_post.bias": (vw,),
        "positional_embedding": (t["context_length"], tw),
        "text_projection": (tw, e),
        "logit_scale": (),
        "token_embedding.weight": (t["vocab_size"], tw),
        "ln_final.weight": (tw,),
        "ln_final.bias": (tw,),
    }
    towers = (("visual.", vw, v["layers"], v["mlp_ratio"]), ("", tw, t["layers"], t["mlp_ratio"]))
    for prefix, w, layers, ratio in towers:
        mlp = int(w * ratio)
        for i in range(layers):
            b = f"{prefix}transformer.resblocks.{i}."
            layout.update(
                {
                    b + "ln_1.weight": (w,),
                    b + "ln_1.bias": (w,),
                    b + "attn.in_proj_weight": (3 * w, w),
                    b + "attn.in_proj_bias": (3 * w,),
                    b + "attn.out_proj.weight": (w, w),
                    b + "attn.out_proj.bias": (w,),
                    b + "ln_2.weight": (w,),
                    b + "ln_2.bias": (w,),
                    b + "mlp.c_fc.weight": (mlp, w),
                    b + "mlp.c_fc.bias": (mlp,),
                    b + "mlp.c_proj.weight": (w, mlp),
                    b + "mlp.c_proj.bias": (w,),
                }
            )
    return layout


def layout_mismatches(state: dict, layout: dict) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, misshapen) original keys of a state dict against `open_clip_layout`."""
    missing = [k for k in layout if k not in state]
    unexpected = [k for k in state if k not in layout]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(layout[k])}"
        for k in layout
        if k in state and tuple(state[k].shape) != tuple(layout[k])
    ]
    return missing, unexpected, shapes


def convert_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """open_clip CLIP keys -> transformers `CLIPModel` keys, plus the keys that match no rule. Attention
    `in_proj_weight` / `in_proj_bias` (q, k, v stacked, in that order) are split into `q_proj` / `k_proj` /
    `v_proj`; `visual.proj` and `text_projection` (used as `x @ proj`) are transposed into Linear weights."""
    state = strip_module_prefix(state)
    renames = dict(_RENAMES)
    out, unknown = {}, []
    for key, value in state.items():
        if key in renames:
            out[renames[key]] = value.t() if key in _TRANSPOSED else value
            continue
        match = _BLOCK_RE.match(key)
        if match is None:
            unknown.append(key)
            continue
        tower = "vision_model" if match.group(1) else "text_model"
        base, rest = f"{tower}.encoder.layers.{match.group(2)}.", match.group(3)
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{base}self_attn.{name}.{kind}"] = part
            continue
        for old, new in _BLOCK:
            if rest.startswith(old) and rest[len(old) :] in ("weight", "bias"):
                out[base + new + rest[len(old) :]] = value
                break
        else:
            unknown.append(key)
    return out, unknown


def build_model(cfg: dict):
    """transformers `CLIPModel` for an open_clip model config, on the meta device (weights come from the
    checkpoint, loaded with `assign=True`)."""
    from transformers import CLIPModel

    config = clip_config(cfg)
    with torch.device("meta"):
        return CLIPModel(config)


# ---------------------------------------------------------------------------------------------- the reward


class HPSv21(Reward):
    """HPSv2.1 on transformers' CLIPModel (module docstring): cosine of the normalised image and text
    features.

    Args:
        checkpoint: `HPS_v2.1_compressed.pt` (open_clip key names, a plain state dict or under "state_dict";
            `.pt`/`.pth`/`.bin` read with `torch.load(weights_only=True)`, or `.safetensors`), a directory
            holding it, or a hub id whose repo holds it (`xswu/HPSv2`).
        base: where the CLIP tokenizer is (a directory or hub id; default the LAION ViT-H-14 repo, whose
            tokenizer is open_clip's BPE). A local directory may also hold an `open_clip_config.json` (as that
            hub repo does), whose `model_cfg` gives the architecture when `model_config` is None.
        model_config: the open_clip model config (a dict, or a path to a JSON file in open_clip's
            `model_configs` format or an `open_clip_config.json`); None: `base`'s open_clip_config.json when
            it is a local directory holding one, else ViT-H-14 (`VIT_H_14`).
        torch_dtype: weight dtype ('float32', 'bfloat16', 'float16'); features are normalised in float32.
        preprocess: 'tensor' (on device) or 'pil' (the original's CPU path); see the module docstring.
        resize: 'longest_pad' (img_score.py's, default) or 'shortest_crop' (open_clip's usual transform).
    """

    def __init__(
        self,
        checkpoint: str = "xswu/HPSv2",
        base: str = DEFAULT_BASE,
        model_config: str | dict | None = None,
        torch_dtype: str = "float32",
        preprocess: str = "tensor",
        resize: str = "longest_pad",
        weight: float = 1.0,
        name: str | None = "hpsv21",
    ) -> None:
        super().__init__(weight=weight, name=name)
        if preprocess not in ("tensor", "pil"):
            raise self._error(f"preprocess={preprocess!r} must be 'tensor' or 'pil'")
        if resize not in _RESIZES:
            raise self._error(f"resize={resize!r} must be 'longest_pad' or 'shortest_crop'")
        self.preprocess, self.resize = preprocess, resize
        self.dtype = resolve_dtype(torch_dtype)
        self.checkpoint = resolve_weights_file(checkpoint, (CHECKPOINT_NAME,), self._error)
        self.model_config = self._model_config(model_config, base)
        self.image_size = _image_size(self.model_config["vision_cfg"])
        self.context_length = int(self.model_config["text_cfg"]["context_length"])
        self.tokenizer = self._tokenizer(base, int(self.model_config["text_cfg"]["vocab_size"]))
        model = build_model(self.model_config)
        self._load(self.checkpoint, model)
        self.model = freeze(model)

    # ------------------------------------------------------------------ construction

    def _error(self, message: str) -> ValueError:
        return ValueError(f"reward {self.name!r}: {message}")

    def _model_config(self, model_config, base) -> dict:
        source = model_config
        if model_config is None:
            beside = os.path.join(str(base), "open_clip_config.json")
            source = beside if os.path.isdir(str(base)) and os.path.isfile(beside) else VIT_H_14
        if isinstance(source, (str, os.PathLike)):
            if not os.path.isfile(source):
                raise self._error(f"model_config={model_config!r}: no such file")
            with open(source) as f:
                source = json.load(f)
        if not isinstance(source, dict):
            raise self._error(f"model_config={model_config!r} must be a dict, a path to a JSON file, or None")
        if "model_cfg" in source:  # an open_clip_config.json
            source = source["model_cfg"]
        try:
            return check_model_config(source)
        except ValueError as e:
            raise self._error(str(e)) from None

    def _tokenizer(self, base, vocab_size: int):
        from transformers import CLIPTokenizer

        try:
            tok = CLIPTokenizer.from_pretrained(str(base))
        except Exception as e:
            raise self._error(
                f"base={base!r}: could not load a CLIP tokenizer from that path or hub id "
                f"({type(e).__name__}: {e})"
            ) from None
        ids = [tok.convert_tokens_to_ids(t) for t in ("<|startoftext|>", "<|endoftext|>")]
        if None in ids or ids[0] == ids[1]:  # a missing token maps to unk, which is <|endoftext|> in CLIP's
            raise self._error(f"base={base!r}: the tokenizer lacks <|startoftext|> / <|endoftext|>")
        largest = max(tok.get_vocab().values())
        if largest >= vocab_size:
            raise self._error(
                f"base={base!r}: the tokenizer has ids up to {largest}, beyond the text "
                f"tower's vocab_size={vocab_size}"
            )
        return tok

    def _load(self, path: str, model) -> None:
        state = read_tensor_state(path, self._error)
        state = strip_module_prefix(state)
        missing, unexpected, shapes = layout_mismatches(state, open_clip_layout(self.model_config))
        if missing or unexpected or shapes:
            raise self._error(
                f"checkpoint={path!r} does not match the open_clip CLIP architecture of model_config: "
                + describe_mismatch(missing, unexpected, shapes)
                + "expected open_clip's key names (visual.*, transformer.resblocks.*, "
                "token_embedding.weight, ...) as HPS_v2.1_compressed.pt holds them"
            )
        converted, unknown = convert_state_dict(state)
        assert not unknown, unknown  # the layout check above admits only keys with a rule
        model.load_state_dict(
            {k: v.to(self.dtype).contiguous() for k, v in converted.items()}, strict=True, assign=True
        )
        for module in (model.vision_model.embeddings, model.text_model.embeddings):  # non-persistent buffers
            module.position_ids = torch.arange(module.position_embedding.num_embeddings).expand((1, -1))
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:  # a transformers version with other buffers: fail here, not at the first call
            raise RuntimeError(f"reward {self.name!r}: tensors not set from the checkpoint: {few(left)}")

    # ------------------------------------------------------------------ scoring

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's input for (B, 3, H, W) images in [0, 1], by the chosen preprocessing."""
        if self.preprocess == "pil":
            out = hps_preprocess_pil(images, self.image_size, self.resize)
        else:
            out = _RESIZES[self.resize](images, self.image_size)
        return out.to(device=self.device, dtype=self.dtype)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """open_clip's token ids (B, context_length): cleaned text, BPE, start/end of text, cut, 0-padded."""
        texts = [open_clip_clean(str(p)) for p in prompts]
        enc = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return enc["input_ids"].masked_fill(enc["attention_mask"] == 0, 0)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=self.pixel_values(images)).pooler_output  # ln_post(cls)
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenize(prompts).to(self.device)
        hidden = self.model.text_model(input_ids=ids).last_hidden_state  # after ln_final
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        pooled = hidden[rows, ids.argmax(dim=-1)]  # open_clip's rule: the largest id, the first end-of-text
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self.image_features(images) * self.text_features(list(prompts))).sum(-1).to(images.device)
