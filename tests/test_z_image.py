"""Z-Image (guardrl/policy/z_image.py) beyond the backbone contract (tests/test_backbone_contract.py, which
already checks that guardrl's ODE sampler reproduces the stock ZImagePipeline, non-square, with and without
guidance): the schedule and the model's conventions by hand, the real loading path, a GRPO run and its exact
resume, LoRA export into the stock pipeline, the published 6B shapes, the recipe, and bad inputs."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import tiny_fit_args
from guardrl.cli import main
from guardrl.export import export_lora
from guardrl.policy import FlowPolicy, LoraSpec, SD3Backbone, ZImageBackbone
from guardrl.policy.z_image import (
    Z_IMAGE_TURBO_TRANSFORMER,
    RandomZImageTurboBackbone,
    TinyZImageBackbone,
    build_z_image_transformer,
    make_tiny_z_image_pipeline,
)
from guardrl.sampling import sample_rollouts

PROMPTS = ["a red circle", "a blue square on the left"]


def _tiny(**kwargs) -> TinyZImageBackbone:
    backbone = TinyZImageBackbone(**kwargs)
    backbone.load()
    return backbone


# ----- the pipeline's conventions, by hand


def test_sigmas_are_the_pipelines_linspace_with_the_static_shift_3():
    backbone = _tiny()
    # ZImagePipeline: linspace(1, 1/S, S), then Z-Image-Turbo's static shift 3: s -> 3 s / (1 + 2 s).
    # S = 4: [1, 3/4, 1/2, 1/4] -> [1, (9/4)/(5/2), (3/2)/2, (3/4)/(3/2)] = [1, 0.9, 0.75, 0.5], then 0.
    expected = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(backbone.sigmas(4), expected, rtol=0, atol=1e-7)
    # S = 3: [1, 2/3, 1/3] -> [1, 2 / (7/3), 1 / (5/3)] = [1, 6/7, 3/5]
    expected = torch.tensor([1.0, 6 / 7, 3 / 5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(backbone.sigmas(3), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static_shift", "dynamic_shift"])
def test_sigmas_are_the_ones_the_stock_pipeline_steps_on(dynamic):
    from diffusers import FlowMatchEulerDiscreteScheduler

    backbone = _tiny(height=128, width=96)
    pipe = backbone.stock_pipeline()
    if dynamic:  # a config with the dynamic shift: mu from the 8 x 6 image tokens
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
        pipe.scheduler = backbone.pipeline.scheduler = scheduler
    with torch.no_grad():
        kwargs = backbone.stock_call_kwargs(1.0)
        pipe(prompt=["a cat"], height=128, width=96, num_inference_steps=5, output_type="latent", **kwargs)
    assert torch.equal(backbone.sigmas(5), pipe.scheduler.sigmas.double())


def test_velocity_is_minus_the_output_at_timestep_one_minus_sigma_on_each_prompts_own_tokens():
    backbone = _tiny(height=128, width=96)
    cond = backbone.encode_prompts(PROMPTS, with_negative=False)
    latents = backbone.initial_noise(2, torch.Generator().manual_seed(0), torch.device("cpu"))
    tokenizer = backbone.pipeline.tokenizer
    captions = []
    for i, prompt in enumerate(PROMPTS):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )
        length = len(tokenizer(text).input_ids)  # the prompt's own tokens, chat template included
        mask = cond.tensors["prompt_embeds_mask"][i]
        assert int(mask.sum()) == length and bool(mask[:length].all())
        assert not cond.tensors["prompt_embeds"][i, length:].any()  # padding is zeros, never read
        captions.append(cond.tensors["prompt_embeds"][i, :length])
    with torch.no_grad():
        ours = backbone.velocity(latents, 0.75, cond)
        # sigma 0.75 -> the transformer's timestep 1 - 0.75 = 0.25; it predicts x0 - noise, guardrl noise - x0
        out = backbone.transformer(
            [x.unsqueeze(1) for x in latents], torch.full((2,), 0.25), captions, return_dict=False
        )[0]
    assert ours.shape == (2, 16, 16, 12)
    torch.testing.assert_close(ours, -torch.stack(out).squeeze(2), rtol=0, atol=1e-6)


def test_truncated_prompts_are_counted_once_and_kept_out_of_the_log(caplog):
    backbone = _tiny()
    long_prompt = " ".join(["a red circle"] * 12)  # > 32 tokens
    seen: list[logging.LogRecord] = []
    pipeline_logger = logging.getLogger(type(backbone.pipeline).__module__)
    handler = logging.Handler()
    handler.emit = seen.append
    pipeline_logger.addHandler(handler)
    try:
        with caplog.at_level(logging.WARNING):
            cond = backbone.encode_prompts([long_prompt, "a cat", long_prompt + " two"], with_negative=False)
    finally:
        pipeline_logger.removeHandler(handler)
    assert backbone.truncated_prompts == 2  # the two long prompts, counted by the base class
    assert int(cond.tensors["prompt_embeds_mask"][0].sum()) == backbone.max_sequence_length == 32
    assert int(cond.tensors["prompt_embeds_mask"][1].sum()) < 32
    assert seen == []  # the per-prompt records were kept out of the log
    assert sum("truncated_prompts" in r.getMessage() for r in caplog.records) == 1  # said once


# ----- loading a saved pipeline


def test_z_image_backbone_loads_a_saved_diffusers_directory(tmp_path):
    make_tiny_z_image_pipeline(seed=3).save_pretrained(tmp_path / "pipe")
    loaded = ZImageBackbone(str(tmp_path / "pipe"), resolution=128, max_sequence_length=32)
    loaded.load()
    built = _tiny(seed=3)
    latents = built.initial_noise(2, torch.Generator().manual_seed(0), torch.device("cpu"))
    with torch.no_grad():
        expected = built.velocity(latents, 0.4, built.encode_prompts(PROMPTS, True), 2.5)
        got = loaded.velocity(latents, 0.4, loaded.encode_prompts(PROMPTS, True), 2.5)
    # the saved tokenizer (chat template included) and Qwen3 give the same captions: same token counts
    assert loaded.pipeline.tokenizer.chat_template == built.pipeline.tokenizer.chat_template
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_another_backbone_on_a_z_image_directory_points_at_z_image_backbone(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "ZImagePipeline"}')
    with pytest.raises(
        ValueError, match=r"holds a ZImagePipeline.*class_path: guardrl\.policy\.ZImageBackbone"
    ):
        SD3Backbone(str(tmp_path), resolution=128).load()


# ----- a GRPO run through `guardrl fit`, and its exact resume


def _fit(prompt_file, root, iterations, ckpt_path=None):
    args = tiny_fit_args(
        prompt_file,
        str(root),
        **{
            "--model.backbone": "guardrl.policy.z_image.TinyZImageBackbone",
            "--model.backbone.init_args.resolution": "64",
            "--model.sampling.guidance_scale": "2.0",  # true CFG: the negative captions go through the loop
            "--model.sampling.num_inference_steps": "3",
            "--model.lora": '{"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", '
            '"w1", "w2", "w3"]}',
            "--model.max_iterations": str(iterations),
            "--model.grpo.minibatch_size": "2",
            "--checkpoint.dirpath": str(root / "ckpt"),
            "--checkpoint.every_n_iterations": "1",
            "--trainer.logger": "false",
            "--seed_everything": "5",
        },
    )
    cli = main(args, run=False)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
    return cli


@pytest.mark.slow  # a guardrl fit: the inner loop leaves it to CI
def test_grpo_on_tiny_z_image_trains_and_a_stopped_run_resumes_bitwise(prompt_file, tmp_path):
    straight = _fit(prompt_file, tmp_path / "straight", 2)
    assert straight.model.num_iterations == 2
    lora = {n: p for n, p in straight.model.policy.transformer.named_parameters() if ".default." in n}
    # the adapter is in every block list (refiners and main layers) and the update moved it
    for blocks in ("noise_refiner", "context_refiner", "layers"):
        assert any(n.startswith(blocks + ".") and "feed_forward.w2" in n for n in lora), blocks
    assert any(p.abs().max() > 0 for n, p in lora.items() if "lora_B" in n)

    _fit(prompt_file, tmp_path / "resumed", 1)
    resumed = _fit(prompt_file, tmp_path / "resumed", 2, str(tmp_path / "resumed" / "ckpt" / "last.ckpt"))
    assert resumed.model.num_iterations == 2
    a = torch.load(tmp_path / "straight" / "ckpt" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt" / "last.ckpt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys() and len(a["state_dict"]) > 0
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_b["state"][index][name]), (index, name)
    assert {k: v for k, v in a["guardrl"].items() if k != "rng"} == {
        k: v for k, v in b["guardrl"].items() if k != "rng"
    }


# ----- LoRA export into the stock pipeline


@pytest.mark.slow  # a guardrl fit: the inner loop leaves it to CI
def test_exported_lora_in_the_stock_z_image_pipeline_reproduces_the_policys_images(tmp_path):
    targets = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]  # the recipe's (Flow-Factory's default)
    policy = FlowPolicy(TinyZImageBackbone(seed=0), LoraSpec(rank=2, alpha=8, target_modules=targets))
    policy.build()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a LoRA as if trained: both factors non-zero
        for p in policy.trainable_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    export_lora(policy, str(tmp_path / "lora"))

    backbone = policy.backbone
    noise = backbone.initial_noise(2, torch.Generator().manual_seed(2), torch.device("cpu"))
    cond = backbone.encode_prompts(PROMPTS, with_negative=False)
    sigmas = backbone.sigmas(3)
    with torch.no_grad(), policy.use_weights("policy") as transformer:

        def velocity_fn(latents, t, k):
            return backbone.velocity(latents, t, cond, 1.0, transformer)

        ours = backbone.decode(sample_rollouts(velocity_fn, noise, sigmas, torch.zeros(3)).final_latents)

    stock = make_tiny_z_image_pipeline(seed=0)

    def stock_images():
        with torch.no_grad():
            return stock(
                prompt=list(PROMPTS),  # ZImagePipeline rewrites the list it is given in place
                latents=noise,
                height=128,
                width=128,
                num_inference_steps=3,
                output_type="pt",
                **backbone.stock_call_kwargs(1.0),
            ).images.float()

    base = stock_images()
    stock.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(stock_images(), ours, rtol=0, atol=1e-5)
    assert (base - ours).abs().max() > 1e-3  # the LoRA changes the images; alpha/rank = 4 was kept


# ----- the published shapes, with random weights


# Tongyi-MAI/Z-Image-Turbo transformer/config.json, as Tongyi-MAI/Z-Image (commit c7ec135) src/config/model.py
# gives it: DEFAULT_TRANSFORMER_* and ROPE_AXES_* (axes_lens [1536, 512, 512]).
PUBLISHED_TRANSFORMER = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
}
# The Z-Image technical report (arXiv 2511.22699, "6.15B parameters"; Tongyi-MAI/Z-Image README: "6B").
PUBLISHED_BILLIONS_TO_2_DECIMALS = 6.15


def test_full_shape_transformer_has_the_published_config_and_6_15_billion_parameters():
    with torch.device("meta"):
        transformer = build_z_image_transformer(small=False, dtype=torch.bfloat16)
    for key, value in PUBLISHED_TRANSFORMER.items():
        got = transformer.config[key]
        assert (list(got) if isinstance(value, list) else got) == value, key
    assert Z_IMAGE_TURBO_TRANSFORMER.keys() == PUBLISHED_TRANSFORMER.keys()
    count = sum(p.numel() for p in transformer.parameters())
    # 6,154,908,736: the 30 main blocks 5,427,310,080, the noise refiner 361,820,672, the context refiner
    # 353,925,632 (no adaLN), embedders, final layer and pad tokens the rest
    assert count == 6_154_908_736 and round(count / 1e9, 2) == PUBLISHED_BILLIONS_TO_2_DECIMALS
    assert {p.dtype for p in transformer.parameters()} == {torch.bfloat16}


def test_full_shape_backbone_has_the_published_latents_and_schedule():
    backbone = RandomZImageTurboBackbone(torch_dtype="bfloat16", resolution=1024)
    with torch.device("meta"):
        backbone.load()
    # FLUX.1 VAE: 16 channels, x8; 1024 px -> 16 x 128 x 128
    assert backbone.latent_numel() == 16 * 128 * 128
    assert (backbone.vae.config.scaling_factor, backbone.vae.config.shift_factor) == (0.3611, 0.1159)
    # Z-Image-Turbo's 9 steps (8 forwards, the README's example): linspace(1, 1/9, 9) = 1, 8/9, ..., 1/9,
    # then the static shift 3: step 6 is 3/9 = 1/3 -> 3 (1/3) / (1 + 2/3) = 0.6
    sigmas = backbone.sigmas(9)
    assert sigmas[6].item() == pytest.approx(0.6, abs=1e-7)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0 and len(sigmas) == 10


def test_small_random_z_image_captions_are_a_fixed_function_of_prompt_and_seed():
    def embed(prompts, seed=0):
        backbone = RandomZImageTurboBackbone(small=True, resolution=64, max_sequence_length=16, seed=seed)
        backbone.load()
        return backbone.encode_prompts(prompts, with_negative=False).tensors

    first = embed(["a cat", "a dog", "a cat"])
    assert first["prompt_embeds"].shape == (3, 16, 64) and bool(first["prompt_embeds_mask"].all())
    assert torch.equal(first["prompt_embeds"][0], first["prompt_embeds"][2])
    assert torch.equal(embed(["a dog"])["prompt_embeds"][0], first["prompt_embeds"][1])
    assert not torch.equal(embed(["a dog"], seed=1)["prompt_embeds"][0], first["prompt_embeds"][1])


# ----- the recipe: tests/published_recipes.py (Z_IMAGE_RECIPE), checked by tests/test_cli.py

# ----- bad inputs (also in tests/test_bad_inputs.py's catalogue)


def test_a_caption_length_beyond_the_rope_table_names_max_sequence_length():
    # captions padded to 32 take RoPE positions 1..L and the image L + 1, all below axes_lens[0] = 1536:
    # L <= 1534, so at most 1504 tokens (1505 pads to 1536)
    backbone = RandomZImageTurboBackbone(small=True, resolution=64, max_sequence_length=1505)
    with pytest.raises(ValueError) as error:
        with torch.device("meta"):
            backbone.load()
    message = str(error.value)
    assert "model.backbone.init_args.max_sequence_length=1505" in message
    assert "axes_lens[0] is 1536" in message and "at most 1504" in message


def test_an_image_beyond_the_rope_table_names_the_size_option():
    with pytest.raises(ValueError, match=r"init_args\.resolution=1024 is too large.*at most 512 pixels"):
        _tiny(resolution=1024)
    with pytest.raises(ValueError, match=r"init_args\.width=640 is too large.*at most 512 pixels"):
        _tiny(height=128, width=640)


def test_bad_small_flag_and_step_count_are_named():
    with pytest.raises(
        ValueError, match=r"model\.backbone\.init_args\.small must be true or false, got 'yes'"
    ):
        RandomZImageTurboBackbone(small="yes")
    with pytest.raises(ValueError, match=r"sampling\.num_inference_steps\) must be >= 1, got 0"):
        _tiny().sigmas(0)
