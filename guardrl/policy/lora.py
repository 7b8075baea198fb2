"""LoRA settings, converted to a peft `LoraConfig` in exactly one place."""

from __future__ import annotations

import dataclasses

import math
from dataclasses import dataclass
from typing import Optional

from peft import LoraConfig

LORA_INITS = ("gaussian", "default")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class LoraSpec:
    """LoRA adapter on the transformer (the base weights stay frozen)."""

    rank: int = 32
    """Adapter rank r (FlowGRPO SD3.5 recipes: 32; Flux: 64)."""
    alpha: float = 64.0
    """lora_alpha; the update is scaled by alpha / rank."""
    target_modules: Optional[list[str]] = None
    """Module names to adapt (peft: a name or a dotted suffix). null: the backbone's `lora_targets()`, the
    diffusers attention projections to_q, to_k, to_v, to_out.0 for most models (FLUX.2 adds its single
    blocks' fused projections)."""
    dropout: float = 0.0
    """Must be 0: the policy runs in eval mode (dropout would make the recomputed mean differ from the
    rollout's), so a LoRA dropout would never be applied. Kept as an option only to refuse it clearly."""
    init: str = "gaussian"
    """peft `init_lora_weights`: "gaussian" or "default" (peft's Kaiming A); both keep B = 0, so the adapted
    model starts equal to the base."""

    def __post_init__(self) -> None:
        if not (isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1):
            raise ValueError(f"lora.rank must be an integer >= 1 (e.g. 32), got {self.rank!r}")
        if not (_is_number(self.alpha) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(
                "lora.alpha must be a finite number > 0 (the update is scaled by alpha / rank), got "
                f"{self.alpha!r}"
            )
        if self.target_modules is not None and (
            isinstance(self.target_modules, str)
            or not self.target_modules
            or not all(isinstance(m, str) and m for m in self.target_modules)
        ):
            raise ValueError(
                "lora.target_modules must be a non-empty list of module names (e.g. [to_q, to_k, to_v, "
                "to_out.0]) or null (the backbone's), "
                f"got {self.target_modules!r}"
            )
        if not (_is_number(self.dropout) and self.dropout == 0.0):
            raise ValueError(
                "lora.dropout must be 0: the policy runs in eval mode so that the update recomputes exactly "
                "the rollout's mean (ratio 1 on-policy), so a LoRA dropout would never be applied; got "
                f"{self.dropout!r}"
            )
        if self.init not in LORA_INITS:
            # Inits that move base weights into the adapter (pissa, olora, ...) would change what "adapters
            # disabled" means, and the reference policy is the model with adapters disabled.
            raise ValueError(
                f"lora.init must be one of {LORA_INITS} (inits that keep B = 0, so the policy starts as the "
                f"base model and the reference is the base model), got {self.init!r}"
            )

    def for_backbone(self, backbone) -> LoraSpec:
        """This spec with null target_modules resolved to the backbone's `lora_targets()`."""
        if self.target_modules is not None:
            return self
        return dataclasses.replace(self, target_modules=list(backbone.lora_targets()))

    def to_peft_config(self) -> LoraConfig:
        if self.target_modules is None:
            raise ValueError("lora.target_modules is null: resolve it with LoraSpec.for_backbone(backbone)")
        init = True if self.init == "default" else self.init
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.target_modules),
            lora_dropout=self.dropout,
            init_lora_weights=init,
        )
