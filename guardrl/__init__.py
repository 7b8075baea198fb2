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


def _silence_expected_third_party_messages() -> None:
    """Importing diffusers' pipelines makes transformers print, for CLIP's and SigLIP's image processors, that
    torchvision is missing and the PIL processor is used instead. guardrl needs no torchvision (its rewards
    preprocess tensors themselves, guardrl/rewards/clip_rewards.py), so the fallback is the intended behaviour
    and the message would only teach users to ignore warnings. This one message is filtered at its source
    (transformers.utils.import_utils' logger); everything else that logger says still shows."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in str(record.msg)

    logging.getLogger("transformers.utils.import_utils").addFilter(keep)


_silence_expected_third_party_messages()
