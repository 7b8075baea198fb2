"""Pure GRPO math: advantages, the five ratio variants, the clipped loss, the KL. No Lightning, no
diffusers."""

from guardrl.algorithm.advantages import (
    REWARD_AGGREGATIONS,
    STD_SCOPES,
    gdpo_advantages,
    group_advantages,
    shuffle_within_groups,
)
from guardrl.algorithm.loss import (
    CLIP_RANGE_UNITS,
    LossStats,
    clip_shares,
    clipped_policy_loss,
    effective_clip_range,
    kl_to_reference,
)
from guardrl.algorithm.ratios import (
    RATIO_VARIANTS,
    VARIANCE_NORMALIZED_VARIANTS,
    PolicyRatio,
    RatioTerms,
    compute_ratio_terms,
    flow_grpo_ratio,
    grpo_guard_ratio,
    mean_revised_ratio,
    ratio_norm_ratio,
    temp_reweight_ratio,
)

__all__ = [
    "CLIP_RANGE_UNITS",
    "RATIO_VARIANTS",
    "REWARD_AGGREGATIONS",
    "STD_SCOPES",
    "VARIANCE_NORMALIZED_VARIANTS",
    "LossStats",
    "PolicyRatio",
    "RatioTerms",
    "clip_shares",
    "clipped_policy_loss",
    "compute_ratio_terms",
    "effective_clip_range",
    "flow_grpo_ratio",
    "gdpo_advantages",
    "group_advantages",
    "shuffle_within_groups",
    "grpo_guard_ratio",
    "kl_to_reference",
    "mean_revised_ratio",
    "ratio_norm_ratio",
    "temp_reweight_ratio",
]
