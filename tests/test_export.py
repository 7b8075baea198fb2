"""LoRA export (guardrl/export.py): a stock diffusers pipeline with `load_lora_weights` on the exported
LoRA gives the same images as guardrl's trained policy, for the same initial noise and prompts."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import tiny_fit_args
from guardrl.cli import main
from guardrl.export import export_from_checkpoint, export_lora
from guardrl.policy.tiny import make_tiny_sd3_pipeline
from guardrl.sampling import sample_rollouts

PROMPTS = ["a red circle", "a blue square"]
STEPS = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("a red circle\na blue square\na green triangle\n")
    # alpha != rank: a reload that lost the adapter metadata would scale the LoRA by alpha/rank = 1, not 4.
    args = tiny_fit_args(
        str(prompt_file),
        str(root / "runs"),
        **{
            "--model.lora": '{"rank": 2, "alpha": 8}',
            "--model.max_iterations": "2",
            "--model.optimizer": '{"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.05}}',
            "--checkpoint.every_n_iterations": "1",
            "--model.grpo.ema_decay": "0.5",
            "--trainer.callbacks": '[{"class_path": "guardrl.callbacks.LoraExport", '
            '"init_args": {"every_n_iterations": 1}}]',
        },
    )
    cli = main(["fit", *args])
    return cli, root


def _guardrl_images(policy, noise, weights="policy"):
    backbone = policy.backbone
    cond = backbone.encode_prompts(PROMPTS, with_negative=False)
    sigmas = backbone.sigmas(STEPS)
    with torch.no_grad(), policy.use_weights(weights) as transformer:

        def velocity_fn(latents, t, k):
            return backbone.velocity(latents, t, cond, 1.0, transformer)

        trajectory = sample_rollouts(velocity_fn, noise, sigmas, torch.zeros(STEPS))  # eta = 0: Euler (ODE)
    return backbone.decode(trajectory.final_latents)


def _stock_images(lora_dir, noise, seed=0):
    pipe = make_tiny_sd3_pipeline(seed=seed)  # the same base weights TinySD3Backbone(seed=0) builds
    pipe.load_lora_weights(lora_dir)
    with torch.no_grad():
        images = pipe(
            prompt=PROMPTS,
            latents=noise,
            num_inference_steps=STEPS,
            guidance_scale=1.0,
            output_type="pt",
            max_sequence_length=pipe_max_len(),
        ).images
    return images.float()


def pipe_max_len():
    from guardrl.policy import TinySD3Backbone

    return TinySD3Backbone(seed=0).max_sequence_length


def test_stock_pipeline_with_exported_lora_reproduces_the_policy(trained, tmp_path):
    cli, _ = trained
    policy = cli.model.policy
    noise = policy.backbone.initial_noise(len(PROMPTS), torch.Generator().manual_seed(3), torch.device("cpu"))
    path = export_lora(policy, str(tmp_path / "lora"))
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors"
    # readable like the run's other files (safetensors alone writes 0600)
    from guardrl.checkpointing import default_file_mode

    assert os.stat(path).st_mode & 0o777 == default_file_mode()

    ours = _guardrl_images(policy, noise)
    stock = _stock_images(str(tmp_path / "lora"), noise)
    base = _stock_images_without_lora(noise)
    assert ours.shape == stock.shape == (2, 3, 128, 128)
    torch.testing.assert_close(stock, ours, rtol=0, atol=1e-5)
    # The LoRA matters: the base pipeline's images are far from the trained policy's.
    assert (base - ours).abs().max() > 1e-3


def _stock_images_without_lora(noise):
    pipe = make_tiny_sd3_pipeline(seed=0)
    with torch.no_grad():
        return pipe(
            prompt=PROMPTS,
            latents=noise,
            num_inference_steps=STEPS,
            guidance_scale=1.0,
            output_type="pt",
            max_sequence_length=pipe_max_len(),
        ).images.float()


def test_export_from_a_checkpoint_with_the_runs_config_matches_the_live_policy(trained, tmp_path):
    cli, root = trained
    (version_dir,) = [
        os.path.join(root / "runs" / "guardrl", d) for d in os.listdir(root / "runs" / "guardrl")
    ]
    path = export_from_checkpoint(
        os.path.join(version_dir, "config.yaml"),
        os.path.join(version_dir, "checkpoints", "last.ckpt"),
        str(tmp_path / "lora"),
    )
    direct = export_lora(cli.model.policy, str(tmp_path / "direct"))
    from safetensors.torch import load_file

    exported, expected = load_file(path), load_file(direct)
    assert exported.keys() == expected.keys() and len(exported) == 16
    assert all(key.startswith("transformer.") for key in exported)
    assert all(torch.equal(exported[k], expected[k]) for k in expected)


def test_ema_weights_export_and_differ_from_the_policy(trained, tmp_path):
    cli, _ = trained
    policy = cli.model.policy
    from safetensors.torch import load_file

    ema = load_file(export_lora(policy, str(tmp_path / "ema"), weights="ema"))
    live = load_file(export_lora(policy, str(tmp_path / "live")))
    assert ema.keys() == live.keys()
    assert any(not torch.equal(ema[k], live[k]) for k in live)


def test_export_refuses_what_cannot_be_exported(trained, tmp_path):
    cli, _ = trained
    with pytest.raises(ValueError, match=r"export weights='old': must be one of \('policy', 'ema'\)"):
        export_lora(cli.model.policy, str(tmp_path), weights="old")
    with pytest.raises(ValueError, match=r"--ckpt='missing.ckpt': no such file"):
        export_from_checkpoint("unused.yaml", "missing.ckpt", str(tmp_path))


def test_lora_export_callback_writes_each_iteration_and_the_final_adapter(trained, tmp_path):
    cli, root = trained
    (version_dir,) = [
        os.path.join(root / "runs" / "guardrl", d) for d in os.listdir(root / "runs" / "guardrl")
    ]
    lora_root = os.path.join(version_dir, "lora")
    assert sorted(os.listdir(lora_root)) == ["final", "iteration=1", "iteration=2"]
    from safetensors.torch import load_file

    final = load_file(os.path.join(lora_root, "final", "pytorch_lora_weights.safetensors"))
    direct = load_file(export_lora(cli.model.policy, str(tmp_path / "direct")))
    first = load_file(os.path.join(lora_root, "iteration=1", "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(final[k], direct[k]) for k in direct)
    assert any(not torch.equal(first[k], final[k]) for k in final)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_exported_lora_in_a_stock_pipeline_gives_the_policys_velocity(kind, tmp_path):
    from guardrl.policy import FlowPolicy, LoraSpec, TinyFluxBackbone, TinySD3Backbone
    from guardrl.policy.tiny import make_tiny_flux_pipeline

    backbone_cls, make_pipeline = {
        "sd3": (TinySD3Backbone, make_tiny_sd3_pipeline),
        "flux": (TinyFluxBackbone, make_tiny_flux_pipeline),
    }[kind]
    policy = FlowPolicy(backbone_cls(seed=0), LoraSpec(rank=2, alpha=8))
    policy.build()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a LoRA as if trained: both factors non-zero
        for p in policy.trainable_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    export_lora(policy, str(tmp_path / "lora"))

    backbone = policy.backbone
    latents = backbone.initial_noise(2, torch.Generator().manual_seed(2), torch.device("cpu"))
    cond = backbone.encode_prompts(PROMPTS, with_negative=False)
    stock = make_pipeline(seed=0)
    with torch.no_grad():
        base = backbone.velocity(latents, 0.6, cond, 1.0, stock.transformer)
        stock.load_lora_weights(str(tmp_path / "lora"))
        expected = backbone.velocity(latents, 0.6, cond, 1.0, policy.transformer)
        got = backbone.velocity(latents, 0.6, cond, 1.0, stock.transformer)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (base - expected).abs().max() > 1e-2  # the LoRA changes the output; alpha/rank = 4 was kept


def test_toy_lora_exports_in_sd3_format_and_loads_into_a_fresh_toy_transformer(tmp_path):
    # The toy model is not a diffusers pipeline; its transformer is an SD3Transformer2DModel, so the export
    # uses SD3's LoRA format (ToyBackbone.lora_format_class) and every run's end-of-run export command works.
    from guardrl.policy import FlowPolicy, LoraSpec
    from guardrl.toy import ToyBackbone

    policy = FlowPolicy(ToyBackbone(), LoraSpec(rank=2, alpha=8))
    policy.build()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    path = export_lora(policy, str(tmp_path / "lora"))
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors"

    fresh = ToyBackbone()
    fresh.load()
    backbone = policy.backbone
    latents = backbone.initial_noise(2, torch.Generator().manual_seed(2), torch.device("cpu"))
    cond = backbone.encode_prompts(["a red circle", "two blue squares"], with_negative=False)
    with torch.no_grad():
        base = backbone.velocity(latents, 0.6, cond, 1.0, fresh.transformer)
        fresh.transformer.load_lora_adapter(
            str(tmp_path / "lora"), prefix="transformer", use_safetensors=True
        )
        expected = backbone.velocity(latents, 0.6, cond, 1.0, policy.transformer)
        got = backbone.velocity(latents, 0.6, cond, 1.0, fresh.transformer)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (base - expected).abs().max() > 1e-2
