"""The published numbers guardrl's shipped recipes, model shapes and toy proxy claim to follow: ONE table.

Every row is a number as its source publishes it, with the source and what it says there. Nothing here is
read from guardrl: tests/test_cli.py compares the parsed recipes (configs/sd35m/, configs/flux/) against
`RECIPES`, tests/test_random_weights.py the random-weight backbones against `MODELS`, tests/test_toy_proxy.py
the shipped toy proxy against `TOY_PROXY`. When a recipe deliberately departs from its source, the departure
is in the recipe's own comments and the row is simply absent here (e.g. guardrl's minibatch sizes, which
must divide a rank's batch, and the FLUX target modules).

Sources as read for this table:
  - FlowGRPO (Liu et al. 2025, arXiv 2505.05470), github.com/yifan123/flow_grpo: config/base.py (defaults),
    config/grpo.py (`geneval_sd3`, `general_ocr_sd3`, `pickscore_sd3`, `pickscore_flux`),
    scripts/train_sd3.py and scripts/train_flux.py (LoRA settings).
  - GRPO-Guard (Wang et al. 2025, arXiv 2510.22319): its release in the flow_grpo code base, configs
    `geneval_sd3_rationorm`, `general_ocr_sd3_rationorm`, `pickscore_hps_sd3_ratio_norm`. Those configs are
    not in the flow_grpo snapshot read for this table; their values are as quoted in the recipes' headers
    (configs/sd35m/grpo_guard_*.yaml) and guardrl's docs/math.md (2e-6); verl-omni's GRPO-Guard page
    independently gives clip_ratio=2e-6.
  - DanceGRPO (Xue et al. 2025, arXiv 2505.07818), github.com/XueZeyue/DanceGRPO:
    scripts/finetune/finetune_flux_grpo_8gpus_lora.sh.
  - Model configs: stabilityai/stable-diffusion-3.5-medium transformer/config.json and vae/config.json;
    black-forest-labs/flux src/flux/util.py `configs["flux-dev"]` (params and ae_params); the model cards.
  - The toy proxy: docs/toy_proxy.md, the documentation of the shipped weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Published:
    value: Any
    source: str  # where it is published, and what it says there


FLOWGRPO_BASE = "yifan123/flow_grpo config/base.py get_config()"
FLOWGRPO_CONFIGS = "yifan123/flow_grpo config/grpo.py"
GRPO_GUARD = "GRPO-Guard (arXiv 2510.22319) release of yifan123/flow_grpo, config/grpo.py"
DANCEGRPO = "XueZeyue/DanceGRPO scripts/finetune/finetune_flux_grpo_8gpus_lora.sh"

# --------------------------------------------------------------------------------------------------------
# Rows shared by several recipes (each recipe below picks the rows that are its sources')
# --------------------------------------------------------------------------------------------------------

_FLOWGRPO_OPTIMIZER = {
    "model.optimizer.class_path": Published("torch.optim.AdamW", f"{FLOWGRPO_BASE}: optimizer_cls = AdamW"),
    "model.optimizer.init_args.lr": Published(3e-4, f"{FLOWGRPO_BASE}: train.learning_rate = 3e-4"),
    "model.optimizer.init_args.weight_decay": Published(
        1e-4, f"{FLOWGRPO_BASE}: train.adam_weight_decay = 1e-4"
    ),
    "model.optimizer.init_args.betas": Published(
        [0.9, 0.999], f"{FLOWGRPO_BASE}: train.adam_beta1 = 0.9, train.adam_beta2 = 0.999"
    ),
    "model.optimizer.init_args.eps": Published(1e-8, f"{FLOWGRPO_BASE}: train.adam_epsilon = 1e-8"),
}

_FLOWGRPO_TRAIN = {
    "model.grpo.clip_range": Published(1e-4, f"{FLOWGRPO_BASE}: train.clip_range = 1e-4"),
    "model.grpo.adv_clip_max": Published(5.0, f"{FLOWGRPO_BASE}: train.adv_clip_max = 5"),
    "model.grpo.max_grad_norm": Published(1.0, f"{FLOWGRPO_BASE}: train.max_grad_norm = 1.0"),
    "model.grpo.num_inner_epochs": Published(1, f"{FLOWGRPO_CONFIGS}: train.num_inner_epochs = 1"),
}

_FLOWGRPO_SD35M = {
    "model.backbone.init_args.pretrained_model_name_or_path": Published(
        "stabilityai/stable-diffusion-3.5-medium",
        f"{FLOWGRPO_CONFIGS} (*_sd3): pretrained.model = 'stabilityai/stable-diffusion-3.5-medium'",
    ),
    "model.backbone.init_args.resolution": Published(512, f"{FLOWGRPO_CONFIGS} (*_sd3): resolution = 512"),
    "model.sampling.num_inference_steps": Published(10, f"{FLOWGRPO_CONFIGS} (*_sd3): sample.num_steps = 10"),
    "model.sampling.guidance_scale": Published(
        4.5, f"{FLOWGRPO_CONFIGS} (*_sd3): sample.guidance_scale = 4.5 (train.cfg True in base.py)"
    ),
    "model.sampling.noise_level": Published(0.7, f"{FLOWGRPO_BASE}: sample.noise_level = 0.7"),
    "model.sampling.sde_type": Published(
        "flow_grpo", "FlowGRPO (arXiv 2505.05470) SDE sampler: sigma_t = a sqrt(t / (1 - t)), a = noise_level"
    ),
    "data.group_size": Published(24, f"{FLOWGRPO_CONFIGS} (*_sd3): sample.num_image_per_prompt = 24"),
    "model.lora.rank": Published(32, "yifan123/flow_grpo scripts/train_sd3.py: LoraConfig(r=32, ...)"),
    "model.lora.alpha": Published(64, "yifan123/flow_grpo scripts/train_sd3.py: LoraConfig(lora_alpha=64)"),
    "model.lora.target_modules": Published(
        sorted(["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]),
        "yifan123/flow_grpo scripts/train_sd3.py: target_modules attn.{add_k_proj, add_q_proj, add_v_proj, "
        "to_add_out, to_k, to_out.0, to_q, to_v}",
    ),
    # gradient_accumulation_steps = num_batches_per_epoch // 2, asserted even "so that gradients are updated
    # twice per epoch"; guardrl: num_inner_epochs * (samples / minibatch) / gradient_accumulation_steps
    "optimizer_steps_per_iteration": Published(
        2, f"{FLOWGRPO_CONFIGS} (*_sd3): 'gradients are updated twice per epoch'"
    ),
}


def _flowgrpo_sd35m(config: str, beta: float) -> dict[str, Published]:
    return {
        **_FLOWGRPO_SD35M,
        **_FLOWGRPO_TRAIN,
        **_FLOWGRPO_OPTIMIZER,
        "model.grpo.ratio_variant": Published(
            "flow_grpo", "FlowGRPO (arXiv 2505.05470): PPO-clipped ratio of the per-step Gaussian densities"
        ),
        "model.grpo.std_scope": Published(
            "global", f"{FLOWGRPO_CONFIGS} `{config}`: sample.global_std = True"
        ),
        "model.grpo.kl_beta": Published(beta, f"{FLOWGRPO_CONFIGS} `{config}`: train.beta = {beta}"),
    }


def _grpo_guard(config: str, clip: float) -> dict[str, Published]:
    return {
        "model.grpo.ratio_variant": Published(
            "grpo_guard", "GRPO-Guard (arXiv 2510.22319): RatioNorm and the 1/|dt| gradient reweighting"
        ),
        "model.grpo.clip_range": Published(clip, f"{GRPO_GUARD} `{config}`: train.clip_range = {clip}"),
        "model.optimizer.init_args.lr": Published(
            1e-4, f"{GRPO_GUARD} `{config}`: train.learning_rate = 1e-4"
        ),
        "model.grpo.kl_beta": Published(0.0, f"{GRPO_GUARD} `{config}`: train.beta = 0"),
        "model.grpo.std_scope": Published("group", f"{GRPO_GUARD} `{config}`: sample.global_std = False"),
    }


def _grpo_guard_sd35m(config: str, clip: float) -> dict[str, Published]:
    # GRPO-Guard's SD3.5-M configs are FlowGRPO's with its ratio, clip range, lr, beta and std scope
    return {
        **_FLOWGRPO_SD35M,
        **_FLOWGRPO_TRAIN,
        **_FLOWGRPO_OPTIMIZER,
        "model.grpo.minibatch_size": Published(
            9, f"{FLOWGRPO_CONFIGS} (*_sd3): train.batch_size = sample.train_batch_size = 9"
        ),
        **_grpo_guard(config, clip),
    }


# --------------------------------------------------------------------------------------------------------
# Flow-Factory's recipes for the newer models (X-GenGroup/Flow-Factory, cited per row)
# --------------------------------------------------------------------------------------------------------

FF_KLEIN = "X-GenGroup/Flow-Factory examples/grpo/lora/flux2_klein_base/default.yaml (a0b2bc5a)"
FF_TRAINING_ARGS = "X-GenGroup/Flow-Factory src/flow_factory/hparams/training_args.py (a0b2bc5a)"
FF_KLEIN_ADAPTER = "X-GenGroup/Flow-Factory src/flow_factory/models/flux/flux2_klein.py (a0b2bc5a)"
FF_SCHEDULER = "X-GenGroup/Flow-Factory src/flow_factory/scheduler/flow_match_euler_discrete.py (a0b2bc5a)"
FLUX2_KLEIN_RECIPE = {
    "model.backbone.class_path": Published("guardrl.policy.Flux2KleinBackbone", f"{FF_KLEIN}: flux2-klein"),
    "model.backbone.init_args.pretrained_model_name_or_path": Published(
        "black-forest-labs/FLUX.2-klein-base-9B",
        f"{FF_KLEIN}: model_name_or_path 'black-forest-labs/FLUX.2-klein-base-9B'",
    ),
    "model.backbone.init_args.resolution": Published(384, f"{FF_KLEIN}: train.resolution 384"),
    "model.backbone.init_args.max_sequence_length": Published(
        512, "Flow-Factory flux2_klein.py encode_prompt(max_sequence_length=512) (the pipeline's default)"
    ),
    "model.sampling.num_inference_steps": Published(8, f"{FF_KLEIN}: train.num_inference_steps 8"),
    "model.sampling.guidance_scale": Published(4.0, f"{FF_KLEIN}: train.guidance_scale 4.0"),
    "model.sampling.noise_level": Published(0.7, f"{FF_KLEIN}: scheduler.noise_level 0.7"),
    "model.sampling.sde_type": Published("flow_grpo", f"{FF_KLEIN}: scheduler.dynamics_type Flow-SDE"),
    "model.sampling.sde_window": Published(
        [1, 4], f"{FF_KLEIN}: scheduler.sde_steps [1, 2, 3] (steps 1..3 = [1, 4))"
    ),
    "model.sampling.sde_window_strategy": Published(
        "random", f"{FF_KLEIN}: 'noise steps are randomly selected from this list during training'"
    ),
    "model.sampling.sde_window_size": Published(1, f"{FF_KLEIN}: scheduler.num_sde_steps 1"),
    "model.sampling.log_prob_reduction": Published(
        "mean", f"{FF_SCHEDULER}: log_prob.mean(dim=tuple(range(1, log_prob.ndim)))"
    ),
    "model.grpo.clip_range": Published(1e-4, f"{FF_KLEIN}: train.clip_range 1.0e-4"),
    "model.grpo.adv_clip_max": Published(5.0, f"{FF_KLEIN}: train.adv_clip_range 5.0"),
    "model.grpo.kl_beta": Published(0.0, f"{FF_KLEIN}: train.kl_beta 0"),
    "model.grpo.std_scope": Published("group", f"{FF_KLEIN}: train.global_std false"),
    "model.grpo.num_inner_epochs": Published(1, f"{FF_TRAINING_ARGS}: num_inner_epochs default 1"),
    "model.grpo.minibatch_size": Published(1, f"{FF_KLEIN}: train.per_device_batch_size 1"),
    "model.grpo.max_grad_norm": Published(1.0, f"{FF_KLEIN}: train.max_grad_norm 1.0"),
    "optimizer_steps_per_iteration": Published(2, f"{FF_KLEIN}: train.gradient_step_per_epoch 2"),
    "model.lora.rank": Published(64, f"{FF_KLEIN}: model.lora_rank 64"),
    "model.lora.alpha": Published(128, f"{FF_KLEIN}: model.lora_alpha 128"),
    "model.lora.target_modules": Published(
        sorted(
            [
                "attn.to_q",
                "attn.to_k",
                "attn.to_v",
                "attn.to_out.0",
                "attn.add_q_proj",
                "attn.add_k_proj",
                "attn.add_v_proj",
                "attn.to_add_out",
                "ff.linear_in",
                "ff.linear_out",
                "ff_context.linear_in",
                "ff_context.linear_out",
                "attn.to_qkv_mlp_proj",
            ]
        ),
        f"{FF_KLEIN}: target_modules 'default' = {FF_KLEIN_ADAPTER} default_target_modules (its single-block "
        "'attn.to_out.0', listed twice, matches nothing there)",
    ),
    "model.optimizer.class_path": Published("torch.optim.AdamW", f"{FF_KLEIN}: adam_* settings (AdamW)"),
    "model.optimizer.init_args.lr": Published(3e-4, f"{FF_KLEIN}: train.learning_rate 3.0e-4"),
    "model.optimizer.init_args.weight_decay": Published(1e-4, f"{FF_KLEIN}: train.adam_weight_decay 1e-4"),
    "model.optimizer.init_args.betas": Published([0.9, 0.999], f"{FF_KLEIN}: train.adam_betas"),
    "model.optimizer.init_args.eps": Published(1e-8, f"{FF_KLEIN}: train.adam_epsilon 1.0e-8"),
    "data.group_size": Published(16, f"{FF_KLEIN}: train.group_size 16"),
    "data.prompts_per_batch": Published(
        6, f"{FF_KLEIN}: unique_sample_num_per_epoch 48 over num_processes 8 = 6 per rank"
    ),
    "trainer.devices": Published(8, f"{FF_KLEIN}: num_processes 8"),
    "seed_everything": Published(42, f"{FF_KLEIN}: train.seed 42"),
}


FF_ZIMAGE = "X-GenGroup/Flow-Factory examples/grpo/lora/z_image_turbo/default.yaml (commit a0b2bc5)"
Z_IMAGE_RECIPE = {
    "model.backbone.init_args.resolution": Published(512, f"{FF_ZIMAGE}: train.resolution 512"),
    "model.sampling.num_inference_steps": Published(6, f"{FF_ZIMAGE}: train.num_inference_steps 6"),
    # Flow-Factory / ZImagePipeline guidance_scale 0 (no CFG) is guardrl's 1.0 (ZImageBackbone docstring)
    "model.sampling.guidance_scale": Published(
        1.0, f"{FF_ZIMAGE}: train.guidance_scale 0 (pipeline convention)"
    ),
    "model.sampling.noise_level": Published(0.7, f"{FF_ZIMAGE}: scheduler.noise_level 0.7"),
    "model.sampling.sde_type": Published("flow_grpo", f"{FF_ZIMAGE}: scheduler.dynamics_type Flow-SDE"),
    "model.grpo.adv_clip_max": Published(5.0, f"{FF_ZIMAGE}: train.adv_clip_range 5.0"),
    "model.grpo.std_scope": Published("group", f"{FF_ZIMAGE}: train.global_std false"),
    "model.grpo.kl_beta": Published(0.0, f"{FF_ZIMAGE}: train.kl_beta 0"),
    "model.grpo.max_grad_norm": Published(1.0, f"{FF_ZIMAGE}: train.max_grad_norm 1.0"),
    "model.lora.rank": Published(64, f"{FF_ZIMAGE}: model.lora_rank 64"),
    "model.lora.alpha": Published(128, f"{FF_ZIMAGE}: model.lora_alpha 128"),
    "model.lora.target_modules": Published(
        sorted(["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]),
        "X-GenGroup/Flow-Factory src/flow_factory/models/z_image/z_image.py default_target_modules: "
        "attention.to_{k,q,v,out.0}, feed_forward.w{1,2,3}",
    ),
    "model.optimizer.init_args.lr": Published(3e-4, f"{FF_ZIMAGE}: train.learning_rate 3.0e-4"),
    "model.optimizer.init_args.weight_decay": Published(1e-4, f"{FF_ZIMAGE}: train.adam_weight_decay 1.0e-4"),
    "model.optimizer.init_args.betas": Published([0.9, 0.999], f"{FF_ZIMAGE}: train.adam_betas [0.9, 0.999]"),
    "model.optimizer.init_args.eps": Published(1e-8, f"{FF_ZIMAGE}: train.adam_epsilon 1.0e-8"),
    "data.group_size": Published(16, f"{FF_ZIMAGE}: train.group_size 16"),
    "model.backbone.init_args.pretrained_model_name_or_path": Published(
        "Tongyi-MAI/Z-Image-Turbo",
        f"{FF_ZIMAGE}: model.model_name_or_path Tongyi-MAI/Z-Image-Turbo",
    ),
    "model.backbone.init_args.max_sequence_length": Published(
        512,
        "X-GenGroup/Flow-Factory src/flow_factory/models/z_image/z_image.py: _encode_prompt("
        "max_sequence_length=512)",
    ),
    "model.grpo.ratio_variant": Published(
        "flow_grpo", f"{FF_ZIMAGE}: trainer_type grpo, r = exp(log_prob - old)"
    ),
    "model.grpo.clip_range": Published(1e-4, f"{FF_ZIMAGE}: train.clip_range 1.0e-4"),
    "model.sampling.log_prob_reduction": Published(
        "mean",
        "X-GenGroup/Flow-Factory src/flow_factory/scheduler/flow_match_euler_discrete.py: log_prob.mean over "
        "the latent dimensions",
    ),
    "model.sampling.sde_window": Published([1, 4], f"{FF_ZIMAGE}: scheduler.sde_steps [1, 2, 3]"),
    "model.sampling.sde_window_strategy": Published(
        "random",
        "X-GenGroup/Flow-Factory trainers/grpo.py: scheduler.set_seed(epoch + seed), then current_sde_steps "
        "draws num_sde_steps of sde_steps",
    ),
    "model.sampling.sde_window_size": Published(1, f"{FF_ZIMAGE}: scheduler.num_sde_steps 1"),
    "model.grpo.minibatch_size": Published(1, f"{FF_ZIMAGE}: train.per_device_batch_size 1"),
    "model.grpo.num_inner_epochs": Published(
        1,
        "X-GenGroup/Flow-Factory hparams/training_args.py: num_inner_epochs 1",
    ),
    # 48 prompts x 16 samples over 8 ranks = 96 per rank, 1 per minibatch, 2 steps: accumulation 48
    "model.grpo.gradient_accumulation_steps": Published(48, f"{FF_ZIMAGE}: gradient_step_per_epoch 2 (auto)"),
    "trainer.devices": Published(8, f"{FF_ZIMAGE}: num_processes 8"),
    "optimizer_steps_per_iteration": Published(2, f"{FF_ZIMAGE}: train.gradient_step_per_epoch 2"),
}


FF_KONTEXT = "X-GenGroup/Flow-Factory examples/grpo/lora/flux1_kontext/default.yaml (commit b30dc00)"
FF_KONTEXT_ADAPTER = "X-GenGroup/Flow-Factory src/flow_factory/models/flux/flux1_kontext.py"

KONTEXT_RECIPE = {
    "model.backbone.init_args.pretrained_model_name_or_path": Published(
        "black-forest-labs/FLUX.1-Kontext-dev",
        f"{FF_KONTEXT}: model.model_name_or_path = 'black-forest-labs/FLUX.1-Kontext-dev'",
    ),
    "model.backbone.init_args.resolution": Published(384, f"{FF_KONTEXT}: train.resolution = 384"),
    "model.backbone.init_args.condition_image_size": Published(
        384, f"{FF_KONTEXT}: train.condition_image_size = 384"
    ),
    "model.backbone.init_args.max_sequence_length": Published(
        512, f"{FF_KONTEXT_ADAPTER}: encode_prompt(max_sequence_length=512)"
    ),
    "model.sampling.num_inference_steps": Published(10, f"{FF_KONTEXT}: train.num_inference_steps = 10"),
    "model.sampling.guidance_scale": Published(2.5, f"{FF_KONTEXT}: train.guidance_scale = 2.5"),
    "model.sampling.noise_level": Published(0.9, f"{FF_KONTEXT}: scheduler.noise_level = 0.9"),
    "model.sampling.sde_type": Published("flow_grpo", f"{FF_KONTEXT}: scheduler.dynamics_type = Flow-SDE"),
    "model.sampling.sde_window": Published([1, 4], f"{FF_KONTEXT}: scheduler.sde_steps = [1, 2, 3]"),
    "model.sampling.sde_window_strategy": Published(
        "random", f"{FF_KONTEXT}: noise steps randomly selected from scheduler.sde_steps"
    ),
    "model.sampling.sde_window_size": Published(1, f"{FF_KONTEXT}: scheduler.num_sde_steps = 1"),
    "model.grpo.ratio_variant": Published("flow_grpo", f"{FF_KONTEXT}: train.trainer_type = 'grpo'"),
    "model.grpo.clip_range": Published(1e-4, f"{FF_KONTEXT}: train.clip_range = 1.0e-4"),
    "model.grpo.adv_clip_max": Published(5.0, f"{FF_KONTEXT}: train.adv_clip_range = 5.0"),
    "model.grpo.std_scope": Published("group", f"{FF_KONTEXT}: train.global_std = false"),
    "model.grpo.kl_beta": Published(0.0, f"{FF_KONTEXT}: train.kl_beta = 0"),
    "model.grpo.minibatch_size": Published(1, f"{FF_KONTEXT}: train.per_device_batch_size = 1"),
    "model.grpo.max_grad_norm": Published(1.0, f"{FF_KONTEXT}: optimizers[0].max_grad_norm = 1.0"),
    "model.lora.rank": Published(64, f"{FF_KONTEXT}: model.lora_rank = 64"),
    "model.lora.alpha": Published(128, f"{FF_KONTEXT}: model.lora_alpha = 128"),
    "model.lora.target_modules": Published(
        sorted(
            ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
            + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
        ),
        f"{FF_KONTEXT_ADAPTER}: Flux1KontextAdapter.default_target_modules (target_modules 'default')",
    ),
    "model.optimizer.class_path": Published("torch.optim.AdamW", f"{FF_KONTEXT}: optimizers (AdamW)"),
    "model.optimizer.init_args.lr": Published(3e-4, f"{FF_KONTEXT}: optimizers[0].learning_rate = 3.0e-4"),
    "model.optimizer.init_args.weight_decay": Published(
        1e-4, f"{FF_KONTEXT}: optimizers[0].weight_decay = 1.0e-4"
    ),
    "model.optimizer.init_args.betas": Published([0.9, 0.999], f"{FF_KONTEXT}: optimizers[0].betas"),
    "model.optimizer.init_args.eps": Published(1e-8, f"{FF_KONTEXT}: optimizers[0].eps = 1.0e-8"),
    "data.group_size": Published(16, f"{FF_KONTEXT}: train.group_size = 16"),
    "data.image_field": Published(
        "image", "Flow-Factory README, Image-to-Image: {'prompt': ..., 'image': ...}"
    ),
    "trainer.devices": Published(8, f"{FF_KONTEXT}: num_processes = 8"),
    "seed_everything": Published(42, f"{FF_KONTEXT}: train.seed = 42"),
    "optimizer_steps_per_iteration": Published(2, f"{FF_KONTEXT}: train.gradient_step_per_epoch = 2"),
}


FF_QWEN_RECIPE = "X-GenGroup/Flow-Factory examples/grpo/lora/qwen_image/default.yaml (a0b2bc5a)"
FF_QWEN = "X-GenGroup/Flow-Factory src/flow_factory/models/qwen_image/qwen_image.py (a0b2bc5a)"
FF_CLIP = "X-GenGroup/Flow-Factory src/flow_factory/rewards/clip.py (a0b2bc5a)"
FF_PICK = "X-GenGroup/Flow-Factory src/flow_factory/rewards/pick_score.py (a0b2bc5a)"
QWEN_IMAGE_RECIPE = {
    "model.backbone.class_path": Published(
        "guardrl.policy.QwenImageBackbone", f"{FF_QWEN_RECIPE}: qwen-image"
    ),
    "model.backbone.init_args.pretrained_model_name_or_path": Published(
        "Qwen/Qwen-Image", f"{FF_QWEN_RECIPE}: model_name_or_path 'Qwen/Qwen-Image or Qwen/Qwen-Image-2512'"
    ),
    "model.backbone.init_args.resolution": Published(512, f"{FF_QWEN_RECIPE}: train.resolution 512"),
    "model.rewards.0.class_path": Published(
        "guardrl.rewards.CLIPScore", f"{FF_QWEN_RECIPE}: reward_model CLIP"
    ),
    "model.rewards.0.init_args.pretrained": Published(
        "openai/clip-vit-large-patch14", f"{FF_CLIP}: DEFAULT_MODEL"
    ),
    "model.rewards.0.init_args.scale": Published(1.0, f"{FF_CLIP}: rewards = cosine similarity"),
    "model.rewards.0.init_args.clamp_at_zero": Published(False, f"{FF_CLIP}: rewards = cosine similarity"),
    "model.rewards.0.init_args.weight": Published(1.0, f"{FF_QWEN_RECIPE}: text_alignment weight 1.0"),
    "model.rewards.1.class_path": Published("guardrl.rewards.PickScore", f"{FF_QWEN_RECIPE}: PickScore"),
    "model.rewards.1.init_args.scale": Published(26.0, f"{FF_PICK}: scores = scores / 26"),
    "model.rewards.1.init_args.weight": Published(0.5, f"{FF_QWEN_RECIPE}: pick_score weight 0.5"),
    "model.sampling.num_inference_steps": Published(10, f"{FF_QWEN_RECIPE}: train.num_inference_steps 10"),
    "model.sampling.guidance_scale": Published(4.0, f"{FF_QWEN_RECIPE}: train.guidance_scale 4"),
    "model.sampling.noise_level": Published(1.0, f"{FF_QWEN_RECIPE}: scheduler.noise_level 1.0"),
    "model.sampling.sde_type": Published("flow_grpo", f"{FF_QWEN_RECIPE}: scheduler.dynamics_type Flow-SDE"),
    "model.sampling.sde_window": Published(
        [1, 4], f"{FF_QWEN_RECIPE}: scheduler.sde_steps [1, 2, 3] (steps 1..3 = [1, 4))"
    ),
    "model.sampling.sde_window_strategy": Published(
        "random", f"{FF_QWEN_RECIPE}: 'noise steps are randomly selected from this list during training'"
    ),
    "model.sampling.sde_window_size": Published(1, f"{FF_QWEN_RECIPE}: scheduler.num_sde_steps 1"),
    "model.sampling.log_prob_reduction": Published(
        "mean", f"{FF_SCHEDULER}: log_prob.mean(dim=tuple(range(1, log_prob.ndim)))"
    ),
    "model.grpo.clip_range": Published(1e-4, f"{FF_QWEN_RECIPE}: train.clip_range 1.0e-4"),
    "model.grpo.adv_clip_max": Published(5.0, f"{FF_QWEN_RECIPE}: train.adv_clip_range 5.0"),
    "model.grpo.kl_beta": Published(0.0, f"{FF_QWEN_RECIPE}: train.kl_beta 0"),
    "model.grpo.std_scope": Published("group", f"{FF_QWEN_RECIPE}: train.global_std false"),
    "model.grpo.num_inner_epochs": Published(1, f"{FF_TRAINING_ARGS}: num_inner_epochs default 1"),
    "model.grpo.minibatch_size": Published(1, f"{FF_QWEN_RECIPE}: train.per_device_batch_size 1"),
    "model.grpo.max_grad_norm": Published(1.0, f"{FF_QWEN_RECIPE}: train.max_grad_norm 1.0"),
    "optimizer_steps_per_iteration": Published(2, f"{FF_QWEN_RECIPE}: train.gradient_step_per_epoch 2"),
    "model.lora.rank": Published(64, f"{FF_QWEN_RECIPE}: model.lora_rank 64"),
    "model.lora.alpha": Published(128, f"{FF_QWEN_RECIPE}: model.lora_alpha 128"),
    "model.lora.target_modules": Published(
        sorted(
            [
                "attn.to_q",
                "attn.to_k",
                "attn.to_v",
                "attn.to_out.0",
                "attn.add_q_proj",
                "attn.add_k_proj",
                "attn.add_v_proj",
                "attn.to_add_out",
                "img_mlp.net.0.proj",
                "txt_mlp.net.0.proj",
            ]
        ),
        f"{FF_QWEN_RECIPE}: target_modules 'default' = {FF_QWEN} default_target_modules (its "
        "'img_mlp.net.2.proj' and 'txt_mlp.net.2.proj' match nothing: net.2 is the Linear itself)",
    ),
    "model.performance.gradient_checkpointing": Published(
        True, f"{FF_QWEN_RECIPE}: train.enable_gradient_checkpointing true"
    ),
    "model.optimizer.class_path": Published(
        "torch.optim.AdamW", f"{FF_QWEN_RECIPE}: adam_* settings (AdamW)"
    ),
    "model.optimizer.init_args.lr": Published(3e-4, f"{FF_QWEN_RECIPE}: train.learning_rate 3.0e-4"),
    "model.optimizer.init_args.weight_decay": Published(
        1e-4, f"{FF_QWEN_RECIPE}: train.adam_weight_decay 1e-4"
    ),
    "model.optimizer.init_args.betas": Published([0.9, 0.999], f"{FF_QWEN_RECIPE}: train.adam_betas"),
    "model.optimizer.init_args.eps": Published(1e-8, f"{FF_QWEN_RECIPE}: train.adam_epsilon 1.0e-8"),
    "data.group_size": Published(16, f"{FF_QWEN_RECIPE}: train.group_size 16"),
    "data.prompts_per_batch": Published(
        6, f"{FF_QWEN_RECIPE}: unique_sample_num_per_epoch 48 over num_processes 8 = 6 per rank"
    ),
    "trainer.devices": Published(8, f"{FF_QWEN_RECIPE}: num_processes 8"),
    "checkpoint.every_n_iterations": Published(20, f"{FF_QWEN_RECIPE}: log.save_freq 20"),
    "seed_everything": Published(42, f"{FF_QWEN_RECIPE}: train.seed 42"),
    "model.grpo.reward_aggregation": Published(
        "gdpo", f"{FF_QWEN_RECIPE}: advantage_aggregation 'gdpo' (per-reward group normalisation)"
    ),
}


FF_QWEN_EDIT = "X-GenGroup/Flow-Factory examples/grpo/lora/qwen_image_edit_plus/default.yaml (commit 5f6cda1)"
# Numbers as FF's Qwen-Image-Edit-Plus recipe gives them; the model (Qwen/Qwen-Image-Edit, not -2509), the
# condition-size rule, the LoRA targets and the missing EMA are deviations, in the recipe's header.
QWEN_IMAGE_EDIT_RECIPE = {
    "model.backbone.class_path": Published(
        "guardrl.policy.QwenImageEditBackbone", f"{FF_QWEN_EDIT}: model_type qwen-image-edit-plus"
    ),
    "model.backbone.init_args.resolution": Published(384, f"{FF_QWEN_EDIT}: train.resolution 384"),
    "model.backbone.init_args.condition_image_size": Published(
        384, f"{FF_QWEN_EDIT}: train.condition_image_size [384, 384]"
    ),
    "model.rewards.0.class_path": Published("guardrl.rewards.PickScore", f"{FF_QWEN_EDIT}: PickScore"),
    "model.rewards.0.init_args.scale": Published(26.0, f"{FF_PICK}: scores = scores / 26"),
    "model.sampling.num_inference_steps": Published(10, f"{FF_QWEN_EDIT}: train.num_inference_steps 10"),
    "model.sampling.guidance_scale": Published(4.0, f"{FF_QWEN_EDIT}: train.guidance_scale 4"),
    "model.sampling.noise_level": Published(1.0, f"{FF_QWEN_EDIT}: scheduler.noise_level 1.0"),
    "model.sampling.sde_type": Published("flow_grpo", f"{FF_QWEN_EDIT}: scheduler.dynamics_type Flow-SDE"),
    "model.sampling.sde_window": Published([1, 4], f"{FF_QWEN_EDIT}: scheduler.sde_steps [1, 2, 3]"),
    "model.sampling.sde_window_strategy": Published(
        "random", f"{FF_QWEN_EDIT}: noise steps randomly selected from scheduler.sde_steps"
    ),
    "model.sampling.sde_window_size": Published(1, f"{FF_QWEN_EDIT}: scheduler.num_sde_steps 1"),
    "model.grpo.ratio_variant": Published("flow_grpo", f"{FF_QWEN_EDIT}: train.trainer_type 'grpo'"),
    "model.grpo.clip_range": Published(1e-4, f"{FF_QWEN_EDIT}: train.clip_range 1.0e-4"),
    "model.grpo.adv_clip_max": Published(5.0, f"{FF_QWEN_EDIT}: train.adv_clip_range 5.0"),
    "model.grpo.std_scope": Published("group", f"{FF_QWEN_EDIT}: train.global_std false"),
    "model.grpo.kl_beta": Published(0.0, f"{FF_QWEN_EDIT}: train.kl_beta 0"),
    "model.grpo.minibatch_size": Published(1, f"{FF_QWEN_EDIT}: train.per_device_batch_size 1"),
    "model.grpo.max_grad_norm": Published(1.0, f"{FF_QWEN_EDIT}: optimizers[0].max_grad_norm 1.0"),
    "model.lora.rank": Published(64, f"{FF_QWEN_EDIT}: model.lora_rank 64"),
    "model.lora.alpha": Published(128, f"{FF_QWEN_EDIT}: model.lora_alpha 128"),
    "model.performance.gradient_checkpointing": Published(
        True, f"{FF_QWEN_EDIT}: train.enable_gradient_checkpointing true"
    ),
    "model.optimizer.class_path": Published("torch.optim.AdamW", f"{FF_QWEN_EDIT}: optimizers (AdamW)"),
    "model.optimizer.init_args.lr": Published(3e-4, f"{FF_QWEN_EDIT}: optimizers[0].learning_rate 3.0e-4"),
    "model.optimizer.init_args.weight_decay": Published(
        1e-4, f"{FF_QWEN_EDIT}: optimizers[0].weight_decay 1.0e-4"
    ),
    "model.optimizer.init_args.betas": Published([0.9, 0.999], f"{FF_QWEN_EDIT}: optimizers[0].betas"),
    "model.optimizer.init_args.eps": Published(1e-8, f"{FF_QWEN_EDIT}: optimizers[0].eps 1.0e-8"),
    "data.group_size": Published(16, f"{FF_QWEN_EDIT}: train.group_size 16"),
    "data.prompts_per_batch": Published(
        6, f"{FF_QWEN_EDIT}: unique_sample_num_per_epoch 48 over num_processes 8 = 6 per rank"
    ),
    "data.image_field": Published(
        "image", "Flow-Factory README, Image-to-Image: {'prompt': ..., 'image': ...}"
    ),
    "trainer.devices": Published(8, f"{FF_QWEN_EDIT}: num_processes 8"),
    "checkpoint.every_n_iterations": Published(20, f"{FF_QWEN_EDIT}: log.save_freq 20"),
    "seed_everything": Published(42, f"{FF_QWEN_EDIT}: train.seed 42"),
    "optimizer_steps_per_iteration": Published(2, f"{FF_QWEN_EDIT}: train.gradient_step_per_epoch 2"),
}

# --------------------------------------------------------------------------------------------------------
# The table: recipe file (under configs/) -> guardrl option (as `guardrl fit --print_config` writes it) ->
# the published number. "optimizer_steps_per_iteration" is derived from the batch settings.
# --------------------------------------------------------------------------------------------------------

_PICKSCORE_FLUX = f"{FLOWGRPO_CONFIGS} `pickscore_flux`"

RECIPES: dict[str, dict[str, Published]] = {
    "sd35m/flow_grpo_geneval.yaml": _flowgrpo_sd35m("geneval_sd3", 0.04),
    "sd35m/flow_grpo_ocr.yaml": _flowgrpo_sd35m("general_ocr_sd3", 0.04),
    "sd35m/flow_grpo_pickscore.yaml": _flowgrpo_sd35m("pickscore_sd3", 0.01),
    "sd35m/grpo_guard_geneval.yaml": _grpo_guard_sd35m("geneval_sd3_rationorm", 2e-6),
    "sd35m/grpo_guard_ocr.yaml": _grpo_guard_sd35m("general_ocr_sd3_rationorm", 2e-6),
    "sd35m/grpo_guard_pickscore.yaml": _grpo_guard_sd35m("pickscore_hps_sd3_ratio_norm", 4e-6),
    "flux2_klein/grpo_pickscore.yaml": FLUX2_KLEIN_RECIPE,
    "qwen_image/grpo_clip_pickscore.yaml": QWEN_IMAGE_RECIPE,
    "z_image/flow_grpo_pickscore_turbo.yaml": Z_IMAGE_RECIPE,
    "flux_kontext/flow_grpo_pickscore.yaml": KONTEXT_RECIPE,
    "qwen_image_edit/flow_grpo_pickscore.yaml": QWEN_IMAGE_EDIT_RECIPE,
    # No published SD3.5-Large GRPO recipe: the Medium one's numbers, the Large weights (the config says so)
    "sd35l/grpo_guard_pickscore.yaml": {
        **_grpo_guard_sd35m("pickscore_hps_sd3_ratio_norm", 4e-6),
        "model.backbone.init_args.pretrained_model_name_or_path": Published(
            "stabilityai/stable-diffusion-3.5-large",
            "configs/sd35l/grpo_guard_pickscore.yaml: the Medium recipe on the Large weights (the deviation)",
        ),
    },
    "flux/dance_grpo_pickscore.yaml": {
        "model.backbone.init_args.pretrained_model_name_or_path": Published(
            "black-forest-labs/FLUX.1-dev",
            f"{DANCEGRPO}: the FLUX.1-dev weights (--pretrained_model_name_or_path)",
        ),
        "model.backbone.init_args.resolution": Published(720, f"{DANCEGRPO}: --h 720 --w 720"),
        "model.sampling.num_inference_steps": Published(12, f"{DANCEGRPO}: --sampling_steps 12"),
        "model.sampling.noise_level": Published(0.3, f"{DANCEGRPO}: --eta 0.3"),
        "model.sampling.sde_type": Published(
            "dance_grpo", "DanceGRPO (arXiv 2505.07818): constant SDE noise scale eta"
        ),
        "model.sampling.same_noise_per_group": Published(True, f"{DANCEGRPO}: --init_same_noise"),
        "model.grpo.ratio_variant": Published(
            "flow_grpo", "DanceGRPO (arXiv 2505.07818): the PPO-clipped ratio of per-step Gaussian densities"
        ),
        "model.grpo.clip_range": Published(1e-4, f"{DANCEGRPO}: --clip_range 1e-4"),
        "model.grpo.adv_clip_max": Published(5.0, f"{DANCEGRPO}: --adv_clip_max 5.0"),
        "model.grpo.std_scope": Published("group", f"{DANCEGRPO}: --use_group (per-group mean and std)"),
        "model.grpo.kl_beta": Published(0.0, f"{DANCEGRPO}: no KL option among the script's arguments"),
        "model.grpo.max_grad_norm": Published(1.0, f"{DANCEGRPO}: --max_grad_norm 1.0"),
        "model.grpo.minibatch_size": Published(2, f"{DANCEGRPO}: --train_batch_size 2"),
        "model.grpo.gradient_accumulation_steps": Published(
            12, f"{DANCEGRPO}: --gradient_accumulation_steps 12"
        ),
        # int(0.6 * 12) = 7 of the 12 sampler steps
        "model.grpo.num_train_timesteps": Published(7, f"{DANCEGRPO}: --timestep_fraction 0.6 of 12 steps"),
        "model.lora.rank": Published(128, f"{DANCEGRPO}: --lora_rank 128"),
        "model.lora.alpha": Published(256, f"{DANCEGRPO}: --lora_alpha 256"),
        "model.optimizer.init_args.lr": Published(3e-4, f"{DANCEGRPO}: --learning_rate 3e-4"),
        "model.optimizer.init_args.weight_decay": Published(1e-4, f"{DANCEGRPO}: --weight_decay 0.0001"),
        "data.group_size": Published(12, f"{DANCEGRPO}: --num_generations 12"),
        # 12 generations / 2 per minibatch / 12 accumulation steps
        "optimizer_steps_per_iteration": Published(
            1, f"{DANCEGRPO}: --num_generations 12, --train_batch_size 2, --gradient_accumulation_steps 12"
        ),
    },
    # No official GRPO-Guard Flux config: FlowGRPO's Flux PickScore recipe with GRPO-Guard's ratio, clip
    # range, lr, beta and std scope from its SD3.5-M PickScore config (as the recipe's header says).
    "flux/grpo_guard_pickscore.yaml": {
        "model.backbone.init_args.pretrained_model_name_or_path": Published(
            "black-forest-labs/FLUX.1-dev",
            f"{_PICKSCORE_FLUX}: pretrained.model = 'black-forest-labs/FLUX.1-dev'",
        ),
        "model.backbone.init_args.resolution": Published(512, f"{_PICKSCORE_FLUX}: resolution = 512"),
        "model.sampling.num_inference_steps": Published(6, f"{_PICKSCORE_FLUX}: sample.num_steps = 6"),
        "model.sampling.guidance_scale": Published(3.5, f"{_PICKSCORE_FLUX}: sample.guidance_scale = 3.5"),
        "model.sampling.noise_level": Published(0.9, f"{_PICKSCORE_FLUX}: sample.noise_level = 0.9"),
        "model.grpo.minibatch_size": Published(
            3, f"{_PICKSCORE_FLUX}: train.batch_size = sample.train_batch_size = 3"
        ),
        "model.grpo.adv_clip_max": Published(5.0, f"{FLOWGRPO_BASE}: train.adv_clip_max = 5"),
        "model.grpo.max_grad_norm": Published(1.0, f"{FLOWGRPO_BASE}: train.max_grad_norm = 1.0"),
        "model.grpo.num_inner_epochs": Published(1, f"{_PICKSCORE_FLUX}: train.num_inner_epochs = 1"),
        "model.lora.rank": Published(64, "yifan123/flow_grpo scripts/train_flux.py: LoraConfig(r=64, ...)"),
        "model.lora.alpha": Published(
            128, "yifan123/flow_grpo scripts/train_flux.py: LoraConfig(lora_alpha=128)"
        ),
        "model.optimizer.init_args.weight_decay": Published(
            1e-4, f"{FLOWGRPO_BASE}: train.adam_weight_decay = 1e-4"
        ),
        "data.group_size": Published(24, f"{_PICKSCORE_FLUX}: sample.num_image_per_prompt = 24"),
        "optimizer_steps_per_iteration": Published(
            2, f"{_PICKSCORE_FLUX}: 'gradients are updated twice per epoch'"
        ),
        **_grpo_guard("pickscore_hps_sd3_ratio_norm", 4e-6),
    },
}

# --------------------------------------------------------------------------------------------------------
# Published model shapes (diffusers config names) and sizes, for the random-weight backbones
# --------------------------------------------------------------------------------------------------------

SD35M_CONFIG = "stabilityai/stable-diffusion-3.5-medium transformer/config.json"
FLUX_UTIL = "black-forest-labs/flux src/flux/util.py configs['flux-dev']"
SD35L_CONFIG = "stabilityai/stable-diffusion-3.5-large transformer/config.json"

MODELS: dict[str, dict[str, Published]] = {
    "sd35m": {
        "sample_size": Published(128, f"{SD35M_CONFIG}: sample_size 128"),
        "patch_size": Published(2, f"{SD35M_CONFIG}: patch_size 2"),
        "in_channels": Published(16, f"{SD35M_CONFIG}: in_channels 16"),
        "out_channels": Published(16, f"{SD35M_CONFIG}: out_channels 16"),
        "num_layers": Published(24, f"{SD35M_CONFIG}: num_layers 24"),
        "attention_head_dim": Published(64, f"{SD35M_CONFIG}: attention_head_dim 64"),
        "num_attention_heads": Published(24, f"{SD35M_CONFIG}: num_attention_heads 24"),
        "joint_attention_dim": Published(4096, f"{SD35M_CONFIG}: joint_attention_dim 4096"),
        "caption_projection_dim": Published(1536, f"{SD35M_CONFIG}: caption_projection_dim 1536"),
        "pooled_projection_dim": Published(2048, f"{SD35M_CONFIG}: pooled_projection_dim 2048"),
        "pos_embed_max_size": Published(384, f"{SD35M_CONFIG}: pos_embed_max_size 384"),
        "dual_attention_layers": Published(list(range(13)), f"{SD35M_CONFIG}: dual_attention_layers 0..12"),
        "qk_norm": Published("rms_norm", f"{SD35M_CONFIG}: qk_norm 'rms_norm'"),
        "vae.latent_channels": Published(
            16, "stabilityai/stable-diffusion-3.5-medium vae/config.json: latent_channels 16"
        ),
        "vae_scale_factor": Published(
            8,
            "stabilityai/stable-diffusion-3.5-medium vae/config.json: block_out_channels "
            "[128, 256, 512, 512], x2 downsampling between blocks: 2^3 = 8",
        ),
        "vae.scaling_factor": Published(
            1.5305, "stabilityai/stable-diffusion-3.5-medium vae/config.json: 1.5305"
        ),
        "vae.shift_factor": Published(
            0.0609, "stabilityai/stable-diffusion-3.5-medium vae/config.json: 0.0609"
        ),
        # Stability AI's SD3.5 announcement / model card: "2.5 billion parameters" (weights file incl. the
        # position-embedding table, which diffusers keeps as a buffer)
        "weights_in_billions_to_1_decimal": Published(
            2.5, "Stability AI, SD3.5 Medium: 2.5 billion parameters"
        ),
    },
    "sd35l": {
        "sample_size": Published(128, f"{SD35L_CONFIG}: sample_size 128"),
        "patch_size": Published(2, f"{SD35L_CONFIG}: patch_size 2"),
        "in_channels": Published(16, f"{SD35L_CONFIG}: in_channels 16"),
        "out_channels": Published(16, f"{SD35L_CONFIG}: out_channels 16"),
        "num_layers": Published(38, f"{SD35L_CONFIG}: num_layers 38 (Stability AI: MMDiT depth 38)"),
        "attention_head_dim": Published(64, f"{SD35L_CONFIG}: attention_head_dim 64"),
        "num_attention_heads": Published(38, f"{SD35L_CONFIG}: num_attention_heads 38 (hidden 2432)"),
        "joint_attention_dim": Published(4096, f"{SD35L_CONFIG}: joint_attention_dim 4096"),
        "caption_projection_dim": Published(2432, f"{SD35L_CONFIG}: caption_projection_dim 2432"),
        "pooled_projection_dim": Published(2048, f"{SD35L_CONFIG}: pooled_projection_dim 2048"),
        "pos_embed_max_size": Published(192, f"{SD35L_CONFIG}: pos_embed_max_size 192"),
        "dual_attention_layers": Published([], f"{SD35L_CONFIG}: no dual_attention_layers (not MMDiT-X)"),
        "qk_norm": Published(
            "rms_norm", f"{SD35L_CONFIG}: qk_norm 'rms_norm' (diffusers blog: QK normalization)"
        ),
        "vae.latent_channels": Published(16, "stabilityai/stable-diffusion-3.5-large vae/config.json: 16"),
        "vae.scaling_factor": Published(
            1.5305, "stabilityai/stable-diffusion-3.5-large vae/config.json: 1.5305"
        ),
        "vae.shift_factor": Published(
            0.0609, "stabilityai/stable-diffusion-3.5-large vae/config.json: 0.0609"
        ),
        # the weights as released (8,146,280,768 with the position table; 8,056,627,520 parameters alone):
        # both round to the model card's figure
        "weights_in_billions_to_1_decimal": Published(
            8.1, "stabilityai/stable-diffusion-3.5-large model card: 'an 8.1 billion parameter' MMDiT"
        ),
    },
    "flux": {
        "in_channels": Published(64, f"{FLUX_UTIL}: in_channels=64"),
        "num_layers": Published(19, f"{FLUX_UTIL}: depth=19"),
        "num_single_layers": Published(38, f"{FLUX_UTIL}: depth_single_blocks=38"),
        "num_attention_heads": Published(24, f"{FLUX_UTIL}: num_heads=24"),
        "attention_head_dim": Published(128, f"{FLUX_UTIL}: hidden_size=3072 / num_heads=24"),
        "joint_attention_dim": Published(4096, f"{FLUX_UTIL}: context_in_dim=4096"),
        "pooled_projection_dim": Published(768, f"{FLUX_UTIL}: vec_in_dim=768"),
        "guidance_embeds": Published(True, f"{FLUX_UTIL}: guidance_embed=True"),
        "axes_dims_rope": Published([16, 56, 56], f"{FLUX_UTIL}: axes_dim=[16, 56, 56]"),
        "vae.latent_channels": Published(16, f"{FLUX_UTIL} ae_params: z_channels=16"),
        "vae.scaling_factor": Published(0.3611, f"{FLUX_UTIL} ae_params: scale_factor=0.3611"),
        "vae.shift_factor": Published(0.1159, f"{FLUX_UTIL} ae_params: shift_factor=0.1159"),
        "weights_in_billions_to_0_decimals": Published(
            12, "black-forest-labs/FLUX.1-dev model card: 'a 12 billion parameter rectified flow transformer'"
        ),
    },
}

# --------------------------------------------------------------------------------------------------------
# The shipped toy proxy (guardrl/toy/proxy): what its documentation publishes
# --------------------------------------------------------------------------------------------------------

TOY_PROXY_DOC = "docs/toy_proxy.md"

TOY_PROXY: dict[str, Published] = {
    "parameters": Published(223_857, f"{TOY_PROXY_DOC}: 'The scorer is a CNN with 223,857 parameters'"),
    "training.seed": Published(
        0, f"{TOY_PROXY_DOC}: `python -m guardrl.toy.proxy train --out DIR --seed 0 --steps 650`"
    ),
    "training.steps_done": Published(650, f"{TOY_PROXY_DOC}: 'It ran 650 steps'"),
    "training.finished": Published(
        True, f"{TOY_PROXY_DOC}: 'This is the command behind the shipped weights'"
    ),
    "training.threads": Published(1, f"{TOY_PROXY_DOC}: 'on one thread of the shared 2-core machine'"),
    "training.settings.batch_size": Published(32, f"{TOY_PROXY_DOC}: 'draws 32 kinds' per batch"),
    "training.settings.lr": Published(3e-3, f"{TOY_PROXY_DOC}: 'AdamW (lr 3e-3, weight decay 1e-4)'"),
    "training.settings.weight_decay": Published(
        1e-4, f"{TOY_PROXY_DOC}: 'AdamW (lr 3e-3, weight decay 1e-4)'"
    ),
    "training.settings.warmup_steps": Published(20, f"{TOY_PROXY_DOC}: 'with 20 warm-up steps'"),
    "training.settings.min_lr_ratio": Published(
        0.05, f"{TOY_PROXY_DOC}: 'cosine decay to 5% of the learning rate'"
    ),
    "training.settings.grad_clip": Published(1.0, f"{TOY_PROXY_DOC}: 'Gradients are clipped at norm 1'"),
    "evaluation.heldout.n": Published(
        1024, f"{TOY_PROXY_DOC}: 'The evaluation uses 1,024 clean renders per split'"
    ),
    "evaluation.train.n": Published(
        1024, f"{TOY_PROXY_DOC}: 'The evaluation uses 1,024 clean renders per split'"
    ),
    "hack.n": Published(256, f"{TOY_PROXY_DOC}: 'The command runs it on 256 held-out prompts'"),
    "hack.epsilon": Published(0.15, f"{TOY_PROXY_DOC}: 'epsilon 0.15, 50 signed steps of 0.02'"),
    "hack.steps": Published(50, f"{TOY_PROXY_DOC}: 'epsilon 0.15, 50 signed steps of 0.02'"),
    "hack.step_size": Published(0.02, f"{TOY_PROXY_DOC}: 'epsilon 0.15, 50 signed steps of 0.02'"),
}
