"""Throughput, memory and model FLOP utilisation at the real shapes of every model guardrl trains
(SD3.5-Medium and -Large, FLUX.1-dev, Qwen-Image, FLUX.2 [klein] 4B / 9B, Z-Image-Turbo, FLUX.1-Kontext-dev),
random weights (issues 4 and 19; docs/benchmarks.md), against this device's measured matmul ceiling.

    python bench/gpu_bench.py               # a GPU: full shapes at 512 px, bf16
    python bench/gpu_bench.py --small       # any machine: the same code on shrunken shapes (CPU: float32)
    python bench/gpu_bench.py --count-only  # any machine: full-shape parameters and FLOPs per image,
                                            # built on the meta device (no memory, no compute)
    python bench/gpu_bench.py --models qwen_image,flux2_klein_4b,flux2_klein_9b,z_image_turbo,flux_kontext

No download: the transformers and VAEs are built from their published configs with random weights
(`guardrl.policy.random_weights` and the Random*Backbone of each model's module; only the shapes matter for
speed). Text encoders are not run: the prompt embeddings are random tensors of the real shapes (SD3: 77 CLIP +
256 T5 tokens of width 4096 and a 2048-wide pooled vector; Flux and Kontext: 512 T5 tokens, 768 pooled;
Qwen-Image: 512 tokens of width 3584, the benchmark's prompts being long enough to fill max_sequence_length;
klein: 512 tokens of 7680 / 12288; Z-Image: 512 caption tokens of 2560), as a run with a warm prompt cache
sees them. FLUX.1-Kontext edits: every prompt comes with a random conditioning image of the configured size
(`condition_image_size` = `--resolution`, as its recipe has it), encoded by the VAE, whose tokens double the
transformer's image sequence. Per model:

1. The bare transformer, the upper bound of what any trainer can reach:
   - rollout: `--steps` forwards of `--batch` images (SD3 with and without CFG, which doubles the batch in one
     forward; Flux-dev has guidance as an embedding, one forward), images/s and MFU;
   - update: one forward + backward + AdamW step on `--minibatch` images at one timestep, seconds and MFU;
   both with the recipe's LoRA adapters (a LoRA policy's rollouts run them too; `RECIPES`: SD3.5-M rank 32,
   Flux rank 64, attention projections of both streams; the newer models' Flow-Factory recipes rank 64) and
   under bf16 autocast with float32 adapters, as guardrl runs them. The newer models' transformers are called
   through their backbone's own forward (`velocity`: ids, masks, the Kontext image tokens, as guardrl's
   rollout calls them); models with true CFG (SD3.5, Qwen-Image, Z-Image) get a row with it too.
2. A real GRPO iteration through guardrl (`guardrl fit` in this process, `--iterations` timed after the first,
   which counts FLOPs): the model's recipe (`RECIPES`: sampler, CFG, LoRA rank and targets, the SDE steps it
   trains, gradient checkpointing where it has it) on the random-weight backbone, with `--batch` images per
   iteration in groups of `--group-size`, `--steps` sampler steps, minibatches of `--minibatch`, one optimizer
   step per iteration, and the JPEG-compressibility reward (no weights; PickScore's 0.4B-parameter CLIP would
   add its own time). Per phase (rollout, decode, reward, update, the whole iteration): seconds, TFLOP and
   MFU from the run's own logged time/* and flops/* metrics; the rollout's time against the bare rollout of
   the same images (guardrl's overhead), and the MFU the run itself logs (throughput/iteration/mfu).
3. Memory savers and switches (`--sections savers`, not by default): the GRPO iteration of 2 once per switch
   of docs/performance.md (`--savers`: recipe, checkpointing, bf16_trajectories, chunks, offload_vae,
   adamw8bit, compile), with its times, update FLOPs and peak memory against the recipe's.

The matmul ceiling is the FLOP/s of a large square matmul in the compute dtype (what MFU is measured against).
FLOPs are counted exactly by guardrl.perf.FlopCounter (matmuls and attention, forward and backward), the same
count the training logs use. Times are medians (bare: `--repeats` after a warm-up). Peak memory is CUDA's
max_memory_allocated (the CPU: the process's peak RSS). A model or section that runs out of device memory
prints "out of memory" and the script goes on (rerun it with a smaller --minibatch or
--gradient-checkpointing).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import inspect
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

import lightning as L
import torch
import yaml

from guardrl.perf import FlopCounter
from guardrl.policy import LoraSpec
from guardrl.policy import RandomFluxDevBackbone, RandomSD35LargeBackbone, RandomSD35MediumBackbone
from guardrl.policy.flux2 import RandomFlux2Klein4BBackbone, RandomFlux2Klein9BBackbone
from guardrl.policy.kontext import RandomFluxKontextBackbone
from guardrl.policy.qwen_image import RandomQwenImageBackbone
from guardrl.policy.random_weights import build_transformer, transformer_config
from guardrl.policy.z_image import RandomZImageTurboBackbone

VAE_FACTOR, LATENT_CHANNELS = 8, 16
SMALL_MAX_SEQUENCE_LENGTH = 16  # --small
BACKBONES = {
    "sd35m": RandomSD35MediumBackbone,
    "sd35l": RandomSD35LargeBackbone,
    "flux": RandomFluxDevBackbone,
    "qwen_image": RandomQwenImageBackbone,
    "flux2_klein_4b": RandomFlux2Klein4BBackbone,
    "flux2_klein_9b": RandomFlux2Klein9BBackbone,
    "z_image_turbo": RandomZImageTurboBackbone,
    "flux_kontext": RandomFluxKontextBackbone,
}
# The models whose bare transformer this script calls itself (`inputs`); the others through their backbone.
DIRECT = ("sd35m", "sd35l", "flux")
RECIPES = {
    "sd35m": "configs/sd35m/grpo_guard_pickscore.yaml",
    "sd35l": "configs/sd35l/grpo_guard_pickscore.yaml",
    "flux": "configs/flux/grpo_guard_pickscore.yaml",
    "qwen_image": "configs/qwen_image/grpo_clip_pickscore.yaml",
    # the klein recipe is klein-base-9B's (true CFG 4.0); the random-weight klein backbones are the
    # step-distilled ones (no CFG), so the iteration runs one forward per step
    "flux2_klein_4b": "configs/flux2_klein/grpo_pickscore.yaml",
    "flux2_klein_9b": "configs/flux2_klein/grpo_pickscore.yaml",
    "z_image_turbo": "configs/z_image/flow_grpo_pickscore_turbo.yaml",
    "flux_kontext": "configs/flux_kontext/flow_grpo_pickscore.yaml",
}
# The sizes the model cards publish, in billions, and the decimals they round to; compared with the
# transformer's weights as released (its state dict: SD3's position table is a buffer in diffusers, in the
# weights file all the same). The same figures the tests check (tests/test_random_weights.py,
# test_qwen_image.py, test_flux2_klein.py, test_z_image.py).
PUBLISHED_BILLIONS = {
    "sd35m": (2.5, 1, "Stability AI, SD3.5 Medium: 2.5 billion parameters"),
    "sd35l": (8.1, 1, "stabilityai/stable-diffusion-3.5-large: an 8.1 billion parameter MMDiT"),
    "flux": (12, 0, "black-forest-labs/FLUX.1-dev: a 12 billion parameter rectified flow transformer"),
    "qwen_image": (20, 0, "QwenLM/Qwen-Image: a 20B MMDiT image foundation model"),
    "flux2_klein_4b": (4, 0, "black-forest-labs/FLUX.2-klein-4B: 4B"),
    "flux2_klein_9b": (9, 0, "black-forest-labs/FLUX.2-klein-9B: 9B"),
    "z_image_turbo": (6.15, 2, "Z-Image technical report (arXiv 2511.22699): 6.15B parameters"),
    "flux_kontext": (
        12,
        0,
        "black-forest-labs/FLUX.1-Kontext-dev: a 12 billion parameter rectified flow transformer",
    ),
}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def max_sequence_length(kind: str, small: bool) -> int:
    """Text tokens per prompt: the model's own (SD3.5 256 T5 tokens, the others 512), or 16 for --small."""
    if small:
        return SMALL_MAX_SEQUENCE_LENGTH
    cls = BACKBONES[kind]
    default = getattr(cls, "default_max_sequence_length", None)
    return default or inspect.signature(cls.__init__).parameters["max_sequence_length"].default


def text_tokens(kind: str, small: bool) -> int:
    """Prompt-embedding tokens of one prompt: SD3 puts 77 CLIP tokens before the T5 ones; the others have
    their one text encoder's (Qwen-Image: the benchmark's prompts fill max_sequence_length)."""
    return getattr(BACKBONES[kind], "clip_tokens", 0) + max_sequence_length(kind, small)


def bench_prompt(index: int, kind: str, small: bool) -> str:
    """A prompt with enough words to fill max_sequence_length where the text length follows the prompt
    (RandomQwenImageBackbone: one token per word plus the chat template's 5), so every model's text is at its
    cap (the others pad to it or are random at it anyway)."""
    return f"benchmark prompt {index} " + " ".join(["word"] * max_sequence_length(kind, small))


def condition_images(count: int, resolution: int, seed: int = 0) -> list[torch.Tensor]:
    """Random conditioning images (3, resolution, resolution) in [0, 1], for an editing model."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, resolution, resolution, generator=generator) for _ in range(count)]


def backbone_init_args(kind: str, small: bool, dtype: torch.dtype, resolution: int) -> dict:
    """The Random*Backbone's init_args: dtype, size, text length, small; an editing model's conditioning
    images are resized to the resolution (configs/flux_kontext: condition_image_size 384 at 384 px)."""
    args = {
        "torch_dtype": str(dtype).replace("torch.", ""),
        "resolution": resolution,
        "max_sequence_length": max_sequence_length(kind, small),
        "small": small,
    }
    if BACKBONES[kind].takes_condition_image:
        args["condition_image_size"] = resolution
    return args


def recipe_guidance(kind: str) -> float:
    with open(os.path.join(REPO_ROOT, RECIPES[kind])) as f:
        return float(yaml.safe_load(f)["model"]["sampling"].get("guidance_scale", 1.0))


def load_backbone(kind: str, small: bool, device: torch.device, dtype: torch.dtype, resolution: int):
    """The random-weight backbone, loaded on `device` in `dtype` (on the meta device: no memory)."""
    backbone = BACKBONES[kind](**backbone_init_args(kind, small, dtype, resolution))
    with device:
        backbone.load()
    backbone.transformer.requires_grad_(False)
    return backbone


def backbone_velocity(backbone, kind: str, batch: int, cfg: bool, small: bool, resolution: int):
    """A no-argument function that runs the backbone's transformer on `batch` images (with true CFG: 2 x
    `batch` in one forward) as guardrl's rollout calls it, at sigma 0.5 with the recipe's guidance."""
    device = backbone.transformer.device
    prompts = [bench_prompt(i, kind, small) for i in range(batch)]
    images = condition_images(batch, resolution) if backbone.takes_condition_image else None
    cond = backbone.encode_prompts(prompts, with_negative=cfg, images=images)
    if device.type == "meta":
        # text masks must be read (Qwen-Image: any padding? Z-Image: each caption's tokens); the bench's
        # are all ones, so they are exact on the CPU
        for side in (cond.tensors, cond.negative or {}):
            for name, t in side.items():
                if "mask" in name:
                    side[name] = torch.ones(t.shape, dtype=t.dtype)
    x = backbone.initial_noise(batch, torch.Generator().manual_seed(0), device)
    # without CFG, a true-CFG model's forward ignores the scale; an embedded guidance (Flux, Kontext) takes it
    guidance = recipe_guidance(kind) if cfg or not backbone.uses_true_cfg else 1.0
    return lambda transformer: backbone.velocity(x, 0.5, cond, guidance, transformer)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (kernels, allocator, autotuning)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = _median_seconds(lambda: torch.mm(a, b), device, repeats)
    return 2 * size**3 / seconds


def build(kind: str, small: bool, device: torch.device, dtype: torch.dtype):
    """The random-weight transformer, built on `device` in `dtype` (guardrl.policy.random_weights)."""
    with device:
        transformer = build_transformer(kind, small, dtype).eval()
    transformer.requires_grad_(False)
    return transformer, transformer_config(kind, small)


def inputs(kind: str, config: dict, batch: int, resolution: int, device, dtype, tokens: int):
    """Random latents, prompt embeddings and (Flux) position ids of the real shapes; returns forward
    kwargs."""
    latent = resolution // VAE_FACTOR
    width, pooled = config["joint_attention_dim"], config["pooled_projection_dim"]
    text = torch.randn(batch, tokens, width, device=device, dtype=dtype)
    pooled_embeds = torch.randn(batch, pooled, device=device, dtype=dtype)
    t = torch.full((batch,), 500.0, device=device, dtype=dtype)
    if kind.startswith("sd35"):
        x = torch.randn(batch, LATENT_CHANNELS, latent, latent, device=device, dtype=dtype)
        return dict(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=text,
            pooled_projections=pooled_embeds,
            return_dict=False,
        )
    side = latent // 2  # Flux packs 2 x 2 latent patches: (B, side^2, 64)
    x = torch.randn(batch, side * side, config["in_channels"], device=device, dtype=dtype)
    img_ids = torch.zeros(side, side, 3, device=device, dtype=dtype)
    img_ids[..., 1] = torch.arange(side, device=device)[:, None]
    img_ids[..., 2] = torch.arange(side, device=device)[None, :]
    return dict(
        hidden_states=x,
        timestep=t / 1000.0,
        encoder_hidden_states=text,
        pooled_projections=pooled_embeds,
        txt_ids=torch.zeros(tokens, 3, device=device, dtype=dtype),
        img_ids=img_ids.reshape(-1, 3),
        guidance=torch.full((batch,), 3.5, device=device, dtype=dtype),
        return_dict=False,
    )


def flops_of(fn) -> int:
    with FlopCounter() as counter:
        fn()
    return counter.total


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def recipe_lora(kind: str) -> LoraSpec:
    """The LoRA settings (rank, alpha, target modules) of the model's GRPO-Guard recipe."""
    with open(os.path.join(REPO_ROOT, RECIPES[kind])) as f:
        return LoraSpec(**yaml.safe_load(f)["model"]["lora"])


def bench_model(kind: str, args, device: torch.device, dtype: torch.dtype, ceiling: float) -> list[dict]:
    """The bare transformer with the recipe's LoRA adapters (rollouts of a LoRA policy run them too), under
    the autocast a bf16-mixed run uses: rollouts (no grad) and one update step."""
    if kind in DIRECT:
        transformer, config = build(kind, args.small, device, dtype)
        true_cfg = kind.startswith("sd35")
    else:
        backbone = load_backbone(kind, args.small, device, dtype, args.resolution)
        transformer = backbone.transformer
        true_cfg = backbone.uses_true_cfg
    recipe_cfg = true_cfg and recipe_guidance(kind) > 1.0  # the recipe's rollout runs CFG

    def forward(batch: int, cfg: bool):
        if kind in DIRECT:
            kwargs = inputs(kind, config, batch * (2 if cfg else 1), args.resolution, device, dtype, tokens)
            return lambda: transformer(**kwargs)[0]
        run = backbone_velocity(backbone, kind, batch, cfg, args.small, args.resolution)
        return lambda: run(transformer)

    lora = recipe_lora(kind)
    # Adapters in float32 as guardrl keeps them; AdamW over the adapters only.
    transformer.add_adapter(lora.to_peft_config())
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens = text_tokens(kind, args.small)
    rows = []
    # a recipe with CFG: the rollout without it too (the cost CFG adds); Z-Image-Turbo's runs none
    cfg_modes = (False, True) if recipe_cfg else (False,)
    for cfg in cfg_modes:
        step = forward(args.batch, cfg)

        @torch.no_grad()
        def rollout():
            with autocast:
                for _ in range(args.steps):
                    step()

        seconds = _median_seconds(rollout, device, args.repeats)
        flops = flops_of(rollout)
        rows.append(
            {
                "model": kind,
                "phase": "rollout" + (" + CFG" if cfg else ""),
                "cfg": cfg,
                "as_recipe": cfg == recipe_cfg,
                "batch": args.batch,
                "seconds": seconds,
                "images_per_s": args.batch / seconds,
                "tflops": flops / 1e12,
                "mfu": flops / seconds / ceiling,
            }
        )
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    step = forward(args.minibatch, False)

    def update():
        with autocast:
            out = step()
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = _median_seconds(update, device, args.repeats)
    flops = flops_of(update)
    rows.append(
        {
            "model": kind,
            "phase": f"update, one step (LoRA r{lora.rank})",
            "batch": args.minibatch,
            "seconds": seconds,
            "images_per_s": args.minibatch / seconds,
            "tflops": flops / 1e12,
            "mfu": flops / seconds / ceiling,
            "peak_gib": peak_memory_gib(device),
        }
    )
    return rows  # the model is freed with this frame; _guarded empties the CUDA cache before the next


def count_only(models: list[str], resolution: int) -> list[dict]:
    """Full shapes on the meta device: parameter counts (against the published sizes) and the exact forward
    FLOPs of one image (no CFG). Prints a table; returns its rows."""
    meta = torch.device("meta")
    print(f"full shapes on the meta device, {resolution} px, 1 image")
    print(
        "| model | transformer parameters | weights (state dict) | published | forward TFLOP per image | "
        "image tokens | text tokens |"
    )
    print("|---|---|---|---|---|---|---|")
    rows = []
    for kind in models:
        image_tokens = (resolution // VAE_FACTOR // 2) ** 2
        tokens = text_tokens(kind, small=False)
        if kind in DIRECT:
            with meta:
                transformer, config = build(kind, False, meta, torch.bfloat16)
            kwargs = inputs(kind, config, 1, resolution, meta, torch.bfloat16, tokens)
            run = lambda: transformer(**kwargs)  # noqa: E731
        else:
            backbone = load_backbone(kind, False, meta, torch.bfloat16, resolution)
            transformer = backbone.transformer
            step = backbone_velocity(backbone, kind, 1, False, False, resolution)
            run = lambda: step(transformer)  # noqa: E731
        with torch.no_grad():
            flops = flops_of(run)
        parameters = sum(p.numel() for p in transformer.parameters())
        weights = sum(t.numel() for t in transformer.state_dict().values())
        billions, decimals, source = PUBLISHED_BILLIONS[kind]
        matches = round(weights / 1e9, decimals) == billions
        # an editing model's sequence holds its conditioning image's tokens after the noisy ones
        editing = BACKBONES[kind].takes_condition_image
        shown_tokens = f"{image_tokens} + {image_tokens}" if editing else image_tokens
        print(
            f"| {kind} | {parameters / 1e9:.3f} B | {weights:,} | {billions:g} B "
            f"({'matches' if matches else 'DIFFERS'}) | {flops / 1e12:.3f} | {shown_tokens} | {tokens} |"
        )
        rows.append(
            {
                "model": kind,
                "parameters": parameters,
                "weights": weights,
                "published_billions": billions,
                "matches_published": matches,
                "published_source": source,
                "forward_flops": flops,
                "image_tokens": image_tokens * (2 if editing else 1),
                "text_tokens": tokens,
            }
        )
    return rows


class _IterationMetrics(L.Callback):
    """Collects the time/, flops/ and throughput/ metrics each GRPO iteration writes
    (guardrl.perf.PhaseMeter)."""

    def __init__(self):
        self.iterations: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, *args):
        self.iterations.append(
            {
                name: float(value)
                for name, value in trainer.callback_metrics.items()
                if name.startswith(("time/", "flops/", "throughput/"))
            }
        )


def grpo_iteration(
    kind: str,
    args,
    device: torch.device,
    dtype: torch.dtype,
    ceiling: float,
    extra: dict | None = None,
    warmup: int = 1,
) -> list[dict]:
    """`guardrl fit` of the model's GRPO-Guard recipe on the random-weight backbone, in this process; one row
    per phase with the medians of `args.iterations` iterations after `warmup` ones (the first counts FLOPs and
    warms up). `extra`: more command-line options, applied last."""
    from guardrl.cli import main as guardrl_main

    tmp = tempfile.mkdtemp(prefix="guardrl-gpu-bench-")
    prompts = [bench_prompt(i, kind, args.small) for i in range(256)]
    cls = BACKBONES[kind]
    if cls.takes_condition_image:
        # an editing recipe reads a .jsonl of prompts and image paths (data.image_field: image); 16 random
        # images of the configured size, cycled
        from PIL import Image

        os.makedirs(os.path.join(tmp, "images"))
        for i, image in enumerate(condition_images(16, args.resolution)):
            pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels).save(os.path.join(tmp, "images", f"{i}.png"))
        prompt_file = os.path.join(tmp, "prompts.jsonl")
        lines = [json.dumps({"prompt": p, "image": f"images/{i % 16}.png"}) for i, p in enumerate(prompts)]
    else:
        prompt_file = os.path.join(tmp, "prompts.txt")
        lines = prompts
    with open(prompt_file, "w") as f:
        f.write("\n".join(lines) + "\n")
    backbone = {
        "class_path": f"{cls.__module__}.{cls.__name__}",
        "init_args": backbone_init_args(kind, args.small, dtype, args.resolution),
    }
    overrides = {
        "--model.backbone": json.dumps(backbone),
        # The recipe's reward is PickScore; its name would carry over to a class_path given alone.
        "--model.rewards": json.dumps(
            [
                {
                    "class_path": "guardrl.rewards.JpegCompressibility",
                    "init_args": {"name": "jpeg_compressibility"},
                }
            ]
        ),
        # one reward here: GDPO (the Qwen-Image recipe's) needs several, guardrl refuses it with one
        "--model.grpo.reward_aggregation": "weighted_sum",
        "--model.sampling.num_inference_steps": args.steps,
        "--model.grpo.minibatch_size": args.minibatch,
        "--model.grpo.gradient_accumulation_steps": args.batch // args.minibatch,  # one optimizer step
        "--model.max_iterations": args.iterations + warmup,
        "--model.performance.peak_flops": ceiling,
        "--model.performance.throughput_window": max(2, args.iterations),
        "--data.train_prompts": prompt_file,
        "--data.group_size": args.group_size,
        "--data.prompts_per_batch": args.batch // args.group_size,
        "--trainer.accelerator": "gpu" if device.type == "cuda" else "cpu",
        "--trainer.devices": 1,
        "--trainer.num_nodes": 1,
        "--trainer.strategy": "auto",
        "--trainer.precision": "bf16-mixed" if dtype == torch.bfloat16 else "32-true",
        "--trainer.logger": "false",
        "--trainer.enable_checkpointing": "false",
        "--trainer.default_root_dir": tmp,
        "--trainer.enable_progress_bar": "false",
        "--trainer.enable_model_summary": "false",
    }
    if args.gradient_checkpointing:  # else the recipe's (Qwen-Image's checkpoints)
        overrides["--model.performance.gradient_checkpointing"] = "true"
    overrides.update(extra or {})
    argv = ["--config", os.path.join(REPO_ROOT, RECIPES[kind])]
    for option, value in overrides.items():
        argv += [option, str(value)]
    metrics = _IterationMetrics()
    try:
        cli = guardrl_main(argv, run=False)
        cli.trainer.callbacks.append(metrics)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        cli.trainer.fit(cli.model, cli.datamodule)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the prompt file and the config Lightning saves (no logs)
    peak = peak_memory_gib(device)
    measured = metrics.iterations[warmup:]
    lora = cli.model.hparams.get("lora") or {}
    sampling = cli.model.sampling
    if cli.model.grpo.num_train_timesteps is not None:
        trained_steps = cli.model.grpo.num_train_timesteps
    elif sampling.sde_window_strategy != "fixed":  # a moving window: its steps are this iteration's SDE steps
        trained_steps = sampling.sde_window_size
    else:
        trained_steps = len(cli.model.noise_scales.nonzero())
    # grpo.track_kl (the default) adds a no-grad reference forward (adapters off) per trained step: train/kl.
    kl = " + KL reference forwards" if cli.model.grpo.needs_reference else ""
    names = {
        "update": f"update (LoRA r{lora.get('rank', '-')}, {args.batch // args.minibatch} minibatches x "
        f"{trained_steps} steps{kl})",
        "iteration": "whole iteration",
    }
    rows = []
    for phase in ("rollout", "decode", "reward", "update", "iteration"):
        seconds = statistics.median(m[f"time/{phase}_s"] for m in measured)
        flops = measured[-1]["flops/model" if phase == "iteration" else f"flops/{phase}"]
        row = {
            "model": kind,
            "phase": names.get(phase, phase),
            "batch": args.batch,
            "seconds": seconds,
            "images_per_s": args.batch / seconds,
            "tflops": flops / 1e12,
            "mfu": flops / seconds / ceiling if flops else None,
        }
        rows.append(row)
    rows[-1]["peak_gib"] = peak
    rows[-1]["logged_mfu"] = measured[-1].get("throughput/iteration/mfu")
    del cli
    return rows


def savers(device: torch.device) -> dict[str, tuple[str, dict | str]]:
    """The memory savers and speed switches of docs/performance.md, one at a time on top of the recipe: key ->
    (label, extra command-line options, or a string saying why the entry cannot run here)."""
    compile_backend = "inductor" if device.type == "cuda" else "eager"  # CPU: no compiler needed, same graphs
    eight_bit = {
        "--model.optimizer": json.dumps(
            {"class_path": "bitsandbytes.optim.AdamW8bit", "init_args": {"lr": 1e-4, "weight_decay": 1e-4}}
        )
    }
    if device.type != "cuda":
        eight_bit = "needs CUDA"
    elif importlib.util.find_spec("bitsandbytes") is None:
        eight_bit = "needs bitsandbytes (pip install 'guardrl[bnb]')"
    return {
        "recipe": ("recipe as shipped", {}),
        "checkpointing": ("gradient_checkpointing", {"--model.performance.gradient_checkpointing": "true"}),
        "bf16_trajectories": (
            "trajectory_dtype bfloat16",
            {"--model.performance.trajectory_dtype": "bfloat16"},
        ),
        "chunks": ("rollout_chunks 2", {"--model.performance.rollout_chunks": 2}),
        "offload_vae": ("offload_vae", {"--model.backbone.init_args.offload_vae": "true"}),
        "adamw8bit": ("8-bit AdamW (bitsandbytes)", eight_bit),
        "compile": (
            f"compile ({compile_backend})",
            {"--model.performance.compile": "true", "--model.performance.compile_backend": compile_backend},
        ),
    }


def savers_table(kind: str, args, device: torch.device, dtype: torch.dtype, ceiling: float) -> list[dict]:
    """One GRPO-iteration fit per saver in args.savers; a saver that fails prints its error and the rest go
    on."""
    rows = []
    available = savers(device)
    for key in args.savers:
        name, extra = available[key]
        if isinstance(extra, str):
            rows.append({"model": kind, "saver": name, "skipped": extra})
            continue
        # torch.compile compiles in the second iteration (the first counts FLOPs eagerly): one more warm-up.
        warmup = 2 if key == "compile" else 1
        try:
            phases = {
                r["phase"].split(" (")[0]: r
                for r in grpo_iteration(kind, args, device, dtype, ceiling, extra, warmup)
            }
        except torch.OutOfMemoryError as e:
            rows.append(
                {"model": kind, "saver": name, "skipped": f"out of memory ({str(e).splitlines()[0]})"}
            )
            continue
        except Exception as e:  # one broken switch must not lose the other rows of a one-shot GPU run
            rows.append({"model": kind, "saver": name, "skipped": f"failed: {type(e).__name__}: {e}"[:300]})
            continue
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append({"model": kind, "saver": name, "phases": phases})
    return rows


def _print_savers(rows: list[dict], device: torch.device) -> None:
    base = {r["model"]: r for r in rows if r["saver"] == "recipe as shipped" and "phases" in r}
    print("| model | saver | iteration s | rollout s | update s | update TFLOP | peak GiB | peak vs recipe |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['model']} | {r['saver']} | {r['skipped']} | | | | | |")
            continue
        p = r["phases"]
        peak = p["whole iteration"]["peak_gib"]
        reference = base.get(r["model"])
        ratio = (
            f"x{peak / reference['phases']['whole iteration']['peak_gib']:.2f}"
            if reference and device.type == "cuda"
            else ""
        )
        shown = f"{peak:.2f}" if device.type == "cuda" else "(CPU: RSS only grows)"
        print(
            f"| {r['model']} | {r['saver']} | {p['whole iteration']['seconds']:.4f} | "
            f"{p['rollout']['seconds']:.4f} | "
            f"{p['update']['seconds']:.4f} | {p['update']['tflops']:.4g} | {shown} | {ratio} |"
        )


def _print_rows(rows: list[dict], extra: str = "") -> None:
    print(
        "| model | phase | images | seconds | images/s | TFLOP | MFU | peak GiB |"
        + (f" {extra} |" if extra else "")
    )
    print("|---|---|---|---|---|---|---|---|" + ("---|" if extra else ""))
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else ""
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
        line = (
            f"| {r['model']} | {r['phase']} | {r['batch']} | {r['seconds']:.4f} | {r['images_per_s']:.2f} | "
            f"{r['tflops']:.4g} | {mfu} | {peak} |"
        )
        print(line + (f" {r.get(extra, '')} |" if extra else ""))


def _guarded(section: str, kind: str, fn):
    """Run one section; out of device memory prints a line and the script goes on with the next."""
    try:
        return fn()
    except torch.OutOfMemoryError as e:
        print(f"{kind} {section}: out of memory ({str(e).splitlines()[0]})", file=sys.stderr)
        return []
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv=None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd35m,flux", help=f"comma-separated, of: {', '.join(BACKBONES)}")
    parser.add_argument(
        "--sections",
        default="bare,iteration",
        help="comma-separated: bare, iteration, savers (one fit per memory saver; not by default)",
    )
    parser.add_argument("--small", action="store_true", help="shrunken shapes (automatic without CUDA)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="rollout images (before CFG doubling)")
    parser.add_argument("--group-size", type=int, default=4, help="GRPO iteration: images per prompt")
    parser.add_argument("--minibatch", type=int, default=4, help="images per LoRA update step")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps per rollout")
    parser.add_argument("--iterations", type=int, default=3, help="GRPO iterations timed after the first")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="GRPO iteration: checkpoint blocks"
    )
    parser.add_argument(
        "--savers",
        default=",".join(savers(torch.device("cpu"))),
        help="savers section: comma-separated keys of the switches to run (default: all)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument(
        "--count-only", action="store_true", help="full-shape parameters and FLOPs, meta device"
    )
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(BACKBONES))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; allowed: {', '.join(BACKBONES)}")
    sections = [m.strip() for m in args.sections.split(",") if m.strip()]
    unknown = sorted(set(sections) - {"bare", "iteration", "savers"})
    if unknown or not sections:
        raise SystemExit(f"--sections: unknown {unknown or sections}; allowed: bare, iteration, savers")
    args.savers = [m.strip() for m in args.savers.split(",") if m.strip()]
    unknown = [key for key in args.savers if key not in savers(torch.device("cpu"))]
    if unknown:
        raise SystemExit(f"--savers: unknown {unknown}; allowed: {', '.join(savers(torch.device('cpu')))}")
    if args.count_only:
        return {"bare": [], "iteration": [], "savers": [], "count": count_only(models, args.resolution)}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.small:
        print("no CUDA device: running the small shapes (--small)", file=sys.stderr)
        args.small = True
    if args.small and args.resolution == 512 and device.type == "cpu":
        args.resolution, args.batch, args.group_size, args.minibatch, args.steps, args.matmul_size = (
            128,
            4,
            2,
            2,
            4,
            1024,
        )
    for option, value in (
        ("--batch", args.batch),
        ("--minibatch", args.minibatch),
        ("--group-size", args.group_size),
        ("--steps", args.steps),
        ("--iterations", args.iterations),
        ("--repeats", args.repeats),
    ):
        if value < 1:
            raise SystemExit(f"{option}={value}: must be >= 1")
    if args.batch % args.group_size or args.batch % args.minibatch:
        raise SystemExit(
            f"--batch={args.batch} must be a multiple of --group-size={args.group_size} and of "
            f"--minibatch={args.minibatch}"
        )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ceiling = matmul_ceiling(device, dtype, args.matmul_size, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device: {name}, {torch.get_num_threads()} threads, dtype {str(dtype).replace('torch.', '')}, "
        f"{'small' if args.small else 'full'} shapes, {args.resolution} px, {args.steps} steps; "
        f"torch {torch.__version__}"
    )
    print(f"matmul ceiling ({args.matmul_size}^3): {ceiling / 1e12:.3f} TFLOP/s")
    bare, iteration, saver_rows = [], [], []
    for kind in models:
        if "bare" in sections:
            bare += _guarded("bare", kind, lambda: bench_model(kind, args, device, dtype, ceiling))
        if "iteration" in sections:
            rows = _guarded(
                "GRPO iteration", kind, lambda: grpo_iteration(kind, args, device, dtype, ceiling)
            )
            # guardrl's rollout against the bare transformer's rollout of the same images (with CFG when the
            # recipe has it: SD3's guidance 4.5, Qwen-Image's 4; Flux's and Kontext's guidance is an
            # embedding, the distilled klein and Z-Image-Turbo run none: no extra forward).
            reference = [
                r for r in bare if r["model"] == kind and r["phase"].startswith("rollout") and r["as_recipe"]
            ]
            for r in rows:
                if r["phase"] == "rollout" and reference:
                    r["vs bare"] = f"x{r['seconds'] / reference[0]['seconds']:.3f} time"
                if r["phase"] == "whole iteration" and r.get("logged_mfu") is not None:
                    r["vs bare"] = f"logged MFU {100 * r['logged_mfu']:.1f}%"
            iteration += rows
        if "savers" in sections:
            saver_rows += savers_table(kind, args, device, dtype, ceiling)
    if bare:
        print(
            "\nbare transformer with the recipe's LoRA (rollout: no-grad forwards; update: forward + "
            "backward + AdamW at one timestep)"
        )
        _print_rows(bare)
    if iteration:
        print(
            "\nGRPO iteration through guardrl (the model's recipe, gpu_bench.RECIPES, "
            f"{args.batch} images in groups of {args.group_size}, minibatch {args.minibatch}, "
            f"medians of {args.iterations})"
        )
        _print_rows(iteration, extra="vs bare")
    if saver_rows:
        print(
            f"\nmemory savers and switches, one at a time on the recipe (GRPO iteration as above, medians of "
            f"{args.iterations})"
        )
        _print_savers(saver_rows, device)
    return {"bare": bare, "iteration": iteration, "savers": saver_rows}


if __name__ == "__main__":
    main()
