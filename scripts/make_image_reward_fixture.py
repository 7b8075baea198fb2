"""Builds tests/fixtures/image_reward/: a tiny random-weight ImageReward made with the ORIGINAL code (the
`image-reward` 1.5 package, github.com/THUDM/ImageReward), its state dict under the original key names, test
images, prompts and the original code's scores, so that tests/test_image_reward.py can check guardrl's port
(guardrl/rewards/image_reward.py, built on transformers 5's BLIP classes) against the original offline.

This script does NOT run in guardrl's environment: the original's vendored BLIP text encoder (med.py) needs
transformers 4.x and its package imports torchvision and timm 0.6.13. It ran in a throwaway venv:

    python -m venv /tmp/irvenv
    /tmp/irvenv/bin/pip install torch==2.14.1 torchvision==0.29.1   # from this machine's wheel disk,
                                                                    # run on CPU
    /tmp/irvenv/bin/pip install --no-deps image-reward==1.5 timm==0.6.13 fairscale==0.4.13
    /tmp/irvenv/bin/pip install transformers==4.40.2 safetensors pillow
    /tmp/irvenv/bin/python scripts/make_image_reward_fixture.py [--out tests/fixtures/image_reward]

(torch 2.13.0's CPU file has no matching torchvision here: PyPI's torchvision fails to import beside it, so
the venv takes torch 2.14.1 + torchvision 0.29.1. image-reward's other pins (diffusers, datasets, accelerate,
huggingface-hub) are only for its training code (ReFL.py) and are not installed; see patch 1.)

What is the original's and what is patched, all in this file (nothing in site-packages is edited):

1. Import: `import ImageReward` runs the package's __init__, which imports ReFL.py (diffusers, datasets,
   accelerate) and the CLIP/BLIP/Aesthetic baseline scorers (OpenAI's `clip`). None of them is involved in the
   ImageReward model, so the two package modules `ImageReward` and `ImageReward.models` are registered as
   empty namespace packages pointing at the installed folders; `ImageReward.ImageReward` (the model class, its
   `_transform`, `MLP`, `score`, `inference_rank`) and `ImageReward.models.BLIP.*` (blip_pretrain.py, blip.py,
   vit.py, med.py) are then imported and run unmodified.
2. Vision size: `BLIP_Pretrain` calls `create_vit('large', 224)` (ViT-L/16: width 1024, 24 blocks). The name
   `create_vit` in blip_pretrain's namespace is replaced by a function that builds the original
   `VisionTransformer` class (vit.py) with the tiny VISION_CONFIG below (224 px, patch 16, width 32, 2 blocks,
   2 heads); its width becomes the text encoder's `encoder_width`, as in the original.
3. Tokenizer: the original's `init_tokenizer` does `BertTokenizer.from_pretrained('bert-base-uncased')` (the
   hub), then adds '[DEC]' as bos and '[ENC]' as an additional special token. The name `BertTokenizer` in
   blip.py's namespace is replaced by a shim whose `from_pretrained` loads the fixture's small uncased
   WordPiece vocabulary (tokenizer/vocab.txt, written here) instead; the rest of `init_tokenizer` runs as is.
4. Head size: `ImageReward.__init__` hard-codes `MLP(768)` (BERT-base width); after construction `model.mlp`
   is replaced by the original `MLP` class built for the tiny text width (32). Its inner layers
   (1024, 128, 64, 16, 1) are the original's.
5. Weights: all parameters are re-drawn from a seeded generator with larger scales than the original's init
   (whose tiny MLP init makes every score about -mean/std, which would test nothing), then rounded to
   float16-representable values so the weights file can be stored as float16 (half the size) and still
   reproduce exactly the float32 model that produced the scores.

`full_size_keys.json` lists the key names and shapes of the full-size original model's state dict (the real
ViT-L `create_vit`, the released med_config values, `MLP(768)`; only the tokenizer patched), so the test can
check that the released checkpoint's layout maps onto guardrl's modules without the 1.7 GB file.

The scores are the original's own API: `model.score(prompt, pil_image)` for each (prompt, image) pair, and
`model.inference_rank(prompt, [pil images])` (what `score(prompt, list)` returns) for each prompt. Before
scoring, the state dict is saved with `torch.save` and loaded into a second, differently seeded original
model with `load_state_dict(..., strict=False)`, exactly as the package's `ImageReward.load` does; that
reloaded model is the one scored (so the saved keys are all the original needs). The images are scored from
the PNG files as `PIL.Image.open` returns them, as a user of the package would pass them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import types

import numpy as np
import torch

VISION_CONFIG = {
    "img_size": 224,
    "patch_size": 16,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "mlp_ratio": 4.0,
}

# An uncased WordPiece vocabulary; [PAD] is id 0 as in bert-base-uncased (med_config's pad_token_id).
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "at",
    "with",
    "and",
    "under",
    "near",
    "photo",
    "painting",
    "cat",
    "dog",
    "car",
    "red",
    "blue",
    "green",
    "small",
    "large",
    "house",
    "tree",
    "garden",
    "sky",
    "clouds",
    "field",
    "flowers",
    "river",
    "mountains",
    "sunset",
    "night",
    "street",
    "parked",
    "cafe",
    "table",
    "sitting",
    "portrait",
    "old",
    "man",
    "woman",
    "golden",
    "light",
    "city",
    "water",
    "boat",
]
PIECES = ["##s", "##ed", "##ing", "##er", "##ly"]
PUNCTUATION = [",", ".", "!", "?", "'", "-", ":"]

MED_CONFIG = {  # BLIP's med_config.json layout (ImageReward's release: BERT-base, 30524 tokens) at tiny size
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 40,
    "model_type": "bert",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": None,  # len(vocab) + 2 ([DEC], [ENC]), filled in below
    "encoder_width": 32,
    "add_cross_attention": True,
}

PROMPTS = [
    "a photo of a cat",
    "A RED car, parked on the street at night!",  # upper case, punctuation
    # > 35 tokens
    "an old man sitting at a cafe table near the river, golden light on the water and boats under a blue sky "
    "with clouds, painting of the city at sunset with flowers and trees in a large green garden",
    "a zebra with two dogs",  # unknown words ([UNK]), a WordPiece split (dog ##s)
]


def make_images() -> list[np.ndarray]:
    """Three uint8 RGB images whose sizes exercise the original's Resize(224) + CenterCrop(224):
    320x256 (downscale, H x W), 150x181 (upscale), 224x263 (no resize; crop offset 19.5, which torchvision
    rounds to 20 where transformers' rule would floor to 19)."""
    rng = np.random.default_rng(0)
    out = []
    for i, (h, w) in enumerate([(320, 256), (150, 181), (224, 263)]):
        yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
        r = 0.5 + 0.45 * np.sin(7 * xx + 3 * yy + i)
        g = 0.5 + 0.45 * np.cos(5 * yy * (1 + i) - 2 * xx)
        b = 0.5 + 0.4 * np.sin(11 * xx * yy + i)
        img = np.stack([r, g, b], -1)
        # a block of noise and a sharp-edged square, so the resize kernel's treatment of detail matters
        ph, pw = h // 4, w // 4
        img[ph : 2 * ph, pw : 2 * pw] = rng.random((ph, pw, 3))
        img[h // 2 : h // 2 + h // 5, w // 2 : w // 2 + w // 5] = [0.9, 0.1, 0.2]
        out.append(np.clip(np.round(img * 255), 0, 255).astype(np.uint8))
    return out


def import_original():
    """Patch 1 of the module docstring: the model modules without the package __init__'s unrelated imports."""
    spec = importlib.util.find_spec("ImageReward")
    if spec is None or spec.origin is None:
        raise SystemExit("the image-reward package is not installed in this interpreter (see the docstring)")
    root = os.path.dirname(spec.origin)
    for name, path in [("ImageReward", root), ("ImageReward.models", os.path.join(root, "models"))]:
        module = types.ModuleType(name)
        module.__path__ = [path]
        sys.modules[name] = module
    import ImageReward.ImageReward as image_reward_module
    import ImageReward.models.BLIP.blip as blip_module
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain_module
    import ImageReward.models.BLIP.vit as vit_module

    return image_reward_module, blip_module, blip_pretrain_module, vit_module


def full_size_keys(modules, med_config_path: str, tokenizer_dir: str) -> dict[str, list[int]]:
    """Key names and shapes of the state dict of the full-size original model (ViT-L, the released BERT-base
    med_config, MLP(768)): what the released ImageReward.pt holds. Only the tokenizer is patched (patch 3)."""
    image_reward_module, blip_module, blip_pretrain_module, vit_module = modules
    saved = blip_pretrain_module.create_vit
    blip_pretrain_module.create_vit = ORIGINAL_CREATE_VIT
    try:
        _patch_tokenizer(blip_module, tokenizer_dir)
        model = image_reward_module.ImageReward(med_config=med_config_path, device="cpu")
        return {k: list(v.shape) for k, v in model.state_dict().items()}
    finally:
        blip_pretrain_module.create_vit = saved


def _patch_tokenizer(blip_module, tokenizer_dir: str) -> None:
    from transformers import BertTokenizer as RealBertTokenizer

    class LocalBertTokenizer:  # patch 3
        @staticmethod
        def from_pretrained(name, *args, **kwargs):
            assert name == "bert-base-uncased", name
            return RealBertTokenizer.from_pretrained(tokenizer_dir)

    blip_module.BertTokenizer = LocalBertTokenizer


ORIGINAL_CREATE_VIT = None


def build_original(modules, med_config_path: str, tokenizer_dir: str, seed: int):
    image_reward_module, blip_module, blip_pretrain_module, vit_module = modules

    def tiny_create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        # patch 2: the original class at tiny size (the original: vit='large' -> width 1024, depth 24)
        assert vit == "large" and image_size == VISION_CONFIG["img_size"]
        encoder = vit_module.VisionTransformer(
            **VISION_CONFIG,
            use_grad_checkpointing=use_grad_checkpointing,
            ckpt_layer=ckpt_layer,
            drop_path_rate=drop_path_rate,
        )
        return encoder, VISION_CONFIG["embed_dim"]

    blip_pretrain_module.create_vit = tiny_create_vit
    _patch_tokenizer(blip_module, tokenizer_dir)
    torch.manual_seed(seed)
    model = image_reward_module.ImageReward(med_config=med_config_path, device="cpu")
    model.mlp = image_reward_module.MLP(model.blip.text_encoder.config.hidden_size)  # patch 4
    return model


@torch.no_grad()
def redraw_weights(model, seed: int) -> None:
    """Patch 5: seeded weights on scales that make the score depend on both image and prompt, rounded to
    float16-representable values."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            new = 0.1 * torch.randn(p.shape, generator=gen)
        elif "LayerNorm" in name or ".norm" in name or name.startswith("blip.visual_encoder.norm"):
            new = 1 + 0.1 * torch.randn(p.shape, generator=gen)
        elif p.ndim >= 2 and "embeddings" not in name and "pos_embed" not in name:
            fan_in = p[0].numel()
            new = torch.randn(p.shape, generator=gen) * (1.5 / fan_in**0.5)
        else:  # cls_token, pos_embed, word / position embeddings
            new = 0.5 * torch.randn(p.shape, generator=gen)
        p.copy_(new.half().float())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "image_reward")
    )
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "tokenizer"), exist_ok=True)

    import PIL
    import safetensors
    import timm
    import torchvision
    import transformers
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import BertTokenizer

    # the tokenizer: vocab.txt + config, saved without [DEC]/[ENC] (the original's init_tokenizer adds them)
    vocab = SPECIAL + PUNCTUATION + WORDS + PIECES + [f"[unused{i}]" for i in range(3)]
    vocab_path = os.path.join(out, "tokenizer", "vocab.txt")
    with open(vocab_path, "w") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizer(vocab_path, do_lower_case=True).save_pretrained(os.path.join(out, "tokenizer"))
    med = dict(MED_CONFIG, vocab_size=len(vocab) + 2)
    med_path = os.path.join(out, "med_config.json")
    with open(med_path, "w") as f:
        json.dump(med, f, indent=2)
    with open(os.path.join(out, "vision_config.json"), "w") as f:
        json.dump(VISION_CONFIG, f, indent=2)

    modules = import_original()
    global ORIGINAL_CREATE_VIT
    ORIGINAL_CREATE_VIT = modules[2].create_vit
    model = build_original(modules, med_path, os.path.join(out, "tokenizer"), seed=0)
    redraw_weights(model, seed=1)
    state = model.state_dict()
    assert len(model.blip.tokenizer) == med["vocab_size"], (len(model.blip.tokenizer), med["vocab_size"])

    # reload the way ImageReward.load does, into a fresh, differently seeded original model
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, os.path.join(tmp, "ImageReward.pt"))
        reloaded = build_original(modules, med_path, os.path.join(out, "tokenizer"), seed=123)
        msg = reloaded.load_state_dict(
            torch.load(os.path.join(tmp, "ImageReward.pt"), map_location="cpu"), strict=False
        )
        assert not msg.missing_keys and not msg.unexpected_keys, msg
    reloaded.eval()

    # weights: the original key names, float16 (every value is float16-representable: patch 5)
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(
        tensors,
        os.path.join(out, "ImageReward.safetensors"),
        metadata={"source": "scripts/make_image_reward_fixture.py", "format": "pt"},
    )

    image_files, crop_files = [], []
    for i, array in enumerate(make_images()):
        name = f"image_{i}.png"
        Image.fromarray(array).save(os.path.join(out, name), optimize=True)
        image_files.append(name)
    pil_images = [Image.open(os.path.join(out, name)) for name in image_files]

    # the original transform's resize + center crop, kept as uint8 PNGs (its ToTensor then divides by 255)
    resize, crop = reloaded.preprocess.transforms[0], reloaded.preprocess.transforms[1]
    for i, img in enumerate(pil_images):
        cropped = crop(resize(img)).convert("RGB")
        full = reloaded.preprocess(img)
        mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
        std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
        again = (torch.from_numpy(np.asarray(cropped)).permute(2, 0, 1).float() / 255 - mean) / std
        assert torch.allclose(full, again, atol=1e-6), "the crop PNG must reproduce the original's transform"
        name = f"crop_{i}.png"
        cropped.save(os.path.join(out, name), optimize=True)
        crop_files.append(name)

    with torch.no_grad():
        pairs, prompt_tokens = [], []
        for p, prompt in enumerate(PROMPTS):
            tokens = reloaded.blip.tokenizer(prompt, padding="max_length", truncation=True, max_length=35)
            ranked = reloaded.inference_rank(prompt, pil_images)[1]
            for i in range(len(pil_images)):
                pairs.append(
                    {
                        "prompt": p,
                        "image": i,
                        "score": reloaded.score(prompt, pil_images[i]),
                        "inference_rank_score": ranked[i],
                    }
                )
            prompt_tokens.append(
                {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
            )
    scores = np.array([row["score"] for row in pairs])
    print("original scores:", np.round(scores, 4).tolist())
    print("spread (std over pairs):", float(scores.std()))

    expected = {
        "about": "Written by scripts/make_image_reward_fixture.py with the original image-reward code; "
        "see its docstring for the venv and the patches. Scores: the original's score(prompt, PIL image) "
        "and inference_rank(prompt, [PIL images]).",
        "versions": {
            "image-reward": "1.5",
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "transformers": transformers.__version__,
            "timm": timm.__version__,
            "pillow": PIL.__version__,
            "safetensors": safetensors.__version__,
        },
        "checkpoint": "ImageReward.safetensors",
        "med_config": "med_config.json",
        "vision_config": VISION_CONFIG,
        "tokenizer": "tokenizer",
        "special_tokens": {
            "[DEC]": reloaded.blip.tokenizer.bos_token_id,
            "[ENC]": reloaded.blip.tokenizer.enc_token_id,
        },
        "mean": reloaded.mean,
        "std": reloaded.std,
        "prompts": PROMPTS,
        "tokens": prompt_tokens,
        "images": image_files,
        "crops": crop_files,
        "image_sizes": [list(img.size[::-1]) for img in pil_images],
        "pairs": pairs,
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    # the full-size original's keys and shapes, for the test that the released layout maps onto guardrl's
    # modules
    with tempfile.TemporaryDirectory() as tmp:
        released_med = dict(
            MED_CONFIG,
            hidden_size=768,
            intermediate_size=3072,
            max_position_embeddings=512,
            num_attention_heads=12,
            num_hidden_layers=12,
            vocab_size=30524,
            encoder_width=768,
        )
        with open(os.path.join(tmp, "med_config.json"), "w") as f:
            json.dump(released_med, f)
        keys = full_size_keys(modules, os.path.join(tmp, "med_config.json"), os.path.join(out, "tokenizer"))
    with open(os.path.join(out, "full_size_keys.json"), "w") as f:
        json.dump(
            {
                "about": "state dict keys and shapes of the original ImageReward class at full size (ViT-L, "
                "the released med_config, MLP(768)), as the released ImageReward.pt holds them",
                "med_config": released_med,
                "keys": keys,
            },
            f,
            indent=0,
        )
    print(f"full-size original: {len(keys)} keys, {sum(np.prod(v) for v in keys.values()) / 1e6:.1f}M values")
    total = sum(
        os.path.getsize(os.path.join(dirpath, name)) for dirpath, _, names in os.walk(out) for name in names
    )
    print(f"wrote {out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
