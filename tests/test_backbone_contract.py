"""The backbone contract (guardrl/policy/backbones.py, `FlowBackbone`), checked on every backbone class.

Every concrete `FlowBackbone` subclass in guardrl.policy and guardrl.toy is found by walking the packages, so
a new backbone is covered the moment its module exists. What the RL loop relies on, and therefore what each
backbone must do:

- conditioning: named batch-first tensors; a prompt's rows do not depend on the batch it was encoded in
  (resume is bitwise), `select` picks rows, true CFG carries a negative side with the same names;
- noise and images: `initial_noise` (B, ...) with `latent_numel` elements per sample, `decode` gives
  (B, 3, height, width) in [0, 1] float32, also for a non-square height x width;
- FSDP2: `shard_block_names` names ModuleLists of the transformer that hold most of its parameters;
- LoRA: the backbone's default target modules (`lora_targets()`) reach every block;
- editing: only a backbone that takes conditioning images accepts them;
- and, for every backbone with a stock diffusers pipeline (the tiny ones build it with the same weights):
  guardrl's ODE sampler with `velocity`, `sigmas` and `decode` reproduces the pipeline's own images for the
  same initial noise, non-square, with and without guidance. This one check covers the schedule (shift,
  dynamic shift), the timestep scale, the latent packing, the VAE's scaling and shift, and CFG.
Every production backbone (a `pipeline_class` users load) must have a tiny subclass with a stock pipeline.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch

import guardrl.policy
import guardrl.toy
from guardrl.policy import FlowBackbone, LoraSpec
from guardrl.policy.backbones import BACKBONE_OF_PIPELINE
from guardrl.sampling import sample_rollouts
from guardrl.sharding import transformer_blocks

# the middle prompt is the shortest, so a backbone that pads text to the batch's longest has to pad it
PROMPTS = ["a red circle on the left", "a blue square", "a red circle on the left"]
STEPS = 3


def _all_backbone_classes() -> list[type]:
    for package in (guardrl.policy, guardrl.toy):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith(("__main__", ".pretrain", ".benchmark", ".learning")):
                continue  # command-line entry points: importing them defines no backbone
            importlib.import_module(info.name)
    found, stack = set(), [FlowBackbone]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found and sub.__module__.startswith("guardrl."):
                found.add(sub)
                stack.append(sub)
    return sorted(found, key=lambda c: c.__qualname__)


CLASSES = _all_backbone_classes()
# What can be built here without files: the tiny backbones (built in code from a seed), the random-weight
# backbones at their small shapes, the toy model (its weights ship with the package).
BUILDABLE = {
    cls.__name__: cls
    for cls in CLASSES
    if cls.__name__.startswith(("Tiny", "Random")) or cls.__name__ == "ToyBackbone"
}
WITH_STOCK = [name for name, cls in BUILDABLE.items() if hasattr(cls, "stock_pipeline")]


def _build(name: str, **sizes) -> FlowBackbone:
    cls = BUILDABLE[name]
    kwargs = dict(sizes)
    if "small" in inspect.signature(cls).parameters:
        kwargs["small"] = True
    if name == "ToyBackbone":
        kwargs = {}  # pixel space at the size it was trained on: 32 x 32, square only
    backbone = cls(**kwargs)
    backbone.load()
    return backbone


def _images(backbone: FlowBackbone, prompts: list[str]) -> list[torch.Tensor] | None:
    """An editing backbone's conditioning images, one per prompt (the same prompt, the same image); None for
    a text-to-image one. Its tiny subclass makes them (`example_condition_images`), of a size its stock
    pipeline, called with `stock_call_kwargs`, preprocesses as the backbone does."""
    if not backbone.takes_condition_image:
        return None
    distinct = list(dict.fromkeys(prompts))
    pool = backbone.example_condition_images(len(distinct))
    return [pool[distinct.index(p)] for p in prompts]


def _first(images: list[torch.Tensor] | None, start: int, stop: int) -> list[torch.Tensor] | None:
    return None if images is None else images[start:stop]


def _non_square(name: str) -> dict:
    # a height and a width that differ, both multiples of what each model needs (16 px for all of them)
    return {} if name == "ToyBackbone" else {"height": 128, "width": 96}


def test_every_production_backbone_has_a_tiny_one_with_a_stock_pipeline():
    production = {cls for cls in CLASSES if getattr(cls, "pipeline_class", None) is not None}
    production = {cls for cls in production if not cls.__name__.startswith(("Tiny", "Random"))}
    assert production, "no production backbone found"
    for cls in production:
        tiny = [BUILDABLE[name] for name in WITH_STOCK if issubclass(BUILDABLE[name], cls)]
        assert tiny, f"{cls.__name__} has no tiny subclass with a stock_pipeline() in guardrl.policy"
        if cls.takes_condition_image:
            assert all(hasattr(t, "example_condition_images") for t in tiny), cls.__name__
        # and a directory saved by its pipeline names it (the error that points users at the right class)
        assert BACKBONE_OF_PIPELINE[cls.pipeline_class.__name__].endswith("." + cls.__name__)


@pytest.mark.parametrize("name", sorted(BUILDABLE))
def test_conditioning_is_named_batch_first_and_independent_of_the_batch(name):
    backbone = _build(name)
    images = _images(backbone, PROMPTS)
    both = backbone.encode_prompts(PROMPTS, with_negative=backbone.uses_true_cfg, images=images)
    assert len(both) == len(PROMPTS) and both.tensors
    for side in (both.tensors, both.negative or {}):
        for tensor in side.values():
            assert tensor.shape[0] == len(PROMPTS)
    if backbone.uses_true_cfg:
        assert both.negative is not None and set(both.negative) == set(both.tensors)
    fresh = _build(name)
    alone = fresh.encode_prompts(PROMPTS[1:2], with_negative=False, images=_first(images, 1, 2))
    picked = both.select(torch.tensor([1]))
    for key, tensor in alone.tensors.items():
        # bitwise, whatever the batch or cache history; a backbone that pads variable-length text to the
        # batch's longest (collate) may only add zeros after the prompt's own tokens (and a mask of 0)
        row, length = picked.tensors[key], tensor.shape[1]  # every tensor is (B, ...) with ndim >= 2
        assert row.shape[0] == 1 and row.shape[2:] == tensor.shape[2:], key
        assert torch.equal(row[:, :length], tensor), key
        assert not row[:, length:].any(), key
    for key, tensor in both.tensors.items():
        assert torch.equal(tensor[0], tensor[2]), key  # the same prompt twice: the same rows


@pytest.mark.parametrize("name", sorted(BUILDABLE))
def test_noise_velocity_and_images_have_the_configured_shape(name):
    sizes = _non_square(name)
    backbone = _build(name, **sizes)
    height, width = sizes.get("height", backbone.height), sizes.get("width", backbone.width)
    noise = backbone.initial_noise(2, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert noise.shape[0] == 2 and noise[0].numel() == backbone.latent_numel()
    images = _first(_images(backbone, PROMPTS), 0, 2)
    cond = backbone.encode_prompts(PROMPTS[:2], with_negative=backbone.uses_true_cfg, images=images)
    with torch.no_grad():
        velocity = backbone.velocity(noise, 0.7, cond, guidance_scale=1.0)
        images = backbone.decode(noise)
    assert velocity.shape == noise.shape and velocity.dtype == torch.float32
    assert images.shape == (2, 3, height, width) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    sigmas = backbone.sigmas(STEPS)
    assert sigmas.shape == (STEPS + 1,) and float(sigmas[-1]) == 0.0 and bool((sigmas.diff() < 0).all())


@pytest.mark.parametrize("name", sorted(BUILDABLE))
def test_shard_blocks_hold_the_transformer_and_lora_targets_are_in_every_block(name):
    backbone = _build(name)
    transformer = backbone.transformer
    blocks = transformer_blocks(transformer, backbone.shard_block_names)
    in_blocks = sum(p.numel() for block in blocks for p in block.parameters())
    total = sum(p.numel() for p in transformer.parameters())
    assert len(blocks) >= 1 and in_blocks > total / 2, (in_blocks, total)
    # lora.target_modules null: the backbone's targets, matched as peft matches them (a full module name or
    # a dotted suffix of one), must reach every block
    targets = LoraSpec().for_backbone(backbone).target_modules
    full_names = {id(module): name for name, module in transformer.named_modules()}
    for block in blocks:
        prefix = full_names[id(block)]
        names = {f"{prefix}.{n}" for n, _ in block.named_modules() if n}
        assert any(n == t or n.endswith("." + t) for n in names for t in targets), prefix


@pytest.mark.parametrize("name", sorted(BUILDABLE))
def test_conditioning_images_only_where_the_backbone_takes_them(name):
    backbone = _build(name)
    if backbone.takes_condition_image:
        with pytest.raises(ValueError, match="needs a conditioning image per prompt"):
            backbone.encode_prompts(PROMPTS, with_negative=False)
    else:
        with pytest.raises(ValueError, match="takes no images"):
            backbone.encode_prompts(PROMPTS, with_negative=False, images=[torch.zeros(3, 32, 32)] * 3)


def _guardrl_images(backbone, noise, guidance_scale):
    with_negative = backbone.uses_true_cfg and guidance_scale > 1.0
    cond = backbone.encode_prompts(PROMPTS, with_negative=with_negative, images=_images(backbone, PROMPTS))
    sigmas = backbone.sigmas(STEPS)

    def velocity_fn(latents, t, k):
        return backbone.velocity(latents, t, cond, guidance_scale)

    with torch.no_grad():
        trajectory = sample_rollouts(velocity_fn, noise, sigmas, torch.zeros(STEPS))  # eta = 0: Euler (ODE)
        return backbone.decode(trajectory.final_latents)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.5])
@pytest.mark.parametrize("name", WITH_STOCK)
def test_the_ode_sampler_reproduces_the_stock_pipeline_non_square(name, guidance_scale):
    backbone = _build(name, **_non_square(name))
    noise = backbone.initial_noise(len(PROMPTS), torch.Generator().manual_seed(1), torch.device("cpu"))
    ours = _guardrl_images(backbone, noise, guidance_scale)
    pipe = backbone.stock_pipeline()
    images = _images(backbone, PROMPTS)
    with torch.no_grad():
        stock = pipe(
            **({} if images is None else {"image": torch.stack(images)}),
            prompt=list(PROMPTS),  # a copy: ZImagePipeline rewrites the list it is given in place
            latents=noise,
            height=backbone.height,
            width=backbone.width,
            num_inference_steps=STEPS,
            output_type="pt",
            **backbone.stock_call_kwargs(guidance_scale),
        ).images.float()
    assert ours.shape == stock.shape == (len(PROMPTS), 3, backbone.height, backbone.width)
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)
    if guidance_scale > 1.0 and backbone.uses_true_cfg:
        # guidance is really applied: the unguided images differ
        assert (ours - _guardrl_images(backbone, noise, 1.0)).abs().max() > 1e-3
