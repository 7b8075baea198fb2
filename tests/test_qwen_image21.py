"""Qwen-Image 2.1 (guardrl/policy/qwen_image21.py): what tests/test_backbone_contract.py leaves open for it.

The tiny processor drops exactly the system message; the schedule is the pipeline's own (linspace or its
`sample_sigmas`, shifted by the token count); padding moves a short prompt's image in the stock pipeline but
never a guardrl row's velocity; guidance is plain true CFG; the decode applies the VAE's latent statistics and
composites its RGBA over white; a `save_pretrained` directory loads through the real path; a `guardrl fit` on
the tiny model resumes bitwise; the exported LoRA reproduces the policy in a stock pipeline; bad inputs are
refused with the option's name.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import QwenImage21Pipeline
from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift, retrieve_timesteps

from guardrl.cli import main
from guardrl.export import export_lora
from guardrl.policy import Conditioning, QwenImage21Backbone, SD3Backbone
from guardrl.policy.qwen_image21 import (
    TinyQwenImage21Backbone,
    make_tiny_qwen_image21_pipeline,
    rgba_over_white,
)
from guardrl.sampling import sample_rollouts
from tests.test_qwen_image import _fit_args as qwen_image_fit_args
from tests.test_qwen_image import _last_checkpoint, check_resume_is_bitwise

PROMPTS = ["a red circle", "a blue square on the left"]
TINY = "guardrl.policy.qwen_image21.TinyQwenImage21Backbone"


@pytest.fixture(scope="module")
def backbone():
    built = TinyQwenImage21Backbone(seed=0)
    built.load()
    return built


def _ode_images(backbone, prompts, noise, steps, guidance_scale=1.0, transformer=None):
    cond = backbone.encode_prompts(prompts, with_negative=guidance_scale > 1.0)
    with torch.no_grad():
        trajectory = sample_rollouts(
            lambda x, t, k: backbone.velocity(x, t, cond, guidance_scale, transformer),
            noise,
            backbone.sigmas(steps),
            torch.zeros(steps),
        )
        return backbone.decode(trajectory.final_latents)


def test_the_tiny_processor_drops_exactly_the_system_message(backbone):
    pipe = backbone.pipeline
    system = f"<|im_start|>system\n{pipe.sys_prompt}<|im_end|>\n"
    assert pipe.prompt_template_t2i.startswith(system)
    # the byte-level tiny tokenizer: <|im_start|>, "system", "\n", 43 bytes of the sentence, <|im_end|>, "\n"
    # (its merges cover the template words of Qwen-Image, not this sentence's)
    assert pipe._drop_idx == len(pipe.processor.tokenizer(system).input_ids) == 38
    assert pipe.processor.tokenizer.convert_ids_to_tokens(pipe._img_token_id) == "<|image_pad|>"
    # kept of "a red circle": <|im_start|> user \n, a Ġred Ġcircle, <|im_end|> \n <|im_start|> assistant \n
    cond = backbone.encode_prompts(["a red circle"], with_negative=False).tensors
    assert cond["prompt_embeds"].shape == (1, 11, 16)
    assert cond["prompt_embeds_mask"].tolist() == [[1] * 11]


def _stock_sigmas(backbone, base):
    scheduler = type(backbone.scheduler).from_config(backbone.scheduler.config)
    config = scheduler.config
    mu = calculate_shift(
        backbone.image_seq_len(),
        config.base_image_seq_len,
        config.max_image_seq_len,
        config.base_shift,
        config.max_shift,
    )
    retrieve_timesteps(scheduler, len(base), "cpu", sigmas=base, mu=mu)
    return scheduler.sigmas.to(torch.float64)


def test_sigmas_are_the_pipelines_own():
    # QwenImage21Pipeline.__call__, step 4: linspace(1, 1/S, S) (no sample_sigmas) shifted by mu(h * w tokens)
    for height, width in ((128, 128), (128, 96), (256, 64)):
        sized = TinyQwenImage21Backbone(height=height, width=width)
        sized.load()
        tokens = (height // 16) * (width // 16)  # unpatched: one token per latent pixel of the x16 VAE
        noise = sized.initial_noise(1, torch.Generator().manual_seed(0), torch.device("cpu"))
        assert sized.image_seq_len() == tokens and noise.shape == (1, tokens, 8)
        steps = 5
        expected = _stock_sigmas(sized, np.linspace(1.0, 1 / steps, steps))
        assert torch.equal(sized.sigmas(steps), expected)
    # the token count matters for this scheduler (base_shift != max_shift), and the terminal shift holds
    small, large = TinyQwenImage21Backbone(resolution=64), TinyQwenImage21Backbone(resolution=256)
    small.load(), large.load()
    assert bool((small.sigmas(4)[1:-2] < large.sigmas(4)[1:-2]).all())
    assert float(small.sigmas(4)[-2]) == float(large.sigmas(4)[-2]) == pytest.approx(0.02, abs=1e-7)


SAMPLE_SIGMAS = [1.0, 0.9, 0.6, 0.3]


def test_the_pipelines_sample_sigmas_are_used_and_fix_the_step_count():
    configured = TinyQwenImage21Backbone(height=128, width=96, sample_sigmas=SAMPLE_SIGMAS)
    configured.load()
    assert configured.pipeline.config.sample_sigmas == SAMPLE_SIGMAS
    expected = _stock_sigmas(configured, SAMPLE_SIGMAS)
    assert torch.equal(configured.sigmas(4), expected)
    assert not torch.equal(expected, _stock_sigmas(configured, np.linspace(1.0, 0.25, 4)))
    with pytest.raises(
        ValueError,
        match=r"sample_sigmas .* fix the number of steps at 4, but sampling\.num_inference_steps=3.*"
        r"model\.backbone\.init_args\.use_sample_sigmas=false",
    ):
        configured.sigmas(3)
    # use_sample_sigmas=false: the pipeline's schedule without them, any step count
    plain = TinyQwenImage21Backbone(
        height=128, width=96, sample_sigmas=SAMPLE_SIGMAS, use_sample_sigmas=False
    )
    plain.load()
    assert torch.equal(plain.sigmas(3), _stock_sigmas(plain, np.linspace(1.0, 1 / 3, 3)))
    # and the stock pipeline, which then ignores num_inference_steps, samples the same images
    noise = configured.initial_noise(1, torch.Generator().manual_seed(5), torch.device("cpu"))
    ours = _ode_images(configured, PROMPTS[:1], noise, 4)
    with torch.no_grad():
        stock = configured.stock_pipeline()(
            prompt=PROMPTS[:1], latents=noise, height=128, width=96, num_inference_steps=40, output_type="pt"
        ).images
    torch.testing.assert_close(ours, stock.float(), rtol=0, atol=1e-5)


def test_padding_moves_the_stock_pipelines_image_but_no_guardrl_velocity(backbone):
    # The target image's rotary frame position is the text's padded length: the stock call batched with a
    # longer prompt gives "a red circle" another image than alone; guardrl runs each text length unpadded.
    noise = backbone.initial_noise(2, torch.Generator().manual_seed(0), torch.device("cpu"))
    stock = QwenImage21Pipeline(**make_tiny_qwen_image21_pipeline().components)
    kwargs = dict(height=128, width=128, num_inference_steps=3, output_type="pt")
    with torch.no_grad():
        batched = stock(prompt=PROMPTS, latents=noise, **kwargs).images
        alone = stock(prompt=PROMPTS[:1], latents=noise[:1], **kwargs).images
    assert (batched[0] - alone[0]).abs().max() > 5e-4  # measured 2.1e-3 (RGBA in [0, 1]), 3 steps
    cond_alone = backbone.encode_prompts(PROMPTS[:1], with_negative=False)
    batch = backbone.encode_prompts(PROMPTS, with_negative=False)
    # "a red circle" has 11 text rows, "a blue square on the left" 14: the first row is padded by 3
    padded = batch.select(torch.tensor([0]))
    assert padded.tensors["prompt_embeds_mask"].tolist() == [[1] * 11 + [0] * 3]
    with torch.no_grad():
        v_alone = backbone.velocity(noise[:1], 0.7, cond_alone)
        v_in_batch = backbone.velocity(noise, 0.7, batch)
        v_padded = backbone.velocity(noise[:1], 0.7, padded)
    assert torch.equal(v_padded, v_alone)
    torch.testing.assert_close(v_in_batch[:1], v_alone, rtol=0, atol=1e-6)  # a batch of 2 vs 1: rounding


def test_guidance_is_plain_true_cfg(backbone):
    noise = backbone.initial_noise(2, torch.Generator().manual_seed(2), torch.device("cpu"))
    cond = backbone.encode_prompts(PROMPTS, with_negative=True)
    scale = 4.0
    with torch.no_grad():
        guided = backbone.velocity(noise, 0.6, cond, scale)
        v_cond = backbone.velocity(noise, 0.6, cond, 1.0)
        v_uncond = backbone.velocity(noise, 0.6, Conditioning(cond.negative), 1.0)
    torch.testing.assert_close(guided, v_uncond + scale * (v_cond - v_uncond), rtol=0, atol=1e-5)
    # no norm rescale (Qwen-Image's): the guided tokens' norms are not the conditional ones' (measured: up to
    # 1.0e-2 apart, on norms of about 1.4)
    assert (guided.norm(dim=-1) - v_cond.norm(dim=-1)).abs().max() > 1e-3


def test_decode_applies_the_vaes_latent_statistics_and_composites_rgba_over_white(backbone):
    vae = backbone.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, 8, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 8, 1, 1, 1)
    assert vae.config.z_dim == 8 and vae.config.out_channels == 4 and backbone.vae_scale_factor == 16
    assert mean.abs().min() > 0 and (std - 1).abs().min() > 0  # non-trivial statistics
    latents = backbone.initial_noise(2, torch.Generator().manual_seed(4), torch.device("cpu"))
    with torch.no_grad():
        z = latents.transpose(1, 2).reshape(2, 8, 1, 8, 8)  # (B, h * w, C) -> (B, C, 1, h, w)
        rgba = (vae.decode(z * std + mean).sample[:, :, 0] / 2 + 0.5).clamp(0, 1)
        ours = backbone.decode(latents)
    assert rgba.shape == (2, 4, 128, 128) and ours.shape == (2, 3, 128, 128)
    alpha = rgba[:, 3:]
    assert alpha.min() < 0.9  # the tiny VAE's alpha is not all opaque: the compositing is exercised
    torch.testing.assert_close(ours, rgba[:, :3] * alpha + 1 - alpha, rtol=0, atol=1e-6)
    assert torch.equal(rgba_over_white(ours), ours)  # RGB passes through


def test_qwen_image21_backbone_loads_a_saved_diffusers_directory(tmp_path):
    make_tiny_qwen_image21_pipeline(seed=3).save_pretrained(tmp_path / "pipe")
    with open(tmp_path / "pipe" / "model_index.json") as f:
        index = json.load(f)
    assert index["_class_name"] == "QwenImage21Pipeline"
    assert index["processor"] == ["transformers", "Qwen3VLProcessor"]
    loaded = QwenImage21Backbone(str(tmp_path / "pipe"), resolution=128)
    loaded.load()
    assert isinstance(loaded.pipeline, QwenImage21Pipeline)
    built = TinyQwenImage21Backbone(seed=3)
    built.load()
    assert loaded.pipeline._drop_idx == built.pipeline._drop_idx == 38
    noise = built.initial_noise(2, torch.Generator().manual_seed(0), torch.device("cpu"))
    with torch.no_grad():
        expected = built.velocity(noise, 0.4, built.encode_prompts(PROMPTS, True), 3.0)
        got = loaded.velocity(noise, 0.4, loaded.encode_prompts(PROMPTS, True), 3.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # and the directory names its backbone when loaded with another one
    with pytest.raises(
        ValueError, match=r"use model\.backbone\.class_path: guardrl\.policy\.QwenImage21Backbone"
    ):
        SD3Backbone(str(tmp_path / "pipe"), resolution=128).load()


# ----- bad inputs (each also listed as a Case(...) for tests/test_bad_inputs.py in the report)
def test_bad_inputs_are_refused_with_the_option_name():
    with pytest.raises(
        ValueError, match=r"model\.backbone\.init_args\.resolution=112.*multiple of 32.*96 or 128"
    ):
        TinyQwenImage21Backbone(resolution=112).load()
    with pytest.raises(ValueError, match=r"model\.backbone\.init_args\.width=80.*multiple of 32.*64 or 96"):
        TinyQwenImage21Backbone(height=128, width=80).load()
    with pytest.raises(
        ValueError, match=r"model\.backbone\.init_args\.num_layers must be an integer >= 1.*0"
    ):
        TinyQwenImage21Backbone(num_layers=0)
    with pytest.raises(
        ValueError, match=r"model\.backbone\.init_args\.use_sample_sigmas must be true or false, got 'yes'"
    ):
        QwenImage21Backbone("unused", use_sample_sigmas="yes")


# ----- a GRPO run on the tiny backbone: exact resume, LoRA export
def _fit_args(prompt_file, log_dir, iterations):
    return qwen_image_fit_args(prompt_file, log_dir, iterations, TINY)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen21_fit")
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("a red circle\na blue square on the left\na green triangle\n")
    cli = main(["fit", *_fit_args(prompt_file, root / "straight", 2)])
    return cli, prompt_file, _last_checkpoint(root / "straight")


@pytest.mark.slow  # a guardrl fit: the inner loop leaves it to CI
def test_two_grpo_iterations_on_tiny_qwen_image21_train_the_lora(straight):
    cli, _, checkpoint = straight
    assert cli.model.num_iterations == 2 and isinstance(cli.model.backbone, TinyQwenImage21Backbone)
    assert cli.model.num_latent_elements == 8 * 8 * 8  # 8 x 8 unpatched tokens x 8 channels
    lora = {k: v for k, v in checkpoint["state_dict"].items() if "lora_B.default" in k}
    # the policy adapter on attention (q, k, v, out) and feed-forward (proj, gate, out): 2 blocks x 7 modules
    assert len(lora) == 14, sorted(lora)
    assert any(bool(v.abs().max() > 0) for v in lora.values())  # B starts at 0 and has moved


@pytest.mark.slow  # a guardrl fit: the inner loop leaves it to CI
def test_a_stopped_and_resumed_run_equals_the_straight_run_bitwise(straight, tmp_path, caplog):
    check_resume_is_bitwise(TINY, straight, tmp_path, caplog)


@pytest.mark.slow  # a guardrl fit: the inner loop leaves it to CI
@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_exported_lora_in_a_stock_pipeline_reproduces_the_policy(straight, tmp_path, guidance_scale):
    cli, _, _ = straight
    policy = cli.model.policy
    backbone = policy.backbone
    export_lora(policy, str(tmp_path / "lora"))
    noise = backbone.initial_noise(len(PROMPTS), torch.Generator().manual_seed(3), torch.device("cpu"))
    steps = 4
    with policy.use_weights("policy") as transformer:
        ours = _ode_images(backbone, PROMPTS, noise, steps, guidance_scale, transformer)

    def stock(with_lora):
        pipe = backbone.stock_pipeline()  # the same base weights TinyQwenImage21Backbone(seed=0) builds
        if with_lora:
            pipe.load_lora_weights(str(tmp_path / "lora"))  # QwenImage21Pipeline's QwenImageLoraLoaderMixin
        with torch.no_grad():
            return pipe(
                prompt=PROMPTS,
                latents=noise,
                height=backbone.height,
                width=backbone.width,
                num_inference_steps=steps,
                output_type="pt",
                **backbone.stock_call_kwargs(guidance_scale),
            ).images.float()

    torch.testing.assert_close(stock(True), ours, rtol=0, atol=1e-5)
    assert (stock(False) - ours).abs().max() > 1e-3  # the LoRA matters
