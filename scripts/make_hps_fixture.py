"""Builds tests/fixtures/hps/: a tiny random-weight CLIP of HPSv2.1's family (open_clip ViT-H-14's structure
at tiny widths) made with the ORIGINAL code, its state dict saved as `HPS_v2.1_compressed.pt` stores it, test
images, prompts and the original's token ids, pixels and scores, so that tests/test_hps.py can check guardrl's
port (guardrl/rewards/hps.py, on transformers' CLIPModel) against the original offline.

This script does NOT run in guardrl's environment (no torchvision, no open_clip). It ran in a throwaway venv:

    python -m venv /tmp/hpsvenv
    /tmp/hpsvenv/bin/pip install torch==2.14.1 torchvision==0.29.1   # this machine's wheel disk; run on CPU
    /tmp/hpsvenv/bin/pip install open_clip_torch==3.3.0 transformers==4.40.2 safetensors pillow  # ftfy, regex
    /tmp/hpsvenv/bin/pip install --no-deps hpsv2==1.2.0 && /tmp/hpsvenv/bin/pip install clint
    SP=$(/tmp/hpsvenv/bin/python -c "import site; print(site.getsitepackages()[0])")
    cp $SP/open_clip/bpe_simple_vocab_16e6.txt.gz $SP/hpsv2/src/open_clip/   # the hpsv2 wheel omits this file
    /tmp/hpsvenv/bin/python scripts/make_hps_fixture.py [--out tests/fixtures/hps]

(hpsv2's other requirements (pandas, webdataset, pytest==7.2.0, ...) are for its benchmark and training code
and are not installed; `import hpsv2` needs only clint beyond open_clip's own requirements. The BPE file the
hpsv2 wheel forgot is the standard OpenAI CLIP vocabulary, the same file HPSv2's GitHub repository ships.)

"The original" here is hpsv2 1.2.0: its vendored open_clip (hpsv2/src/open_clip: the model classes, the
`light_augmentation` validation transform, the tokenizer) and `hpsv2.img_score.score`, run unmodified.
What is patched, all in this file (nothing in site-packages is edited beyond the copied BPE file):

1. Model size: `img_score.initialize_model()` calls `create_model_and_transforms('ViT-H-14',
   'laion2B-s32B-b79K', precision='amp', ..., light_augmentation=True, output_dict=True, ...)`, which builds
   the 1B-parameter model and downloads the LAION weights. Here the same call, with the same arguments, builds
   the model config TINY below (registered in the vendored factory's `_MODEL_CONFIGS`) with pretrained=None
   (the HPS checkpoint overwrites every weight anyway), and its result is put into `img_score.model_dict`,
   which `initialize_model` then keeps. TINY is ViT-H-14.json with smaller numbers: the same keys, no
   quick_gelu, class-token pooling, argmax text pooling, 224 px, patch 14, 77 tokens and the full 49408-token
   vocabulary (so the original tokenizer's ids are used as they are).
2. Weights: all parameters re-drawn from a seeded generator on scales that make the score depend on image and
   prompt, rounded to float16-representable values; saved as float16 under "state_dict" (open_clip names),
   which `img_score.score` loads with `model.load_state_dict(checkpoint['state_dict'])` into the float32
   model.
3. Scores: `img_score.score(png_path, prompt, cp=fixture_checkpoint)` for every (prompt, image) pair: its own
   checkpoint loading, `get_tokenizer('ViT-H-14')`, transform and `torch.cuda.amp.autocast()` block (inactive
   on the CPU). HPS_ROOT points at a temporary folder (img_score creates it).

Cross-checks made here (recorded in expected.json): open_clip_torch 3.3.0's own `CLIP` class, built from the
same config and loaded with the same state dict, gives the same image/text features as hpsv2's vendored one;
open_clip 3.3.0's tokenizer gives the same ids; the fixture's small transformers tokenizer (tokenizer/: the
original BPE's vocabulary entries and merges that the test prompts use, with their original ids, plus all 512
byte symbols) gives the original's ids on every prompt, with transformers 4.40's fast and slow CLIPTokenizer.

`full_size_keys.json` lists the key names and shapes of the full-size ViT-H-14 `CLIP` of the vendored code
(built on the meta device), i.e. the layout of the released HPS_v2.1_compressed.pt, so the test can check
that it maps onto transformers' CLIPModel without the 3.9 GB file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings

import numpy as np
import torch

TINY = {  # open_clip ViT-H-14.json's layout at tiny size
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 8, "heads": 2, "layers": 2},
}
TINY_NAME = "HPS-tiny-ViT-H-14-layout"

PROMPTS = [  # scored against every image
    "a photo of a cat",
    "A RED car, parked on the street at night!",  # upper case, punctuation
    "an old man sitting at a cafe table near the river, golden light on the water and boats under a blue sky "
    "with clouds, a painting of the city at sunset with flowers and trees in a large green garden, highly "
    "detailed, 8k, trending on artstation, by greg rutkowski and alphonse mucha, octane render, volumetric "
    "lighting, sharp focus, intricate, elegant",  # more than 77 tokens: cut, end-of-text last
    "  Tom &amp; Jerry's   café,\n2 mice  ",  # html entity, 's, whitespace runs, newline, non-ASCII, digits
]
EXTRA_TOKEN_PROMPTS = [""]  # tokenised only
FTFY_PROMPTS = ["a dog\u2019s \u201ctoy\u201d"]  # curly quotes: ftfy uncurls them (tokenised only)
IMAGE_SIZES = [(320, 256), (150, 181), (224, 263), (256, 256)]  # (H, W)


def make_images() -> list[np.ndarray]:
    """uint8 RGB images: downscale (320x256), upscale (150x181), longest edge shrunk a little with an odd pad
    (224x263 -> 191x224: 16 + 17 rows), and a square one (where both resize rules agree)."""
    rng = np.random.default_rng(0)
    out = []
    for i, (h, w) in enumerate(IMAGE_SIZES):
        yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
        r = 0.5 + 0.45 * np.sin(7 * xx + 3 * yy + i)
        g = 0.5 + 0.45 * np.cos(5 * yy * (1 + i) - 2 * xx)
        b = 0.5 + 0.4 * np.sin(11 * xx * yy + i)
        img = np.stack([r, g, b], -1)
        ph, pw = h // 4, w // 4
        img[ph : 2 * ph, pw : 2 * pw] = rng.random((ph, pw, 3))  # detail, so the resize kernel matters
        img[h // 2 : h // 2 + h // 5, w // 2 : w // 2 + w // 5] = [0.9, 0.1, 0.2]  # a sharp-edged square
        out.append(np.clip(np.round(img * 255), 0, 255).astype(np.uint8))
    return out


@torch.no_grad()
def redraw_weights(model, seed: int) -> None:
    """Patch 2: seeded weights, float16-representable."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name == "logit_scale":
            new = torch.full_like(p, float(np.log(100.0)))
        elif name.endswith("bias"):
            new = 0.1 * torch.randn(p.shape, generator=gen)
        elif ".ln_" in name or name.startswith(("ln_", "visual.ln_")):
            new = 1 + 0.1 * torch.randn(p.shape, generator=gen)
        elif name.endswith(("proj", "projection")) or (p.ndim >= 2 and "embedding" not in name):
            fan_in = p.shape[0] if name.endswith(("proj", "projection")) else p[0].numel()
            new = torch.randn(p.shape, generator=gen) * (1.5 / fan_in**0.5)
        else:  # class / positional / token embeddings
            new = 0.5 * torch.randn(p.shape, generator=gen)
        p.copy_(new.half().float())


def bpe_with_merges(tokenizer, token: str, fired: set) -> list[str]:
    """The original SimpleTokenizer.bpe, recording the merges it applies (the same loop)."""
    word = tuple(token[:-1]) + (token[-1] + "</w>",)
    if len(word) == 1:
        return [word[0]]
    while True:
        pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
        bigram = min(pairs, key=lambda pair: tokenizer.bpe_ranks.get(pair, float("inf")))
        if bigram not in tokenizer.bpe_ranks:
            break
        fired.add(bigram)
        first, second = bigram
        new_word, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                new_word.append(first + second)
                i += 2
            else:
                new_word.append(word[i])
                i += 1
        word = tuple(new_word)
        if len(word) == 1:
            break
    return list(word)


def write_small_tokenizer(simple, prompts: list[str], out_dir: str) -> None:
    """The transformers tokenizer files for the original BPE restricted to what `prompts` use: vocab.json with
    the original ids (open_clip's <start_of_text>/<end_of_text> under transformers' names), merges.txt with
    the fired merges in the original order (a subset of BPE merges that contains every merge fired on a word
    tokenises that word identically)."""
    import regex as re
    from hpsv2.src.open_clip.tokenizer import basic_clean, whitespace_clean

    fired, pieces = set(), set()
    for prompt in prompts:
        text = whitespace_clean(basic_clean(prompt)).lower()
        for token in re.findall(simple.pat, text):
            token = "".join(simple.byte_encoder[b] for b in token.encode("utf-8"))
            word = bpe_with_merges(simple, token, fired)
            assert " ".join(word) == simple.bpe(token), (token, word)
            pieces.update(word)
    byte_symbols = list(simple.byte_encoder.values())
    keep = set(byte_symbols) | {s + "</w>" for s in byte_symbols} | pieces | {a + b for a, b in fired}
    keep |= {a for a, _ in fired} | {b for _, b in fired}
    vocab = {t: simple.encoder[t] for t in keep}
    vocab["<|startoftext|>"] = simple.encoder["<start_of_text>"]
    vocab["<|endoftext|>"] = simple.encoder["<end_of_text>"]
    merges = sorted(fired, key=lambda pair: simple.bpe_ranks[pair])
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w") as f:
        json.dump(dict(sorted(vocab.items(), key=lambda kv: kv[1])), f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "errors": "replace",
        "add_prefix_space": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)


def hf_ids(tokenizer, prompts, clean) -> list[list[int]]:
    enc = tokenizer([clean(p) for p in prompts], padding="max_length", truncation=True, max_length=77)
    return [
        [i if m else 0 for i, m in zip(ids, mask)]
        for ids, mask in zip(enc["input_ids"], enc["attention_mask"])
    ]


def pixel_summary(x: torch.Tensor, seed: int) -> dict[str, np.ndarray]:
    """A (3, 224, 224) float32 tensor, compactly: per-channel row and column sums (float64) and the exact
    values at 4096 seeded positions."""
    flat = x.reshape(-1).numpy()
    idx = np.random.default_rng(seed).choice(flat.size, 4096, replace=False)
    return {
        "rows": x.double().sum(2).numpy(),
        "cols": x.double().sum(1).numpy(),
        "idx": idx.astype(np.int64),
        "values": flat[idx].astype(np.float32),
        "shape": np.array(x.shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hps")
    )
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    os.environ.setdefault("HPS_ROOT", tempfile.mkdtemp(prefix="hps_root_"))
    warnings.filterwarnings("ignore")

    import ftfy
    import open_clip
    import PIL
    import torchvision
    import transformers
    from PIL import Image

    import hpsv2
    import hpsv2.img_score as img_score
    import hpsv2.src.open_clip as hoc
    from hpsv2.src.open_clip import factory as hoc_factory
    from hpsv2.src.open_clip import tokenizer as hoc_tokenizer
    from hpsv2.src.open_clip.transform import image_transform

    # ---- the original model, built by img_score's own call (patch 1), weights redrawn (patch 2)
    hoc_factory._MODEL_CONFIGS[TINY_NAME] = json.loads(json.dumps(TINY))

    def create_original_model():
        # img_score.py's own create_model_and_transforms arguments
        return hoc.create_model_and_transforms(
            TINY_NAME,
            None,
            precision="amp",
            device="cpu",
            jit=False,
            force_quick_gelu=False,
            force_custom_text=False,
            force_patch_dropout=False,
            force_image_size=None,
            pretrained_image=False,
            image_mean=None,
            image_std=None,
            light_augmentation=True,
            aug_cfg={},
            output_dict=True,
            with_score_predictor=False,
            with_region_predictor=False,
        )

    torch.manual_seed(0)
    model, _, preprocess_val = create_original_model()
    redraw_weights(model, seed=1)
    state = {k: v.half() for k, v in model.state_dict().items()}
    checkpoint = os.path.join(out, "HPS_v2.1_compressed.pt")
    torch.save({"state_dict": state}, checkpoint)
    # a fresh, differently seeded original model goes into img_score's cache; score() loads the checkpoint
    torch.manual_seed(123)
    fresh, _, preprocess_val = create_original_model()
    img_score.model_dict["model"] = fresh
    img_score.model_dict["preprocess_val"] = preprocess_val

    # ---- images
    image_files = []
    for i, array in enumerate(make_images()):
        name = f"image_{i}.png"
        Image.fromarray(array).save(os.path.join(out, name), optimize=True)
        image_files.append(name)
    paths = [os.path.join(out, name) for name in image_files]

    # ---- the original's scores: img_score.score, unmodified (patch 3)
    pairs = []
    for p, prompt in enumerate(PROMPTS):
        for i, path in enumerate(paths):
            pairs.append(
                {
                    "prompt": p,
                    "image": i,
                    "score": float(img_score.score(path, prompt, cp=checkpoint, hps_version="v2.1")[0]),
                }
            )
    scores = np.array([row["score"] for row in pairs])
    print("original scores:", np.round(scores, 4).tolist())

    # ---- tokens: the original tokenizer (get_tokenizer('ViT-H-14') is the module's `tokenize`)
    tokenize = hoc.get_tokenizer("ViT-H-14")
    assert tokenize is hoc_tokenizer.tokenize
    token_prompts = PROMPTS + EXTRA_TOKEN_PROMPTS + FTFY_PROMPTS
    original_ids = tokenize(token_prompts).tolist()
    assert open_clip.get_tokenizer("ViT-H-14")(token_prompts).tolist() == original_ids, "open_clip differs"
    write_small_tokenizer(hoc_tokenizer._tokenizer, token_prompts, os.path.join(out, "tokenizer"))

    def clean(text):  # guardrl's open_clip_clean, restated
        import html
        import re

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return re.sub(r"\s+", " ", text).strip().lower()

    for cls in (transformers.CLIPTokenizerFast, transformers.CLIPTokenizer):
        tok = cls.from_pretrained(os.path.join(out, "tokenizer"))
        assert hf_ids(tok, token_prompts, clean) == original_ids, cls

    # ---- pixels: the original transform's output for each image (light_augmentation: ResizeMaxSize), and
    # the vendored non-light validation transform's (Resize shortest + CenterCrop), for guardrl's two modes
    crop_transform = image_transform(224, is_train=False)
    summaries = {}
    for i, path in enumerate(paths):
        for tag, transform in (("pad", preprocess_val), ("crop", crop_transform)):
            x = transform(Image.open(path))
            assert x.shape == (3, 224, 224), x.shape
            for key, value in pixel_summary(x, seed=i).items():
                summaries[f"{tag}_{i}_{key}"] = value
    np.savez_compressed(os.path.join(out, "pixels.npz"), **summaries)

    # ---- cross-check: open_clip 3.3.0's CLIP with the same weights gives the same features
    open_clip.factory._MODEL_CONFIGS[TINY_NAME] = json.loads(json.dumps(TINY))
    oc_model = open_clip.create_model(TINY_NAME, pretrained=None, precision="fp32", device="cpu")
    oc_model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    oc_model.eval()
    fresh.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess_val(Image.open(path)) for path in paths])
        ids = torch.tensor(original_ids)
        diffs = [
            float((fresh.encode_image(pixels) - oc_model.encode_image(pixels)).abs().max()),
            float((fresh.encode_text(ids) - oc_model.encode_text(ids)).abs().max()),
        ]
    print("hpsv2 vendored vs open_clip 3.3.0 features, max |diff| (image, text):", diffs)
    assert max(diffs) < 1e-5, diffs

    # ---- the full-size layout (the released checkpoint's keys), on the meta device
    with torch.device("meta"):
        full = hoc.create_model("ViT-H-14", None, precision="amp", device="meta", output_dict=True)
    keys = {k: list(v.shape) for k, v in full.state_dict().items()}
    with open(os.path.join(out, "full_size_keys.json"), "w") as f:
        json.dump(
            {
                "about": "state dict keys and shapes of hpsv2 1.2.0's vendored open_clip CLIP for "
                "ViT-H-14 (the layout of HPS_v2.1_compressed.pt's state_dict), written by "
                "scripts/make_hps_fixture.py",
                "keys": keys,
            },
            f,
            indent=0,
        )
    print(f"full-size ViT-H-14: {len(keys)} keys, {sum(np.prod(v) for v in keys.values()) / 1e6:.1f}M values")

    expected = {
        "about": "Written by scripts/make_hps_fixture.py with hpsv2 1.2.0's original code; see its "
        "docstring. Scores: hpsv2.img_score.score(png path, prompt, cp=HPS_v2.1_compressed.pt).",
        "versions": {
            "hpsv2": "1.2.0",
            "open_clip_torch": open_clip.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "transformers": transformers.__version__,
            "ftfy": ftfy.__version__,
            "pillow": PIL.__version__,
            "python": sys.version.split()[0],
        },
        "checkpoint": "HPS_v2.1_compressed.pt",
        "model_config": TINY,
        "vit_h_14": {
            "hpsv2": hoc.get_model_config("ViT-H-14"),
            "open_clip": open_clip.get_model_config("ViT-H-14"),
        },
        "tokenizer": "tokenizer",
        "prompts": PROMPTS,
        "token_prompts": token_prompts,
        "ftfy_prompts": FTFY_PROMPTS,
        "tokens": original_ids,
        "images": image_files,
        "image_sizes": [list(s) for s in IMAGE_SIZES],
        "pixels": "pixels.npz",
        "pairs": pairs,
        "open_clip_3_3_feature_max_diff": diffs,
        "hpsv2_package_dir": os.path.dirname(hpsv2.__file__).replace(os.path.expanduser("~"), "~"),
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(out) for n in names)
    print(f"wrote {out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
