"""Rollout and update throughput of random-weight transformers with the real SD3.5-Medium and FLUX.1-dev shapes,
and their model FLOP utilisation against this device's measured matmul ceiling (issue 4; docs/benchmarks.md).

    python bench/gpu_bench.py                          # a GPU: full shapes at 512 px, bf16
    python bench/gpu_bench.py --small                  # any machine: the same code on shrunken shapes (CPU: float32)
    python bench/gpu_bench.py --count-only             # any machine: full-shape parameters and FLOPs per image,
                                                       # built on the meta device (no memory, no compute)

No download: the transformers are built from their published configs with random weights (only the shapes
matter for speed). Text encoders are not run: the prompt embeddings are random tensors of the real shapes
(SD3: 77 CLIP + 256 T5 tokens of width 4096 and a 2048-wide pooled vector; Flux: 512 T5 tokens, 768 pooled),
as a run with a warm prompt cache sees them. Per model the script prints:

- the matmul ceiling: FLOP/s of a large square matmul in the compute dtype (what MFU is measured against);
- rollout: `--steps` sampler steps of `--batch` images (SD3 with and without CFG, which doubles the batch in
  one forward; Flux-dev has guidance as an embedding, one forward), images/s and MFU;
- update: one LoRA (rank `--lora-rank`) forward + backward + AdamW step on `--minibatch` images at one
  timestep, seconds and MFU;
- peak device memory (CUDA) or peak RSS (CPU).

FLOPs are counted exactly by guardrl.perf.FlopCounter (matmuls and attention, forward and backward), the same
count the training logs use. Times are medians of `--repeats` after a warm-up.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch

from guardrl.perf import FlopCounter
from guardrl.policy import LoraSpec

# Published transformer configs (diffusers' config.json of each model's "transformer" folder).
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
FLUX_DEV = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# --small: the same architectures with few, narrow layers, so the script runs anywhere in seconds.
SMALL = {
    "sd35m": dict(num_layers=2, attention_head_dim=16, num_attention_heads=4, caption_projection_dim=64,
                  joint_attention_dim=64, pooled_projection_dim=32, dual_attention_layers=(0,)),
    "flux": dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=4,
                 joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
}
TEXT_TOKENS = {"sd35m": 77 + 256, "flux": 512}
VAE_FACTOR, LATENT_CHANNELS = 8, 16


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
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    config = dict(SD35_MEDIUM if kind == "sd35m" else FLUX_DEV)
    if small:
        config.update(SMALL[kind])
    cls = SD3Transformer2DModel if kind == "sd35m" else FluxTransformer2DModel
    torch.manual_seed(0)
    transformer = cls(**config).to(device=device, dtype=dtype).eval()
    transformer.requires_grad_(False)
    return transformer, config


def inputs(kind: str, config: dict, batch: int, resolution: int, device, dtype, text_tokens: int):
    """Random latents, prompt embeddings and (Flux) position ids of the real shapes; returns forward kwargs."""
    latent = resolution // VAE_FACTOR
    width, pooled = config["joint_attention_dim"], config["pooled_projection_dim"]
    text = torch.randn(batch, text_tokens, width, device=device, dtype=dtype)
    pooled_embeds = torch.randn(batch, pooled, device=device, dtype=dtype)
    t = torch.full((batch,), 500.0, device=device, dtype=dtype)
    if kind == "sd35m":
        x = torch.randn(batch, LATENT_CHANNELS, latent, latent, device=device, dtype=dtype)
        return dict(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled_embeds,
                    return_dict=False)
    side = latent // 2  # Flux packs 2 x 2 latent patches: (B, side^2, 64)
    x = torch.randn(batch, side * side, config["in_channels"], device=device, dtype=dtype)
    img_ids = torch.zeros(side, side, 3, device=device, dtype=dtype)
    img_ids[..., 1] = torch.arange(side, device=device)[:, None]
    img_ids[..., 2] = torch.arange(side, device=device)[None, :]
    return dict(hidden_states=x, timestep=t / 1000.0, encoder_hidden_states=text, pooled_projections=pooled_embeds,
                txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype), img_ids=img_ids.reshape(-1, 3),
                guidance=torch.full((batch,), 3.5, device=device, dtype=dtype), return_dict=False)


def flops_of(fn) -> int:
    with FlopCounter() as counter:
        fn()
    return counter.total


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def bench_model(kind: str, args, device: torch.device, dtype: torch.dtype, ceiling: float) -> list[dict]:
    transformer, config = build(kind, args.small, device, dtype)
    tokens = TEXT_TOKENS[kind] if not args.small else 16
    rows = []
    cfg_modes = (False, True) if kind == "sd35m" else (False,)
    for cfg in cfg_modes:
        forward_batch = args.batch * (2 if cfg else 1)
        kwargs = inputs(kind, config, forward_batch, args.resolution, device, dtype, tokens)

        @torch.no_grad()
        def rollout():
            for _ in range(args.steps):
                transformer(**kwargs)

        seconds = _median_seconds(rollout, device, args.repeats)
        flops = flops_of(rollout)
        rows.append({
            "model": kind, "phase": "rollout" + (" + CFG" if cfg else ""), "batch": args.batch,
            "seconds": seconds, "images_per_s": args.batch / seconds, "tflops": flops / 1e12,
            "mfu": flops / seconds / ceiling,
        })
    # The LoRA update: adapters in float32 as guardrl keeps them, AdamW over the adapters only.
    transformer.add_adapter(LoraSpec(rank=args.lora_rank, alpha=2 * args.lora_rank).to_peft_config())
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    kwargs = inputs(kind, config, args.minibatch, args.resolution, device, dtype, tokens)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def update():
        with autocast:
            out = transformer(**kwargs)[0]
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = _median_seconds(update, device, args.repeats)
    flops = flops_of(update)
    rows.append({
        "model": kind, "phase": f"LoRA r{args.lora_rank} update", "batch": args.minibatch, "seconds": seconds,
        "images_per_s": args.minibatch / seconds, "tflops": flops / 1e12, "mfu": flops / seconds / ceiling,
        "peak_gib": peak_memory_gib(device),
    })
    rows[0]["parameters_m"] = sum(p.numel() for p in transformer.parameters() if not p.requires_grad) / 1e6
    return rows  # the model is freed with this frame; main() empties the CUDA cache before the next


def count_only(models: list[str], resolution: int) -> None:
    """Full shapes on the meta device: parameter counts and the exact forward FLOPs of one image."""
    meta = torch.device("meta")
    print(f"full shapes on the meta device, {resolution} px, 1 image")
    print("| model | transformer parameters | forward TFLOP per image | image tokens | text tokens |")
    print("|---|---|---|---|---|")
    for kind in models:
        with meta:
            transformer, config = build(kind, False, meta, torch.bfloat16)
        kwargs = inputs(kind, config, 1, resolution, meta, torch.bfloat16, TEXT_TOKENS[kind])
        with torch.no_grad():
            flops = flops_of(lambda: transformer(**kwargs))
        image_tokens = (resolution // VAE_FACTOR // 2) ** 2
        parameters = sum(p.numel() for p in transformer.parameters())
        print(f"| {kind} | {parameters / 1e9:.3f} B | {flops / 1e12:.3f} | {image_tokens} | {TEXT_TOKENS[kind]} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd35m,flux", help="comma-separated: sd35m, flux")
    parser.add_argument("--small", action="store_true", help="shrunken shapes (automatic without CUDA)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="rollout images per forward (before CFG doubling)")
    parser.add_argument("--minibatch", type=int, default=4, help="images per LoRA update step")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps per rollout")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--count-only", action="store_true", help="full-shape parameters and FLOPs, meta device")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - {"sd35m", "flux"})
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; allowed: sd35m, flux")
    if args.count_only:
        count_only(models, args.resolution)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.small:
        print("no CUDA device: running the small shapes (--small)", file=sys.stderr)
        args.small = True
    if args.small and args.resolution == 512 and device.type == "cpu":
        args.resolution, args.batch, args.minibatch, args.steps, args.matmul_size = 128, 2, 2, 4, 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ceiling = matmul_ceiling(device, dtype, args.matmul_size, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}, {torch.get_num_threads()} threads, dtype {str(dtype).replace('torch.', '')}, "
          f"{'small' if args.small else 'full'} shapes, {args.resolution} px, {args.steps} steps; torch {torch.__version__}")
    print(f"matmul ceiling ({args.matmul_size}^3): {ceiling / 1e12:.3f} TFLOP/s")
    rows = []
    for kind in models:
        rows += bench_model(kind, args, device, dtype, ceiling)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("| model | phase | batch | seconds | images/s | TFLOP | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else ""
        print(f"| {r['model']} | {r['phase']} | {r['batch']} | {r['seconds']:.4f} | {r['images_per_s']:.2f} | "
              f"{r['tflops']:.3g} | {100 * r['mfu']:.1f}% | {peak} |")


if __name__ == "__main__":
    main()
