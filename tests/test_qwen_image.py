"""Qwen-Image (guardrl/policy/qwen_image.py): what tests/test_backbone_contract.py leaves open for this model.

The tokenizer drops exactly the chat template's system prompt; the sigma schedule is the pipeline's own;
padding a prompt's text changes its velocity by float32 rounding only; guidance is the pipeline's CFG with its
norm rescale; the decode applies the VAE's latent statistics from its config; a `save_pretrained` directory
loads through the real path; a `guardrl fit` on the tiny model resumes bitwise; the exported LoRA reproduces
the policy in a stock pipeline; bad inputs are refused with the option's name.
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps
from safetensors.torch import load_file

from conftest import REPO_ROOT, tiny_fit_args
from guardrl.cli import main
from guardrl.export import export_lora
from guardrl.policy import Conditioning, QwenImageBackbone, SD3Backbone
from guardrl.policy.qwen_image import (
    QWEN_IMAGE_VAE,
    RandomQwenImageBackbone,
    TinyQwenImageBackbone,
    build_qwen_image_transformer,
    make_tiny_qwen_image_pipeline,
)
from guardrl.sampling import sample_rollouts
from tests.published_recipes import Published

PROMPTS = ["a red circle", "a blue square on the left"]
TINY = "guardrl.policy.qwen_image.TinyQwenImageBackbone"


@pytest.fixture(scope="module")
def backbone():
    built = TinyQwenImageBackbone(seed=0)
    built.load()
    return built


def test_the_tiny_tokenizer_drops_exactly_the_system_prompt(backbone):
    pipe = backbone.pipeline
    template = pipe.prompt_template_encode
    prefix = template[: template.index("{}")]
    ids = pipe.tokenizer(prefix).input_ids
    # <|im_start|> system \n Describe the image by detailing the color , shape , size , texture , quantity ,
    # text , spatial relationships of the objects and background : <|im_end|> \n <|im_start|> user \n = 34
    assert len(ids) == pipe.prompt_template_encode_start_idx == 34
    # what is kept of "a red circle": a, Ġred, Ġcircle, then the template's tail
    # <|im_end|> \n <|im_start|> assistant \n: 3 + 5 = 8 rows, all valid
    cond = backbone.encode_prompts(["a red circle"], with_negative=False).tensors
    assert cond["prompt_embeds"].shape == (1, 8, 16)
    assert cond["prompt_embeds_mask"].tolist() == [[1] * 8]


def test_sigmas_are_the_pipelines_own(backbone):
    # QwenImagePipeline.__call__, step 5, with its own helpers: linspace sigmas shifted by mu(image_seq_len)
    for height, width in ((128, 128), (128, 96), (256, 64)):
        sized = TinyQwenImageBackbone(height=height, width=width)
        sized.load()
        scheduler = type(backbone.scheduler).from_config(backbone.scheduler.config)
        steps = 5
        # (height / 16) x (width / 16) packed tokens
        image_seq_len = (height // 16) * (width // 16)
        assert (
            sized.image_seq_len()
            == image_seq_len
            == sized.initial_noise(1, torch.Generator().manual_seed(0), torch.device("cpu")).shape[1]
        )
        config = scheduler.config
        mu = calculate_shift(
            image_seq_len,
            config.base_image_seq_len,
            config.max_image_seq_len,
            config.base_shift,
            config.max_shift,
        )
        retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        assert torch.equal(sized.sigmas(steps), scheduler.sigmas.to(torch.float64))
    # the token count matters for this scheduler (base_shift != max_shift), and the terminal shift holds
    small, large = TinyQwenImageBackbone(height=64, width=64), TinyQwenImageBackbone(height=256, width=256)
    small.load(), large.load()
    assert bool((small.sigmas(4)[1:-2] < large.sigmas(4)[1:-2]).all())
    assert float(small.sigmas(4)[-2]) == float(large.sigmas(4)[-2]) == pytest.approx(0.02, abs=1e-7)


def test_padding_a_prompt_changes_its_velocity_by_float32_rounding_only(backbone):
    noise = backbone.initial_noise(1, torch.Generator().manual_seed(0), torch.device("cpu"))
    alone = backbone.encode_prompts(PROMPTS[:1], with_negative=False)
    batch = backbone.encode_prompts(PROMPTS, with_negative=False)
    # "a red circle" has 8 text rows, "a blue square on the left" 11: the first row is padded by 3
    assert alone.tensors["prompt_embeds"].shape[1] == 8 and batch.tensors["prompt_embeds"].shape[1] == 11
    padded = batch.select(torch.tensor([0]))
    assert padded.tensors["prompt_embeds_mask"].tolist() == [[1] * 8 + [0] * 3]
    assert torch.equal(padded.tensors["prompt_embeds"][:, :8], alone.tensors["prompt_embeds"])
    assert not padded.tensors["prompt_embeds"][:, 8:].any()
    with torch.no_grad():
        v_alone = backbone.velocity(noise, 0.7, alone)
        v_padded = backbone.velocity(noise, 0.7, padded)
    # Masked keys get no attention weight, but the softmax sums over a longer row: float32 rounding (measured
    # 3e-7 on velocities of size ~1), the same order as running a prompt in a batch of 1 or of 2.
    torch.testing.assert_close(v_padded, v_alone, rtol=0, atol=2e-6)


def test_guidance_is_the_pipelines_cfg_with_its_norm_rescale(backbone):
    noise = backbone.initial_noise(2, torch.Generator().manual_seed(2), torch.device("cpu"))
    cond = backbone.encode_prompts(PROMPTS, with_negative=True)
    scale = 4.0
    with torch.no_grad():
        guided = backbone.velocity(noise, 0.6, cond, scale)
        v_cond = backbone.velocity(noise, 0.6, cond, 1.0)
        v_uncond = backbone.velocity(noise, 0.6, Conditioning(cond.negative), 1.0)
    combined = v_uncond + scale * (v_cond - v_uncond)
    expected = combined * v_cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(guided, expected, rtol=0, atol=1e-5)
    # the rescale: every token's guided velocity has the conditional one's norm
    torch.testing.assert_close(guided.norm(dim=-1), v_cond.norm(dim=-1), rtol=1e-5, atol=0)
    assert (guided - combined).abs().max() > 1e-2  # and it matters


def test_decode_applies_the_vaes_latent_statistics_from_its_config(backbone):
    vae = backbone.vae
    mean, std = vae.config.latents_mean, vae.config.latents_std
    assert (mean, std) == ([-0.25, 0.5, 0.125, -0.5], [2.0, 0.5, 1.5, 1.25])
    latents = backbone.initial_noise(1, torch.Generator().manual_seed(4), torch.device("cpu"))
    # by hand: unpack (1, 64 tokens, 4 ch x 2 x 2) to (1, 4, 1, 16, 16), then z * std + mean per channel
    z = latents.view(1, 8, 8, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 4, 1, 16, 16)
    z = z * torch.tensor(std).view(1, 4, 1, 1, 1) + torch.tensor(mean).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        expected = (vae.decode(z).sample[:, :, 0] / 2 + 0.5).clamp(0, 1)
        ours = backbone.decode(latents)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_qwen_image_backbone_loads_a_saved_diffusers_directory(tmp_path):
    make_tiny_qwen_image_pipeline(seed=3).save_pretrained(tmp_path / "pipe")
    loaded = QwenImageBackbone(str(tmp_path / "pipe"), resolution=128, max_sequence_length=32)
    loaded.load()
    assert isinstance(loaded.pipeline, QwenImagePipeline)
    built = TinyQwenImageBackbone(seed=3)
    built.load()
    noise = built.initial_noise(2, torch.Generator().manual_seed(0), torch.device("cpu"))
    with torch.no_grad():
        expected = built.velocity(noise, 0.4, built.encode_prompts(PROMPTS, True), 3.0)
        got = loaded.velocity(noise, 0.4, loaded.encode_prompts(PROMPTS, True), 3.0)
    # measured bitwise equal; float32 precision allowed, as for SD3 (tests/test_policy.py)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # and the directory names its backbone when loaded with another one
    with pytest.raises(
        ValueError, match=r"use model\.backbone\.class_path: guardrl\.policy\.QwenImageBackbone"
    ):
        SD3Backbone(str(tmp_path / "pipe"), resolution=128).load()


def test_a_prompt_longer_than_max_sequence_length_is_cut_and_counted(caplog):
    backbone = TinyQwenImageBackbone(max_sequence_length=6)
    backbone.load()
    with caplog.at_level("WARNING"):
        cond = backbone.encode_prompts(["a red circle on the left", "a cat"], with_negative=False).tensors
    # "a red circle on the left" + the template's 5-token tail = 11 rows, cut to 6; "a cat" = 2 + 5 = 7, cut
    assert cond["prompt_embeds"].shape[1] == 6 and cond["prompt_embeds_mask"].tolist() == [[1] * 6] * 2
    assert backbone.truncated_prompts == 2
    assert caplog.text.count("was truncated") == 1  # said once per run, with the count


# ----- bad inputs (each also listed as a Case(...) for tests/test_bad_inputs.py in the report)
def test_bad_inputs_are_refused_with_the_option_name():
    with pytest.raises(
        ValueError, match=r"model\.backbone\.init_args\.max_sequence_length.*\[1, 1024\].*2048"
    ):
        QwenImageBackbone("unused", max_sequence_length=2048)
    with pytest.raises(ValueError, match=r"model\.backbone\.init_args\.resolution=120.*multiple of 16"):
        TinyQwenImageBackbone(resolution=120).load()
    with pytest.raises(ValueError, match=r"model\.backbone\.init_args\.width=100.*multiple of 16.*96 or 112"):
        TinyQwenImageBackbone(height=128, width=100).load()
    with pytest.raises(
        ValueError, match=r"model\.backbone\.init_args\.num_layers must be an integer >= 1.*0"
    ):
        TinyQwenImageBackbone(num_layers=0)
    with pytest.raises(
        ValueError, match=r"model\.backbone\.init_args\.small must be true or false, got 'yes'"
    ):
        RandomQwenImageBackbone(small="yes")


# ----- a GRPO run on the tiny backbone: exact resume, LoRA export
def _fit_args(prompt_file, log_dir, iterations, backbone=TINY):
    return tiny_fit_args(
        str(prompt_file),
        str(log_dir),
        **{
            "--model.backbone": backbone,
            "--model.sampling.guidance_scale": "2.0",
            "--model.max_iterations": str(iterations),
            "--model.lora": '{"rank": 2, "alpha": 8}',
            "--model.optimizer": '{"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.05}}',
            "--checkpoint.every_n_iterations": "1",
            "--seed_everything": "7",
        },
    )


def _last_checkpoint(log_dir):
    (path,) = glob.glob(os.path.join(str(log_dir), "guardrl", "version_*", "checkpoints", "last.ckpt"))
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_fit")
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("a red circle\na blue square on the left\na green triangle\n")
    cli = main(["fit", *_fit_args(prompt_file, root / "straight", 2)])
    return cli, prompt_file, _last_checkpoint(root / "straight")


@pytest.mark.slow  # a guardrl fit: the inner loop leaves it to CI
def test_two_grpo_iterations_on_tiny_qwen_image_train_the_lora(straight):
    cli, _, checkpoint = straight
    assert cli.model.num_iterations == 2 and isinstance(cli.model.backbone, TinyQwenImageBackbone)
    # 4 x 16 x 16 latents, packed: 64 tokens x 16
    assert cli.model.num_latent_elements == 1024
    lora = {k: v for k, v in checkpoint["state_dict"].items() if "lora_B" in k}
    assert lora and any(bool(v.abs().max() > 0) for v in lora.values())  # B starts at 0 and has moved


@pytest.mark.slow  # a guardrl fit: the inner loop leaves it to CI
def test_a_stopped_and_resumed_run_equals_the_straight_run_bitwise(straight, tmp_path, caplog):
    check_resume_is_bitwise(TINY, straight, tmp_path, caplog)


def check_resume_is_bitwise(backbone: str, straight, tmp_path, caplog) -> None:
    """One iteration, stop, resume with --ckpt_path last to the straight run's two: the same weights,
    optimizer state and step count, bit for bit (test_qwen_image21.py runs it on Qwen-Image 2.1)."""
    _, prompt_file, expected = straight
    main(["fit", *_fit_args(prompt_file, tmp_path, 1, backbone)])
    assert _last_checkpoint(tmp_path)["guardrl"]["num_iterations"] == 1
    with caplog.at_level("WARNING"):
        cli = main(["fit", *_fit_args(prompt_file, tmp_path, 2, backbone), "--ckpt_path", "last"])
    assert "--ckpt_path last resolved to" in caplog.text  # resumed in place (one version dir, below)
    assert cli.trainer.global_step == expected["global_step"]
    resumed = _last_checkpoint(tmp_path)
    assert resumed["guardrl"]["num_iterations"] == 2
    assert expected["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    (opt_a,), (opt_b,) = expected["optimizer_states"], resumed["optimizer_states"]
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_b["state"][index][name]), (index, name)
    assert expected["global_step"] == resumed["global_step"]


@pytest.mark.slow  # a guardrl fit: the inner loop leaves it to CI
@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_exported_lora_in_a_stock_pipeline_reproduces_the_policy(straight, tmp_path, guidance_scale):
    cli, _, _ = straight
    policy = cli.model.policy
    backbone = policy.backbone
    export_lora(policy, str(tmp_path / "lora"))
    noise = backbone.initial_noise(len(PROMPTS), torch.Generator().manual_seed(3), torch.device("cpu"))
    steps = 4
    cond = backbone.encode_prompts(PROMPTS, with_negative=guidance_scale > 1.0)
    with torch.no_grad(), policy.use_weights("policy") as transformer:
        trajectory = sample_rollouts(
            lambda x, t, k: backbone.velocity(x, t, cond, guidance_scale, transformer),
            noise,
            backbone.sigmas(steps),
            torch.zeros(steps),
        )
        ours = backbone.decode(trajectory.final_latents)

    def stock(with_lora):
        pipe = backbone.stock_pipeline()  # the same base weights TinyQwenImageBackbone(seed=0) builds
        if with_lora:
            pipe.load_lora_weights(str(tmp_path / "lora"))
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


# ----- the published shapes (random weights) -------------------------------------------------------------
QWEN_README = "QwenLM/Qwen-Image README.md (0f0596c3e7263ba175f7a8f66ed227fc217995cd)"
QWEN_CONFIG = (
    "Qwen/Qwen-Image transformer/config.json, as diffusers' QwenImageTransformer2DModel defaults "
    "(huggingface/diffusers 58eb52c0 src/diffusers/models/transformers/transformer_qwenimage.py)"
)
QWEN_VAE = (
    "Qwen/Qwen-Image vae/config.json, as diffusers' AutoencoderKLQwenImage defaults "
    "(huggingface/diffusers 58eb52c0 src/diffusers/models/autoencoders/autoencoder_kl_qwenimage.py)"
)
# In the form of tests/published_recipes.py MODELS, to merge there.
QWEN_IMAGE_MODEL = {
    "patch_size": Published(2, f"{QWEN_CONFIG}: patch_size 2"),
    "in_channels": Published(64, f"{QWEN_CONFIG}: in_channels 64"),
    "out_channels": Published(16, f"{QWEN_CONFIG}: out_channels 16"),
    "num_layers": Published(60, f"{QWEN_CONFIG}: num_layers 60"),
    "attention_head_dim": Published(128, f"{QWEN_CONFIG}: attention_head_dim 128"),
    "num_attention_heads": Published(24, f"{QWEN_CONFIG}: num_attention_heads 24"),
    "joint_attention_dim": Published(3584, f"{QWEN_CONFIG}: joint_attention_dim 3584 (Qwen2.5-VL-7B width)"),
    "guidance_embeds": Published(False, f"{QWEN_CONFIG}: guidance_embeds false"),
    "axes_dims_rope": Published([16, 56, 56], f"{QWEN_CONFIG}: axes_dims_rope [16, 56, 56]"),
    "vae.z_dim": Published(16, f"{QWEN_VAE}: z_dim 16"),
    "vae_scale_factor": Published(8, f"{QWEN_VAE}: temperal_downsample [false, true, true]: 2^3 = 8"),
    "weights_in_billions_to_0_decimals": Published(
        20, f"{QWEN_README}: 'Qwen-Image, a 20B MMDiT image foundation model'"
    ),
}


def test_the_full_shape_transformer_has_the_published_config_and_size():
    with torch.device("meta"):
        transformer = build_qwen_image_transformer(small=False, dtype=torch.bfloat16)
    for key, row in QWEN_IMAGE_MODEL.items():
        if key.startswith(("vae", "weights")):
            continue
        value = transformer.config[key]
        assert (list(value) if isinstance(value, tuple) else value) == row.value, (key, row.source)
    weights = sum(t.numel() for t in transformer.state_dict().values())
    # as counted: 20,430,401,088 (all parameters, no buffers), 99.8% of them in the 60 blocks FSDP2 shards
    assert weights == sum(p.numel() for p in transformer.parameters()) == 20_430_401_088
    size = QWEN_IMAGE_MODEL["weights_in_billions_to_0_decimals"]
    assert round(weights / 1e9) == size.value, size.source
    in_blocks = sum(p.numel() for p in transformer.transformer_blocks.parameters())
    assert in_blocks == 20_389_877_760


def test_the_random_weight_backbone_has_the_published_latents_and_schedule():
    backbone = RandomQwenImageBackbone(small=True, resolution=1024)
    backbone.load()
    vae = backbone.vae
    assert vae.config.z_dim == QWEN_IMAGE_MODEL["vae.z_dim"].value
    assert backbone.vae_scale_factor == QWEN_IMAGE_MODEL["vae_scale_factor"].value
    assert (vae.config.latents_mean, vae.config.latents_std) == (
        QWEN_IMAGE_VAE["latents_mean"],
        QWEN_IMAGE_VAE["latents_std"],
    )
    # 1024 px: 64 x 64 packed tokens = 4096 image tokens of 16 x 2 x 2 = 64 channels
    noise = backbone.initial_noise(1, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert noise.shape == (1, 4096, 64) and backbone.latent_numel() == 262_144
    # mu = 0.5 + 0.4 * (4096 - 256) / (8192 - 256) = 0.69355, e^mu = 2.0008. 3 steps: t = 1, 2/3, 1/3, shifted
    # exponentially to s = e^mu / (e^mu + 1/t - 1) = 1, 0.80006, 0.50010; the terminal shift then stretches
    # 1 - s so that the last one lands on 0.02: s' = 1 - (1 - s) (1 - 0.02) / (1 - 0.50010), middle 0.60805
    mu = 0.5 + 0.4 * (4096 - 256) / (8192 - 256)
    shifted = [math.exp(mu) / (math.exp(mu) + 1 / t - 1) for t in (1.0, 2 / 3, 1 / 3)]
    stretched = [1 - (1 - s) * 0.98 / (1 - shifted[-1]) for s in shifted]
    assert backbone.sigmas(3).tolist() == pytest.approx([*stretched, 0.0], abs=1e-6)
    assert stretched[1] == pytest.approx(0.60805, abs=1e-5) and stretched[-1] == pytest.approx(0.02)
    # prompts of different lengths: one row per word + the template's 5 trailing tokens, padded and masked
    cond = backbone.encode_prompts(["a cat", "a red circle on the left"], with_negative=False).tensors
    assert cond["prompt_embeds"].shape == (2, 11, 64)
    assert cond["prompt_embeds_mask"].sum(dim=1).tolist() == [7, 11]


# ----- the recipe -----------------------------------------------------------------------------------------
RECIPE = "qwen_image/grpo_clip_pickscore.yaml"


def test_recipe_lora_targets_are_in_every_block(backbone):
    import yaml

    with open(os.path.join(REPO_ROOT, "configs", RECIPE)) as f:
        targets = yaml.safe_load(f)["model"]["lora"]["target_modules"]
    for block in backbone.transformer.transformer_blocks:
        names = {n for n, _ in block.named_modules()}
        # every target adapts a module in every block (none is a dead name)
        assert all(any(n == t or n.endswith("." + t) for n in names) for t in targets)
        assert not any(n.endswith(("img_mlp.net.2.proj", "txt_mlp.net.2.proj")) for n in names)


# ----- FSDP2 on two CPU processes (as tests/test_sharding.py, on the tiny Qwen-Image) --------------------
def _fit_two_ranks(out, *extra):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "MASTER_", "LOCAL_RANK", "WORLD_"))
    }
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [
        *(sys.executable, "-m", "guardrl.cli", "fit", "--config", "configs/tiny/grpo_guard.yaml", *extra),
        *("--model.backbone", TINY, "--model.sampling.guidance_scale", "2.0"),
        *("--trainer.devices", "2", "--trainer.accelerator", "cpu", "--model.max_iterations", "2"),
        *("--data.prompts_per_batch", "2", "--model.sampling.num_inference_steps", "4"),
        # why SmoothReward and SGD: tests/sharding_probe.py and tests/test_sharding.py
        *("--model.rewards", '[{"class_path": "tests.sharding_probe.SmoothReward"}]'),
        *("--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.5"),
        *("--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", "run"),
        *("--trainer.logger.init_args.version", "0", "--trainer.callbacks+=guardrl.callbacks.LoraExport"),
        *("--trainer.callbacks+=tests.sharding_probe.ShardingProbe", "--trainer.callbacks.init_args.out"),
        str(out / "probe"),
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-4000:]
    return load_file(str(out / "run" / "version_0" / "lora" / "final" / "pytorch_lora_weights.safetensors"))


@pytest.mark.slow
def test_fsdp2_shards_the_tiny_qwen_image_and_trains_what_ddp_trains(tmp_path):
    ddp = _fit_two_ranks(tmp_path / "ddp", "--trainer.strategy", "ddp")
    fsdp = _fit_two_ranks(tmp_path / "fsdp", "--config", "configs/strategy/fsdp.yaml")
    records = [json.loads((tmp_path / "fsdp" / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for record in records:
        assert record["sharded"] == record["parameters"] > 0  # every transformer parameter is a DTensor shard
        assert record["trainable_sharded"] == 16  # LoRA A and B of to_q, to_k, to_v, to_out.0 in 2 blocks
    assert records[0]["local_numel"] + records[1]["local_numel"] == records[0]["full_numel"]
    assert ddp.keys() == fsdp.keys()
    assert all(v.abs().max() > 0 for k, v in ddp.items() if "lora_B" in k)  # trained
    num = sum(((ddp[k] - fsdp[k]).double() ** 2).sum() for k in ddp)
    den = sum((ddp[k].double() ** 2).sum() for k in ddp)
    # the same weights up to the order of floating-point reductions (tests/test_sharding.py: < 1e-5)
    assert float((num / den).sqrt()) < 1e-5
