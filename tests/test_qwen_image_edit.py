"""Qwen-Image-Edit (guardrl/policy/qwen_image_edit.py): what tests/test_backbone_contract.py leaves open.

The unchanged stock QwenImageEditPipeline (one PIL image, its 1024^2 px condition area) gives the backbone's
ODE images; the tiny tokenizer drops exactly the system prompt and keeps the image's vision tokens; the
conditioning rows (text seen with the image, image latents) and the forward (image tokens after the noise
tokens, velocity of the noise tokens only); the real loading path; one GRPO iteration through `guardrl fit`
on a .jsonl of prompts and PNG images, its bitwise resume and its LoRA in a stock pipeline; bad inputs; the
published transformer shape.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline
from PIL import Image

from conftest import tiny_fit_args
from guardrl.cli import main
from guardrl.export import export_lora
from guardrl.policy import (
    QwenImageBackbone,
    QwenImageEditBackbone,
    RandomQwenImageEditBackbone,
    TinyQwenImageEditBackbone,
)
from guardrl.policy.qwen_image_edit import make_tiny_qwen_image_edit_pipeline, to_pil
from guardrl.sampling import sample_rollouts

PROMPTS = ["a red circle", "a blue square on the left", "a red circle"]
STEPS = 3
TINY = "guardrl.policy.TinyQwenImageEditBackbone"


def _tiny(**kwargs) -> TinyQwenImageEditBackbone:
    backbone = TinyQwenImageEditBackbone(**kwargs)
    backbone.load()
    return backbone


def _ode_images(backbone, noise, cond, guidance_scale, steps=STEPS, transformer=None):
    with torch.no_grad():
        trajectory = sample_rollouts(
            lambda x, t, k: backbone.velocity(x, t, cond, guidance_scale, transformer),
            noise,
            backbone.sigmas(steps),
            torch.zeros(steps),
        )  # eta = 0: Euler (ODE)
        return backbone.decode(trajectory.final_latents)


def _png_like(height: int, width: int, seed: int) -> torch.Tensor:
    # as guardrl's data loader reads an 8-bit image: k / 255
    return torch.randint(0, 256, (3, height, width), generator=torch.Generator().manual_seed(seed)) / 255.0


# ------------------------------------------------------------------------------------- the stock pipeline
@pytest.mark.slow  # the stock 1024^2 px condition area: ~7 s of tiny VAE per encode on a CPU
def test_the_unchanged_stock_pipeline_at_its_own_condition_area_gives_the_backbones_images():
    # condition_image_size null: the pipeline's own rule. A 40 x 24 (H x W) image, aspect 0.6: width
    # sqrt(1024^2 * 0.6) = 793.1 -> 800, height 1321.8 -> 1312 (multiples of 32)
    backbone = _tiny(condition_image_size=None, height=128, width=96)
    image = _png_like(40, 24, seed=5)
    assert backbone.condition_size(40, 24) == (1312, 800)
    noise = backbone.initial_noise(1, torch.Generator().manual_seed(2), torch.device("cpu"))
    cond = backbone.encode_prompts(PROMPTS[:1], with_negative=True, images=[image])
    assert cond.tensors["image_latents"].shape == (1, (1312 // 16) * (800 // 16), 16)  # 82 x 50 tokens
    ours = _ode_images(backbone, noise, cond, 2.0, steps=2)
    pipe = make_tiny_qwen_image_edit_pipeline()  # the class itself, same weights as seed 0
    assert type(pipe) is QwenImageEditPipeline
    with torch.no_grad():
        stock = pipe(
            image=to_pil(image),  # one PIL image, as the pipeline documents; exact for an 8-bit image
            prompt=PROMPTS[0],
            negative_prompt="",
            true_cfg_scale=2.0,
            latents=noise,
            height=128,
            width=96,
            num_inference_steps=2,
            output_type="pt",
        ).images.float()
    assert ours.shape == stock.shape == (1, 3, 128, 96)
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)


def test_the_ode_sampler_reproduces_the_stock_call_per_image_and_the_image_conditions_it():
    backbone = _tiny(height=128, width=96)
    images = [_png_like(40, 32, 0), _png_like(40, 32, 1), _png_like(40, 32, 2)]  # prompts 0, 2 agree
    noise = backbone.initial_noise(3, torch.Generator().manual_seed(1), torch.device("cpu"))
    cond = backbone.encode_prompts(PROMPTS, with_negative=True, images=images)
    ours = _ode_images(backbone, noise, cond, 3.0)
    with torch.no_grad():
        stock = backbone.stock_pipeline()(
            image=torch.stack(images),
            prompt=PROMPTS,
            latents=noise,
            height=128,
            width=96,
            num_inference_steps=STEPS,
            output_type="pt",
            **backbone.stock_call_kwargs(3.0),
        ).images.float()
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)
    # other images, other samples (same prompts and noise): the image conditions the sample
    others = [_png_like(40, 32, 10 + i) for i in range(3)]
    swapped = _ode_images(backbone, noise, backbone.encode_prompts(PROMPTS, True, images=others), 3.0)
    assert (swapped - ours).abs().amax(dim=(1, 2, 3)).min() > 1e-3


# ------------------------------------------------------------------------------------- the conditioning
def test_the_tiny_tokenizer_drops_exactly_the_system_prompt_and_keeps_the_image_tokens():
    backbone = _tiny()
    pipe = backbone.pipeline
    template = pipe.prompt_template_encode
    system = template[: template.index("<|vision_start|>")]
    assert len(pipe.tokenizer(system).input_ids) == pipe.prompt_template_encode_start_idx == 64
    # a 40 x 32 image: condition area 32^2 -> 32 x 32 px; the processor's smart resize: 56 x 56 px = 4 x 4
    # patches of 14 px, merged 2 x 2: 4 image tokens. Kept rows: <|vision_start|>, 4 x <|image_pad|>,
    # <|vision_end|>, "a", "Ġred", "Ġcircle", then <|im_end|> \n <|im_start|> assistant \n = 6 + 3 + 5 = 14
    image = _png_like(40, 32, 0)
    assert backbone.condition_size(40, 32) == (32, 32)
    cond = backbone.encode_prompts(["a red circle"], with_negative=True, images=[image])
    assert cond.tensors["prompt_embeds"].shape == (1, 14, 16)
    assert cond.tensors["prompt_embeds_mask"].tolist() == [[1] * 14]
    assert cond.negative["prompt_embeds"].shape == (1, 6 + 0 + 5, 16)  # "" with the same image
    # the text embeddings see the image: the same prompt with another image, other embeddings
    other = backbone.encode_prompts(["a red circle"], with_negative=False, images=[_png_like(40, 32, 1)])
    assert not torch.equal(other.tensors["prompt_embeds"], cond.tensors["prompt_embeds"])
    # 32 x 32 px -> 4 x 4 latents -> 2 x 2 tokens of 4 channels x 2 x 2
    assert cond.tensors["image_latents"].shape == (1, 4, 16)
    assert cond.tensors["image_grid"].tolist() == [[1, 2, 2]]


def test_image_latents_are_the_vae_mode_normalised_and_packed():
    backbone = _tiny()
    image = _png_like(48, 48, 3)
    rows = backbone.encode_prompts(["a cat"], with_negative=False, images=[image]).tensors
    vae = backbone.vae
    resized = to_pil(image).resize((32, 32), Image.LANCZOS)  # the pipeline's PIL resize
    pixels = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        z = vae.encode((pixels * 2 - 1)[None, :, None]).latent_dist.mode()[:, :, 0]  # (1, 4, 4, 4)
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1)
    z = (z - mean) / std
    packed = z.reshape(1, 4, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 4, 16)
    torch.testing.assert_close(rows["image_latents"], packed, rtol=0, atol=1e-6)


def test_the_forward_appends_the_image_tokens_and_returns_the_noise_tokens_velocity():
    backbone = _tiny()
    images = [_png_like(40, 32, 0), _png_like(40, 32, 1), _png_like(40, 32, 0)]
    both = backbone.encode_prompts(PROMPTS, with_negative=True, images=images)
    seen = []
    hook = backbone.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True
    )
    noise = backbone.initial_noise(3, torch.Generator().manual_seed(0), torch.device("cpu"))
    with torch.no_grad():
        velocity = backbone.velocity(noise, 0.5, both, 2.0)
        row = backbone.velocity(noise[1:2], 0.5, both.select(torch.tensor([1])), 2.0)
    hook.remove()
    assert velocity.shape == noise.shape == (3, 64, 16)  # 128 px: 8 x 8 noise tokens
    # one batched forward for CFG: uncond then cond, noise tokens then the image's 2 x 2 tokens
    assert seen[0]["hidden_states"].shape == (6, 64 + 4, 16)
    assert seen[0]["img_shapes"] == [[(1, 8, 8), (1, 2, 2)]] * 6
    torch.testing.assert_close(row, velocity[1:2], rtol=0, atol=1e-5)


def test_a_group_encodes_its_image_and_text_once_with_the_same_result():
    backbone = _tiny()
    image = _png_like(40, 32, 0)
    vae_calls, text_calls = [], []
    hooks = [
        backbone.vae.encoder.register_forward_hook(lambda *a: vae_calls.append(1)),
        backbone.text_encoder.register_forward_hook(lambda *a: text_calls.append(1)),
    ]
    cond = backbone.encode_prompts(["a cat"] * 4, with_negative=True, images=[image] * 4)
    again = backbone.encode_prompts(["a cat"], with_negative=True, images=[image.clone()])
    for hook in hooks:
        hook.remove()
    assert len(vae_calls) == 1 and len(text_calls) == 2  # the prompt and "", each with the image
    for name, tensor in again.tensors.items():
        assert torch.equal(tensor[0], cond.tensors[name][3]), name
    fresh = _tiny().encode_prompts(["a cat"], with_negative=True, images=[image])
    for name, tensor in fresh.tensors.items():
        assert torch.equal(tensor, again.tensors[name]), name


# ------------------------------------------------------------------------------------- bad inputs
def test_bad_images_and_sizes_are_refused():
    backbone = _tiny()
    with pytest.raises(ValueError, match="TinyQwenImageEditBackbone needs a conditioning image per prompt"):
        backbone.encode_prompts(PROMPTS, with_negative=False)
    with pytest.raises(ValueError, match="3 prompts but 2 conditioning images"):
        backbone.encode_prompts(PROMPTS, with_negative=False, images=[_png_like(8, 8, 0)] * 2)
    with pytest.raises(
        ValueError, match=r"must be a \(3, H, W\) tensor in \[0, 1\] \(RGB\), got \(1, 8, 8\)"
    ):
        backbone.encode_prompts(["a cat"], with_negative=False, images=[torch.zeros(1, 8, 8)])
    # a 10:1 image at a 32^2 px area: width sqrt(1024 * 10) = 101 -> 96, height 10 -> 0
    with pytest.raises(
        ValueError,
        match=r"a 20 x 200 px conditioning image comes out 0 x 96 px at "
        r"model\.backbone\.init_args\.condition_image_size=32: use a larger condition_image_size",
    ):
        backbone.encode_prompts(["a cat"], with_negative=False, images=[torch.zeros(3, 20, 200)])
    # a square image comes out 32 x 32 px (2 x 2 tokens), a 1:3 one 32 x 64 px (width sqrt(1024 * 3) = 55.4
    # -> 64, height 18.5 -> 32; 2 x 4 tokens)
    with pytest.raises(
        ValueError,
        match=r"conditioning images of one batch have different sizes after resizing "
        r"\(\[\(4, 16\), \(8, 16\)\] tokens x channels\)",
    ):
        backbone.encode_prompts(
            ["a cat", "a dog"], with_negative=False, images=[_png_like(32, 32, 0), _png_like(32, 96, 0)]
        )


@pytest.mark.parametrize("value", [0, 16, "32", 32.0, True])
def test_condition_image_size_is_validated(value):
    with pytest.raises(
        ValueError,
        match=r"model\.backbone\.init_args\.condition_image_size must be null \(about 1024 x 1024 px, as "
        r"QwenImageEditPipeline\) or an integer >= 32 .*got " + repr(value).replace(".", r"\."),
    ):
        TinyQwenImageEditBackbone(condition_image_size=value)


def test_random_weight_backbone_options_are_validated():
    with pytest.raises(
        ValueError, match=r"model\.backbone\.init_args\.small must be true or false, got 'no'"
    ):
        RandomQwenImageEditBackbone(small="no")
    with pytest.raises(ValueError, match=r"model\.backbone\.init_args\.num_layers must be an integer >= 1"):
        TinyQwenImageEditBackbone(num_layers=0)


# ------------------------------------------------------------------------------------- loading from disk
def test_qwen_image_edit_backbone_loads_a_saved_diffusers_directory(tmp_path):
    make_tiny_qwen_image_edit_pipeline(seed=3).save_pretrained(tmp_path / "pipe")
    loaded = QwenImageEditBackbone(str(tmp_path / "pipe"), resolution=128, condition_image_size=32)
    loaded.load()
    assert type(loaded.pipeline) is QwenImageEditPipeline
    built = _tiny(seed=3)
    images = [_png_like(40, 32, 0), _png_like(40, 32, 1)]
    noise = built.initial_noise(2, torch.Generator().manual_seed(0), torch.device("cpu"))
    with torch.no_grad():
        expected = built.velocity(noise, 0.4, built.encode_prompts(PROMPTS[:2], True, images=images), 3.0)
        got = loaded.velocity(noise, 0.4, loaded.encode_prompts(PROMPTS[:2], True, images=images), 3.0)
    # as tests/test_policy.py: a module read from disk may pick another kernel, so float32 precision
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # the directory names its pipeline: the text-to-image backbone points at this one
    with pytest.raises(
        ValueError,
        match=r"holds a QwenImageEditPipeline, but QwenImageBackbone loads a QwenImagePipeline: use "
        r"model\.backbone\.class_path: guardrl\.policy\.QwenImageEditBackbone",
    ):
        QwenImageBackbone(str(tmp_path / "pipe"), resolution=128).load()


# ------------------------------------------------------------------------------------- the published shape
def test_the_random_weight_backbone_is_the_qwen_image_transformer_at_its_published_shape():
    backbone = RandomQwenImageEditBackbone(torch_dtype="bfloat16")
    with torch.device("meta"):
        pipe = backbone._load_pipeline()
    transformer = pipe.transformer
    assert (transformer.config.num_layers, transformer.config.joint_attention_dim) == (60, 3584)
    assert (transformer.config.in_channels, transformer.config.out_channels) == (64, 16)
    # as counted for Qwen-Image (tests/test_qwen_image.py): 20,430,401,088; Qwen-Image-Edit is "built upon
    # our 20B Qwen-Image model" (Qwen/Qwen-Image-Edit model card)
    assert sum(p.numel() for p in transformer.parameters()) == 20_430_401_088


# ------------------------------------------------------------------------------------- guardrl fit
TOTAL_ITERATIONS = 2
EDITS = {"make it red": (255, 0, 0), "a blue square": (0, 0, 255), "a cat": (0, 160, 64)}


def _edit_file(directory) -> str:
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    lines = []
    for i, (prompt, colour) in enumerate(EDITS.items()):
        Image.new("RGB", (32, 40), colour).save(os.path.join(directory, "images", f"{i}.png"))
        lines.append(json.dumps({"prompt": prompt, "image": f"images/{i}.png"}))
    path = os.path.join(directory, "edits.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _fit(edit_file: str, log_root: str, *extra: str, **overrides: str):
    settings = {
        "--model.backbone": TINY,
        "--model.sampling.guidance_scale": "2.0",
        "--data.image_field": "image",
        "--data.shuffle_buffer_size": "2",
        "--model.grpo.minibatch_size": "2",
        "--model.performance.rollout_chunks": "2",
        "--model.max_iterations": str(TOTAL_ITERATIONS),
        "--model.lora": '{"rank": 2, "alpha": 8}',
        "--model.optimizer": '{"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.05}}',
        "--checkpoint.every_n_iterations": "1",
        "--checkpoint.save_top_k": "-1",
        "--seed_everything": "7",
        **overrides,
    }
    return main(["fit", *tiny_fit_args(edit_file, log_root, **settings), *extra])


def _last(log_root: str) -> dict:
    (path,) = glob.glob(os.path.join(log_root, "guardrl", "version_*", "checkpoints", "last.ckpt"))
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_edit_fit")
    edit_file = _edit_file(str(root / "data"))
    cli = _fit(edit_file, str(root / "straight"))
    return edit_file, cli, str(root / "straight")


@pytest.mark.slow  # a guardrl fit: the inner loop leaves it to CI
def test_grpo_iterations_through_guardrl_fit_train_the_lora(straight):
    _, cli, log_root = straight
    module = cli.model
    assert isinstance(module.backbone, TinyQwenImageEditBackbone)
    assert module.num_iterations == TOTAL_ITERATIONS and module.stream_position == 2 * TOTAL_ITERATIONS
    assert module.num_latent_elements == 1024  # 4 x 16 x 16 latents, packed: 64 tokens x 16
    adapters = {k: v for k, v in _last(log_root)["state_dict"].items() if "lora_B" in k}
    assert adapters and any(v.abs().max() > 0 for v in adapters.values())  # B starts at 0 and has moved


@pytest.mark.slow  # a guardrl fit: the inner loop leaves it to CI
def test_a_resumed_qwen_image_edit_run_equals_the_straight_run_bitwise(straight, tmp_path):
    edit_file, _, straight_root = straight
    log_root = str(tmp_path / "resumed")
    _fit(edit_file, log_root, **{"--model.max_iterations": "1"})
    assert _last(log_root)["guardrl"]["num_iterations"] == 1
    _fit(edit_file, log_root, "--ckpt_path", "last")
    a, b = _last(straight_root), _last(log_root)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_b["state"][index][name]), (index, name)
    counters_a = {k: v for k, v in a["guardrl"].items() if k != "rng"}
    counters_b = {k: v for k, v in b["guardrl"].items() if k != "rng"}
    assert counters_a == counters_b and counters_a["num_iterations"] == TOTAL_ITERATIONS


@pytest.mark.slow  # a guardrl fit: the inner loop leaves it to CI
def test_exported_lora_in_a_stock_pipeline_reproduces_the_policy(straight, tmp_path):
    _, cli, _ = straight
    policy = cli.model.policy
    backbone = policy.backbone
    export_lora(policy, str(tmp_path / "lora"))
    images = [_png_like(40, 32, 0), _png_like(40, 32, 1), _png_like(40, 32, 0)]
    noise = backbone.initial_noise(3, torch.Generator().manual_seed(3), torch.device("cpu"))
    cond = backbone.encode_prompts(PROMPTS, with_negative=True, images=images)
    with policy.use_weights("policy") as transformer:
        ours = _ode_images(backbone, noise, cond, 2.0, steps=4, transformer=transformer)

    def stock(with_lora):
        pipe = backbone.stock_pipeline()  # the same base weights TinyQwenImageEditBackbone(seed=0) builds
        if with_lora:
            pipe.load_lora_weights(str(tmp_path / "lora"))  # QwenImageEditPipeline.load_lora_weights
        with torch.no_grad():
            return pipe(
                image=torch.stack(images),
                prompt=PROMPTS,
                latents=noise,
                height=backbone.height,
                width=backbone.width,
                num_inference_steps=4,
                output_type="pt",
                **backbone.stock_call_kwargs(2.0),
            ).images.float()

    torch.testing.assert_close(stock(True), ours, rtol=0, atol=1e-5)
    assert (stock(False) - ours).abs().max() > 1e-3  # the LoRA matters
