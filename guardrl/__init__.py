"""guardrl: GRPO and GRPO-Guard fine-tuning of flow-matching text-to-image models on PyTorch Lightning.

Where things live (see docs/architecture.md):
    sampling/   pure: sigma schedules, SDE/ODE steps with log-probabilities, the rollout loop
    algorithm/  pure: group advantages, the five ratio variants, the clipped loss, the KL
    policy/     backbones (SD3, Flux, tiny), LoRA adapters, old-policy snapshot, reference, EMA
    rewards/    the Reward interface and offline rewards
    data/       PromptDataModule: streamed prompts, repeated per group
    module.py   GRPOModule: the one orchestrator (one training_step = one GRPO iteration)
    callbacks/  RatioStatsCallback: per-step ratio and clip statistics to TensorBoard
    cli.py      GuardRLCLI and the `guardrl` console script
"""

__version__ = "0.1.0"
