"""Every published recipe (configs/sd35m/, configs/sd35l/, configs/flux/) trains through `guardrl fit` from
a diffusers pipeline directory on disk: tiny random-weight SD3 / Flux pipelines are built in code, saved with
`save_pretrained`, and each recipe is overlaid on them. Kept from the recipe: the backbone class and its
loading path, the sampler (steps, noise level, SDE type, guidance, SDE window), the ratio variant, clip range
and unit, advantages, KL, LoRA rank/alpha/targets, optimizer. Shrunk: the model (tiny, float32), resolution,
batch and accumulation, the devices (1 CPU), the reward (JPEG: the recipes' PickScore needs a hub download)
and the prompts."""

import glob
import os

import pytest
import torch
import yaml

from guardrl.cli import main
from guardrl.policy import FluxBackbone, SD3Backbone
from guardrl.policy.tiny import make_tiny_flux_pipeline, make_tiny_sd3_pipeline
from tests.conftest import REPO_ROOT

RECIPES = sorted(
    glob.glob(os.path.join(REPO_ROOT, "configs", "sd35m", "*.yaml"))
    + glob.glob(os.path.join(REPO_ROOT, "configs", "sd35l", "*.yaml"))
    + glob.glob(os.path.join(REPO_ROOT, "configs", "flux", "*.yaml"))
)


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    make_tiny_sd3_pipeline(seed=0).save_pretrained(root / "sd3")
    make_tiny_sd3_pipeline(seed=0, qk_norm="rms_norm").save_pretrained(root / "sd3_qk_norm")  # as SD3.5-Large
    make_tiny_flux_pipeline(seed=0, guidance_embeds=True).save_pretrained(
        root / "flux"
    )  # FLUX.1-dev: guidance
    return {"sd35m": str(root / "sd3"), "sd35l": str(root / "sd3_qk_norm"), "flux": str(root / "flux")}


@pytest.mark.parametrize("recipe", RECIPES, ids=[os.path.relpath(r, REPO_ROOT) for r in RECIPES])
def test_recipe_trains_from_a_saved_pipeline_directory(recipe, pipeline_dirs, prompt_file, tmp_path):
    family = os.path.basename(os.path.dirname(recipe))
    with open(recipe) as f:
        published = yaml.safe_load(f)["model"]
    cli = main(
        [
            "--config",
            recipe,
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--trainer.num_nodes",
            "1",
            "--trainer.strategy",
            "auto",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--model.backbone.init_args.pretrained_model_name_or_path",
            pipeline_dirs[family],
            "--model.backbone.init_args.torch_dtype",
            "float32",
            "--model.backbone.init_args.resolution",
            "64",
            "--model.backbone.init_args.max_sequence_length",
            "32",
            "--model.rewards",
            '[{"class_path": "guardrl.rewards.JpegCompressibility"}]',
            "--data.train_prompts",
            prompt_file,
            "--data.group_size",
            "2",
            "--data.prompts_per_batch",
            "2",
            "--model.grpo.minibatch_size",
            "2",
            "--model.grpo.gradient_accumulation_steps",
            "2",
            "--model.max_iterations",
            "1",
        ],
        run=False,
    )
    # one process: a recipe's num_nodes left in place would make fit wait for ranks that never come
    assert cli.trainer.world_size == 1
    model = cli.model
    expected_class = FluxBackbone if family == "flux" else SD3Backbone
    assert type(model.backbone) is expected_class  # the real loading class, not a tiny one
    assert model.backbone.pretrained_model_name_or_path == pipeline_dirs[family]
    # what the test keeps from the recipe
    assert model.grpo.ratio_variant == published["grpo"]["ratio_variant"]
    assert model.grpo.clip_range == published["grpo"]["clip_range"]
    assert model.sampling.num_inference_steps == published["sampling"]["num_inference_steps"]
    assert model.policy.lora.rank == published["lora"]["rank"]
    assert not model.backbone.is_loaded  # loading happens in configure_model, inside fit
    cli.trainer.fit(model, cli.datamodule)
    assert model.num_iterations == 1
    trained = dict(model.policy.transformer.named_parameters())
    targets = set(published["lora"].get("target_modules") or [])
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trained if ".default." in name}
    assert adapted and (not targets or adapted <= {t.rsplit(".", 1)[-1] for t in targets})
    # the LoRA moved (lora_B starts at zero), the frozen base did not get gradients
    assert any(p.abs().max() > 0 for n, p in trained.items() if "lora_B" in n and ".default." in n)
    assert all(p.grad is None for n, p in trained.items() if "lora_" not in n)
    assert torch.isfinite(
        torch.stack([p.detach().abs().max() for p in model.policy.trainable_parameters()])
    ).all()
