"""FLUX.2 [klein] (guardrl/policy/flux2.py): what tests/test_backbone_contract.py does not already check.

The contract test covers the base ("klein-base", true CFG) tiny model: the stock pipeline's images reproduced
non-square, with and without guidance. Here: the step-distilled variant, the schedule against the pipeline's
and a closed form, the real loading path from a `save_pretrained` directory, a GRPO run through `guardrl fit`
with an exact resume, LoRA export into a stock pipeline, the published 4B / 9B shapes and sizes, the recipe,
and the bad inputs.
"""

from __future__ import annotations

import glob
import math
import os

import pytest
import torch

from conftest import REPO_ROOT, tiny_fit_args
from guardrl.cli import main
from guardrl.export import export_lora
from guardrl.policy import FlowPolicy, Flux2KleinBackbone, LoraSpec, SD3Backbone
from guardrl.policy.flux2 import (
    KLEIN_4B_TRANSFORMER,
    KLEIN_9B_TRANSFORMER,
    RandomFlux2Klein4BBackbone,
    RandomFlux2Klein9BBackbone,
    TinyFlux2KleinBackbone,
    make_tiny_flux2_klein_pipeline,
)
from guardrl.sampling import sample_rollouts
from guardrl.sharding import transformer_blocks
from tests.published_recipes import Published

PROMPTS = ["a red circle", "a blue square on the left"]
# The default targets (to_q, to_k, to_v, to_out.0) exist only in the double-stream blocks; the single-stream
# blocks fuse theirs into attn.to_qkv_mlp_proj and attn.to_out, a Linear whose name "to_out" would also match
# the double blocks' to_out ModuleList, hence the full name (as diffusers'
# examples/dreambooth/train_dreambooth_lora_flux2_klein.py writes it).
TINY_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "to_qkv_mlp_proj",
    "single_transformer_blocks.0.attn.to_out",
]


def _ode_images(backbone, noise, guidance_scale, steps, transformer=None):
    cond = backbone.encode_prompts(PROMPTS, with_negative=backbone.uses_true_cfg and guidance_scale > 1.0)

    def velocity_fn(latents, t, k):
        return backbone.velocity(latents, t, cond, guidance_scale, transformer)

    with torch.no_grad():
        sigmas = backbone.sigmas(steps)
        trajectory = sample_rollouts(velocity_fn, noise, sigmas, torch.zeros(steps))  # eta = 0: Euler
        return backbone.decode(trajectory.final_latents)


def _stock_images(pipe, backbone, noise, guidance_scale, steps):
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


def test_distilled_klein_ignores_guidance_and_reproduces_the_stock_pipeline():
    backbone = TinyFlux2KleinBackbone(is_distilled=True, height=96, width=128)
    backbone.load()
    assert backbone.uses_true_cfg is False
    # the VAE's batch-norm statistics are not the identity, so the decode is checked to use them
    assert (backbone.vae.bn.running_mean.abs() > 0).all() and (backbone.vae.bn.running_var != 1).all()
    noise = backbone.initial_noise(2, torch.Generator().manual_seed(5), torch.device("cpu"))
    assert noise.shape == (2, 16, 6, 8)  # (B, 4 x 4 latent channels, 96 / 16, 128 / 16)
    ours = _ode_images(backbone, noise, 4.0, 3)
    stock = _stock_images(backbone.stock_pipeline(), backbone, noise, 4.0, 3)
    assert ours.shape == stock.shape == (2, 3, 96, 128)
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)
    # a distilled klein has no guidance input at all: the guided images are the unguided ones, bitwise
    assert torch.equal(ours, _ode_images(backbone, noise, 1.0, 3))


@pytest.mark.parametrize("steps, height, width", [(4, 128, 128), (3, 128, 96), (6, 256, 192)])
def test_sigmas_are_the_pipelines_own(steps, height, width):
    backbone = TinyFlux2KleinBackbone(height=height, width=width)
    backbone.load()
    pipe = backbone.stock_pipeline()
    noise = backbone.initial_noise(1, torch.Generator().manual_seed(0), torch.device("cpu"))
    with torch.no_grad():
        pipe(
            prompt=PROMPTS[:1],
            latents=noise,
            height=height,
            width=width,
            num_inference_steps=steps,
            output_type="latent",
            **backbone.stock_call_kwargs(1.0),
        )
    assert torch.equal(backbone.sigmas(steps).float(), pipe.scheduler.sigmas)  # the schedule it sampled on


def test_sigmas_match_the_empirical_shift_by_hand():
    # 128 px: (128 / 16)^2 = 64 image tokens, 4 steps. Flux2KleinPipeline's compute_empirical_mu (its
    # constants: a1 = 8.73809524e-05, b1 = 1.89833333, a2 = 0.00016927, b2 = 0.45666666), for 64 <= 4300
    # tokens:
    #   m_200 = a2 * 64 + b2 = 0.46749994, m_10 = a1 * 64 + b1 = 1.9039257109536
    #   a = (m_200 - m_10) / 190 = -0.0075601356366, b = m_200 - 200 a = 1.9795270673196
    #   mu = 4 a + b = 1.9492865247732
    # and the scheduler's exponential shift of t in linspace(1, 1/4, 4): sigma = e^mu / (e^mu + 1/t - 1).
    backbone = TinyFlux2KleinBackbone()
    backbone.load()
    mu = 1.9492865247732
    expected = [math.exp(mu) / (math.exp(mu) + 1 / t - 1) for t in (1.0, 0.75, 0.5, 0.25)] + [0.0]
    assert backbone.sigmas(4).tolist() == pytest.approx(expected, abs=1e-6)
    assert backbone.sigmas(4)[2].item() == pytest.approx(math.exp(mu) / (math.exp(mu) + 1), abs=1e-6)


def test_klein_loads_a_saved_diffusers_directory(tmp_path):
    make_tiny_flux2_klein_pipeline(seed=3).save_pretrained(tmp_path / "pipe")
    loaded = Flux2KleinBackbone(
        str(tmp_path / "pipe"),
        torch_dtype="float32",
        resolution=128,
        max_sequence_length=64,
        text_encoder_out_layers=[1, 2, 3],
    )
    loaded.load()
    built = TinyFlux2KleinBackbone(seed=3)
    built.load()
    assert loaded.uses_true_cfg and type(loaded.pipeline).__name__ == "Flux2KleinPipeline"
    latents = built.initial_noise(2, torch.Generator().manual_seed(0), torch.device("cpu"))
    with torch.no_grad():
        expected = built.velocity(latents, 0.4, built.encode_prompts(PROMPTS, True), 2.0)
        got = loaded.velocity(latents, 0.4, loaded.encode_prompts(PROMPTS, True), 2.0)
    # same weights; a module read from disk may pick another kernel (see tests/test_policy.py)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # a directory of this pipeline loaded as another backbone names the right class
    with pytest.raises(ValueError, match=r"holds a Flux2KleinPipeline.*guardrl\.policy\.Flux2KleinBackbone"):
        SD3Backbone(str(tmp_path / "pipe"), resolution=128).load()


def test_a_prompt_longer_than_max_sequence_length_is_cut_and_counted():
    backbone = TinyFlux2KleinBackbone()
    backbone.load()
    # 60 words of one token each ("red", " red"), plus the chat template's 16 tokens: 76 > 64
    long_prompt = " ".join(["red"] * 60)
    cond = backbone.encode_prompts([long_prompt, "a red circle"], with_negative=False)
    assert cond.tensors["prompt_embeds"].shape == (
        2,
        64,
        48,
    )  # cut to max_sequence_length, as the pipeline does
    assert backbone.truncated_prompts == 1


# ------------------------------------------------------------------------------------ guardrl fit and resume
def _fit_args(prompt_file, log_dir, **extra):
    return tiny_fit_args(
        prompt_file,
        log_dir,
        **{
            "--model.backbone": "guardrl.policy.flux2.TinyFlux2KleinBackbone",
            "--model.sampling.guidance_scale": "2.0",  # klein-base: true CFG in rollouts and the update
            "--model.lora": f'{{"rank": 4, "alpha": 8, "target_modules": {TINY_TARGETS!r}}}'.replace(
                "'", '"'
            ),
            "--checkpoint.every_n_iterations": "1",
            "--checkpoint.save_top_k": "-1",
            "--seed_everything": "7",
            **extra,
        },
    )


def _assert_same_checkpoint(a: dict, b: dict) -> None:
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_b["state"][index][name]), (index, name)
    assert a["global_step"] == b["global_step"]
    assert {k: v for k, v in a["guardrl"].items() if k != "rng"} == {
        k: v for k, v in b["guardrl"].items() if k != "rng"
    }


@pytest.mark.slow  # a guardrl fit: the inner loop leaves it to CI
def test_grpo_on_tiny_klein_trains_single_blocks_and_resumes_exactly(tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red circle\na blue square\na green triangle\ntwo yellow circles\n")
    straight = main(["fit", *_fit_args(str(prompt_file), str(tmp_path / "straight"))])
    module = straight.model
    assert module.num_iterations == 2 and isinstance(module.backbone, TinyFlux2KleinBackbone)
    assert module.num_skipped_updates == 0
    # both kinds of block carry trained adapters
    lora = {n: p for n, p in module.policy.transformer.named_parameters() if "lora_B" in n}
    assert any(n.startswith("single_transformer_blocks.0.attn.to_out.") for n in lora)
    assert any(n.startswith("single_transformer_blocks.0.attn.to_qkv_mlp_proj.") for n in lora)
    assert all(float(p.detach().abs().max()) > 0 for p in lora.values())  # B starts at 0: every adapter moved
    (version,) = glob.glob(str(tmp_path / "straight" / "guardrl" / "version_*"))
    checkpoints = os.path.join(version, "checkpoints")
    first = os.path.join(checkpoints, "iteration=1.ckpt")
    assert os.path.exists(first), os.listdir(checkpoints)

    # a run stopped after iteration 1, resumed from its checkpoint in another process state, to iteration 2
    main(["fit", *_fit_args(str(prompt_file), str(tmp_path / "resumed")), "--ckpt_path", first])
    (resumed_version,) = glob.glob(str(tmp_path / "resumed" / "guardrl" / "version_*"))
    # it ran iteration 2 only: iteration 1 came from the checkpoint
    assert sorted(os.listdir(os.path.join(resumed_version, "checkpoints"))) == [
        "iteration=2.ckpt",
        "last.ckpt",
    ]

    def last(version_dir):
        return torch.load(os.path.join(version_dir, "checkpoints", "last.ckpt"), weights_only=True)

    straight_ckpt, resumed_ckpt = last(version), last(resumed_version)
    assert straight_ckpt["guardrl"]["num_iterations"] == 2
    _assert_same_checkpoint(straight_ckpt, resumed_ckpt)


# ------------------------------------------------------------------------------------------------ LoRA export
@pytest.mark.slow  # a guardrl fit: the inner loop leaves it to CI
def test_exported_lora_in_a_stock_pipeline_reproduces_the_policys_images(tmp_path):
    policy = FlowPolicy(
        TinyFlux2KleinBackbone(seed=0), LoraSpec(rank=2, alpha=8, target_modules=TINY_TARGETS)
    )
    policy.build()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a LoRA as if trained: both factors non-zero
        for p in policy.trainable_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    path = export_lora(policy, str(tmp_path / "lora"))
    from safetensors.torch import load_file

    keys = load_file(path).keys()
    assert "transformer.single_transformer_blocks.0.attn.to_out.lora_A.weight" in keys
    assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_B.weight" in keys

    backbone = policy.backbone
    noise = backbone.initial_noise(2, torch.Generator().manual_seed(2), torch.device("cpu"))
    stock = make_tiny_flux2_klein_pipeline(seed=0)
    base = _stock_images(stock, backbone, noise, 2.0, 3)
    stock.load_lora_weights(str(tmp_path / "lora"))
    with policy.use_weights("policy") as transformer:
        ours = _ode_images(backbone, noise, 2.0, 3, transformer)
    got = _stock_images(stock, backbone, noise, 2.0, 3)
    torch.testing.assert_close(got, ours, rtol=0, atol=1e-5)
    assert (base - ours).abs().max() > 1e-3  # the LoRA changes the images; alpha / rank = 4 was kept


# ------------------------------------------------------------------------------------ the published shapes
# diffusers scripts/convert_flux2_to_diffusers.py `get_flux2_transformer_config`, commit
# 58eb52c0803ea9af3abec60841c2a093bdf1f951 of huggingface/diffusers.
CONVERT = "huggingface/diffusers scripts/convert_flux2_to_diffusers.py get_flux2_transformer_config"
PUBLISHED_SHAPES = {
    "klein-4b": {
        "num_layers": Published(5, f"{CONVERT}('klein-4b'): num_layers 5"),
        "num_single_layers": Published(20, f"{CONVERT}('klein-4b'): num_single_layers 20"),
        "num_attention_heads": Published(24, f"{CONVERT}('klein-4b'): num_attention_heads 24"),
        "attention_head_dim": Published(128, f"{CONVERT}('klein-4b'): attention_head_dim 128"),
        "joint_attention_dim": Published(7680, f"{CONVERT}('klein-4b'): joint_attention_dim 7680"),
        "in_channels": Published(128, f"{CONVERT}('klein-4b'): in_channels 128"),
        "axes_dims_rope": Published([32, 32, 32, 32], f"{CONVERT}('klein-4b'): axes_dims_rope (32,) * 4"),
        "mlp_ratio": Published(3.0, f"{CONVERT}('klein-4b'): mlp_ratio 3.0"),
        "guidance_embeds": Published(False, f"{CONVERT}('klein-4b'): guidance_embeds False"),
        # The model card (huggingface.co/black-forest-labs/FLUX.2-klein-4B; build.nvidia.com's model card:
        # "Diffusion Transformer ~4B") calls it a 4 billion parameter rectified flow transformer.
        "billions": Published(
            4, "FLUX.2-klein-4B model card: a 4 billion parameter rectified flow transformer"
        ),
    },
    "klein-9b": {
        "num_layers": Published(8, f"{CONVERT}('klein-9b'): num_layers 8"),
        "num_single_layers": Published(24, f"{CONVERT}('klein-9b'): num_single_layers 24"),
        "num_attention_heads": Published(32, f"{CONVERT}('klein-9b'): num_attention_heads 32"),
        "attention_head_dim": Published(128, f"{CONVERT}('klein-9b'): attention_head_dim 128"),
        "joint_attention_dim": Published(12288, f"{CONVERT}('klein-9b'): joint_attention_dim 12288"),
        "in_channels": Published(128, f"{CONVERT}('klein-9b'): in_channels 128"),
        "axes_dims_rope": Published([32, 32, 32, 32], f"{CONVERT}('klein-9b'): axes_dims_rope (32,) * 4"),
        "mlp_ratio": Published(3.0, f"{CONVERT}('klein-9b'): mlp_ratio 3.0"),
        "guidance_embeds": Published(False, f"{CONVERT}('klein-9b'): guidance_embeds False"),
        "billions": Published(
            9, "FLUX.2-klein-9B model card: a 9 billion parameter rectified flow transformer"
        ),
    },
}


@pytest.mark.parametrize(
    "cls, kind, exact",
    [
        # counted on the meta device (parameters = state dict here: FLUX.2 has no buffers)
        (RandomFlux2Klein4BBackbone, "klein-4b", 3_875_544_576),
        (RandomFlux2Klein9BBackbone, "klein-9b", 9_078_581_248),
    ],
)
def test_full_klein_shapes_have_the_published_config_size_latents_and_schedule(cls, kind, exact):
    backbone = cls(torch_dtype="bfloat16", resolution=512)
    with torch.device("meta"):
        backbone.load()
    transformer = backbone.transformer
    for key, row in PUBLISHED_SHAPES[kind].items():
        if key == "billions":
            continue
        value = transformer.config[key]
        value = list(value) if isinstance(value, tuple) else value
        assert value == row.value, f"{kind}: {key}={value!r}; {row.source}"
    count = sum(p.numel() for p in transformer.parameters())
    assert count == sum(t.numel() for t in transformer.state_dict().values()) == exact
    billions = PUBLISHED_SHAPES[kind]["billions"]
    assert round(count / 1e9) == billions.value, billions.source
    assert {p.dtype for p in transformer.parameters()} == {torch.bfloat16}
    # 512 px: x8 VAE (32 latent channels, AutoencoderKLFlux2's defaults), 2 x 2 patchify -> 128 x 32 x 32
    assert backbone.vae_scale_factor == 8 and backbone.vae.config.latent_channels == 32
    assert backbone.latent_numel() == 128 * 32 * 32
    assert backbone.uses_true_cfg is False  # the distilled klein: 4 steps, no CFG
    # 1024 tokens, 4 steps: m_200 = 0.00016927 * 1024 + 0.45666666 = 0.62999914,
    # m_10 = 8.73809524e-05 * 1024 + 1.89833333 = 1.9878114252576, a = (m_200 - m_10) / 190 = -0.0071463806,
    # b = m_200 - 200 a = 2.0592752, mu = 4 a + b = 2.0306897; at t = 0.5: sigma = e^mu / (e^mu + 1)
    m_200, m_10 = 0.00016927 * 1024 + 0.45666666, 8.73809524e-05 * 1024 + 1.89833333
    a = (m_200 - m_10) / 190
    mu = 4 * a + m_200 - 200 * a
    assert mu == pytest.approx(2.0306897, abs=1e-6)
    sigmas = backbone.sigmas(4)
    assert sigmas[2].item() == pytest.approx(math.exp(mu) / (math.exp(mu) + 1), abs=1e-6)
    assert sigmas[0].item() == pytest.approx(1.0) and sigmas[-1].item() == 0.0


def test_published_configs_are_the_modules_own():
    # what flux2.py builds is the table above (one source each way: a typo in either is caught)
    for config, kind in ((KLEIN_4B_TRANSFORMER, "klein-4b"), (KLEIN_9B_TRANSFORMER, "klein-9b")):
        for key, row in PUBLISHED_SHAPES[kind].items():
            if key != "billions":
                value = config[key]
                assert (list(value) if isinstance(value, tuple) else value) == row.value, (kind, key)


# ------------------------------------------------------------------------------------------------ the recipe
RECIPE = "flux2_klein/grpo_pickscore.yaml"


def test_recipe_lora_targets_reach_every_block_kind():
    import yaml

    with open(os.path.join(REPO_ROOT, "configs", RECIPE)) as f:
        targets = yaml.safe_load(f)["model"]["lora"]["target_modules"]
    backbone = TinyFlux2KleinBackbone()
    backbone.load()
    for block in transformer_blocks(backbone.transformer, backbone.shard_block_names):
        names = {n for n, _ in block.named_modules()}
        assert any(n == t or n.endswith("." + t) for n in names for t in targets), type(block).__name__
    # and the usual attention targets alone do not: the single blocks have no to_q / to_k / to_v / to_out.0
    single = {n for n, _ in backbone.transformer.single_transformer_blocks[0].named_modules()}
    assert not any(n.endswith("." + t) for n in single for t in ["to_q", "to_k", "to_v", "to_out.0"])
    # the backbone's own targets (lora.target_modules null) add the fused ones, for every single block
    assert backbone.lora_targets()[4:] == ["to_qkv_mlp_proj"] + [
        f"single_transformer_blocks.{i}.attn.to_out"
        for i in range(len(backbone.transformer.single_transformer_blocks))
    ]


# ------------------------------------------------------------------------------------------------ bad inputs
OPTION = "model.backbone.init_args"


@pytest.mark.parametrize("layers", ["9", [], [-1], [1.5], [True], 9])
def test_text_encoder_out_layers_must_be_a_list_of_indices(layers):
    with pytest.raises(ValueError) as raised:
        Flux2KleinBackbone("x", text_encoder_out_layers=layers)
    assert str(raised.value) == (
        f"{OPTION}.text_encoder_out_layers must be a non-empty list of integers >= 0 (Qwen3 hidden-state "
        f"indices, e.g. [9, 18, 27]) or null, got {layers!r}"
    )


def test_text_encoder_out_layers_must_exist_and_fit_the_transformer():
    # the tiny Qwen3 has 3 layers: hidden states 0..3, each 16 wide; its transformer takes 3 x 16 = 48
    with pytest.raises(ValueError) as raised:
        TinyFlux2KleinBackbone(text_encoder_out_layers=[1, 2, 4]).load()
    assert str(raised.value) == (
        f"{OPTION}.text_encoder_out_layers=[1, 2, 4]: the text encoder has 3 layers, so each index must be "
        "in [0, 3]"
    )
    with pytest.raises(ValueError) as raised:
        TinyFlux2KleinBackbone(text_encoder_out_layers=[1, 2]).load()
    assert str(raised.value) == (
        f"{OPTION}.text_encoder_out_layers=[1, 2]: 2 layers of width 16 make 32-wide token embeddings, but "
        "the transformer takes 48 (joint_attention_dim): give 3 layers"
    )


def test_tiny_is_distilled_must_be_a_bool():
    with pytest.raises(ValueError) as raised:
        TinyFlux2KleinBackbone(is_distilled="yes")
    assert str(raised.value) == f"{OPTION}.is_distilled must be true or false, got 'yes'"
