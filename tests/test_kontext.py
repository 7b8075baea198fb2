"""FLUX.1-Kontext (guardrl/policy/kontext.py): guardrl's ODE sampler reproduces diffusers' FluxKontextPipeline
for the same prompts, conditioning images and noise; the image's tensors (latents as the VAE encodes them,
their position ids) ride in the Conditioning; the real loading path; one GRPO iteration through `guardrl fit`
on a .jsonl of prompts and PNG images, and its exact resume; the shipped recipe parses."""

from __future__ import annotations

import glob
import json
import math
import os

import pytest
import torch
import yaml
from diffusers import FluxKontextPipeline
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO_ROOT, tiny_fit_args
from guardrl.cli import main
from guardrl.export import export_lora
from guardrl.policy import FlowPolicy, FluxBackbone, FluxKontextBackbone, LoraSpec, TinyFluxKontextBackbone
from guardrl.policy.kontext import RandomFluxKontextBackbone, make_tiny_flux_kontext_pipeline
from guardrl.sampling import sample_rollouts
from tests.published_recipes import MODELS

PROMPTS = ["a red circle", "a blue square on the left", "a red circle"]
STEPS = 3


def _tiny(**kwargs) -> TinyFluxKontextBackbone:
    backbone = TinyFluxKontextBackbone(**kwargs)
    backbone.load()
    return backbone


def _ode_images(backbone, noise, cond, guidance_scale, steps=STEPS, transformer=None):
    sigmas = backbone.sigmas(steps)
    with torch.no_grad():
        trajectory = sample_rollouts(
            lambda x, t, k: backbone.velocity(x, t, cond, guidance_scale, transformer),
            noise,
            sigmas,
            torch.zeros(steps),
        )  # eta = 0: Euler (ODE)
        return backbone.decode(trajectory.final_latents)


def _stock_images(backbone, prompts, images, noise, guidance_scale, steps=STEPS, pipe=None):
    pipe = backbone.stock_pipeline() if pipe is None else pipe
    with torch.no_grad():
        return pipe(
            image=torch.stack(images),
            prompt=prompts,
            latents=noise,
            height=backbone.height,
            width=backbone.width,
            num_inference_steps=steps,
            output_type="pt",
            **backbone.stock_call_kwargs(guidance_scale),
        ).images.float()


# ------------------------------------------------------------------------------------- the stock pipeline
@pytest.mark.parametrize("guidance_scale", [1.0, 3.5])
def test_the_ode_sampler_reproduces_flux_kontext_pipeline_non_square(guidance_scale):
    backbone = _tiny(height=128, width=96)
    images = backbone.example_condition_images(len(PROMPTS))  # prompts 0 and 2 agree, their images do not
    noise = backbone.initial_noise(len(PROMPTS), torch.Generator().manual_seed(1), torch.device("cpu"))
    cond = backbone.encode_prompts(PROMPTS, with_negative=False, images=images)
    ours = _ode_images(backbone, noise, cond, guidance_scale)
    stock = _stock_images(backbone, PROMPTS, images, noise, guidance_scale)
    assert ours.shape == stock.shape == (len(PROMPTS), 3, 128, 96)
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)
    # the image really conditions the sample: other images, other samples (same prompts and noise)
    others = backbone.example_condition_images(len(PROMPTS), seed=1)
    swapped = _ode_images(
        backbone, noise, backbone.encode_prompts(PROMPTS, False, images=others), guidance_scale
    )
    assert (swapped - ours).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_auto_resize_takes_the_preferred_kontext_resolution_as_the_pipeline_does():
    # condition_image_size null: a 40 x 72 (H x W) image is first floored to multiples of 16, 32 x 64 (aspect
    # 2.0); the preferred resolution nearest that aspect is 1456 x 720 (W x H; 2.022, against 1392 x 752 =
    # 1.851 and 1504 x 688 = 2.186). Latents 720 / 8 = 90 x 1456 / 8 = 182, packed 45 x 91 = 4095 tokens.
    backbone = _tiny(condition_image_size=None)
    image = torch.rand(3, 40, 72, generator=torch.Generator().manual_seed(3))
    assert backbone._condition_size(image[None]) == (720, 1456)
    cond = backbone.encode_prompts(PROMPTS[:1], with_negative=False, images=[image])
    assert cond.tensors["image_latents"].shape == (1, 45 * 91, 16)
    noise = backbone.initial_noise(1, torch.Generator().manual_seed(1), torch.device("cpu"))
    ours = _ode_images(backbone, noise, cond, 2.5, steps=2)
    torch.testing.assert_close(
        ours, _stock_images(backbone, PROMPTS[:1], [image], noise, 2.5, steps=2), rtol=0, atol=1e-5
    )


# ------------------------------------------------------------------------------------- LoRA export
@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_exported_lora_in_the_stock_kontext_pipeline_reproduces_the_policys_images(tmp_path, guidance_scale):
    """export_lora writes the adapter in diffusers' format; FluxKontextPipeline.load_lora_weights on the same
    base weights then samples the policy's images from the same prompts, conditioning images and noise (as
    tests/test_qwen_image.py and tests/test_z_image.py check for their pipelines)."""
    with open(os.path.join(REPO_ROOT, RECIPE)) as f:  # the recipe's 12 targets (Flow-Factory's default)
        targets = yaml.safe_load(f)["model"]["lora"]["target_modules"]
    assert len(targets) == 12
    lora = LoraSpec(rank=2, alpha=8, target_modules=targets)
    policy = FlowPolicy(TinyFluxKontextBackbone(seed=0), lora)
    policy.build()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a LoRA as if trained: both factors non-zero
        for p in policy.trainable_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    path = export_lora(policy, str(tmp_path / "lora"))
    saved = load_file(path)
    # every adapted module of the tiny transformer (1 double block: 12 targets; 1 single block: to_q/k/v),
    # two factors each, under diffusers' "transformer." prefix
    assert len(saved) == 2 * (12 + 3) and all(key.startswith("transformer.") for key in saved)

    backbone = policy.backbone
    images = backbone.example_condition_images(len(PROMPTS))
    noise = backbone.initial_noise(len(PROMPTS), torch.Generator().manual_seed(2), torch.device("cpu"))
    cond = backbone.encode_prompts(PROMPTS, with_negative=False, images=images)
    with policy.use_weights("policy") as transformer:
        ours = _ode_images(backbone, noise, cond, guidance_scale, transformer=transformer)
    stock = backbone.stock_pipeline()  # the same base weights TinyFluxKontextBackbone(seed=0) builds
    base = _stock_images(backbone, PROMPTS, images, noise, guidance_scale, pipe=stock)
    stock.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(
        _stock_images(backbone, PROMPTS, images, noise, guidance_scale, pipe=stock), ours, rtol=0, atol=1e-5
    )
    assert (base - ours).abs().max() > 1e-3  # the LoRA changes the images; alpha / rank = 4 was kept


# ------------------------------------------------------------------------------------- the conditioning
def _pack(z: torch.Tensor) -> torch.Tensor:
    # Flux's 2 x 2 packing, written out: (B, C, H, W) -> (B, H/2 * W/2, C * 4), channel-major within a patch
    b, c, h, w = z.shape
    return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def test_image_latents_and_ids_are_the_vae_mode_scaled_packed_and_offset():
    backbone = _tiny()
    image = torch.rand(3, 48, 40, generator=torch.Generator().manual_seed(0))  # resized to 32 x 32
    rows = backbone._encode_condition_image(image, torch.device("cpu"))
    vae = backbone.vae
    resized = torch.nn.functional.interpolate(image[None], size=(32, 32))  # nearest, as the pipeline does
    with torch.no_grad():
        z = vae.encode(resized * 2 - 1).latent_dist.mode()
    expected = _pack((z - vae.config.shift_factor) * vae.config.scaling_factor)
    assert rows["image_latents"].shape == (1, 4, 16)  # 32 px / 8 = 4 x 4 latents, 2 x 2 tokens
    torch.testing.assert_close(rows["image_latents"], expected, rtol=0, atol=1e-6)
    # ids: (1, row, column) of the 2 x 2 token grid; the noisy tokens' first id is 0
    expected_ids = torch.tensor([[1.0, 0, 0], [1, 0, 1], [1, 1, 0], [1, 1, 1]])
    assert torch.equal(rows["image_ids"], expected_ids[None])


def test_conditioning_rows_are_independent_of_the_batch_and_select_with_their_prompts():
    backbone = _tiny()
    images = backbone.example_condition_images(3)
    both = backbone.encode_prompts(PROMPTS, with_negative=True, images=images)
    assert (
        set(both.tensors)
        == set(both.negative)
        == {
            "prompt_embeds",
            "pooled_prompt_embeds",
            "image_latents",
            "image_ids",
        }
    )
    for side in (both.tensors, both.negative):
        assert all(t.shape[0] == 3 for t in side.values())
        assert torch.equal(side["image_latents"], both.tensors["image_latents"])  # the image conditions both
    alone = _tiny().encode_prompts(PROMPTS[1:2], with_negative=False, images=images[1:2])
    picked = both.select(torch.tensor([1]))
    for name, tensor in alone.tensors.items():
        assert torch.equal(picked.tensors[name], tensor), name  # bitwise, whatever the batch
    assert not torch.equal(both.tensors["image_latents"][0], both.tensors["image_latents"][2])
    # the forward: noisy tokens then image tokens in, only the noisy tokens' velocity out
    seen = []
    hook = backbone.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True
    )
    noise = backbone.initial_noise(3, torch.Generator().manual_seed(0), torch.device("cpu"))
    with torch.no_grad():
        velocity = backbone.velocity(noise, 0.5, both.select(slice(0, 3)), 1.0)
        row = backbone.velocity(noise[1:2], 0.5, picked, 1.0)
    hook.remove()
    assert velocity.shape == noise.shape == (3, 64, 16)  # 128 px: 8 x 8 tokens
    seen = seen[0]  # the batch of three
    assert seen["hidden_states"].shape == (3, 64 + 4, 16) and seen["img_ids"].shape == (64 + 4, 3)
    assert torch.equal(seen["img_ids"][64:, 0], torch.ones(4)) and torch.equal(
        seen["img_ids"][:64, 0], torch.zeros(64)
    )
    torch.testing.assert_close(row, velocity[1:2], rtol=0, atol=1e-6)


def test_a_group_encodes_its_image_once_with_the_same_result():
    backbone = _tiny()
    (image,) = backbone.example_condition_images(1)
    calls = []
    hook = backbone.vae.encoder.register_forward_hook(lambda *a: calls.append(1))
    cond = backbone.encode_prompts(["a cat"] * 4, with_negative=False, images=[image] * 4)
    again = backbone.encode_prompts(["a cat"], with_negative=False, images=[image.clone()])
    hook.remove()
    assert len(calls) == 1
    assert torch.equal(again.tensors["image_latents"][0], cond.tensors["image_latents"][3])
    fresh = _tiny().encode_prompts(["a cat"], with_negative=False, images=[image])
    assert torch.equal(fresh.tensors["image_latents"], again.tensors["image_latents"])


def test_bad_images_and_sizes_are_refused():
    backbone = _tiny()
    with pytest.raises(ValueError, match="TinyFluxKontextBackbone needs a conditioning image per prompt"):
        backbone.encode_prompts(PROMPTS, with_negative=False)
    with pytest.raises(
        ValueError, match=r"must be a \(3, H, W\) tensor in \[0, 1\] \(RGB\), got shape \(1, 8, 8\)"
    ):
        backbone.encode_prompts(["a cat"], with_negative=False, images=[torch.zeros(1, 8, 8)])
    rows = [{"image_latents": torch.zeros(1, 4, 16)}, {"image_latents": torch.zeros(1, 8, 16)}]
    with pytest.raises(
        ValueError,
        match=r"conditioning images of one batch have different sizes after resizing "
        r"\(\[\(4, 16\), \(8, 16\)\] tokens x channels\).*set "
        r"model\.backbone\.init_args\.condition_image_size",
    ):
        backbone.collate(rows)


@pytest.mark.parametrize("value", [0, 8, "32", 32.0, True])
def test_condition_image_size_is_validated(value):
    with pytest.raises(
        ValueError,
        match=r"model\.backbone\.init_args\.condition_image_size must be null \(the preferred Kontext "
        r"resolution nearest each image's aspect ratio\) or an integer >= 16 .*got "
        + repr(value).replace(".", r"\."),
    ):
        TinyFluxKontextBackbone(condition_image_size=value)


def test_condition_image_size_must_fit_the_vae_and_packing():
    with pytest.raises(
        ValueError,
        match=r"model\.backbone\.init_args\.condition_image_size=40 is not allowed for this model: it must "
        r"be a multiple of 16 .*e\.g\. 32 or 48",
    ):
        TinyFluxKontextBackbone(condition_image_size=40).load()


# ------------------------------------------------------------------------------------- loading from disk
def test_kontext_backbone_loads_a_saved_diffusers_directory(tmp_path):
    make_tiny_flux_kontext_pipeline(seed=3).save_pretrained(tmp_path / "pipe")
    loaded = FluxKontextBackbone(
        str(tmp_path / "pipe"), resolution=128, max_sequence_length=32, condition_image_size=32
    )
    loaded.load()
    built = _tiny(seed=3)
    images = built.example_condition_images(2)
    noise = built.initial_noise(2, torch.Generator().manual_seed(0), torch.device("cpu"))
    with torch.no_grad():
        expected = built.velocity(noise, 0.4, built.encode_prompts(PROMPTS[:2], False, images=images), 2.5)
        got = loaded.velocity(noise, 0.4, loaded.encode_prompts(PROMPTS[:2], False, images=images), 2.5)
    # as tests/test_policy.py: a module read from disk may pick another kernel, so float32 precision
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # the directory names its pipeline: the text-to-image backbone points at this one
    with pytest.raises(
        ValueError,
        match=r"holds a FluxKontextPipeline, but FluxBackbone loads a FluxPipeline: use model\.backbone\."
        r"class_path: guardrl\.policy\.FluxKontextBackbone",
    ):
        FluxBackbone(str(tmp_path / "pipe"), resolution=128).load()


# ------------------------------------------------------------------------------------- random weights
def test_random_kontext_backbone_has_flux_dev_shapes_and_edits_at_the_condition_size():
    """RandomFluxKontextBackbone: FLUX.1-dev's transformer, VAE and schedule (FLUX.1-Kontext-dev ships the
    same configs) at the published size; its forward carries the conditioning image's tokens."""
    backbone = RandomFluxKontextBackbone(torch_dtype="bfloat16", resolution=512, condition_image_size=512)
    with torch.device("meta"):
        backbone.load()
    assert type(backbone.pipeline) is FluxKontextPipeline and backbone.takes_condition_image
    transformer = backbone.transformer
    for key, row in MODELS["flux"].items():  # tests/published_recipes.py: FLUX.1-dev's released configs
        if key.startswith("weights"):
            continue
        config = backbone.vae.config if key.startswith("vae.") else transformer.config
        value = config[key.removeprefix("vae.")]
        assert (list(value) if isinstance(value, tuple) else value) == row.value, (key, row.source)
    weights = sum(t.numel() for t in transformer.state_dict().values())
    assert weights == sum(p.numel() for p in transformer.parameters()) == 11_901_408_320  # 12B, as Flux-dev
    assert backbone.latent_numel() == 16 * 64 * 64
    # Flux's dynamic shift over the 1024 noisy tokens of 512 px (the image's tokens do not count):
    # mu = 0.5 + 0.65 * (1024 - 256) / (4096 - 256) = 0.63; step 5 of 10 at t = 0.5
    sigmas = backbone.sigmas(10)
    assert sigmas[5].item() == pytest.approx(math.exp(0.63) / (math.exp(0.63) + 1), abs=1e-6)

    small = RandomFluxKontextBackbone(
        small=True, resolution=64, max_sequence_length=16, condition_image_size=32
    )
    small.load()
    images = [torch.rand(3, 48, 40, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cond = small.encode_prompts(["a cat", "a dog"], with_negative=False, images=images)
    # 32 px / 8 = 4 x 4 latents, 2 x 2 tokens of 16 x 4 channels; 64 px: 4 x 4 noisy tokens
    assert cond.tensors["image_latents"].shape == (2, 4, 64) and cond.tensors["prompt_embeds"].shape == (
        2,
        16,
        64,
    )
    seen = []
    hook = small.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"].shape), with_kwargs=True
    )
    noise = small.initial_noise(2, torch.Generator().manual_seed(0), torch.device("cpu"))
    with torch.no_grad():
        velocity = small.velocity(noise, 0.5, cond, 2.5)
    hook.remove()
    assert seen == [(2, 16 + 4, 64)] and velocity.shape == noise.shape == (2, 16, 64)
    with pytest.raises(ValueError, match=r"condition_image_size must be null .* got 8"):
        RandomFluxKontextBackbone(condition_image_size=8)


# ------------------------------------------------------------------------------------- guardrl fit
TOTAL_ITERATIONS = 2
EDITS = {"make it red": (255, 0, 0), "a blue square": (0, 0, 255), "a cat": (0, 160, 64)}


def _edit_file(directory) -> str:
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    lines = []
    for i, (prompt, colour) in enumerate(EDITS.items()):
        Image.new("RGB", (40, 24), colour).save(os.path.join(directory, "images", f"{i}.png"))
        lines.append(json.dumps({"prompt": prompt, "image": f"images/{i}.png"}))
    path = os.path.join(directory, "edits.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _fit(edit_file: str, log_root: str, *extra: str, **overrides: str):
    settings = {
        "--model.backbone": "guardrl.policy.TinyFluxKontextBackbone",
        "--model.sampling.guidance_scale": "2.5",
        "--data.image_field": "image",
        "--data.shuffle_buffer_size": "2",
        # conditioning rows selected per minibatch and per rollout chunk (Conditioning.select)
        "--model.grpo.minibatch_size": "2",
        "--model.performance.rollout_chunks": "2",
        "--model.max_iterations": str(TOTAL_ITERATIONS),
        "--checkpoint.every_n_iterations": "1",
        "--checkpoint.save_top_k": "-1",
        "--seed_everything": "7",
        **overrides,
    }
    return main(["fit", *tiny_fit_args(edit_file, log_root, **settings), *extra])


def _version_dir(log_root: str) -> str:
    (version_dir,) = glob.glob(os.path.join(log_root, "guardrl", "version_*"))
    return version_dir


def _last(log_root: str) -> dict:
    return torch.load(os.path.join(_version_dir(log_root), "checkpoints", "last.ckpt"), weights_only=True)


def _rewards(log_root: str) -> dict[int, float]:
    accumulator = EventAccumulator(_version_dir(log_root), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {p.step: p.value for p in accumulator.Scalars("reward/mean")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("kontext_fit")
    edit_file = _edit_file(str(root / "data"))
    cli = _fit(edit_file, str(root / "straight"))
    return edit_file, cli, str(root / "straight")


@pytest.mark.slow  # a guardrl fit: the inner loop leaves it to CI
def test_grpo_iterations_through_guardrl_fit_condition_on_the_images(straight):
    edit_file, cli, log_root = straight
    module = cli.model
    assert isinstance(module.backbone, TinyFluxKontextBackbone)
    assert module.num_iterations == TOTAL_ITERATIONS and module.stream_position == 2 * TOTAL_ITERATIONS
    checkpoint = _last(log_root)
    adapters = {k: v for k, v in checkpoint["state_dict"].items() if "lora_B" in k}
    assert adapters and any(v.abs().max() > 0 for v in adapters.values())  # the LoRA moved
    assert sorted(_rewards(log_root)) == list(range(TOTAL_ITERATIONS))
    # the run's sampler conditions on the images: one prompt's image, swapped for another, changes the sample
    backbone = module.backbone
    noise = backbone.initial_noise(1, torch.Generator().manual_seed(0), module.device)
    red, blue = (
        torch.tensor(c, dtype=torch.float32)[:, None, None].expand(3, 24, 40) / 255
        for c in list(EDITS.values())[:2]
    )
    first = module.sample(["make it red"], noise, sampler="ode", images=[red])
    second = module.sample(["make it red"], noise, sampler="ode", images=[blue])
    assert (first - second).abs().max() > 1e-3


@pytest.mark.slow  # a guardrl fit: the inner loop leaves it to CI
def test_a_resumed_kontext_run_equals_the_straight_run(straight, tmp_path):
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
    assert counters_a == counters_b and counters_a["stream_position"] == 2 * TOTAL_ITERATIONS
    assert _rewards(log_root) == _rewards(straight_root)


# ------------------------------------------------------------------------------------- the recipe
RECIPE = os.path.join("configs", "flux_kontext", "flow_grpo_pickscore.yaml")


def test_the_kontext_recipe_parses_through_the_cli(monkeypatch, capsys):
    from guardrl.checks import check_batch_sizes
    from guardrl.options import GRPOOptions, SamplingOptions, check_compatible
    from guardrl.policy import LoraSpec

    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", RECIPE, "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    model, data = config["model"], config["data"]
    assert model["backbone"]["class_path"] == "guardrl.policy.FluxKontextBackbone"
    assert model["backbone"]["init_args"]["condition_image_size"] == 384
    assert data["image_field"] == "image"
    grpo, sampling = GRPOOptions(**model["grpo"]), SamplingOptions(**model["sampling"])
    check_compatible(sampling, grpo)
    check_batch_sizes(grpo, data["prompts_per_batch"], data["group_size"])
    # Flow-Factory: 48 prompts x 16 samples over 8 GPUs = 96 per GPU, 2 optimizer steps per epoch
    samples = data["prompts_per_batch"] * data["group_size"]
    assert samples * config["trainer"]["devices"] == 48 * 16
    assert grpo.num_inner_epochs * (samples // grpo.minibatch_size) // grpo.gradient_accumulation_steps == 2
    # the LoRA targets exist in every block of the Kontext transformer (tiny: the same module names)
    targets = LoraSpec(**model["lora"]).target_modules
    transformer = _tiny().transformer
    names = {n for n, _ in transformer.named_modules()}
    for target in targets:
        assert any(n.endswith("." + target) for n in names), target


def test_the_watch_refuses_an_editing_backbone_clearly(tmp_path):
    # its evaluation prompts carry no conditioning images (no watch.image_field): a clear refusal before any
    # sampling, not a crash mid-run
    from types import SimpleNamespace

    from guardrl.callbacks import OverOptimizationWatch
    from guardrl.gold import ImageDetail

    prompts = tmp_path / "eval.txt"
    prompts.write_text("a red circle\n")
    watch = OverOptimizationWatch(str(prompts), [ImageDetail()])
    module = SimpleNamespace(backbone=TinyFluxKontextBackbone())
    with pytest.raises(
        ValueError, match=r"watch: TinyFluxKontextBackbone edits images .* set watch\.image_field"
    ):
        watch.on_train_start(None, module)
