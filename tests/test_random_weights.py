"""The random-weight backbones of the published SD3.5-Medium / FLUX.1-dev shapes
(guardrl.policy.random_weights), and bench/gpu_bench.py, which times the bare transformers and a real GRPO
iteration on them."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from guardrl.policy import RandomFluxDevBackbone, RandomSD35LargeBackbone, RandomSD35MediumBackbone
from guardrl.policy.random_weights import build_transformer
from tests.published_recipes import MODELS

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def test_full_shapes_build_on_meta_in_the_published_configs_and_sizes():
    with torch.device("meta"):
        models = {
            kind: build_transformer(kind, small=False, dtype=torch.bfloat16)
            for kind in ("sd35m", "sd35l", "flux")
        }
    for kind, model in models.items():
        published = MODELS[kind]  # tests/published_recipes.py: the released configs and model cards
        shape = {k: row for k, row in published.items() if not k.startswith(("vae", "weights"))}
        assert len(shape) >= 9
        for key, row in shape.items():
            value = model.config[key]
            value = list(value) if isinstance(value, tuple) else value
            assert value == row.value, f"{kind}: {key}={value!r}; {row.source}"
        assert {t.dtype for t in model.state_dict().values()} == {torch.bfloat16}
    # Sizes as the model cards round them, counted over the weights as released (state dict: SD3's 226M
    # position-embedding table is a buffer in diffusers, in the weights file all the same): SD3.5-M
    # 2,469,663,936 -> 2.5 billion (its parameters alone, 2.24 billion, would round to 2.2), FLUX.1-dev
    # 11,901,408,320 -> 12 billion.
    weights = {kind: sum(t.numel() for t in m.state_dict().values()) for kind, m in models.items()}
    sd35m_size = MODELS["sd35m"]["weights_in_billions_to_1_decimal"]
    sd35l_size = MODELS["sd35l"]["weights_in_billions_to_1_decimal"]
    flux_size = MODELS["flux"]["weights_in_billions_to_0_decimals"]
    assert round(weights["sd35m"] / 1e9, 1) == sd35m_size.value, sd35m_size.source
    assert round(weights["sd35l"] / 1e9, 1) == sd35l_size.value, sd35l_size.source
    assert weights["sd35l"] == 8_146_280_768  # as counted (see the published row's note)
    assert round(weights["flux"] / 1e9) == flux_size.value, flux_size.source


def _sd3_shift(t: float) -> float:
    return 3 * t / (1 + 2 * t)  # SD3.5's static shift 3


# Step 5 of 10. SD3.5 (StableDiffusion3Pipeline: set_timesteps(10)): t runs linearly from 1 to the shifted
# sigma of the last training timestep, shift(1/1000), and is then shifted. FLUX.1-dev (FluxPipeline): t = 1,
# 0.9, ..., 0.1, shifted by mu = 0.5 + 0.65 * (1024 - 256) / (4096 - 256) = 0.63 for the 1024 image tokens of
# 512 px:
# sigma = e^mu / (e^mu + 1/t - 1).
SD3_T5 = 1 - 5 / 9 * (1 - _sd3_shift(1 / 1000))
FLUX_T5 = 0.5


@pytest.mark.parametrize(
    "cls, sigma_5",
    [
        (RandomSD35MediumBackbone, _sd3_shift(SD3_T5)),
        (RandomSD35LargeBackbone, _sd3_shift(SD3_T5)),  # the same schedule as SD3.5-Medium
        (RandomFluxDevBackbone, math.exp(0.63) / (math.exp(0.63) + 1 / FLUX_T5 - 1)),
    ],
)
def test_full_shape_backbones_have_the_published_latents_and_schedules(cls, sigma_5):
    backbone = cls(torch_dtype="bfloat16", resolution=512)
    with torch.device("meta"):
        backbone.load()
    assert backbone.vae_scale_factor == 8
    assert backbone.latent_numel() == 16 * 64 * 64
    published = MODELS[cls.kind]
    for key in ("latent_channels", "scaling_factor", "shift_factor"):
        row = published[f"vae.{key}"]
        assert backbone.vae.config[key] == row.value, row.source
    sigmas = backbone.sigmas(10)
    assert sigmas[5].item() == pytest.approx(sigma_5, abs=1e-6)
    assert sigmas[0].item() == pytest.approx(1.0) and sigmas[-1].item() == 0.0


@pytest.mark.parametrize("cls, tokens", [(RandomSD35MediumBackbone, 77 + 16), (RandomFluxDevBackbone, 16)])
def test_prompt_embeddings_are_a_fixed_function_of_prompt_and_seed(cls, tokens):
    def embed(prompts, seed=0):
        backbone = cls(small=True, resolution=64, max_sequence_length=16, seed=seed)
        backbone.load()
        return backbone.encode_prompts(prompts, with_negative=False)

    first = embed(["a cat", "a dog", "a cat"])
    assert first.tensors["prompt_embeds"].shape == (3, tokens, 64) and first.tensors[
        "pooled_prompt_embeds"
    ].shape == (
        3,
        32,
    )
    assert torch.equal(first.tensors["prompt_embeds"][0], first.tensors["prompt_embeds"][2])
    assert not torch.equal(first.tensors["prompt_embeds"][0], first.tensors["prompt_embeds"][1])
    again = embed(["a dog"])  # another instance, another batch: the same tensor
    assert torch.equal(again.tensors["prompt_embeds"][0], first.tensors["prompt_embeds"][1])
    assert torch.equal(again.tensors["pooled_prompt_embeds"][0], first.tensors["pooled_prompt_embeds"][1])
    assert not torch.equal(
        embed(["a dog"], seed=1).tensors["prompt_embeds"][0], first.tensors["prompt_embeds"][1]
    )


# What --small picks on a CPU, at 64 px and with one repeat / one timed iteration, to keep the suite fast.
SMALL_RUN = [
    "--resolution",
    "64",
    "--batch",
    "4",
    "--group-size",
    "2",
    "--minibatch",
    "2",
    "--steps",
    "4",
    "--matmul-size",
    "256",
    "--repeats",
    "1",
    "--iterations",
    "1",
]


@pytest.fixture(scope="module")
def gpu_bench_small():
    sys.path.insert(0, BENCH)
    try:
        import gpu_bench
    finally:
        sys.path.remove(BENCH)
    tables = gpu_bench.main(["--small", *SMALL_RUN])
    assert tables["savers"] == []  # not a default section
    return gpu_bench, tables["bare"], tables["iteration"]


def test_gpu_bench_small_times_the_bare_model_and_a_grpo_iteration(gpu_bench_small):
    _, bare, iteration = gpu_bench_small
    assert [(r["model"], r["phase"]) for r in bare] == [
        ("sd35m", "rollout"),
        ("sd35m", "rollout + CFG"),
        ("sd35m", "update, one step (LoRA r32)"),
        ("flux", "rollout"),
        ("flux", "update, one step (LoRA r64)"),
    ]
    # 4 images in groups of 2, minibatch 2, 4 sampler steps (3 SDE steps trained).
    update = "update (LoRA r{}, 2 minibatches x 3 steps + KL reference forwards)"
    assert [(r["model"], r["phase"]) for r in iteration] == [
        (model, phase)
        for model, rank in (("sd35m", 32), ("flux", 64))
        for phase in ("rollout", "decode", "reward", update.format(rank), "whole iteration")
    ]
    for row in bare + iteration:
        assert row["seconds"] > 0 and row["batch"] in (2, 4)
        assert (row["mfu"] is None) == (row["phase"] == "reward")
        assert row["mfu"] is None or row["mfu"] > 0
    for model in ("sd35m", "flux"):
        phases = {r["phase"].split(" (")[0]: r for r in iteration if r["model"] == model}
        # The iteration's model FLOPs are its rollout, decode and update; the reward's model is not the
        # policy's.
        assert phases["reward"]["tflops"] == 0
        assert phases["whole iteration"]["tflops"] == pytest.approx(
            phases["rollout"]["tflops"] + phases["decode"]["tflops"] + phases["update"]["tflops"], rel=1e-12
        )
        assert phases["whole iteration"]["peak_gib"] > 0


def test_guardrl_rollout_does_exactly_the_bare_rollouts_model_flops(gpu_bench_small):
    """guardrl's rollout runs no forward the bare loop does not: the same matmul/attention FLOPs, counted
    exactly (SD3: CFG batched into one forward, as the recipe's guidance 4.5 needs; Flux: guidance
    embedded)."""
    _, bare, iteration = gpu_bench_small
    reference = {("sd35m", "rollout + CFG"), ("flux", "rollout")}
    bare_flops = {r["model"]: r["tflops"] for r in bare if (r["model"], r["phase"]) in reference}
    rollout_flops = {r["model"]: r["tflops"] for r in iteration if r["phase"] == "rollout"}
    assert rollout_flops == bare_flops
    for row in iteration:
        if row["phase"] == "rollout":
            assert row["vs bare"].startswith("x") and row["vs bare"].endswith(" time")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--models", "sdxl"],
            "--models: unknown ['sdxl']; allowed: sd35m, sd35l, flux, qwen_image, flux2_klein_4b, "
            "flux2_klein_9b, z_image_turbo, flux_kontext",
        ),
        (["--sections", "warmup"], "--sections: unknown ['warmup']; allowed: bare, iteration, savers"),
        (
            ["--small", "--resolution", "64", "--batch", "6", "--group-size", "4"],
            "--batch=6 must be a multiple of --group-size=4 and of --minibatch=4",
        ),
        (["--small", "--resolution", "64", "--iterations", "0"], "--iterations=0: must be >= 1"),
        (
            ["--savers", "fp8"],
            "--savers: unknown ['fp8']; allowed: recipe, checkpointing, bf16_trajectories, chunks, "
            "offload_vae, adamw8bit, compile",
        ),
    ],
)
def test_gpu_bench_refuses_bad_options(gpu_bench_small, argv, message):
    gpu_bench = gpu_bench_small[0]
    with pytest.raises(SystemExit) as raised:
        gpu_bench.main(argv)
    assert str(raised.value) == message


def test_the_documented_dry_run_command_trains(tmp_path, monkeypatch):
    """docs/performance.md's dry run (a recipe on the small random-weight backbone, on a CPU), verbatim."""
    import re
    import shlex

    from guardrl.cli import main

    root = os.path.dirname(BENCH)
    with open(os.path.join(root, "docs", "performance.md")) as f:
        section = f.read().split("## A dry run at the real shapes")[1]
    command = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:2] == ["guardrl", "fit"]
    monkeypatch.chdir(root)  # the command's paths are relative to the repository
    cli = main(
        argv[2:]
        + [
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    module = cli.model
    assert type(module.backbone) is RandomSD35MediumBackbone and module.backbone.small
    assert [reward.name for reward in module.rewards] == ["jpeg"]
    assert module.num_iterations == 2 and module.sampling.num_inference_steps == 10  # the recipe's sampler
    assert module.hparams["lora"]["rank"] == 32 and module.hparams["grpo"]["ratio_variant"] == "grpo_guard"
    assert module.num_skipped_updates == 0  # both updates ran with finite losses and gradients


def test_gpu_bench_savers_table_runs_each_switch_alone(gpu_bench_small):
    """--sections savers: one fit per memory saver / switch on top of the recipe. Only gradient checkpointing
    changes the model FLOPs (it recomputes each block's forward in the backward pass); the others store, move,
    chunk or compile the same computation."""
    gpu_bench = gpu_bench_small[0]
    # compile is left out here (tracing takes most of a minute on this CPU; tests/test_perf.py covers it).
    rows = gpu_bench.main(
        [
            "--small",
            *SMALL_RUN,
            "--models",
            "sd35m",
            "--sections",
            "savers",
            "--savers",
            "recipe,checkpointing,bf16_trajectories,chunks,offload_vae,adamw8bit",
        ]
    )["savers"]
    assert [r["saver"] for r in rows] == [
        "recipe as shipped",
        "gradient_checkpointing",
        "trajectory_dtype bfloat16",
        "rollout_chunks 2",
        "offload_vae",
        "8-bit AdamW (bitsandbytes)",
    ]
    by_name = {r["saver"]: r for r in rows}
    assert by_name["8-bit AdamW (bitsandbytes)"] == {
        "model": "sd35m",
        "saver": "8-bit AdamW (bitsandbytes)",
        "skipped": "needs CUDA",
    }
    ran = {name: r["phases"] for name, r in by_name.items() if "phases" in r}
    assert len(ran) == 5  # every other switch trained
    recipe = ran["recipe as shipped"]
    for name, phases in ran.items():
        assert phases["rollout"]["tflops"] == recipe["rollout"]["tflops"], name
        assert phases["decode"]["tflops"] == recipe["decode"]["tflops"], name
        if name == "gradient_checkpointing":
            assert phases["update"]["tflops"] > recipe["update"]["tflops"]
        else:
            assert phases["update"]["tflops"] == recipe["update"]["tflops"], name
