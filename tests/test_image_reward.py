"""ImageReward (guardrl/rewards/image_reward.py) against the ORIGINAL image-reward code.

tests/fixtures/image_reward/ was written by scripts/make_image_reward_fixture.py in a separate venv with the
original package (image-reward 1.5, transformers 4.40): a tiny random-weight ImageReward built with the
original classes, its state dict under the original key names (ImageReward.safetensors), its med_config.json,
its ViT size, a small uncased WordPiece tokenizer, three PNG images whose sizes exercise the resize and the
center crop, the original transform's resize+crop of each (crop_*.png), four prompts, the original tokenizer's
ids and the original `score(prompt, PIL image)` for every (prompt, image) pair. Everything here runs offline.
"""

import json
import os

import numpy as np
import pytest
import torch

from guardrl.rewards import Reward
from guardrl.rewards.hps import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
import guardrl.rewards.image_reward as image_reward_module
from guardrl.rewards.image_reward import (
    IMAGE_REWARD_MEAN,
    IMAGE_REWARD_STD,
    RELEASED_MED_CONFIG,
    VIT_LARGE,
    ImageReward,
    build_modules,
    convert_state_dict,
    image_reward_crop_pil,
    image_reward_preprocess,
    image_reward_preprocess_pil,
    state_dict_mismatches,
)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "image_reward")
TOKENIZER = os.path.join(FIXTURE, "tokenizer")
VISION = os.path.join(FIXTURE, "vision_config.json")
# Equality with the original: float32 on the CPU, batched here, one pair at a time there. Measured max
# |difference| 6.7e-6 with preprocess='pil' (0.0, bit-identical, when scored one pair at a time); the
# original's own two APIs (score and inference_rank) differ by up to 3.8e-6 on these scores (8.9 to 11.5).
SCORE_ATOL = 5e-5


@pytest.fixture(scope="module")
def expected():
    with open(os.path.join(FIXTURE, "expected.json")) as f:
        return json.load(f)


def _load_png(name):
    from PIL import Image

    return np.asarray(Image.open(os.path.join(FIXTURE, name)).convert("RGB"))


def _as_tensor(array):
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def images(expected):
    """The fixture images as (3, H, W) float tensors in [0, 1] (exact: they are 8-bit PNGs)."""
    return [_as_tensor(_load_png(name)) for name in expected["images"]]


@pytest.fixture(scope="module")
def rewards():
    """One reward per preprocessing, loaded from the fixture file with the original key names."""
    path = os.path.join(FIXTURE, "ImageReward.safetensors")
    return {
        pre: ImageReward(path, tokenizer=TOKENIZER, vision_config=VISION, preprocess=pre)
        for pre in ("pil", "tensor")
    }


def _score_pairs(reward, images, expected, pairs=None):
    """Scores the fixture's pairs, grouped by image size (a batch holds images of one size)."""
    pairs = expected["pairs"] if pairs is None else pairs
    out = torch.empty(len(pairs))
    for i, image in enumerate(images):
        rows = [n for n, row in enumerate(pairs) if row["image"] == i]
        batch = image.unsqueeze(0).expand(len(rows), -1, -1, -1)
        out[rows] = reward(batch, [expected["prompts"][pairs[n]["prompt"]] for n in rows])
    return out


# ---------------------------------------------------------------- equality with the original code


def test_scores_equal_the_original_code(rewards, images, expected):
    original = torch.tensor([row["score"] for row in expected["pairs"]])
    ours = _score_pairs(rewards["pil"], images, expected)
    assert (ours - original).abs().max() <= SCORE_ATOL, (ours - original).abs().max()
    # the fixture is a meaningful test: the scores depend on the image and on the prompt well beyond the
    # tolerance
    grid = original.view(len(expected["prompts"]), len(images))
    assert (grid.max(1).values - grid.min(1).values).min() > 0.05  # per prompt, across images
    assert (grid.max(0).values - grid.min(0).values).min() > 0.05  # per image, across prompts


def test_scores_of_one_batch_mixing_prompts_equal_the_original(rewards, images, expected):
    # all four prompts against one image in a single batch: padding to 35 tokens keeps rows independent
    rows = [row for row in expected["pairs"] if row["image"] == 2]
    ours = rewards["pil"](
        images[2].unsqueeze(0).expand(len(rows), -1, -1, -1),
        [expected["prompts"][row["prompt"]] for row in rows],
    )
    torch.testing.assert_close(
        ours, torch.tensor([row["inference_rank_score"] for row in rows]), atol=SCORE_ATOL, rtol=0
    )


def test_tokenization_equals_the_original(rewards, expected):
    tokenizer = rewards["pil"].tokenizer
    out = tokenizer(expected["prompts"], padding="max_length", truncation=True, max_length=35)
    assert out["input_ids"] == [t["input_ids"] for t in expected["tokens"]]
    assert out["attention_mask"] == [t["attention_mask"] for t in expected["tokens"]]
    assert tokenizer.bos_token_id == expected["special_tokens"]["[DEC]"]
    assert tokenizer.convert_tokens_to_ids("[ENC]") == expected["special_tokens"]["[ENC]"]
    # ImageReward.score feeds [CLS] first (it does not swap in [ENC]), and truncates the long prompt to 35
    assert {t["input_ids"][0] for t in expected["tokens"]} == {tokenizer.cls_token_id}
    assert sum(expected["tokens"][2]["attention_mask"]) == 35


def test_constants_are_the_originals(expected):
    assert (IMAGE_REWARD_MEAN, IMAGE_REWARD_STD) == (expected["mean"], expected["std"])


def test_pil_crop_equals_the_original_transform(expected):
    # torchvision Resize(224, BICUBIC) + CenterCrop(224) on PIL images, as the original ran them:
    # bit-identical
    from PIL import Image

    for name, crop, size in zip(expected["images"], expected["crops"], expected["image_sizes"]):
        image = Image.open(os.path.join(FIXTURE, name))
        assert [image.height, image.width] == size
        ours = np.asarray(image_reward_crop_pil(image))
        np.testing.assert_array_equal(ours, _load_png(crop))


def _original_pixels(crop_name):
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    return (_as_tensor(_load_png(crop_name)) - mean) / std


def test_pil_preprocessing_equals_the_original(images, expected):
    for image, crop in zip(images, expected["crops"]):
        torch.testing.assert_close(
            image_reward_preprocess_pil(image[None])[0], _original_pixels(crop), atol=1e-6, rtol=0
        )


def test_tensor_preprocessing_is_within_two_8bit_levels_of_the_original(images, expected):
    # no resize (224 x 263, crop offset 19.5 -> torchvision rounds to 20): equal; with a resize (320 x 256
    # down, 150 x 181 up): PIL's fixed-point bicubic vs two float passes, measured max 2 levels, mean < 0.05
    # level
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    for image, crop, size in zip(images, expected["crops"], expected["image_sizes"]):
        ours = image_reward_preprocess(image[None])[0]
        theirs = _original_pixels(crop)
        assert ours.shape == theirs.shape == (3, 224, 224)
        levels = ((ours - theirs) * std * 255).abs()
        if min(size) == 224:
            assert levels.max() <= 1e-3
        else:
            assert levels.max() <= 2.0 + 1e-3
            assert levels.mean() <= 0.1


@pytest.mark.parametrize("height,width", [(512, 512), (1024, 1024), (100, 700)])
def test_tensor_preprocessing_is_within_two_8bit_levels_of_pil_at_generation_sizes(height, width):
    # the 'pil' path is the original's (tests above); typical generated sizes, a smooth and a noise image:
    # measured max 2 levels, mean <= 0.052 level
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    smooth = torch.stack([0.5 + 0.4 * torch.sin(6 * xx + 2 * yy), yy, 0.5 + 0.3 * torch.cos(5 * yy) * xx])
    noise = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
    images = torch.stack([smooth, noise])
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    levels = ((image_reward_preprocess(images) - image_reward_preprocess_pil(images)) * std * 255).abs()
    assert levels.max() <= 2.0 + 1e-3
    assert levels.mean() <= 0.1


def test_tensor_scores_are_close_to_the_original(rewards, images, expected):
    # what those pixel differences do to this tiny random model's scores (spread ~0.8): measured max 0.0038
    original = torch.tensor([row["score"] for row in expected["pairs"]])
    ours = _score_pairs(rewards["tensor"], images, expected)
    no_resize = torch.tensor([row["image"] == 2 for row in expected["pairs"]])
    assert (ours - original)[no_resize].abs().max() <= SCORE_ATOL
    assert (ours - original).abs().max() <= 0.02


# ---------------------------------------------------------------- the reward


def test_is_a_frozen_eval_mode_reward_with_one_float_score_per_image(rewards, images):
    reward = rewards["tensor"]
    assert isinstance(reward, Reward) and reward.name == "image_reward"
    assert not reward.vision_model.training and not reward.text_model.training and not reward.mlp.training
    assert all(not p.requires_grad for p in reward.parameters())
    batch = torch.stack([images[0], images[0].flip(-1)])
    scores = reward(batch, ["a photo of a cat", "a red car"])
    assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    torch.testing.assert_close(reward(batch, ["a photo of a cat", "a red car"]), scores, atol=0, rtol=0)
    # any size in, 224 px to the model
    assert reward.pixel_values(torch.rand(3, 3, 64, 90)).shape == (3, 3, 224, 224)


def test_bfloat16_weights(images):
    reward = ImageReward(
        os.path.join(FIXTURE, "ImageReward.safetensors"),
        tokenizer=TOKENIZER,
        vision_config=VISION,
        torch_dtype="bfloat16",
    )
    assert {p.dtype for p in reward.vision_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in reward.mlp.parameters()} == {torch.float32}  # the head stays float32
    assert reward(images[2][None], ["a photo of a cat"]).dtype == torch.float32


def test_loads_from_a_directory_and_from_a_pt_file(tmp_path, rewards, images, expected):
    # a directory laid out like the hub repo THUDM/ImageReward: ImageReward.pt + med_config.json beside it;
    # the .pt is the original state dict saved with torch.save, as the released file is
    from safetensors.torch import load_file

    state = {
        k: v.float() if v.is_floating_point() else v
        for k, v in load_file(os.path.join(FIXTURE, "ImageReward.safetensors")).items()
    }
    torch.save(state, tmp_path / "ImageReward.pt")
    with open(os.path.join(FIXTURE, "med_config.json")) as f:
        (tmp_path / "med_config.json").write_text(f.read())
    from_dir = ImageReward(str(tmp_path), tokenizer=TOKENIZER, vision_config=VISION, preprocess="pil")
    assert from_dir.checkpoint == str(tmp_path / "ImageReward.pt")
    pairs = [row for row in expected["pairs"] if row["prompt"] == 0]
    ours = _score_pairs(from_dir, images, expected, pairs)
    torch.testing.assert_close(ours, torch.tensor([row["score"] for row in pairs]), atol=SCORE_ATOL, rtol=0)
    # a file path finds med_config.json beside it too; dict configs work as well as paths
    from_file = ImageReward(
        str(tmp_path / "ImageReward.pt"),
        tokenizer=TOKENIZER,
        vision_config=expected["vision_config"],
        preprocess="pil",
    )
    torch.testing.assert_close(
        from_file(images[1][None], [expected["prompts"][0]]), ours[1:2], atol=0, rtol=0
    )


def test_key_mapping_covers_the_original_names():
    from safetensors.torch import load_file

    state = load_file(os.path.join(FIXTURE, "ImageReward.safetensors"))
    vision, text, mlp, unknown = convert_state_dict(state)
    assert unknown == []
    assert vision["embeddings.class_embedding"] is state["blip.visual_encoder.cls_token"]
    assert (
        vision["encoder.layers.1.self_attn.projection.weight"]
        is state["blip.visual_encoder.blocks.1.attn.proj.weight"]
    )
    assert vision["post_layernorm.bias"] is state["blip.visual_encoder.norm.bias"]
    assert (
        text["encoder.layer.0.crossattention.self.key.weight"]
        is state["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"]
    )
    assert mlp["layers.7.bias"] is state["mlp.layers.7.bias"]
    # dropped: unused by the score (the original also loads them into modules its score never calls)
    used = {k for k in state if k.startswith(("blip.visual_encoder.", "mlp."))}
    used |= {f"blip.text_encoder.{k}" for k in text}
    assert set(state) - used == {
        "blip.vision_proj.weight",
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
        "blip.text_encoder.embeddings.position_ids",
    }
    assert len(vision) == sum(k.startswith("blip.visual_encoder.") for k in state)


def test_messages_name_every_converted_key_by_its_original_name():
    # mismatch messages translate BlipVisionModel / BlipTextModel / MLP names back: the round trip of every
    # key of the released layout must give the key itself
    with open(os.path.join(FIXTURE, "full_size_keys.json")) as f:
        keys = json.load(f)["keys"]
    state = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    vision, text, mlp, unknown = convert_state_dict(state)
    assert unknown == []
    originals = {
        image_reward_module._original_name(part, name)
        for part, converted in (("vision", vision), ("text", text), ("mlp", mlp))
        for name in converted
    }
    assert originals == set(state) - {
        "blip.vision_proj.weight",
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
        "blip.text_encoder.embeddings.position_ids",
    }


def test_the_full_size_original_layout_maps_onto_the_default_architecture():
    # full_size_keys.json: keys and shapes of the original class's state dict at full size (ViT-L/16, the
    # released med_config, MLP(768)), i.e. the layout of the released ImageReward.pt; checked here on meta
    # tensors against the modules the defaults build (vision_config=None, med_config=None)
    with open(os.path.join(FIXTURE, "full_size_keys.json")) as f:
        full = json.load(f)
    assert full["med_config"] == {**RELEASED_MED_CONFIG, "architectures": ["BertModel"]}
    state = {k: torch.empty(shape, device="meta") for k, shape in full["keys"].items()}
    parts = convert_state_dict(state)
    vision, text, mlp = build_modules(RELEASED_MED_CONFIG, VIT_LARGE)
    assert state_dict_mismatches(parts, vision, text, mlp) == ([], [], [])
    assert sum(len(p) for p in parts[:3]) == len(state) - 5  # vision_proj, text_proj (w, b), position_ids
    assert vision.config.num_attention_heads == 16 and text.config.num_attention_heads == 12


# ---------------------------------------------------------------- bad inputs


def _fixture_state():
    from safetensors.torch import load_file

    return load_file(os.path.join(FIXTURE, "ImageReward.safetensors"))


def _make(path, **kwargs):
    kwargs = {
        "tokenizer": TOKENIZER,
        "vision_config": VISION,
        "med_config": os.path.join(FIXTURE, "med_config.json"),
        **kwargs,
    }
    return ImageReward(str(path), **kwargs)


def test_bad_options_are_named(tmp_path):
    good = os.path.join(FIXTURE, "ImageReward.safetensors")
    with pytest.raises(ValueError, match="preprocess='bogus' must be 'tensor' or 'pil'"):
        _make(good, preprocess="bogus")
    with pytest.raises(ValueError, match="torch_dtype='int8'"):
        _make(good, torch_dtype="int8")
    with pytest.raises(
        ValueError, match=r"checkpoint='/nonexistent/ImageReward.pt': no such file or directory"
    ):
        _make("/nonexistent/ImageReward.pt")
    with pytest.raises(
        ValueError,
        match=r"is a directory without ImageReward.pt or ImageReward.safetensors "
        r"\(it holds: notes.txt\)",
    ):
        (tmp_path / "notes.txt").write_text("x")
        _make(tmp_path)
    with pytest.raises(
        ValueError,
        match="checkpoint='nobody/no-such-model' is not a local file or directory, "
        "and ImageReward.pt could not be fetched",
    ):
        _make("nobody/no-such-model")  # HF_HUB_OFFLINE=1 in the test environment: fails without a request
    with pytest.raises(ValueError, match="tokenizer='/nonexistent/tok': could not load a BERT tokenizer"):
        _make(good, tokenizer="/nonexistent/tok")
    with pytest.raises(ValueError, match=r"vision_config has unknown keys \['width'\]; allowed: "):
        _make(good, vision_config={"width": 32})
    with pytest.raises(ValueError, match="med_config=42 must be a path to a med_config.json file"):
        _make(good, med_config=42)
    with open(os.path.join(FIXTURE, "med_config.json")) as f:
        med = json.load(f)
    with pytest.raises(ValueError, match="add_cross_attention=False"):
        _make(good, med_config={**med, "add_cross_attention": False})
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        _make(good, med_config={**med, "position_embedding_type": "relative_key"})
    with pytest.raises(
        ValueError,
        match=r"has 68 tokens with \[DEC\] and \[ENC\], more than the text encoder's "
        r"vocab_size=60",
    ):
        _make(good, med_config={**med, "vocab_size": 60})


def test_checkpoint_that_does_not_match_lists_the_keys(tmp_path):
    from safetensors.torch import save_file

    state = _fixture_state()
    broken = {k: v for k, v in state.items() if ".blocks.1." not in k and k != "mlp.layers.7.bias"}
    broken["blip.some_adapter.weight"] = torch.zeros(2)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError) as info:
        _make(tmp_path / "broken.safetensors")
    message = str(info.value)
    assert "13 missing keys: blip.visual_encoder.blocks.1.attn.proj.bias" in message
    assert "1 unexpected keys: blip.some_adapter.weight" in message
    assert "(and 8 more)" in message  # a few listed, the count of the rest
    # the released (BERT-base) med_config on the tiny weights: shapes do not match, named with both shapes
    save_file(state, str(tmp_path / "ImageReward.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"tensors of other shapes: blip.text_encoder.embeddings.LayerNorm.bias: "
        r"checkpoint \(32,\), model \(768,\)",
    ):
        _make(tmp_path / "ImageReward.safetensors", med_config=None)  # none beside it: the released values
    # a file that is not a state dict
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"checkpoint='.*junk.pt' could not be read as a state dict"):
        _make(tmp_path / "junk.pt")
